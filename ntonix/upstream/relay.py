"""Forwarding one client request to a backend and relaying its answer.

The answer is never held whole: the upstream body transport is registered as
the client request's streaming producer, so when the client stops reading,
Twisted pauses the upstream socket, and when the client goes away, the
upstream connection is closed at once. Errors before the response head are
answered as OpenAI-style JSON (502, 503, 504), after a bounded retry on
another backend; a failure in the middle of a stream ends it with an SSE
``error`` event.
"""

from typing import TYPE_CHECKING, Any, List, Optional

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._newclient import (
    RequestTransmissionFailed,
    ResponseNeverReceived,
)
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from ntonix.http.errors import error_json, write_error
from ntonix.routing.backend import Backend
from ntonix.upstream.headers import client_response_headers, upstream_request_headers

if TYPE_CHECKING:
    from ntonix.gateway import Gateway

log = Logger(namespace="ntonix.upstream.relay")

# Failures where the backend cannot have produced an answer: safe to retry.
CONNECT_FAILURES = (
    error.ConnectError,
    error.DNSLookupError,
    error.TimeoutError,  # the connect timeout (the head timeout is our own timer)
    ResponseNeverReceived,
    RequestTransmissionFailed,
)


def sse_error_event(message: str, code: str) -> bytes:
    return b"event: error\ndata: " + error_json(502, message, code) + b"\n\n"


