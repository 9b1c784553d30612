"""One upstream answer shared by every client that asked the same question.

A ``Flight`` is the sink of one ``Exchange``: it keeps the answer's head and
its chunks as they arrive (one copy per group), and each client is a
``Subscriber`` that writes from that list at its own pace, as a push producer
on its own connection. A late joiner starts from the first chunk and then
follows the live ones. The upstream socket is paused only when every
subscriber is paused, so a slow joiner never slows the others or the backend,
while a lone slow client still pushes back on the backend as a direct relay
does. When the last client leaves, the upstream request is cancelled. A
complete 200 is stored in the cache.

A client that asked in the other framing (a plain request while a stream is
being generated, or the reverse) is a ``ConvertingSubscriber``: it gets the
whole answer, converted, when the flight ends.

A ``Replay`` answers a cache hit from a stored entry, at once or paced at the
recorded cadence.
"""

from typing import TYPE_CHECKING, Any, Callable, List, Optional

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from ntonix.cache.convert import json_to_sse, sse_to_json
from ntonix.cache.store import Entry, ResponseStore
from ntonix.http.request import Request
from ntonix.upstream.relay import answer_error, end_response, server_timing

if TYPE_CHECKING:
    from ntonix.upstream.connection import UpstreamResponse
    from ntonix.upstream.relay import Exchange

log = Logger(namespace="ntonix.cache.flight")

# Headers that describe one delivery, not the answer: never stored or shared.
PER_RESPONSE = frozenset({b"date", b"server", b"x-request-id", b"content-length", b"age"})


@implementer(IPushProducer)
class Subscriber:
    """One client of a flight, written to as fast as it reads."""

    def __init__(self, flight: "Flight", request: Request, cache_status: bytes,
                 include_usage: bool = False) -> None:
        self.flight = flight
        self.request = request
        self.cache_status = cache_status
        self.include_usage = include_usage  # what it asked, should it need converting
        self.index = 0
        self.paused = False
        self.started = False
        self.finished = False
        self.gone = False
        request.when_done(self._done)

    def _done(self, reason: Any) -> None:
        if reason is not None:
            self.gone = True
            self.flight.leave(self)

    # -- IPushProducer: the client's connection says when it wants more
    def pauseProducing(self) -> None:
        self.paused = True
        self.flight.subscriber_paused()

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()
        self.flight.subscriber_resumed()

    def stopProducing(self) -> None:
        self.paused = True

    def start(self) -> None:
        """Write the head once the flight has one."""
        if self.started or self.gone:
            return
        self.started = True
        f, req = self.flight, self.request
        req.setResponseCode(f.code, f.phrase)
        req.headers_out.extend(f.headers)
        if f.backend_shown and self.cache_status != b"HIT":
            # As for stored hits, a joiner is told it was served by the cache;
            # the access log still names the backend.
            req.addHeader(b"X-Backend", f.backend_shown.encode())
        req.addHeader(b"X-Cache", self.cache_status)
        if f.length is not None:
            req.addHeader(b"Content-Length", b"%d" % f.length)
        info = getattr(req, "info", None)
        if info is not None:
            # A joiner waited for the shared answer: that is upstream time.
            if info.upstream_sent_at is None:
                info.upstream_sent_at = info.received_at
            if info.upstream_head_at is None:
                info.upstream_head_at = f.committed_at
            info.backend = info.backend or f.backend_name
        server_timing(req)
        req.registerProducer(self, True)
        self.pump()

    def pump(self) -> None:
        if not self.started or self.gone or self.finished:
            return
        f = self.flight
        # request.write may pause us from inside (the socket buffer filled).
        while not self.paused and self.index < f.base + len(f.chunks):
            chunk = f.chunks[self.index - f.base]
            self.index += 1
            self.request.write(chunk)
        if f.ended and self.index >= f.base + len(f.chunks) and not self.paused:
            self.finished = True
            end_response(self.request, f.complete, f.sse, f.why)
            f.leave(self)

    def fail(self, status: int, message: str, code: str, retry_after: bool) -> None:
        if self.gone or self.finished:
            return
        self.finished = True
        info = self.request.info
        if info is not None:
            info.upstream_failed = True
        self.request.setHeader(b"X-Cache", self.cache_status)
        answer_error(self.request, status, message, code, retry_after)


