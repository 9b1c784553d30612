"""Forwarding one client request to a backend and relaying its answer.

The answer is never held whole: the upstream body transport is registered as
the client request's streaming producer, so when the client stops reading,
Twisted pauses the upstream socket, and when the client goes away, the
upstream connection is closed at once.

Before the first byte reaches the client, failures are retried on another
backend (connect errors, resets before the head, 5xx answers), at most
``proxy.retries`` times. A stream's response is committed only when its first
content event arrives, so a backend that stalls before its first token is
abandoned after ``proxy.first_token_timeout_seconds`` and the stream is served
by another; the last attempt waits the full ``proxy.response_timeout_seconds``.
After the commit nothing is retried: a failure mid-stream ends the stream with
an SSE ``error`` event.
"""

from typing import TYPE_CHECKING, Any, List, Optional

from twisted.internet import error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._newclient import RequestTransmissionFailed, ResponseNeverReceived
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from ntonix.http.errors import error_json, write_error
from ntonix.routing.backend import Backend
from ntonix.upstream.headers import client_response_headers, upstream_request_headers
from ntonix.upstream.sse import first_content_end

if TYPE_CHECKING:
    from ntonix.gateway import Gateway

log = Logger(namespace="ntonix.upstream.relay")

# Failures where the backend cannot have produced an answer: safe to retry.
CONNECT_FAILURES = (
    error.ConnectError,
    error.DNSLookupError,
    error.TimeoutError,  # the connect timeout (response deadlines are our own timers)
    ResponseNeverReceived,
    RequestTransmissionFailed,
)

# What a gated stream may hold before its first content event: past this the
# backend is plainly sending, so the response is committed anyway.
HOLD_LIMIT = 256 * 1024


def sse_error_event(message: str, code: str) -> bytes:
    return b"event: error\ndata: " + error_json(502, message, code) + b"\n\n"


