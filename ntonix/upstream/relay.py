"""Forwarding a request to a backend and relaying its answer to a sink.

An ``Exchange`` owns the upstream side; what it receives goes to a sink: a
``ClientSink`` (one client, nothing copied: the upstream body transport is
registered as the client request's streaming producer, so when the client
stops reading Twisted pauses the upstream socket, and when the client goes
away the upstream connection is closed at once) or a cache ``Flight`` (many
clients, one recorded copy).

Before the first byte reaches the client, failures are retried on another
backend (connect errors, resets before the head, 5xx answers), at most
``proxy.retries`` times. A stream's response is committed only when its first
content event arrives, so a backend that stalls before its first token is
abandoned after ``proxy.first_token_timeout_seconds`` and the stream is served
by another; the last attempt waits the full ``proxy.response_timeout_seconds``.
After the commit nothing is retried: a failure mid-stream ends the stream with
an SSE ``error`` event.
"""

from typing import TYPE_CHECKING, Any, List, Optional, Union

from twisted.internet import error
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from ntonix.http.errors import error_json, send_error
from ntonix.http.request import Request
from ntonix.http.passthrough import IDEMPOTENT
from ntonix.routing.backend import Backend
from ntonix.routing.scorer import RouteContext, attempt_ended, prefill_ended
from ntonix.upstream.connection import UpstreamClosed, UpstreamProtocolError, UpstreamResponse
from ntonix.upstream.headers import RawHeaders, client_response_headers, request_line
from ntonix.upstream.sse import first_content_end
from ntonix.upstream.usage import UsageTap, usage_numbers

if TYPE_CHECKING:
    from ntonix.gateway import Gateway

log = Logger(namespace="ntonix.upstream.relay")

# Failures where the backend cannot have produced an answer: safe to retry.
CONNECT_FAILURES = (
    error.ConnectError,
    error.DNSLookupError,
    error.TimeoutError,  # the connect timeout (response deadlines are our own timers)
    UpstreamClosed,
)

# Errors told to clients when backends are not to be named
# (proxy.expose_backend=false); others name no backend.
HIDDEN_REASONS = {
    "upstream_unreachable": "the backend could not be reached or failed",
    "upstream_timeout": "the backend did not answer in time",
    "internal_error": "internal gateway error",
}

# What a gated stream may hold before its first content event: past this the
# backend is plainly sending, so the response is committed anyway.
HOLD_LIMIT = 256 * 1024
# The bytes of a JSON answer kept from before its last read, for a usage
# object cut between two reads.
TAIL = 512
# A body of known length up to this size is written without pausing the
# backend for a slow client: the most it can hold in the gateway is this
# much, and registering a producer costs more than such a body takes.
SMALL_BODY = 64 * 1024


def sse_error_event(message: str, code: str) -> bytes:
    return b"event: error\ndata: " + error_json(502, message, code) + b"\n\n"


