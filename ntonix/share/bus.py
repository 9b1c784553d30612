"""Between gateways: scheduler batches through a capped Redis Stream.

One publisher and one reader per gateway (the single process, or the
supervisor for all its workers). Each gateway has a random id; a record is
``{"g": id, "b": [[source, batch], ...], "x": [source, ...]}`` in the field
``d`` of ``<prefix>sched``: the batches of the gateway's processes since its
last record, and the processes that ended (``x``). Records are written with
``XADD MAXLEN ~`` and read with ``XREAD BLOCK`` from the last id seen.

Why a stream and not PUBLISH/SUBSCRIBE: the project's RESP client
(``cache/redis_client.py``) has no pub/sub (a subscribed connection answers
in its own shape and takes no other command), and it already has bounded
blocking reads on a pool of their own, which the Redis cache tier uses the
same way. A stream also lets a slow reader catch up on what it missed,
within the cap, instead of being cut off as a slow subscriber is.

Publishing never waits: one XADD is out at a time, and batches arriving
meanwhile go in the next record. Redis down: every call is bounded by the
client's timeouts; the gateway logs it once, drops the other gateways'
loads (it routes on its own view and its workers'), stops publishing, tries
to read again every ``RETRY_SECONDS`` and logs once more when Redis answers.
Nothing read back is trusted: record shape, sizes, ids and every batch
(``wire.check_batch``) are checked before a batch goes further.
"""

import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Set

from twisted.internet import defer
from twisted.logger import Logger

from ntonix.share.wire import BadBatch, check_batch

log = Logger(namespace="ntonix.share.redis")

STREAM = b"sched"
# Records kept: seconds of traffic for a dozen busy gateways, plenty for a
# reader a moment behind.
STREAM_MAXLEN = 2000
READ_BLOCK_MS = 1000
READ_COUNT = 64
RETRY_SECONDS = 1.0
# Bounds on what is read back.
MAX_RECORD_BYTES = 8 * 1024 * 1024
MAX_BATCHES_PER_RECORD = 256
MAX_ID = 64
_RECORD_ID = re.compile(rb"\d{1,20}-\d{1,20}")


class BadRecord(ValueError):
    pass