class ResponsePipe(Protocol):
    """Receives the upstream body and writes it to the client as it comes."""

    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self.idle_timer: Optional[IDelayedCall] = None
        self.timed_out = False

    def connectionMade(self) -> None:
        # self.transport proxies pause/resume/stop to the upstream socket.
        self.relay.request.registerProducer(self.transport, True)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self.relay.client_gone:
            return
        self.relay.bytes_out += len(data)
        self.relay.request.write(data)
        self._arm()

    def connectionLost(self, reason: Failure = None) -> None:
        self._disarm()
        self.relay.body_done(reason, self.timed_out)

    def stop(self) -> None:
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
                 request_id: bytes) -> None:
        self.gateway = gateway
        self.request = request
        self.path = path
        self.body = body
        self.request_id = request_id
        self.retries_left = gateway.config.proxy.retries
        self.tried: List[Backend] = []
        self.backend: Optional[Backend] = None
        self.attempt_started = 0.0
        self.pending: Optional[defer.Deferred] = None
        self.head_timer: Optional[IDelayedCall] = None
        self.head_timed_out = False
        self.pipe: Optional[ResponsePipe] = None
        self.sse = False
        self.status = 0
        self.bytes_out = 0
        self.client_gone = False
        self.done = False
        request.notifyFinish().addErrback(self._client_lost)

    # -- lifecycle
    def start(self) -> None:
        self.gateway.active_relays += 1
        self._attempt()

    def _attempt(self) -> None:
        backend = self.gateway.pick_backend(exclude=self.tried)
        if backend is None and self.tried:
            # A single backend (or all tried): a stale pooled connection is
            # the usual cause, so the same backend may take the retry.
            backend = self.gateway.pick_backend()
        if backend is None:
            self._answer_error(503, "no backend available", "no_backend_available",
                               retry_after=True)
            return
        self.tried.append(backend)
        self.backend = backend
        backend.in_flight += 1
        self.attempt_started = self.gateway.reactor.seconds()
        req = self.request
        headers = upstream_request_headers(
            req.requestHeaders, req.getClientAddress().host if req.getClientAddress() else "",
            self.request_id, req.isSecure())
        d = self.gateway.upstream.forward(req.method, backend.base_url + self.path,
                                          headers, self.body)
        # Our own timer, not Deferred.addTimeout: cancelling the client's
        # request surfaces as ResponseNeverReceived, which addTimeout would not
        # turn into a TimeoutError, and a 504 must not look like a 502.
        self.head_timed_out = False
        self.head_timer = self.gateway.reactor.callLater(
            self.gateway.config.proxy.response_timeout_seconds, self._head_timeout)
        self.pending = d
        d.addBoth(self._head_arrived)
        d.addCallbacks(self._got_response, self._failed)
        d.addErrback(self._bug)

    def _head_timeout(self) -> None:
        self.head_timer = None
        self.head_timed_out = True
        if self.pending is not None:
            self.pending.cancel()

    def _head_arrived(self, result: Any) -> Any:
        if self.head_timer is not None and self.head_timer.active():
            self.head_timer.cancel()
        self.head_timer = None
        return result

    def _release(self, ok: bool, why: Optional[str] = None) -> None:
        """Account the current attempt with its backend, once."""
        b, self.backend = self.backend, None
        if b is None:
            return
        b.in_flight -= 1
        b.record(ok, self.gateway.reactor.seconds() - self.attempt_started, why)

    def _finish_relay(self) -> None:
        if not self.done:
            self.done = True
            self.gateway.active_relays -= 1

    # -- upstream events
    def _got_response(self, response: IResponse) -> None:
        self.pending = None
        if self.client_gone:
            self._release(True)
            response.deliverBody(Discard())
            return
        req = self.request
        self.status = response.code
        req.setResponseCode(response.code, response.phrase)
        for name, values in client_response_headers(response.headers).getAllRawHeaders():
            req.responseHeaders.setRawHeaders(name, values)
        req.setHeader(b"X-Backend", self.tried[-1].name.encode())
        if response.length is not UNKNOWN_LENGTH:
            req.setHeader(b"Content-Length", b"%d" % response.length)
        ctype = response.headers.getRawHeaders(b"content-type", [b""])[0]
        self.sse = ctype.lower().startswith(b"text/event-stream")
        self.pipe = ResponsePipe(self)
        response.deliverBody(self.pipe)

    def body_done(self, reason: Failure, timed_out: bool) -> None:
        """The upstream body ended: completely, or not."""
        self.pipe = None
        complete = reason is None or reason.check(ResponseDone, http.PotentialDataLoss)
        why = None
        if not complete:
            setting = self.gateway.config.proxy.stream_idle_timeout_seconds
            why = (f"backend {self.tried[-1].name} sent nothing for {setting:g}s "
                   "(proxy.stream_idle_timeout_seconds)" if timed_out
                   else f"backend {self.tried[-1].name} failed mid-response: "
                   f"{reason.getErrorMessage()}")
        self._release(bool(complete) and self.status < 500, why)
        self._finish_relay()
        if self.client_gone:
            return
        req = self.request
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

    def _failed(self, failure: Failure) -> None:
        self.pending = None
        name = self.tried[-1].name
        if self.client_gone:
            self._release(True)
            self._finish_relay()
            return
        if self.head_timed_out:
            t = self.gateway.config.proxy.response_timeout_seconds
            why = f"backend {name} sent no response head within {t:g}s " \
                  "(proxy.response_timeout_seconds)"
            self._release(False, why)
            self._answer_error(504, why, "upstream_timeout")
            return
        why = f"backend {name} unreachable: {failure.getErrorMessage()}"
        self._release(False, why)
        if failure.check(*CONNECT_FAILURES) and self.retries_left > 0:
            self.retries_left -= 1
            log.info("request {request_id}: {why}; retrying", request_id=self.request_id, why=why)
            self._attempt()
            return
        if not failure.check(*CONNECT_FAILURES):
            log.failure("request {request_id} to {backend}", failure,
                        request_id=self.request_id, backend=name)
            why = f"backend {name} failed: {failure.getErrorMessage()}"
        self._answer_error(502, why, "upstream_unreachable")

    def _bug(self, failure: Failure) -> None:
        log.failure("relaying request {request_id}", failure, request_id=self.request_id)
        self._release(False, "gateway error")
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
        if self.pending is not None:
            # Cancelling the request closes its connection: the backend
            # stops generating for nobody.
            self.pending.cancel()
        elif self.pipe is not None:
            self.pipe.stop()