@implementer(IPushProducer)
class ResponsePipe:
    """Receives one attempt's upstream body and hands it to the exchange.

    It is also the producer that the client side registers: pausing it pauses
    the upstream socket. It knows when it is paused, so that silence while
    paused (the client is not reading) is not blamed on the backend: past
    ``proxy.stream_idle_timeout_seconds`` of either kind of silence the
    stream ends, as the backend's failure or as the client's stall.
    """

    def __init__(self, exchange: "Exchange", gated: bool) -> None:
        self.transport: Any = None  # the upstream connection, while the body lasts
        self.exchange = exchange
        self.gated = gated
        self.held = b""
        self.scanned = 0
        # When silence becomes a failure (checked by the gateway's sweep).
        self.idle_at: Optional[float] = None
        self.timed_out = False
        self.abandoned = False
        self.paused = False

    # -- IPushProducer, driven by the client side's flow control
    def pauseProducing(self) -> None:
        self.paused = True
        self._arm()  # from now on the silence is the client's
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self._arm()
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionMade(self) -> None:
        if not self.gated:
            self.exchange.commit(self)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self.abandoned:
            return
        self._arm()
        if self.gated:
            self.held += data
            end, self.scanned = first_content_end(self.held, self.scanned)
            if end is None and len(self.held) < HOLD_LIMIT:
                return
            data, self.held = self.held, b""
            self.gated = False
            self.exchange.commit(self)
        self.exchange.deliver(data)

    def body_ended(self, complete: bool, why: Optional[str]) -> None:
        self._disarm()
        if self.abandoned:
            return
        if self.gated:
            # Ended before any content event: relay what there was (perhaps
            # nothing: an empty answer is still an answer to start).
            self.gated = False
            self.exchange.commit(self)
            if self.held:
                self.exchange.deliver(self.held)
        self.exchange.body_done(complete, why, self.timed_out)

    def abandon(self) -> None:
        """Drop this attempt: close its connection, relay nothing more."""
        self.abandoned = True
        self._disarm()
        if self.transport is not None:
            self.transport.stopProducing()

    def _arm(self) -> None:
        exchange = self.exchange
        self.idle_at = exchange.clock.seconds() + exchange.idle_timeout

    def _disarm(self) -> None:
        self.idle_at = None

    def idle(self) -> None:
        """Nothing for ``proxy.stream_idle_timeout_seconds``."""
        self.idle_at = None
        if self.paused:
            self.exchange.client_stalled()
            return
        self.timed_out = True
        if self.transport is not None:
            self.transport.stopProducing()


