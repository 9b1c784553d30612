"""One process's side of the shared scheduler state: what it tells its
peers, and what it takes from theirs.

Peers are this gateway's other workers and the other gateways' processes.
Each process's inference scorer only sees what it did itself: the prompts
it sent where (the prefix index), its requests in flight and prefill
pending per backend, and its own latency samples. A ``SchedulerShare``
collects those events as they happen and sends them as one batch
(``wire.py``) at most every ``flush_seconds`` while there is something to
send, so a peer sees a change within about twice that. From peers it
applies:

- prefix additions as if this process had sent them (``index.add``), so
  the next turn of a conversation finds its prefix whichever process takes
  it;
- loads, kept per peer and summed into ``Backend.peer_in_flight`` and
  ``Backend.peer_prefill``: the scorer's load terms, never the local
  ``in_flight`` that limits and admission count;
- latency samples, into the backend's model, so every process predicts
  from all the traffic.

A peer that is dropped (its worker ended: ``drop``) or silent for
``peer_timeout`` seconds loses its loads here. Each process says something
at least every ``heartbeat_seconds`` (its loads) so silence means gone.

On the request path this costs an append and a flag; encoding happens in
the flush. Pure logic over an injected clock: the transport is ``send``.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import attrs
from twisted.logger import Logger

from ntonix.routing.backend import Backend
from ntonix.share.wire import (MAX_BLOCKS_PER_BATCH, MAX_PREFIX_ENTRIES, MAX_SAMPLES, BadBatch,
                               check_batch, encode_blocks)

log = Logger(namespace="ntonix.share")

FLUSH_SECONDS = 0.005
HEARTBEAT_SECONDS = 1.0
PEER_TIMEOUT_SECONDS = 3.0
# Peers remembered at once; more (a hostile Redis inventing them) are refused.
MAX_PEERS = 1024
MAX_PEER_ID = 200


@attrs.define(eq=False)
class Peer:
    seen_at: float
    loads: Dict[str, Tuple[int, int]] = attrs.Factory(dict)
    batches: int = 0


class SchedulerShare:
    def __init__(self, clock: Any, backends: Callable[[], Sequence[Backend]],
                 index: Callable[[], Any], send: Callable[[Dict[str, Any]], None],
                 flush_seconds: float = FLUSH_SECONDS,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 peer_timeout: float = PEER_TIMEOUT_SECONDS) -> None:
        self.clock = clock
        # Getters: SIGHUP swaps the backend list and may swap the balancer.
        self._backends = backends
        self._index = index
        self.send = send
        self.flush_seconds = flush_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.peer_timeout = peer_timeout
        # Collected since the last flush.
        self._prefixes: List[Tuple[str, Sequence[int]]] = []
        self._blocks = 0
        self._ttft: List[Tuple[str, float, float, float]] = []
        self._tpot: List[Tuple[str, float, float]] = []
        self._loads_dirty = False
        self._flush_call: Any = None
        self._heartbeat_call: Any = None
        self._sent_loads: Dict[str, List[int]] = {}
        self._loads_sent_at = float("-inf")
        # From peers.
        self.peers: Dict[str, Peer] = {}
        self._totals: Dict[str, List[int]] = {}
        self._list: Any = None
        self._by_name: Dict[str, Backend] = {}
        # The Redis bus, for a single process (its state in GET /backends).
        self.bus: Any = None
        # Counters (GET /backends).
        self.sent = 0
        self.applied = 0
        self.rejected = 0
        self._warned_bad = False
        self._warned_full = False

    # -- what this process did (the request path: keep it cheap)
    def picked(self, backend: Backend, hashes: Sequence[int]) -> None:
        """The scorer sent a prompt with ``hashes`` to ``backend``."""
        if hashes and len(self._prefixes) < MAX_PREFIX_ENTRIES \
                and self._blocks + len(hashes) <= MAX_BLOCKS_PER_BATCH:
            # Within what a peer takes (beyond, a burst's tail is not shared).
            self._blocks += len(hashes)
            self._prefixes.append((backend.name, hashes))
        self._loads_dirty = True
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(self.flush_seconds, self.flush)

    def loads_changed(self) -> None:
        """A backend's in-flight count or pending prefill changed here."""
        self._loads_dirty = True
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(self.flush_seconds, self.flush)

    def ttft(self, backend: Backend, uncached: float, ahead: float, seconds: float) -> None:
        """A first token came (the prefill is over: the loads changed too)."""
        if len(self._ttft) < MAX_SAMPLES:
            self._ttft.append((backend.name, uncached, ahead, seconds))
        self.loads_changed()

    def tpot(self, backend: Backend, running: float, seconds: float) -> None:
        if len(self._tpot) < MAX_SAMPLES:
            self._tpot.append((backend.name, running, seconds))
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(self.flush_seconds, self.flush)

    # -- sending
    def _loads(self) -> Dict[str, List[int]]:
        return {b.name: [b.in_flight, max(0, b.pending_prefill)] for b in self._backends()
                if b.in_flight or b.pending_prefill > 0}

    def flush(self) -> None:
        """Send what was collected since the last flush (the timer's call)."""
        self._flush_call = None
        batch: Dict[str, Any] = {}
        if self._index() is not None:
            if self._prefixes:
                batch["prefixes"] = [[name, encode_blocks(hashes)]
                                     for name, hashes in self._prefixes]
            # Lists, as they read back from JSON (an in-process peer too).
            if self._ttft:
                batch["ttft"] = [list(t) for t in self._ttft]
            if self._tpot:
                batch["tpot"] = [list(t) for t in self._tpot]
        # else: the balancer is no longer the scorer (a reload): only loads.
        self._prefixes, self._ttft, self._tpot = [], [], []
        self._blocks = 0
        if self._loads_dirty:
            self._loads_dirty = False
            loads = self._loads()
            if loads != self._sent_loads:
                batch["loads"] = self._sent_loads = loads
        if batch:
            self._send(batch)

    def _send(self, batch: Dict[str, Any]) -> None:
        if "loads" in batch:
            self._loads_sent_at = self.clock.seconds()
        self.sent += 1
        try:
            self.send(batch)
        except Exception:
            log.failure("sending scheduler events to the peers")

    def start(self) -> None:
        if self._heartbeat_call is None:
            self._heartbeat_call = self.clock.callLater(self.heartbeat_seconds, self._heartbeat)

    def stop(self) -> None:
        for call in (self._flush_call, self._heartbeat_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._heartbeat_call = None

    def _heartbeat(self) -> None:
        self._heartbeat_call = self.clock.callLater(self.heartbeat_seconds, self._heartbeat)
        try:
            now = self.clock.seconds()
            if now - self._loads_sent_at >= self.heartbeat_seconds * 0.999:
                # Silence would read as gone, and a batch lost on the way
                # (Redis) would leave an old view: say the loads again.
                self._sent_loads = self._loads()
                self._send({"loads": self._sent_loads})
            self.expire(now)
        except Exception:
            log.failure("scheduler share heartbeat")

    # -- applying peers' batches
    def _backend_map(self) -> Dict[str, Backend]:
        backends = self._backends()
        if backends is not self._list:
            # The list changed (a reload): new backends get the peers'
            # totals, whichever came first.
            self._list = backends
            self._by_name = {b.name: b for b in backends}
            for name, b in self._by_name.items():
                n, prefill = self._totals.get(name, (0, 0))
                b.peer_in_flight, b.peer_prefill = n, prefill
        return self._by_name

    def apply(self, peer_id: Any, doc: Any) -> bool:
        """A peer's batch; False when it was refused (and why is logged once)."""
        try:
            if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID:
                raise BadBatch("a peer id that is not a short string")
            batch = check_batch(doc)
        except BadBatch as e:
            self._refused(str(e), peer_id if isinstance(peer_id, str) else "?")
            return False
        now = self.clock.seconds()
        peer = self.peers.get(peer_id)
        if peer is None:
            if len(self.peers) >= MAX_PEERS:
                if not self._warned_full:
                    self._warned_full = True
                    log.warn("scheduler share: more than {n} peers; the others' events are "
                             "ignored", n=MAX_PEERS)
                self.rejected += 1
                return False
            peer = self.peers[peer_id] = Peer(now)
            log.info("scheduler peer {peer} joined", peer=peer_id)
        peer.seen_at = now
        peer.batches += 1
        self.applied += 1
        by_name = self._backend_map()
        index = self._index()
        if index is not None:
            for name, hashes in batch.prefixes:
                b = by_name.get(name)
                if b is not None and hashes:
                    index.add(b, hashes)
        if batch.loads is not None:
            self._set_loads(peer, {n: v for n, v in batch.loads.items() if n in by_name},
                            by_name)
        for name, uncached, ahead, seconds in batch.ttft:
            b = by_name.get(name)
            if b is not None:
                b.latency.observe_ttft(uncached, ahead, seconds)
        for name, running, seconds in batch.tpot:
            b = by_name.get(name)
            if b is not None:
                b.latency.observe_tpot(running, seconds)
        return True

    def _refused(self, why: str, peer_id: str) -> None:
        self.rejected += 1
        if not self._warned_bad:
            self._warned_bad = True
            log.warn("scheduler share: a batch from {peer} refused ({why}); later ones are "
                     "only counted", peer=peer_id[:MAX_PEER_ID], why=why)

    def _set_loads(self, peer: Peer, loads: Dict[str, Tuple[int, int]],
                   by_name: Dict[str, Backend]) -> None:
        old = peer.loads
        if old == loads:
            return
        peer.loads = loads
        totals = self._totals
        for name in set(old) | set(loads):
            o, n = old.get(name, (0, 0)), loads.get(name, (0, 0))
            t = totals.get(name)
            if t is None:
                t = totals[name] = [0, 0]
            t[0] += n[0] - o[0]
            t[1] += n[1] - o[1]
            if t == [0, 0]:
                del totals[name]
            b = by_name.get(name)
            if b is not None:
                b.peer_in_flight, b.peer_prefill = t[0], t[1]

    def drop(self, peer_id: Any, why: str = "gone") -> None:
        """A peer left (its worker ended, its gateway's Redis went quiet):
        its loads no longer count."""
        peer = self.peers.pop(peer_id, None) if isinstance(peer_id, str) else None
        if peer is None:
            return
        self._set_loads(peer, {}, self._backend_map())
        log.info("scheduler peer {peer} dropped ({why})", peer=peer_id, why=why)

    def expire(self, now: Optional[float] = None) -> None:
        now = self.clock.seconds() if now is None else now
        for peer_id, peer in list(self.peers.items()):
            if now - peer.seen_at > self.peer_timeout:
                self.drop(peer_id, f"silent for {now - peer.seen_at:.1f}s")

    def as_json(self) -> Dict[str, Any]:
        doc = {"peers": sorted(self.peers), "batches_sent": self.sent,
               "batches_applied": self.applied, "batches_refused": self.rejected}
        if self.bus is not None:
            doc["redis"] = self.bus.as_json()
        return doc