class RedisBus:
    def __init__(self, client: Any, prefix: str, clock: Any,
                 deliver: Callable[[str, Dict[str, Any]], None],
                 gone: Callable[[str], None],
                 gateway_id: Optional[str] = None) -> None:
        self.client = client
        self.key = prefix.encode() + STREAM
        self.clock = clock
        self.deliver = deliver  # (peer id, batch) of another gateway's process
        self.gone = gone  # peer id that left
        self.id = gateway_id or os.urandom(8).hex()
        self.up = True
        self.running = False
        self._queue: List[List[Any]] = []
        self._ended: List[str] = []
        self._sending = False
        self._last_id = b"$"  # only what is written from now on
        self._read_d: Optional[defer.Deferred] = None
        self._retry: Any = None
        # Other gateways' processes heard of, to drop when Redis goes.
        self._remote: Set[str] = set()
        self.published = 0
        self.received = 0
        self.refused = 0
        self._warned_bad = False

    # -- publishing
    def publish(self, source: str, batch: Dict[str, Any]) -> None:
        """A batch of one of this gateway's processes, for the others."""
        if not self.up or not self.running:
            return  # the reader finds out when Redis is back
        self._queue.append([source, batch])
        if not self._sending:
            self._send()

    def ended(self, source: str) -> None:
        """One of this gateway's processes ended: the others drop its loads."""
        if self.up and self.running:
            self._ended.append(source)
            if not self._sending:
                self._send()

    def _send(self) -> None:
        record = {"g": self.id, "b": self._queue[:MAX_BATCHES_PER_RECORD],
                  "x": self._ended[:MAX_BATCHES_PER_RECORD]}
        del self._queue[:MAX_BATCHES_PER_RECORD]
        del self._ended[:MAX_BATCHES_PER_RECORD]
        data = json.dumps(record, separators=(",", ":")).encode()
        self._sending = True
        self.published += 1
        d = self.client.execute(b"XADD", self.key, b"MAXLEN", b"~", STREAM_MAXLEN, b"*",
                                b"d", data)
        d.addCallbacks(self._sent, self._send_failed)

    def _sent(self, _: Any) -> None:
        self._sending = False
        self._became_up()
        if (self._queue or self._ended) and self.running:
            self._send()

    def _send_failed(self, failure: Any) -> None:
        self._sending = False
        self._queue, self._ended = [], []
        self._became_down(failure.getErrorMessage())

    # -- reading
    def start(self) -> None:
        self.running = True
        self._read()

    def stop(self) -> None:
        self.running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._read_d is not None:
            d, self._read_d = self._read_d, None
            d.cancel()

    def _read(self) -> None:
        self._retry = None
        if not self.running:
            return
        d = self.client.blocking(b"XREAD", b"COUNT", READ_COUNT, b"BLOCK", READ_BLOCK_MS,
                                 b"STREAMS", self.key, self._last_id,
                                 timeout=READ_BLOCK_MS / 1000.0 + 1.0)
        self._read_d = d
        d.addCallbacks(self._got, self._read_failed)

    def _got(self, reply: Any) -> None:
        self._read_d = None
        if not self.running:
            return
        self._became_up()
        try:
            self._records(reply)
        except Exception:
            log.failure("reading the other gateways' scheduler events")
        # Not from within this callback: a reply already there would nest.
        self._retry = self.clock.callLater(0, self._read)

    def _read_failed(self, failure: Any) -> None:
        self._read_d = None
        if not self.running or failure.check(defer.CancelledError):
            return
        self._became_down(failure.getErrorMessage())
        self._retry = self.clock.callLater(RETRY_SECONDS, self._read)

    def _records(self, reply: Any) -> None:
        if reply is None:
            return  # BLOCK ran out: nothing new
        if not isinstance(reply, list):
            raise BadRecord("XREAD answered something that is not a list")
        for stream in reply:
            if not isinstance(stream, list) or len(stream) != 2 \
                    or not isinstance(stream[1], list):
                self._bad("a stream entry of another shape")
                continue
            for record in stream[1][:READ_COUNT]:
                if not isinstance(record, list) or len(record) != 2 \
                        or not isinstance(record[0], bytes) \
                        or not _RECORD_ID.fullmatch(record[0]):
                    self._bad("a record without a valid id")
                    continue
                self._last_id = record[0]
                try:
                    self._record(record[1])
                except (BadRecord, BadBatch) as e:
                    self._bad(str(e))

    def _record(self, fields: Any) -> None:
        if not isinstance(fields, list) or len(fields) != 2 or fields[0] != b"d" \
                or not isinstance(fields[1], bytes):
            raise BadRecord("a record whose fields are not d=<bytes>")
        data = fields[1]
        if len(data) > MAX_RECORD_BYTES:
            raise BadRecord(f"a record over {MAX_RECORD_BYTES} bytes")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise BadRecord("a record that is not JSON") from None
        if not isinstance(doc, dict):
            raise BadRecord("a record that is not an object")
        gid, batches, ended = doc.get("g"), doc.get("b", []), doc.get("x", [])
        if not isinstance(gid, str) or not 0 < len(gid) <= MAX_ID:
            raise BadRecord("a record without a gateway id")
        if gid == self.id:
            return  # our own
        if not isinstance(batches, list) or len(batches) > MAX_BATCHES_PER_RECORD \
                or not isinstance(ended, list) or len(ended) > MAX_BATCHES_PER_RECORD:
            raise BadRecord("a record with too many or malformed batches")
        checked = []
        for item in batches:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str) \
                    or not 0 < len(item[0]) <= MAX_ID:
                raise BadRecord("a batch without its source")
            check_batch(item[1])  # raises BadBatch: the whole record is refused
            checked.append((f"{gid}/{item[0]}", item[1]))
        for source in ended:
            if not isinstance(source, str) or not 0 < len(source) <= MAX_ID:
                raise BadRecord("an ended source that is not a short string")
        self.received += 1
        for peer, batch in checked:
            self._remote.add(peer)
            self.deliver(peer, batch)
        for source in ended:
            peer = f"{gid}/{source}"
            self._remote.discard(peer)
            self.gone(peer)

    def _bad(self, why: str) -> None:
        self.refused += 1
        if not self._warned_bad:
            self._warned_bad = True
            log.warn("scheduler share: a record in Redis refused ({why}); later ones are "
                     "only counted", why=why)

    # -- up and down
    def _became_up(self) -> None:
        if not self.up:
            self.up = True
            log.info("scheduler share: Redis answers again; sharing with the other gateways")

    def _became_down(self, why: str) -> None:
        if self.up:
            self.up = False
            log.warn("scheduler share: Redis unavailable ({why}); routing on this gateway's "
                     "own view until it answers", why=why)
        # Only what is written from now on, once back: older loads are stale.
        self._last_id = b"$"
        remote, self._remote = self._remote, set()
        for peer in sorted(remote):
            self.gone(peer)

    def as_json(self) -> Dict[str, Any]:
        return {"gateway_id": self.id, "redis": "ok" if self.up else "unavailable",
                "records_published": self.published, "records_received": self.received,
                "records_refused": self.refused}