class Exchange:
    """One request sent upstream, with retries, until its answer ends.

    The sink it reports to provides ``commit(exchange, response, producer)``,
    ``write(data)``, ``end(complete, why)``, ``fail(status, message, code,
    retry_after)`` and ``stalled()`` (its readers stopped reading for the idle
    timeout); it calls ``cancel()`` when nobody wants the answer.
    """

    # One per request: slots make it cheaper to build and to read.
    __slots__ = ("gateway", "clock", "idle_timeout", "method", "path", "header_block", "body",
                 "request_id", "stream", "sink", "retries_left", "tried", "backend",
                 "attempt_started", "pending", "pipe", "response", "deadline_at", "waited",
                 "last_attempt", "committed", "sse", "status", "bytes_in", "cancelled", "done",
                 "info", "first_byte_at", "model", "route", "tenant_raw", "_tenant",
                 "priority", "waiter", "same_backend_ok", "account", "strip_usage", "tap",
                 "json_tail", "remote_slot", "passthrough")

    def __init__(self, gateway: "Gateway", method: bytes, path: bytes, header_block: bytes,
                 body: bytes, request_id: bytes, stream: bool, sink: Any,
                 info: Any = None, model: Optional[str] = None,
                 route: Optional[RouteContext] = None, tenant: Optional[bytes] = None,
                 account: bool = False, strip_usage: bool = False,
                 passthrough: bool = False) -> None:
        self.gateway = gateway
        self.clock = gateway.reactor
        self.idle_timeout = gateway.config.proxy.stream_idle_timeout_seconds
        self.method = method
        self.path = path
        self.header_block = header_block
        self.body = body
        # Text, as every log line and event shows it.
        self.request_id = request_id.decode("ascii")
        self.stream = stream
        self.sink = sink
        self.retries_left = gateway.config.proxy.retries
        self.tried: List[Backend] = []
        self.backend: Optional[Backend] = None
        self.attempt_started = 0.0
        self.pending: Any = None
        self.pipe: Optional[ResponsePipe] = None
        self.response: Optional[UpstreamResponse] = None
        # The current attempt's deadline (checked by the gateway's sweep).
        self.deadline_at: Optional[float] = None
        self.waited = 0.0
        self.last_attempt = True
        self.committed = False
        self.sse = False
        self.status = 0
        self.bytes_in = 0
        self.cancelled = False
        self.done = False
        self.info = info  # the leading client's RequestInfo, for timings and the access log
        self.first_byte_at: Optional[float] = None
        self.model = model  # only backends that serve it are candidates
        self.route = route  # the inference scorer's view of the prompt
        # Who asks (hashed only when needed), at which priority.
        self.tenant_raw = tenant
        self._tenant: Optional[str] = None
        tenants = gateway.config.tenants
        self.priority = gateway.admission.priority_of(tenant) if tenants.classes \
            else tenants.default_priority
        self.waiter: Any = None  # while it waits in the admission queue
        self.same_backend_ok = False
        # A route a client chose (proxy.passthrough): its 5xx answers are
        # not the backend's fault as far as the breaker knows (a client
        # could open a circuit by asking for a route that fails), and it is
        # sent again after one only when its method changes nothing.
        self.passthrough = passthrough
        # The attempt holds a slot of the workers' broker (given back when it ends).
        self.remote_slot = False
        # Token accounting (generation routes): usage read from the answer;
        # with strip_usage the gateway asked for a stream's usage chunk the
        # client did not ask for, and takes it out again.
        self.account = account
        self.strip_usage = strip_usage
        self.tap: Optional[UsageTap] = None
        self.json_tail: Optional[bytes] = None

    @property
    def tenant(self) -> str:
        if self._tenant is None:
            self._tenant = self.gateway.admission.tenant_of(self.tenant_raw)
        return self._tenant

    @property
    def backend_name(self) -> Optional[str]:
        return self.tried[-1].name if self.tried else None

    @property
    def shown_backend(self) -> Optional[str]:
        """The backend's name as clients may see it (``proxy.expose_backend``)."""
        return self.backend_name if self.gateway.config.proxy.expose_backend else None

    def _for_client(self, message: Optional[str], code: str = "") -> Optional[str]:
        """``message`` fit for the client: unless ``proxy.expose_backend``,
        what went wrong upstream is told without any of it (a reason such as
        a DNS error names the host); the log keeps the details."""
        if message is None or self.gateway.config.proxy.expose_backend:
            return message
        return HIDDEN_REASONS.get(code, "the backend failed mid-response" if not code
                                  else message)

    # -- attempts
    def start(self) -> None:
        self.gateway.active_relays += 1
        self.gateway.deadlines.add(self)
        self._attempt()

    def check(self, now: float) -> None:
        """Called by the gateway's deadline sweep."""
        if self.deadline_at is not None and self.deadline_at <= now:
            self.deadline_at = None
            self._deadline_passed(self.waited)
            return
        pipe = self.pipe
        if pipe is not None and pipe.idle_at is not None and pipe.idle_at <= now:
            pipe.idle()

    def _attempt(self, same_backend_ok: bool = False) -> None:
        """Send to a backend with room now, or wait for one (admission)."""
        self.same_backend_ok = same_backend_ok
        self.gateway.admission.admit(self)

    # -- admission's answers
    def no_backend(self) -> None:
        self._fail(503, "no backend available", "no_backend_available", retry_after=True)

    def refused(self, why: str, reason: str, retry_after: int) -> None:
        """Waited too long, or no room to wait: a 429."""
        self.waiter = None
        self.deadline_at = None
        self._fail(429, why, reason, retry_after=retry_after)

    def send(self, room: List[Backend]) -> None:
        """Send the request to the best of ``room`` (backends with room)."""
        gw = self.gateway
        backend = gw.balancer.pick(room, None, self.route) if room else None
        if backend is None or not backend.breaker.acquire():
            self.no_backend()  # cannot happen on one thread: room was just checked
            return
        self.tried.append(backend)
        self.backend = backend
        backend.in_flight += 1
        self.attempt_started = gw.reactor.seconds()
        if self.info is not None:
            if self.info.upstream_sent_at is None:
                self.info.upstream_sent_at = self.attempt_started
            self.info.backend = backend.name
            self.info.retries = len(self.tried) - 1
        # Only a stream's deadline depends on it (see below).
        self.last_attempt = not self.stream or self.retries_left == 0 or \
            not gw.any_available(exclude=self.tried, model=self.model)
        proxy = gw.config.proxy
        # One deadline per attempt. A stream's deadline runs to its first
        # content event; the last attempt gets the full response timeout.
        wait = proxy.first_token_timeout_seconds if self.stream and not self.last_attempt \
            else proxy.response_timeout_seconds
        self.waited = wait
        self.deadline_at = self.attempt_started + wait
        data = b"".join((request_line(self.method, self.path, backend.host_header),
                         self.header_block, self.body))
        self.pending = gw.upstream.forward(backend.host, backend.port, backend.name, data, self,
                                           backend.tls)

    def _release(self, verdict: Optional[bool], why: Optional[str] = None) -> None:
        """Account the current attempt with its backend, once.

        ``verdict`` feeds the circuit breaker; None means no verdict (nobody
        wanted the answer any more), which frees a half-open circuit's trial.
        """
        b, self.backend = self.backend, None
        if b is None:
            return
        b.in_flight -= 1
        if self.remote_slot:
            self.remote_slot = False
            self.gateway.admission.remote.release(b)
        now = self.gateway.reactor.seconds()
        elapsed = now - self.attempt_started
        route = self.route
        if route is not None:
            # The tap counted the stream's events (each chunk is scanned once).
            route.output_events = self.tap.events if self.tap is not None else 0
            first = self.first_byte_at
            attempt_ended(b, route, now - first if verdict and first is not None
                          and first >= self.attempt_started else None)
        b.record(verdict is not False, elapsed, why)
        self.gateway.metrics.observe_backend(b.name, elapsed)
        if verdict is None:
            b.breaker.release()
        elif verdict:
            b.breaker.succeeded()
        else:
            b.breaker.failed(why or "failed")
        self.gateway.released(b)

    def _cancel_deadline(self) -> None:
        self.deadline_at = None

    def _finish(self) -> Any:
        """The exchange is over: account it and let go of what it holds.

        Returns the sink, for its last call. Dropping the references breaks
        the cycles (sink <-> exchange, exchange -> response -> pipe ->
        exchange) that would otherwise keep every object of the request
        alive until a full collection, whose pauses stall the reactor.
        """
        self._cancel_deadline()
        if not self.done:
            self.done = True
            self.gateway.active_relays -= 1
            self.gateway.deadlines.discard(self)
        sink, self.sink = self.sink, NO_SINK
        self.response = None
        self.pipe = None
        return sink

    def _drop_attempt(self) -> None:
        """Abandon the attempt in progress, whatever stage it is at."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.cancel()
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            pipe.abandon()

    def cancel(self) -> None:
        """Nobody wants the answer: close the upstream request at once, so
        the backend stops generating for nobody."""
        if self.done:
            return
        self.cancelled = True
        if self.waiter is not None:
            self.gateway.admission.leave(self.waiter)
            self.waiter = None
        self._drop_attempt()
        self._release(None)
        self._finish()

    def _deadline_passed(self, waited: float) -> None:
        if self.waiter is not None:
            self.gateway.admission.timed_out(self)
            return
        name = self.tried[-1].name
        setting = "proxy.first_token_timeout_seconds" if self.stream and not self.last_attempt \
            else "proxy.response_timeout_seconds"
        what = "response head" if self.response is None else "first token"
        why = f"backend {name} sent no {what} within {waited:g}s ({setting})"
        self._drop_attempt()
        self.response = None
        self._release(False, why)
        if self.stream and not self.last_attempt:
            self.retries_left -= 1
            log.info("request {request_id}: {why}; retrying elsewhere",
                     request_id=self.request_id, why=why)
            self._attempt()
            return
        self._fail(504, why, "upstream_timeout")

    # -- upstream events
    def got_response(self, pending: Any, response: UpstreamResponse) -> None:
        try:
            self._got_response(pending, response)
        except Exception:
            self._bug()

    def _got_response(self, pending: Any, response: UpstreamResponse) -> None:
        if pending is not self.pending:
            response.discard()  # an abandoned attempt answered late
            return
        self.pending = None
        name = self.tried[-1].name
        if response.code >= 500 and self.retries_left > 0 \
                and (not self.passthrough or self.method in IDEMPOTENT) \
                and self.gateway.any_available(exclude=self.tried, model=self.model):
            self._cancel_deadline()
            response.discard()
            self._release(None if self.passthrough else False,
                          f"backend {name} answered HTTP {response.code}")
            self.retries_left -= 1
            log.info("request {request_id}: {backend} answered {code}; retrying elsewhere",
                     request_id=self.request_id, backend=name, code=response.code)
            self._attempt()
            return
        self.response = response
        self.status = response.code
        ctype = response.header(b"content-type")
        self.sse = ctype.lower().startswith(b"text/event-stream")
        gated = self.stream and self.sse and response.code == 200
        if self.account and response.code == 200:
            if self.sse:
                # A length announced for a stream forbids taking bytes out.
                self.tap = UsageTap(self.strip_usage and response.length is None)
            else:
                # A JSON answer's usage is in its last bytes: keep those.
                self.json_tail = b""
        if not gated:
            self._cancel_deadline()
        self.pipe = ResponsePipe(self, gated)
        response.deliverBody(self.pipe)

    def commit(self, pipe: ResponsePipe) -> None:
        """The answer starts: from here on nothing is retried."""
        self._cancel_deadline()
        self.committed = True
        self.first_byte_at = self.gateway.reactor.seconds()
        if self.route is not None and self.backend is not None:
            prefill_ended(self.backend, self.route, self.first_byte_at - self.attempt_started)
        if self.info is not None:
            self.info.upstream_head_at = self.first_byte_at
        assert self.response is not None
        self.sink.commit(self, self.response, pipe)

    def client_stalled(self) -> None:
        """The client read nothing for the idle timeout: let it go. The
        backend is not at fault, so no verdict reaches its breaker."""
        idle = self.gateway.config.proxy.stream_idle_timeout_seconds
        log.info("request {request_id}: client read nothing for {idle:g}s "
                 "(proxy.stream_idle_timeout_seconds); closing it", request_id=self.request_id,
                 idle=idle)
        self.sink.stalled()

    def deliver(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.tap is not None:
            data = self.tap.feed(data)
            if not data:
                return
        elif self.json_tail is not None:
            self.json_tail = self.json_tail[-TAIL:] + data if self.json_tail else data
        self.sink.write(data)

    def response_headers(self) -> RawHeaders:
        """The backend's head as the client may see it."""
        assert self.response is not None
        return client_response_headers(self.response.headers, self.response.lower)

    def body_done(self, complete: bool, why: Optional[str], timed_out: bool) -> None:
        """The upstream body ended: completely, or not."""
        self.pipe = None
        tap = self.tap
        usage = None
        if tap is not None:
            rest = tap.end()
            if rest:
                self.sink.write(rest)
            usage = tap.usage
            if complete:
                self.gateway.metrics.answered(self, usage, tap.events)
        elif self.json_tail is not None:
            usage = usage_numbers(self.json_tail)
            if complete:
                self.gateway.metrics.answered(self, usage, 0)
        if usage is not None and self.sink.keeps_usage:
            self.sink.usage = usage  # a cache flight keeps it with the entry
        if not complete:
            name = self.tried[-1].name
            idle = self.gateway.config.proxy.stream_idle_timeout_seconds
            why = (f"backend {name} sent nothing for {idle:g}s "
                   "(proxy.stream_idle_timeout_seconds)" if timed_out
                   else f"backend {name} failed mid-response: {why}")
            log.warn("response {request_id} cut: {why}", request_id=self.request_id, why=why)
        if complete and self.status >= 500 and self.passthrough:
            self._release(None)  # the client's route, not the backend's fault
        else:
            self._release(complete and self.status < 500, why)
        if not complete and self.info is not None:
            self.info.upstream_failed = True
        self._finish().end(complete, self._for_client(why))

    def failed(self, pending: Any, reason: Exception) -> None:
        try:
            self._failed(pending, reason)
        except Exception:
            self._bug()

    def _failed(self, pending: Any, reason: Exception) -> None:
        if pending is not self.pending:
            return  # an attempt we abandoned on purpose; already accounted
        self.pending = None
        self._cancel_deadline()
        name = self.tried[-1].name
        why = f"backend {name} unreachable: {reason}"
        self._release(False, why)
        resend_ok = not self.passthrough or self.method in IDEMPOTENT \
            or not isinstance(reason, UpstreamClosed)  # it may have been received
        if isinstance(reason, CONNECT_FAILURES) and resend_ok:
            if self.retries_left > 0:
                self.retries_left -= 1
                log.info("request {request_id}: {why}; retrying", request_id=self.request_id,
                         why=why)
                self._attempt(same_backend_ok=True)
                return
        else:
            why = str(reason) if isinstance(reason, UpstreamProtocolError) else \
                f"backend {name} failed: {reason}"
            log.warn("request {request_id}: {why}", request_id=self.request_id, why=why)
        self._fail(502, why, "upstream_unreachable")

    def _bug(self) -> None:
        """Called inside ``except``: a bug of ours, logged with its traceback."""
        log.failure("relaying request {request_id}", request_id=self.request_id)
        self._release(None)
        sink = self._finish()
        if self.committed:
            sink.end(False, "internal gateway error")
        else:
            sink.fail(500, "internal gateway error", "internal_error", False)

    def _fail(self, status: int, message: str, code: str,
              retry_after: Union[bool, int] = False) -> None:
        self.status = status
        if self.info is not None:
            self.info.upstream_failed = True
        self._finish().fail(status, self._for_client(message, code), code, retry_after)