class ResponsePipe(Protocol):
    """Receives one attempt's upstream body and writes it to the client."""

    def __init__(self, relay: "Relay", gated: bool) -> None:
        self.relay = relay
        self.gated = gated
        self.held = b""
        self.scanned = 0
        self.idle_timer: Optional[IDelayedCall] = None
        self.timed_out = False
        self.abandoned = False

    def connectionMade(self) -> None:
        if not self.gated:
            self.relay.commit(self)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self.abandoned or self.relay.client_gone:
            return
        self._arm()
        if self.gated:
            self.held += data
            end, self.scanned = first_content_end(self.held, self.scanned)
            if end is None and len(self.held) < HOLD_LIMIT:
                return
            data, self.held = self.held, b""
            self.gated = False
            self.relay.commit(self)
        self.relay.bytes_out += len(data)
        self.relay.request.write(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self._disarm()
        if self.abandoned:
            return
        if self.gated and self.held and not self.relay.client_gone:
            # Ended before any content event: relay what there was.
            self.gated = False
            self.relay.commit(self)
            self.relay.bytes_out += len(self.held)
            self.relay.request.write(self.held)
        self.relay.body_done(reason, self.timed_out)

    def abandon(self) -> None:
        """Drop this attempt: close its connection, relay nothing more."""
        self.abandoned = True
        self._disarm()
        if self.transport is not None:
            self.transport.stopProducing()

    def _arm(self) -> None:
        timeout = self.relay.gateway.config.proxy.stream_idle_timeout_seconds
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.reset(timeout)
        else:
            self.idle_timer = self.relay.gateway.reactor.callLater(timeout, self._idle)

    def _disarm(self) -> None:
        if self.idle_timer is not None and self.idle_timer.active():
            self.idle_timer.cancel()
        self.idle_timer = None

    def _idle(self) -> None:
        self.idle_timer = None
        self.timed_out = True
        if self.transport is not None:
            self.transport.stopProducing()


class Discard(Protocol):
    """Takes an upstream body nobody wants and closes its connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()


class Relay:
    """One client request, forwarded; lives until the client's answer ends."""

    def __init__(self, gateway: "Gateway", request: Request, path: bytes, body: bytes,
                 request_id: bytes, stream: bool = False) -> None:
        self.gateway = gateway
        self.request = request
        self.path = path
        self.body = body
        self.request_id = request_id
        self.stream = stream
        self.retries_left = gateway.config.proxy.retries
        self.tried: List[Backend] = []
        self.backend: Optional[Backend] = None
        self.attempt_started = 0.0
        self.pending: Any = None
        self.pipe: Optional[ResponsePipe] = None
        self.response: Optional[IResponse] = None
        self.deadline: Optional[IDelayedCall] = None
        self.last_attempt = True
        self.committed = False
        self.sse = False
        self.status = 0
        self.bytes_out = 0
        self.client_gone = False
        self.done = False
        self.started_at = gateway.reactor.seconds()
        self.first_byte_at: Optional[float] = None
        request.notifyFinish().addErrback(self._client_lost)

    # -- attempts
    def start(self) -> None:
        self.gateway.active_relays += 1
        self._attempt()

    def _attempt(self, same_backend_ok: bool = False) -> None:
        gw = self.gateway
        backend = gw.pick_backend(exclude=self.tried)
        if backend is None and same_backend_ok:
            # A single backend: a stale pooled connection is the usual cause
            # of a connect-level failure, so the same backend may take it.
            backend = gw.pick_backend()
        if backend is None:
            self._answer_error(503, "no backend available", "no_backend_available",
                               retry_after=True)
            return
        self.tried.append(backend)
        self.backend = backend
        backend.in_flight += 1
        self.attempt_started = gw.reactor.seconds()
        self.last_attempt = self.retries_left == 0 or not gw.any_available(exclude=self.tried)
        req = self.request
        client = req.getClientAddress()
        headers = upstream_request_headers(req.requestHeaders, getattr(client, "host", ""),
                                           self.request_id, req.isSecure())
        proxy = gw.config.proxy
        # One deadline per attempt, our own timer rather than addTimeout: a
        # cancelled request surfaces as ResponseNeverReceived, not a timeout.
        # A stream's deadline runs to its first content event; the last
        # attempt gets the full response timeout for it.
        wait = proxy.first_token_timeout_seconds if self.stream and not self.last_attempt \
            else proxy.response_timeout_seconds
        self.deadline = gw.reactor.callLater(wait, self._deadline_passed, wait)
        d = gw.upstream.forward(req.method, backend.base_url + self.path, headers, self.body)
        self.pending = d
        d.addCallbacks(self._got_response, self._failed, errbackArgs=(d,), callbackArgs=(d,))
        d.addErrback(self._bug)

    def _release(self, verdict: Optional[bool], why: Optional[str] = None) -> None:
        """Account the current attempt with its backend, once.

        ``verdict`` feeds the circuit breaker; None means no verdict (the
        client left), which frees a half-open circuit's trial.
        """
        b, self.backend = self.backend, None
        if b is None:
            return
        b.in_flight -= 1
        b.record(verdict is not False, self.gateway.reactor.seconds() - self.attempt_started, why)
        if verdict is None:
            b.breaker.release()
        elif verdict:
            b.breaker.succeeded()
        else:
            b.breaker.failed(why or "failed")
        self.gateway.released(b)

    def _cancel_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None

    def _finish_relay(self) -> None:
        self._cancel_deadline()
        if not self.done:
            self.done = True
            self.gateway.active_relays -= 1

    def _drop_attempt(self) -> None:
        """Abandon the attempt in progress, whatever stage it is at."""
        if self.pending is not None:
            d, self.pending = self.pending, None
            d.cancel()
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            pipe.abandon()

    def _deadline_passed(self, waited: float) -> None:
        self.deadline = None
        name = self.tried[-1].name
        if self.response is None:
            why = (f"backend {name} sent no response head within {waited:g}s "
                   f"({self._deadline_setting()})")
        else:
            why = (f"backend {name} sent no first token within {waited:g}s "
                   f"({self._deadline_setting()})")
        self._drop_attempt()
        self.response = None
        self._release(False, why)
        if self.stream and not self.last_attempt:
            self.retries_left -= 1
            log.info("request {request_id}: {why}; retrying elsewhere",
                     request_id=self.request_id, why=why)
            self._attempt()
            return
        self._answer_error(504, why, "upstream_timeout")

    def _deadline_setting(self) -> str:
        if self.stream and not self.last_attempt:
            return "proxy.first_token_timeout_seconds"
        return "proxy.response_timeout_seconds"

    # -- upstream events
    def _got_response(self, response: IResponse, d: Any) -> None:
        if d is not self.pending:
            response.deliverBody(Discard())  # an abandoned attempt answered late
            return
        self.pending = None
        if self.client_gone:
            response.deliverBody(Discard())
            return
        name = self.tried[-1].name
        if response.code >= 500 and self.retries_left > 0 \
                and self.gateway.any_available(exclude=self.tried):
            self._cancel_deadline()
            response.deliverBody(Discard())
            self._release(False, f"backend {name} answered HTTP {response.code}")
            self.retries_left -= 1
            log.info("request {request_id}: {backend} answered {code}; retrying elsewhere",
                     request_id=self.request_id, backend=name, code=response.code)
            self._attempt()
            return
        self.response = response
        self.status = response.code
        ctype = response.headers.getRawHeaders(b"content-type", [b""])[0]
        self.sse = ctype.lower().startswith(b"text/event-stream")
        gated = self.stream and self.sse and response.code == 200
        if not gated:
            self._cancel_deadline()
        self.pipe = ResponsePipe(self, gated)
        response.deliverBody(self.pipe)

    def commit(self, pipe: ResponsePipe) -> None:
        """Write the response head: from here on nothing is retried."""
        self._cancel_deadline()
        self.committed = True
        self.first_byte_at = self.gateway.reactor.seconds()
        req, response = self.request, self.response
        assert response is not None
        req.setResponseCode(response.code, response.phrase)
        for name, values in client_response_headers(response.headers).getAllRawHeaders():
            req.responseHeaders.setRawHeaders(name, values)
        req.setHeader(b"X-Backend", self.tried[-1].name.encode())
        if response.length is not UNKNOWN_LENGTH:
            req.setHeader(b"Content-Length", b"%d" % response.length)
        # The upstream socket now follows the client's pace.
        req.registerProducer(pipe.transport, True)

    def body_done(self, reason: Failure, timed_out: bool) -> None:
        """The upstream body ended: completely, or not."""
        self.pipe = None
        complete = reason is None or reason.check(ResponseDone, http.PotentialDataLoss)
        why = None
        if not complete:
            name = self.tried[-1].name
            idle = self.gateway.config.proxy.stream_idle_timeout_seconds
            why = (f"backend {name} sent nothing for {idle:g}s "
                   "(proxy.stream_idle_timeout_seconds)" if timed_out
                   else f"backend {name} failed mid-response: {reason.getErrorMessage()}")
        self._release(bool(complete) and self.status < 500, why)
        self._finish_relay()
        if self.client_gone:
            return
        req = self.request
        if req.producer is not None:
            req.unregisterProducer()
        if complete:
            req.finish()
        elif self.sse:
            log.warn("stream {request_id} cut: {why}", request_id=self.request_id, why=why)
            req.write(sse_error_event(why, "upstream_stream_failed"))
            req.finish()
        else:
            # The head is out and the body is short: only a cut connection
            # tells the client that the answer is incomplete.
            log.warn("response {request_id} cut: {why}", request_id=self.request_id, why=why)
            req.channel.transport.abortConnection()

    def _failed(self, failure: Failure, d: Any) -> None:
        if d is not self.pending:
            return  # an attempt we abandoned on purpose; already accounted
        self.pending = None
        self._cancel_deadline()
        name = self.tried[-1].name
        if self.client_gone:
            self._release(None)
            self._finish_relay()
            return
        why = f"backend {name} unreachable: {failure.getErrorMessage()}"
        self._release(False, why)
        if failure.check(*CONNECT_FAILURES):
            if self.retries_left > 0:
                self.retries_left -= 1
                log.info("request {request_id}: {why}; retrying", request_id=self.request_id,
                         why=why)
                self._attempt(same_backend_ok=True)
                return
        else:
            log.failure("request {request_id} to {backend}", failure,
                        request_id=self.request_id, backend=name)
            why = f"backend {name} failed: {failure.getErrorMessage()}"
        self._answer_error(502, why, "upstream_unreachable")

    def _bug(self, failure: Failure) -> None:
        log.failure("relaying request {request_id}", failure, request_id=self.request_id)
        self._release(None)
        self._finish_relay()
        if not self.client_gone and not self.request.finished:
            if self.request.startedWriting:
                self.request.channel.transport.abortConnection()
            else:
                self._answer_error(500, "internal gateway error", "internal_error")

    # -- client side
    def _answer_error(self, status: int, message: str, code: str,
                      retry_after: bool = False) -> None:
        self._finish_relay()
        self.status = status
        body = write_error(self.request, status, message, code)
        if retry_after:
            self.request.setHeader(b"Retry-After", b"1")
        self.request.write(body)
        self.request.finish()

    def _client_lost(self, reason: Failure) -> None:
        self.client_gone = True
        if self.done:
            return
        # Closing the upstream request stops the backend generating for nobody.
        self._drop_attempt()
        self._release(None)
        self._finish_relay()
