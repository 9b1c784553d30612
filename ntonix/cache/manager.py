"""The cache as the request path sees it: the policy for one request, the
store of complete answers, and the map of answers being generated."""

from typing import Any, Callable, Dict, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ntonix.cache.flight import Flight, Replay, converted_entry, feed_from_entry
from ntonix.cache.redis_client import RedisClient
from ntonix.cache.sealed import Seal
from ntonix.cache.shared import Follower, Publisher, SharedTier
from ntonix.cache.store import Entry
from ntonix.cache.convert import with_usage_as_asked
from ntonix.cache.key import cache_key, convertible, is_sampled
from ntonix.cache.store import ResponseStore
from ntonix.config import CacheConfig
from ntonix.http.request import Request
from ntonix.observe.access import annotate

log = Logger(namespace="ntonix.cache")

MB = 1024 * 1024
HIT, MISS, BYPASS = b"HIT", b"MISS", b"BYPASS"


@attrs.frozen
class Decision:
    """What the cache does for one request."""

    label: bytes  # the X-Cache answer when it goes upstream
    key: Optional[bytes] = None
    lookup: bool = False  # may be answered from the store or an in-flight twin
    store: bool = False  # its complete answer may be kept
    stream: bool = False  # the client asked for SSE
    model: Optional[str] = None
    include_usage: bool = False  # ... with a usage chunk (stream_options)


def cache_control(request: Request) -> set:
    tokens = set()
    for value in request.requestHeaders.getRawHeaders(b"cache-control", []):
        tokens.update(t.strip().lower().split(b"=")[0] for t in value.split(b","))
    return tokens