def server_timing(request: Request) -> None:
    """Say what the gateway and the upstream each cost, on the head."""
    info = getattr(request, "info", None)
    if info is not None:
        request.addHeader(b"Server-Timing", info.timing(request.channel.clock.seconds()).encode())


def answer_error(request: Request, status: int, message: str, code: str,
                 retry_after: Union[bool, int] = False) -> None:
    if request.finished or request.disconnected:
        return
    server_timing(request)
    if retry_after:
        # True is 1; admission says how many seconds from the drain rate.
        request.setHeader(b"Retry-After", b"%d" % retry_after)
    send_error(request, status, message, code,
               "fleet_saturated" if status == 429 else None)


def end_response(request: Request, complete: bool, sse: bool, why: Optional[str]) -> None:
    """Finish a committed answer: whole, with an SSE error event, or cut."""
    if request.finished or request.disconnected:
        return
    if request.producer is not None:
        request.unregisterProducer()
    if complete:
        request.finish()
    elif sse:
        request.write(sse_error_event(why or "upstream failed", "upstream_stream_failed"))
        request.finish()
    else:
        # The head is out and the body is short: only a cut connection
        # tells the client that the answer is incomplete.
        request.abort()


class _NoSink:
    """Where a finished exchange's late events go: nowhere."""

    keeps_usage = False

    def commit(self, *args: Any) -> None:
        pass

    write = end = fail = stalled = commit


