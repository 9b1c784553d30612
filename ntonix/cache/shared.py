"""The Redis tier: one cache and one answer in flight per question across
every gateway process sharing a Redis.

The in-process cache stays the first tier. On a local miss the gateway asks
Redis, within ``cache.redis_timeout_seconds``:

1. a stored entry (``<prefix>e:<key>``, written with the entry's TTL): it is
   kept locally too and replayed, as a local hit is;
2. otherwise a lease (``SET <prefix>l:<key> <id> NX PX``): the gateway that
   gets it sends the request to a backend and publishes the answer as it
   arrives to a capped Redis Stream (``<prefix>s:<key>``: a head record, one
   record per chunk, an end record), renewing its lease while it works; a
   complete 200 is stored as an entry;
3. a lease held elsewhere: the gateway follows that leader's stream with
   blocking reads and relays it live, so a follower's first token comes a
   few ms after the leader's. When the stream goes quiet and the lease is
   gone (the leader died), the follower takes over and asks a backend itself.

Every local request for the same question meanwhile joins the local flight
that this feeds, exactly as without Redis.

Redis never fails a request: each call is bounded; after
``FAILURES_TO_OPEN`` failures in a row the tier stops asking Redis for
``OPEN_SECONDS`` (the gateway serves from its own tier, ``/health`` says
degraded, once in the log), then tries again.

Redis is not trusted (``sealed.py``): entries and live records carry an
HMAC under ``cache.redis_secret`` and every field is checked before a byte
reaches a client. An entry that fails is a miss, counted
(``ntonix_redis_rejected_total``) and deleted; a record that fails ends the
following, as a leader's death does: the follower asks a backend itself, or
ends its clients' answers when part of one is out. Entries are a JSON head
(status, headers, framing, chunk sizes, pacing, usage) and the chunks'
bytes after it: nothing executable, so a shared Redis cannot make a gateway
run anything.
"""

import hashlib
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from ntonix.cache.flight import NoProducer, RemoteExchange, RemoteResponse
from ntonix.cache.redis_client import RedisError
from ntonix.cache.sealed import (MALFORMED, Record, Seal, decode_entry, decode_head,
                                 encode_entry, encode_head)
from ntonix.cache.store import Entry

if TYPE_CHECKING:
    from ntonix.cache.flight import Flight

log = Logger(namespace="ntonix.cache.shared")