class ResponseCache:
    def __init__(self, config: CacheConfig, clock: Any) -> None:
        self.clock = clock
        self.config = config
        self.store = ResponseStore(int(config.max_size_mb * MB), config.ttl_seconds,
                                   int(config.max_entry_mb * MB), clock.seconds)
        self.flights: Dict[bytes, Flight] = {}
        # (model, usage, times=1): the tokens a hit saved (set by the gateway).
        self.on_saved: Optional[Callable[..., None]] = None
        self.shared: Optional[SharedTier] = None
        # request -> the keyed hash of its credential (set by the gateway,
        # which holds the deployment's secret).
        self.credential_hash: Callable[[Any], bytes] = lambda request: b""
        if config.redis_url:
            client = RedisClient.from_url(
                clock, config.redis_url, ca_file=config.redis_ca_file or None,
                connect_timeout=max(0.2, config.redis_timeout_seconds * 5),
                command_timeout=config.redis_timeout_seconds)
            self.shared = SharedTier(client, config.redis_prefix, clock,
                                     config.redis_lease_seconds,
                                     Seal(config.redis_secret.encode("utf-8")))

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def stats(self) -> Any:
        return self.store.stats

    def reconfigure(self, config: CacheConfig) -> None:
        self.config = config
        s = self.store
        s.max_bytes = int(config.max_size_mb * MB)
        s.ttl = config.ttl_seconds
        s.max_entry_bytes = int(config.max_entry_mb * MB)
        if not config.enabled:
            s.clear()

    def decide(self, route: str, doc: dict, stream: bool, request: Request) -> Decision:
        cc = cache_control(request)
        if b"no-store" in cc:
            self.stats.bypasses += 1
            return Decision(BYPASS)
        if is_sampled(doc) and not self.config.sampled:
            # A fresh random draw was asked for, as a "regenerate" button does.
            self.stats.bypasses += 1
            return Decision(BYPASS)
        credential = self.credential_hash(request)
        if not self.config.cross_format:
            fmt = b"sse" if stream else b"json"
        elif convertible(doc):
            fmt = b"any"
        else:
            # n > 1: served only as it came, under a key of its own format.
            self.stats.unconvertible += 1
            fmt = b"sse" if stream else b"json"
        key = cache_key(route, doc, credential, self.config.scope, fmt)
        options = doc.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        model = doc.get("model") if isinstance(doc.get("model"), str) else None
        if b"no-cache" in cc:
            self.stats.bypasses += 1
            return Decision(BYPASS, key, lookup=False, store=True, stream=stream,
                            include_usage=usage, model=model)
        return Decision(MISS, key, lookup=True, store=True, stream=stream, include_usage=usage,
                        model=model)

    def answer_from_cache(self, decision: Decision, request: Request) -> bool:
        """Answer ``request`` from the store or by joining its twin in flight."""
        assert decision.key is not None
        entry = self.store.get(decision.key)
        if entry is not None and entry.sse != decision.stream:
            # Stored in the other framing: served converted when it converts
            # faithfully; otherwise a miss, whose answer replaces it.
            entry = converted_entry(entry, decision.stream, decision.include_usage)
            if entry is None:
                self.stats.unconvertible += 1
            else:
                self.stats.converted += 1
        elif entry is not None and entry.sse:
            # The same framing: the usage chunk as this client asked for it.
            events = with_usage_as_asked(entry.chunks, decision.include_usage, entry.usage)
            if events is not None:
                entry = attrs.evolve(entry, chunks=events, times=None)
        if entry is not None:
            self.stats.hits += 1
            if self.on_saved is not None:
                self.on_saved(decision.model, entry.usage)
            annotate(request, cache="HIT", sse=entry.sse)
            Replay(entry, request, self.clock, self.config.replay == "paced").start()
            return True
        flight = self.flights.get(decision.key)
        if flight is not None and flight.joinable:
            self.stats.coalesced += 1
            flight.joined += 1
            annotate(request, cache="HIT")
            if flight.stream == decision.stream:
                flight.join(request, HIT, decision.include_usage)
            else:
                self.stats.converted += 1
                flight.join_converting(request, decision.stream, decision.include_usage)
            return True
        self.stats.misses += 1
        return False

    def new_flight(self, decision: Decision) -> Flight:
        assert decision.key is not None
        flight = Flight(decision.key, self.store, self.clock, self._landed,
                        stream=decision.stream, model=decision.model, on_saved=self.on_saved)
        # A no-cache request gets its own fresh answer; it does not displace
        # a twin already in flight under the same key.
        self.flights.setdefault(decision.key, flight)
        return flight

    def resolve_shared(self, decision: Decision, flight: Flight,
                       go_upstream: Callable[[], None]) -> None:
        """A local miss with a Redis tier: feed ``flight`` from a stored
        entry, from another gateway's answer in flight, or lead: call
        ``go_upstream`` (also when Redis is unusable)."""
        shared = self.shared
        assert shared is not None and decision.key is not None
        key = decision.key
        takeovers = [0]

        def wanted() -> bool:
            return bool(flight.subscribers) and not flight.failed

        def upstream() -> None:
            if wanted():
                go_upstream()

        def lead(token: bytes) -> None:
            if not wanted():
                shared.release(key, token)  # nobody to ask for: let others lead
                return
            shared.led += 1
            go_upstream()
            if flight.failed or flight.ended or not flight.subscribers:
                shared.release(key, token)  # it failed at once (no backend)
                return
            flight.publisher = Publisher(shared, key, token, self.store.ttl)

        def leased(result: tuple) -> None:
            ours, token = result
            if ours is None:
                upstream()  # Redis unusable: this gateway alone
            elif ours:
                lead(token)
            elif token is None or takeovers[0] > 2:
                upstream()  # the lease went as we looked, or leaders keep dying
            elif wanted():
                Follower(shared, key, token, flight, take_over).start()

        def take_over() -> None:
            takeovers[0] += 1
            shared.acquire(key).addCallback(leased).addErrback(broken)

        def found(entry: Optional[Entry]) -> None:
            if entry is None:
                shared.acquire(key).addCallback(leased).addErrback(broken)
                return
            self.stats.hits += 1
            self.stats.misses -= 1  # counted as a miss before Redis was asked
            if self.on_saved is not None:
                self.on_saved(decision.model, entry.usage)
            for sub in flight.subscribers:
                sub.cache_status = HIT
            feed_from_entry(flight, entry)

        def broken(failure: Any) -> None:
            # A bug of ours: its clients get an error, not a hang.
            log.failure("the shared cache tier", failure)
            if flight.publisher is not None:
                flight.publisher.abandon()
            if not flight.ended and not flight.failed:
                flight.fail(500, "internal gateway error", "internal_error", False)

        shared.get(key).addCallback(found).addErrback(broken)

    def _landed(self, flight: Flight) -> None:
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]

    def as_json(self) -> dict:
        doc = self.store.as_json(self.enabled)
        doc["in_flight"] = len(self.flights)
        if self.shared is not None:
            doc["shared"] = self.shared.as_json()
        return doc


class CacheSweeper(Service):
    """Drops expired entries now and then; reads also skip them lazily."""

    def __init__(self, cache: ResponseCache, clock: Any, interval: float = 30.0) -> None:
        self.cache = cache
        self.loop = LoopingCall(self._sweep)
        self.loop.clock = clock
        self.interval = interval

    def _sweep(self) -> None:
        try:
            n = self.cache.store.sweep()
            if n:
                log.debug("swept {n} expired cache entries", n=n)
        except Exception:
            log.failure("sweeping the cache")

    def startService(self) -> None:
        super().startService()
        self.loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self.loop.running:
            self.loop.stop()