NO_SINK = _NoSink()


class ClientSink:
    """One client, fed directly: the upstream socket is its producer."""

    keeps_usage = False

    def __init__(self, request: Request, cache_status: Optional[bytes] = None) -> None:
        self.request = request
        self.cache_status = cache_status
        self.exchange: Optional[Exchange] = None
        self.gone = False
        request.when_done(self._done)

    def _done(self, reason: Any) -> None:
        if reason is None:
            return
        self.gone = True
        if self.exchange is not None:
            self.exchange.cancel()

    def commit(self, exchange: Exchange, response: UpstreamResponse, producer: Any) -> None:
        req = self.request
        req.setResponseCode(response.code, response.phrase)
        req.headers_out.extend(exchange.response_headers())
        shown = exchange.shown_backend
        if shown is not None:
            req.addHeader(b"X-Backend", shown.encode())
        if self.cache_status:
            req.addHeader(b"X-Cache", self.cache_status)
        length = response.length
        if length is not None:
            req.addHeader(b"Content-Length", b"%d" % length)
        server_timing(req)
        if length is None or length > SMALL_BODY:
            req.registerProducer(producer, True)

    def write(self, data: bytes) -> None:
        if not self.gone:
            self.request.write(data)

    def stalled(self) -> None:
        if not self.gone:
            # Closing the client's connection cancels the exchange.
            self.request.abort()

    def end(self, complete: bool, why: Optional[str]) -> None:
        exchange, self.exchange = self.exchange, None
        if not self.gone:
            end_response(self.request, complete, exchange.sse, why)

    def fail(self, status: int, message: str, code: str, retry_after: bool) -> None:
        self.exchange = None
        if not self.gone:
            if self.cache_status:
                self.request.setHeader(b"X-Cache", self.cache_status)
            answer_error(self.request, status, message, code, retry_after)