def converted_entry(entry: Entry, stream: bool, include_usage: bool) -> Optional[Entry]:
    """``entry`` in the other framing, or None when it does not convert
    faithfully (see ``convert.py``)."""
    body = b"".join(entry.chunks)
    headers = [(n, v) for n, v in entry.headers
               if n.lower() not in (b"content-type", b"cache-control")]
    if stream:
        events = json_to_sse(body, include_usage)
        if events is None:
            return None
        # Paced replay spreads the events over the time the backend took.
        step = entry.duration / len(events) if events else 0.0
        return Entry(code=entry.code, phrase=entry.phrase,
                     headers=[(b"Content-Type", b"text/event-stream"),
                              (b"Cache-Control", b"no-cache"), *headers],
                     chunks=events, sse=True, stored_at=entry.stored_at,
                     expires_at=entry.expires_at,
                     times=[step * (i + 1) for i in range(len(events))],
                     duration=entry.duration, usage=entry.usage)
    data = sse_to_json(body, entry.usage)
    if data is None:
        return None
    return Entry(code=entry.code, phrase=entry.phrase,
                 headers=[(b"Content-Type", b"application/json"), *headers], chunks=[data],
                 sse=False, stored_at=entry.stored_at, expires_at=entry.expires_at,
                 duration=entry.duration, usage=entry.usage)


class RemoteResponse:
    """The response head of an answer not fetched by this gateway's exchange."""

    def __init__(self, code: int, phrase: bytes) -> None:
        self.code, self.phrase, self.length = code, phrase, None


class RemoteExchange:
    """What a flight asks of its exchange, for an answer from elsewhere (the
    shared store, another gateway)."""

    remote = True  # its framing is whatever the first asker elsewhere asked

    def __init__(self, headers: list, sse: bool) -> None:
        self.headers = headers
        self.sse = sse
        self.backend_name = None
        self.shown_backend = None

    def response_headers(self) -> list:
        return self.headers

    def cancel(self) -> None:
        pass


class NoProducer:
    """Nothing to pause: the answer is already here, or paced elsewhere."""

    def pauseProducing(self) -> None:
        pass

    resumeProducing = stopProducing = pauseProducing


def feed_from_entry(flight: "Flight", entry: Entry) -> None:
    """Play a stored entry into ``flight`` as if an exchange answered it."""
    flight.commit(RemoteExchange(entry.headers, entry.sse),  # type: ignore[arg-type]
                  RemoteResponse(entry.code, entry.phrase), NoProducer())
    for chunk in entry.chunks:
        flight.write(chunk)
    flight.usage = entry.usage
    flight.end(True, None)


class ConvertingSubscriber(Subscriber):
    """A client of a flight in the other framing: nothing can be sent until
    the whole answer is there, then it gets it converted at once."""

    def __init__(self, flight: "Flight", request: Request, stream: bool,
                 include_usage: bool) -> None:
        super().__init__(flight, request, b"HIT", include_usage)
        self.stream = stream  # the framing it asked for
        # index stays 0: the flight keeps every chunk until the end.

    def start(self) -> None:
        pass  # the head waits for the whole answer

    def pump(self) -> None:
        f = self.flight
        if self.finished or self.gone or not f.ended:
            return
        f.leave(self)
        entry = converted_entry(f.entry(), self.stream, self.include_usage) \
            if f.complete and f.code == 200 else None
        if entry is not None:
            self.finished = True
            Replay(entry, self.request, f.clock, False).start()
            return
        f.store.stats.unconvertible += 1
        why = ("the answer this request shared was cut: " + (f.why or "upstream failed")
               if not f.complete else
               f"the shared answer (HTTP {f.code}) cannot be served in this format")
        self.fail(502, why, "shared_answer_unusable", False)