FAILURES_TO_OPEN = 3
OPEN_SECONDS = 5.0
# Stream records kept per answer (approximate trim): far more than any
# answer's chunks; followers start from the first record.
STREAM_MAXLEN = 100_000
# Renew or delete a lease only while it is still ours.
_RENEW = (b"if redis.call('get', KEYS[1]) == ARGV[1] then "
          b"return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
_RELEASE = (b"if redis.call('get', KEYS[1]) == ARGV[1] then "
            b"return redis.call('del', KEYS[1]) else return 0 end")
# Delete a refused entry only while it is the bytes refused (by their SHA-1):
# a good one stored meanwhile stays.
_DELETE_IF = (b"local v = redis.call('get', KEYS[1]) "
              b"if v and redis.sha1hex(v) == ARGV[1] then "
              b"return redis.call('del', KEYS[1]) else return 0 end")
# A lease's value as SharedTier.acquire makes it; anything else names no
# stream a gateway writes.
_TOKEN = re.compile(rb"[0-9a-f]{16}-[0-9]{1,20}")
# Refusals are logged at most this often (an attacker controls their rate).
REJECT_LOG_SECONDS = 60.0
# A follower's blocking read, and how long a silent stream is waited for
# before checking whether its leader still holds the lease.
READ_BLOCK_MS = 1000


__all__ = ["SharedTier", "Publisher", "Follower", "encode_entry", "decode_entry"]


class SharedTier:
    def __init__(self, client: Any, prefix: str, clock: Any, lease_seconds: float,
                 seal: Optional[Seal] = None) -> None:
        self.client = client
        self.prefix = prefix.encode()
        self.clock = clock
        self.seal = seal if seal is not None else Seal()
        self.lease_ms = max(100, int(lease_seconds * 1000))
        self.id = os.urandom(8).hex().encode()  # this gateway, in lease values
        self.failures = 0
        self.open_until = 0.0
        self.degraded = False
        self.errors = 0
        self.hits = 0
        self.led = 0
        self.followed = 0
        self.takeovers = 0
        self.leases = 0
        # (entry or record, reason) -> refusals; see sealed.py.
        self.rejected: Dict[Tuple[str, str], int] = {}
        self._rejected_logged_at = float("-inf")
        self._rejected_unlogged = 0

    # -- health
    @property
    def usable(self) -> bool:
        return self.clock.seconds() >= self.open_until

    def _ok(self, result: Any) -> Any:
        self.failures = 0
        if self.degraded:
            self.degraded = False
            log.info("redis answers again: the shared cache tier is back")
        return result

    def _failed(self, failure: Any, what: str) -> None:
        self.errors += 1
        self.failures += 1
        if self.failures >= FAILURES_TO_OPEN:
            self.open_until = self.clock.seconds() + OPEN_SECONDS
            if not self.degraded:
                self.degraded = True
                log.warn("redis unusable ({why}, during {what}): serving from this gateway's "
                         "own cache; trying again every {s:g}s", why=failure.getErrorMessage(),
                         what=what, s=OPEN_SECONDS)
        return None

    def _call(self, what: str, *args: Any, wrong_type: bool = False) -> "defer.Deferred[Any]":
        """One command; fires with its reply, or None on any failure.
        ``wrong_type``: a WRONGTYPE reply is the RedisError itself, not a
        failure (Redis answers; a key holds what no gateway wrote there)."""
        if not self.usable:
            return defer.succeed(None)
        d = self.client.execute(*args)

        def failed(failure: Any) -> Any:
            if wrong_type and failure.check(RedisError) \
                    and str(failure.value).startswith("WRONGTYPE"):
                return self._ok(failure.value)
            return self._failed(failure, what)

        d.addCallbacks(self._ok, failed)
        return d

    def _key(self, kind: bytes, key: bytes) -> bytes:
        return self.prefix + kind + b":" + key.hex().encode()

    def reject(self, what: str, why: str) -> None:
        """Count an entry or record refused; say so in the log now and then
        (never its bytes: they may be anybody's)."""
        self.rejected[(what, why)] = self.rejected.get((what, why), 0) + 1
        self._rejected_unlogged += 1
        now = self.clock.seconds()
        if now - self._rejected_logged_at >= REJECT_LOG_SECONDS:
            log.warn("redis: refused {n} {what}(s) since the last report, the latest {why}: "
                     "served as a miss (someone else writes to this Redis, or with another "
                     "cache.redis_secret)", n=self._rejected_unlogged, what=what, why=why)
            self._rejected_logged_at = now
            self._rejected_unlogged = 0

    # -- entries
    def get(self, key: bytes) -> "defer.Deferred[Optional[Entry]]":
        """The stored entry, or None (none, or Redis unusable)."""
        if not self.usable:
            return defer.succeed(None)
        ekey = self._key(b"e", key)
        # Pipelined: one round trip. _call never errbacks.
        d = defer.gatherResults([self._call("a lookup", b"GET", ekey, wrong_type=True),
                                 self._call("a lookup", b"PTTL", ekey)])

        def got(replies: List[Any]) -> Optional[Entry]:
            data, pttl = replies
            if data is None or not isinstance(pttl, int):
                return None  # none stored, or Redis failed
            if not isinstance(data, bytes):
                # Not a string (WRONGTYPE): not a gateway's either.
                self.reject("entry", MALFORMED)
                self._call("deleting a refused entry", b"DEL", ekey)
                return None
            ttl_left = pttl / 1000.0 if pttl >= 0 else float("inf")
            entry, why = self.seal.open_entry(ekey, data, self.clock.seconds(), ttl_left)
            if why is not None:
                self.reject("entry", why)
                self._call("deleting a refused entry", b"EVAL", _DELETE_IF, 1, ekey,
                           hashlib.sha1(data).hexdigest())
                return None
            self.hits += 1
            return entry

        return d.addCallback(got)

    def put(self, key: bytes, entry: Entry, ttl: float) -> None:
        ms = int(ttl * 1000)
        if ms <= 0:
            return
        ekey = self._key(b"e", key)
        self._call("a store", b"SET", ekey, self.seal.seal_entry(ekey, entry, ttl), b"PX", ms)

    # -- leases: the value is a token naming this leader's stream
    def acquire(self, key: bytes) -> "defer.Deferred[Tuple[Optional[bool], Optional[bytes]]]":
        """(True, token): ours; (False, token): another gateway leads, its
        stream named by token (None: the lease just went); (None, None):
        Redis unusable."""
        self.leases += 1
        token = self.id + b"-%d" % self.leases
        lkey = self._key(b"l", key)
        d = self._call("a lease", b"SET", lkey, token, b"NX", b"PX", self.lease_ms)

        def taken(reply: Any) -> Any:
            if reply == "OK" or reply == b"OK":
                return (True, token)
            if reply is None and not self.usable:
                return (None, None)
            return self._call("a lease", b"GET", lkey).addCallback(
                lambda held: (None, None) if held is None and not self.usable
                else (False, _token(held)))

        return d.addCallback(taken)

    def renew(self, key: bytes, token: bytes) -> None:
        self._call("a lease renewal", b"EVAL", _RENEW, 1, self._key(b"l", key), token,
                   self.lease_ms)

    def release(self, key: bytes, token: bytes) -> None:
        # Only our own: an expired lease may already be someone else's.
        self._call("a lease release", b"EVAL", _RELEASE, 1, self._key(b"l", key), token)

    def leader(self, key: bytes) -> "defer.Deferred[Optional[bytes]]":
        """The current lease's token (None: no lease, or Redis unusable)."""
        d = self._call("a lease check", b"GET", self._key(b"l", key))
        return d.addCallback(_token)

    # -- the live stream of an answer (one per lease)
    def _stream(self, key: bytes, token: bytes) -> bytes:
        return self._key(b"s", key) + b":" + token

    def publish(self, key: bytes, token: bytes, seq: int, kind: bytes, data: bytes = b"") -> None:
        stream = self._stream(key, token)
        n = b"%d" % seq
        self._call("publishing", b"XADD", stream, b"MAXLEN", b"~", STREAM_MAXLEN, b"*",
                   b"k", kind, b"n", n, b"d", data,
                   b"m", self.seal.record_tag(stream, n, kind, data))

    def expire_stream(self, key: bytes, token: bytes, seconds: float) -> None:
        self._call("expiring a stream", b"PEXPIRE", self._stream(key, token),
                   max(1000, int(seconds * 1000)))

    def read(self, key: bytes, token: bytes,
             after: bytes) -> "defer.Deferred[Optional[List[Optional[Record]]]]":
        """Records after id ``after`` (``0`` from the start), waiting up to
        READ_BLOCK_MS for new ones: a list of Records, a refused one as None
        and the last (counted here); [] when none came, None when Redis
        failed."""
        if not self.usable:
            return defer.succeed(None)
        stream = self._stream(key, token)
        d = self.client.blocking(b"XREAD", b"BLOCK", READ_BLOCK_MS, b"STREAMS", stream, after,
                                 timeout=READ_BLOCK_MS / 1000.0 + 1.0)

        def parse(reply: Any) -> List[Optional[Record]]:
            # XREAD's reply: [[stream, [[id, [field, value, ...]], ...]]].
            out: List[Optional[Record]] = []
            if not isinstance(reply, list):
                return out
            for item in reply:
                if not isinstance(item, list) or len(item) != 2 \
                        or not isinstance(item[1], list):
                    return self._refused(out, MALFORMED)
                for r in item[1]:
                    if not isinstance(r, list) or len(r) != 2:
                        return self._refused(out, MALFORMED)
                    record, why = self.seal.open_record(stream, r[0], r[1])
                    if why is not None:
                        return self._refused(out, why)
                    out.append(record)
            return out

        d.addCallbacks(self._ok, self._failed, errbackArgs=("following a leader",))
        d.addCallback(lambda r: None if r is None and not self.usable else parse(r))
        return d

    def _refused(self, out: List[Optional[Record]], why: str) -> List[Optional[Record]]:
        self.reject("record", why)
        out.append(None)
        return out

    def as_json(self) -> dict:
        return {"state": "degraded" if self.degraded else "ok", "errors": self.errors,
                "hits": self.hits, "led": self.led, "followed": self.followed,
                "takeovers": self.takeovers, "rejected": sum(self.rejected.values()),
                "authenticated": self.seal.authenticated}


def _token(value: Any) -> Optional[bytes]:
    """A lease's value when it is one a gateway makes, else None."""
    return value if isinstance(value, bytes) and _TOKEN.fullmatch(value) else None


class Publisher:
    """The leader's side: mirrors a local flight into its lease's stream,
    numbered so that a follower notices a lost record, then stores the
    entry and lets the lease go."""

    def __init__(self, tier: SharedTier, key: bytes, token: bytes, ttl: float) -> None:
        self.tier = tier
        self.key = key
        self.token = token
        self.ttl = ttl
        self.seq = 0
        self.renew_call: Any = None
        self.stopped = False
        self._schedule_renewal()

    def _schedule_renewal(self) -> None:
        half = self.tier.lease_ms / 2000.0
        self.renew_call = self.tier.clock.callLater(half, self._renew)

    def _renew(self) -> None:
        if not self.stopped:
            self.tier.renew(self.key, self.token)
            self._schedule_renewal()

    def _publish(self, kind: bytes, data: bytes = b"") -> None:
        self.tier.publish(self.key, self.token, self.seq, kind, data)
        self.seq += 1

    def head(self, code: int, phrase: bytes, headers: list, sse: bool) -> None:
        self._publish(b"head", encode_head(code, phrase, headers, sse))
        # A leader that dies mid-answer leaves a stream that expires anyway.
        self.tier.expire_stream(self.key, self.token, 6 * self.tier.lease_ms / 1000.0)

    def chunk(self, data: bytes) -> None:
        if not self.stopped:
            self._publish(b"data", data)

    def end(self, complete: bool, entry: Optional[Entry]) -> None:
        """The answer ended (complete: whole, whatever its status); ``entry``
        when it is to be stored."""
        if self.stopped:
            return
        self.stopped = True
        if self.renew_call is not None and self.renew_call.active():
            self.renew_call.cancel()
        if entry is not None:
            self.tier.put(self.key, entry, self.ttl)
        self._publish(b"end" if complete else b"fail")
        self.tier.expire_stream(self.key, self.token, 30.0)
        self.tier.release(self.key, self.token)

    def abandon(self) -> None:
        """Too big to share, failed, or nobody wants it: followers take over
        (or end, when they have started)."""
        self.end(False, None)


class Follower:
    """Feeds a local flight from another gateway's live answer."""

    def __init__(self, tier: SharedTier, key: bytes, token: bytes, flight: "Flight",
                 take_over: Callable[[], None]) -> None:
        self.tier = tier
        self.key = key
        self.token = token
        self.flight = flight
        self.take_over = take_over
        self.last = b"0"
        self.expected = 0
        self.started = False
        self.done = False

    def start(self) -> None:
        self.tier.followed += 1
        self._next()

    def _next(self) -> None:
        if self.done:
            return
        if not self.flight.subscribers:
            self.done = True  # everyone left
            return
        d = self.tier.read(self.key, self.token, self.last)
        d.addCallback(self._got)
        d.addErrback(self._broken)

    def _broken(self, failure: Any) -> None:
        log.failure("following a shared answer", failure)
        if not self.done:
            self._give_up("an error in the gateway")

    def _got(self, records: Optional[list]) -> None:
        if self.done:
            return
        if records is None:
            return self._give_up("redis unusable")
        if not records:
            # Quiet: is the same leader still there?
            d = self.tier.leader(self.key)
            d.addCallback(lambda token: self._next() if token == self.token
                          else self._give_up("leader gone"))
            d.addErrback(self._broken)
            return
        for record in records:
            if record is None:
                # Nothing of it reaches a client: as if the leader had died.
                return self._give_up("a record of the shared answer failed its check")
            self.last = record.rid
            if record.seq != self.expected:
                return self._give_up("a record of the shared answer was lost")
            self.expected += 1
            if record.kind == b"head" and not self.started:
                head = decode_head(record.data)
                if head is None:
                    self.tier.reject("record", MALFORMED)
                    return self._give_up("the shared answer's head failed its check")
                self.started = True
                self.flight.commit(RemoteExchange(head.headers, head.sse),
                                   RemoteResponse(head.code, head.phrase), NoProducer())
            elif record.kind == b"data" and self.started:
                self.flight.write(record.data)
            elif record.kind == b"end" and self.started:
                self.done = True
                self.flight.end(True, None)
                return
            else:  # fail, a second head, or data or an end without a head
                return self._give_up("the leader's answer failed")
        self._next()

    def _give_up(self, why: str) -> None:
        self.done = True
        if self.started:
            # Part of the answer is out: it cannot be restarted from here.
            self.flight.end(False, f"the shared answer stopped: {why}")
            return
        self.tier.takeovers += 1
        log.info("following a shared answer: {why}; asking a backend", why=why)
        self.take_over()