class Flight:
    """The shared answer to one question, while it is being generated."""

    keeps_usage = True  # the exchange hands it the answer's usage

    def __init__(self, key: bytes, store: ResponseStore, clock: Any,
                 on_done: Callable[["Flight"], None], stream: bool = False,
                 model: Optional[str] = None,
                 on_saved: Optional[Callable[..., None]] = None) -> None:
        self.key = key
        self.store = store
        self.clock = clock
        self.now = clock.seconds
        self.on_done = on_done
        self.stream = stream  # the framing its leader asked for
        self.model = model
        self.on_saved = on_saved  # (model, usage, times): tokens joiners did not cost
        self.usage: Optional[tuple] = None
        self.joined = 0
        # The leader's mirror into the shared (Redis) tier, when there is one.
        self.publisher: Any = None
        self.started_at = self.now()
        self.exchange: Optional["Exchange"] = None
        self.subscribers: List[Subscriber] = []
        self.code = 0
        self.phrase = b""
        self.headers: list = []
        self.length: Optional[int] = None
        self.backend_name: Optional[str] = None
        self.backend_shown: Optional[str] = None  # as clients may see it (X-Backend)
        self.sse = False
        self.chunks: List[bytes] = []
        self.times: List[float] = []
        self.base = 0  # absolute index of chunks[0], once the head is trimmed
        self.size = 0
        self.recording = True  # within the entry cap: keep every chunk, allow joiners
        self.committed_at = 0.0
        self.upstream: Any = None
        self.upstream_paused = False
        self.ended = False
        self.complete = False
        self.why: Optional[str] = None
        self.failed = False

    @property
    def joinable(self) -> bool:
        return self.recording and not self.failed and not (self.ended and not self.complete)

    def join(self, request: Request, cache_status: bytes,
             include_usage: bool = False) -> Subscriber:
        sub = Subscriber(self, request, cache_status, include_usage)
        self.subscribers.append(sub)
        if self.code:
            sub.start()
        return sub

    def join_converting(self, request: Request, stream: bool,
                        include_usage: bool) -> ConvertingSubscriber:
        sub = ConvertingSubscriber(self, request, stream, include_usage)
        self.subscribers.append(sub)  # type: ignore[arg-type]
        return sub

    def entry(self) -> Entry:
        """The answer as a cache entry (once it ended complete)."""
        now = self.now()
        return Entry(code=self.code, phrase=self.phrase, headers=self.headers,
                     chunks=self.chunks, sse=self.sse, stored_at=now,
                     expires_at=now + self.store.ttl,
                     times=self.times if self.sse else None,
                     duration=now - self.started_at, usage=self.usage)

    def leave(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
            if not self.ended and (isinstance(sub, ConvertingSubscriber)
                                   or sub.cache_status == b"HIT"):
                self.joined = max(0, self.joined - 1)  # it saved nothing after all
        if not self.subscribers and not self.ended and not self.failed:
            # The last client left: nobody wants this answer any more.
            if self.exchange is not None:
                self.exchange.cancel()
            if self.publisher is not None:
                self.publisher.abandon()  # other gateways' followers take over
            self._detach()
        else:
            self._trim()
            self.subscriber_resumed()

    # -- sink interface for the Exchange
    def commit(self, exchange: "Exchange", response: "UpstreamResponse", producer: Any) -> None:
        self.code, self.phrase = response.code, response.phrase
        self.headers = [(n, v) for n, v in exchange.response_headers()
                        if n.lower() not in PER_RESPONSE]
        self.length = response.length
        self.backend_name = exchange.backend_name
        self.backend_shown = exchange.shown_backend
        self.sse = exchange.sse
        self.upstream = producer
        self.committed_at = self.now()
        if self.publisher is not None:
            self.publisher.head(self.code, self.phrase, self.headers, self.sse)
        if getattr(exchange, "remote", False) and self.sse != self.stream:
            self._reframe()
        for sub in list(self.subscribers):
            sub.start()

    def _reframe(self) -> None:
        """The answer came from another gateway (or the shared store) in the
        other framing than this flight's first client asked for: each client
        is served in its own framing, converted or not."""
        self.stream = self.sse
        swapped: List[Any] = []
        for sub in self.subscribers:
            sub.gone = True  # the old one's handlers do nothing from now on
            if isinstance(sub, ConvertingSubscriber):
                # It wanted the other framing: the one this answer has.
                new: Any = Subscriber(self, sub.request, b"HIT", sub.include_usage)
            else:
                new = ConvertingSubscriber(self, sub.request, not self.sse, sub.include_usage)
            swapped.append(new)
        self.subscribers = swapped

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.publisher is not None:
            self.publisher.chunk(data)
        if self.recording:
            self.times.append(self.now() - self.committed_at)
            if self.size > self.store.max_entry_bytes:
                if self.publisher is not None:
                    self.publisher.abandon()
                # Too big to keep: stop recording, let no one else join, and
                # keep only what the slowest subscriber has yet to send.
                self.recording = False
                self.times = []
                self._detach()
        for sub in list(self.subscribers):
            sub.pump()
        self._trim()
        if self.subscribers and all(s.paused for s in self.subscribers):
            self._pause_upstream()

    def end(self, complete: bool, why: Optional[str]) -> None:
        self.ended, self.complete, self.why = True, complete, why
        if complete and self.joined and self.on_saved is not None:
            self.on_saved(self.model, self.usage, self.joined)
        self.exchange = None
        self._resume_upstream()
        self.upstream = None
        stored = None
        if complete and self.code == 200 and self.recording:
            stored = self.entry()
            self.store.put(self.key, stored)
        if self.publisher is not None:
            self.publisher.end(complete, stored)
        self._detach()
        for sub in list(self.subscribers):
            sub.pump()

    def stalled(self) -> None:
        """Every subscriber stopped reading for the idle timeout."""
        for sub in list(self.subscribers):
            if sub.paused:
                sub.request.abort()

    def fail(self, status: int, message: str, code: str, retry_after: bool) -> None:
        # A failing leader leaves nobody hanging: every joiner gets its error.
        self.failed = True
        if self.publisher is not None:
            self.publisher.abandon()
        self.exchange = None
        self.upstream = None
        self._detach()
        for sub in list(self.subscribers):
            sub.fail(status, message, code, retry_after)
        self.subscribers = []

    # -- flow control
    def subscriber_paused(self) -> None:
        if self.subscribers and all(s.paused for s in self.subscribers):
            self._pause_upstream()

    def subscriber_resumed(self) -> None:
        if any(not s.paused for s in self.subscribers) or not self.subscribers:
            self._resume_upstream()

    def _pause_upstream(self) -> None:
        if self.upstream is not None and not self.upstream_paused and not self.ended:
            self.upstream_paused = True
            self.upstream.pauseProducing()

    def _resume_upstream(self) -> None:
        if self.upstream is not None and self.upstream_paused:
            self.upstream_paused = False
            if not self.ended:
                self.upstream.resumeProducing()

    def _trim(self) -> None:
        """Once not recording, drop chunks every subscriber has sent."""
        if self.recording or not self.subscribers:
            return
        low = min(s.index for s in self.subscribers)
        if low > self.base:
            del self.chunks[:low - self.base]
            self.base = low

    def _detach(self) -> None:
        """No new joiners from here on."""
        self.on_done(self)


@implementer(IPushProducer)
class Replay:
    """Answers a cache hit from a stored entry, as fast as the client reads,
    or at the recorded pace."""

    def __init__(self, entry: Entry, request: Request, clock: Any, paced: bool) -> None:
        self.entry = entry
        self.request = request
        self.clock = clock
        self.paced = paced and entry.sse and entry.times is not None
        self.index = 0
        self.paused = False
        self.done = False
        self.timer: Optional[IDelayedCall] = None
        self.started_at = 0.0
        request.when_done(self._done)

    def start(self) -> None:
        e, req = self.entry, self.request
        req.setResponseCode(e.code, e.phrase)
        req.headers_out.extend(e.headers)
        req.addHeader(b"X-Cache", b"HIT")
        req.addHeader(b"Age", b"%d" % max(0, int(self.clock.seconds() - e.stored_at)))
        if not e.sse:
            req.addHeader(b"Content-Length", b"%d" % sum(len(c) for c in e.chunks))
        server_timing(req)
        self.started_at = self.clock.seconds()
        req.registerProducer(self, True)
        self.pump()

    def _done(self, reason: Any) -> None:
        if reason is not None:
            self.done = True
            self._cancel()

    def _cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def pauseProducing(self) -> None:
        self.paused = True
        self._cancel()

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.done = True
        self._cancel()

    def pump(self) -> None:
        self.timer = None
        chunks, times = self.entry.chunks, self.entry.times
        while not self.done and not self.paused and self.index < len(chunks):
            if self.paced:
                due = self.started_at + times[self.index] - self.clock.seconds()
                if due > 0:
                    self.timer = self.clock.callLater(due, self.pump)
                    return
            self.request.write(chunks[self.index])
            self.index += 1
        if not self.done and self.index >= len(chunks) and not self.paused:
            self.done = True
            self.request.unregisterProducer()
            self.request.finish()
