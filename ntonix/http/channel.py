"""The client connection, hardened against slow and hostile clients.

Twisted's ``HTTPChannel`` has one idle timer that restarts on every byte, so a
client trickling a header line a second is never cut off. ``GuardedChannel``
adds two total deadlines: one for the request head (from its first byte) and
one for the body (from the end of the head). It also answers parse errors
and over-large heads or bodies with OpenAI-shaped JSON instead of an empty
400, and rejects an over-large body from its Content-Length before reading it.
"""

from typing import Any, Optional

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.http_headers import Headers

from ntonix._version import __version__
from ntonix.http.errors import raw_error_response, write_error
from ntonix.observe.access import access_log
from ntonix.upstream.headers import request_id_from

log = Logger(namespace="ntonix.http.channel")

IDLE, HEAD, BODY, HANDLING = "idle", "head", "body", "handling"
SERVER = b"ntonix/" + __version__.encode()


@attrs.frozen
class Limits:
    max_body_bytes: int
    max_headers: int
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    idle_timeout: float

    @classmethod
    def from_config(cls, server_cfg: Any) -> "Limits":
        return cls(
            max_body_bytes=server_cfg.max_body_bytes,
            max_headers=server_cfg.max_headers,
            max_header_bytes=server_cfg.max_header_bytes,
            header_timeout=server_cfg.header_timeout_seconds,
            body_timeout=server_cfg.body_timeout_seconds,
            idle_timeout=server_cfg.idle_timeout_seconds,
        )


class GatewayRequest(server.Request):
    """A request whose body is bounded and whose failures answer in JSON."""

    _rejected = False
    _received = 0

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.channel.limits.max_body_bytes:
            self._reject_body(length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._received += len(data)
        # Chunked bodies have no length up front: count as they come.
        if self._received > self.channel.limits.max_body_bytes:
            self._reject_body(self._received)
            return
        super().handleContentChunk(data)

    def _reject_body(self, size: int) -> None:
        self._rejected = True
        limit = self.channel.limits.max_body_bytes
        self.channel.reject(
            413, f"request body of {size} bytes or more exceeds the limit of {limit} bytes "
            "(server.max_body_bytes)", "request_too_large")

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            return
        super().requestReceived(command, path, version)

    def write(self, data: bytes) -> None:
        info = getattr(self, "info", None)
        if info is not None and data:
            if info.first_byte_at is None:
                info.first_byte_at = self.channel.clock.seconds() if self.channel \
                    else info.received_at
            info.chunks += 1
        super().write(data)

    def render(self, resrc: Any) -> None:
        # Twisted names itself and its version on every answer; the gateway's
        # own answers name the gateway. A relayed answer carries the
        # backend's Server header instead, as the backend sent it.
        self.setHeader(b"Server", SERVER)
        super().render(resrc)

    def processingFailed(self, reason: Any) -> None:
        # A bug of ours must not show the client a traceback or an HTML page.
        log.failure("while handling {method} {uri}", reason,
                    method=self.method, uri=self.uri)
        if self.finished or self._disconnected:
            return None
        if self.startedWriting:
            self.channel.transport.abortConnection()
            return None
        body = write_error(self, 500, "internal gateway error", "internal_error")
        self.write(body)
        self.finish()
        return reason


class GuardedChannel(http.HTTPChannel):
    """HTTPChannel with total deadlines for the head and the body."""

    limits: Limits
    clock: IReactorTime
    _phase = IDLE
    _deadline: Optional[IDelayedCall] = None
    _closing = False
    _bytes_seen = False

    def connectionMade(self) -> None:
        self.maxHeaders = self.limits.max_headers
        self.totalHeadersSize = self.limits.max_header_bytes
        super().connectionMade()
        self.factory.channels.add(self)
        self.factory.connections_total += 1
        # From the connection on, not the first byte: a client that connects
        # and sends nothing (or stalls in the TLS handshake, which happens
        # below this protocol) is dropped at the head deadline too.
        self._enter(HEAD, self.limits.header_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._bytes_seen = True
        if self._phase == IDLE and not self._handlingRequest:
            self._enter(HEAD, self.limits.header_timeout)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        # length is None for chunked bodies and 0 for none.
        if self.length == 0:
            self._enter(HANDLING, None)
        else:
            self._enter(BODY, self.limits.body_timeout)
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._enter(HANDLING, None)
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        # Before super(): it replays pipelined bytes, which start the next head.
        self._enter(IDLE, None)
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._enter(IDLE, None)
        self.factory.channels.discard(self)
        super().connectionLost(reason)

    @property
    def busy(self) -> bool:
        """Whether a request (from its request line on) is being received or
        answered on this connection; a silent or idle one is not."""
        return bool(self.requests)

    def _enter(self, phase: str, timeout: Optional[float]) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._phase = phase
        if timeout is not None:
            self._deadline = self.clock.callLater(timeout, self._deadline_passed, phase)

    def _deadline_passed(self, phase: str) -> None:
        self._deadline = None
        peer = self.transport.getPeer()
        if not self._bytes_seen:
            # Nothing was ever said (or the TLS handshake never finished):
            # there is no one to answer, just let go of the socket.
            log.debug("dropping silent connection from {peer}", peer=str(peer))
            self._closing = True
            self.transport.abortConnection()
            return
        log.info("closing {peer}: request {phase} not received within its deadline",
                 peer=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}", phase=phase)
        setting = "server.header_timeout_seconds" if phase == HEAD else "server.body_timeout_seconds"
        self.reject(408, f"request {phase} not received in time ({setting})", "request_timeout")

    def reject(self, status: int, message: str, code: str) -> None:
        """Answer ``status`` as a whole raw response and close the connection.

        Only used before a request is being handled, so nothing else has been
        written for it and nothing will be.
        """
        if self._closing:
            return
        self._closing = True
        self._enter(IDLE, None)
        headers = self.requests[-1].requestHeaders if self.requests else Headers()
        request_id = request_id_from(headers)
        self.transport.write(raw_error_response(status, message, code, request_id))
        peer = self.transport.getPeer()
        access_log.info("{client} - - {status} rejected: {reason} request_id={request_id}",
                        client=getattr(peer, "host", str(peer)), status=status, reason=code,
                        request_id=request_id.decode("ascii", "replace"), outcome="rejected")
        self.loseConnection()
        # A client that will not read our answer must not keep the socket.
        self._abortingCall = self.clock.callLater(self.abortTimeout, self.forceAbortClient)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted calls this for every framing and header error it finds.
        if self._receivedHeaderCount > self.maxHeaders:
            self.reject(431, f"more than {self.maxHeaders} request headers "
                        "(server.max_headers)", "headers_too_large")
        elif self._receivedHeaderSize > self.totalHeadersSize:
            self.reject(431, f"request head larger than {self.totalHeadersSize} bytes "
                        "(server.max_header_bytes)", "headers_too_large")
        else:
            self.reject(400, "malformed HTTP request", "bad_request")


class GatewaySite(server.Site):
    """A Site whose connections are GuardedChannels, tracked for shutdown."""

    protocol = GuardedChannel  # HTTP/1.1 only: ALPN offers nothing else.
    noisy = False
    displayTracebacks = False

    def __init__(self, resource: Any, limits: Limits, clock: IReactorTime) -> None:
        # No form parsing: every route takes JSON, and parsing multipart
        # uploads would cost memory for nothing.
        super().__init__(resource, requestFactory=GatewayRequest,
                         parsePOSTFormSubmission=False,
                         timeout=limits.idle_timeout, reactor=clock)
        self.limits = limits
        self.channels: "set[GuardedChannel]" = set()
        self.connections_total = 0

    def buildProtocol(self, addr: Any) -> GuardedChannel:
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        channel.clock = self.reactor
        return channel

    def log(self, request: http.Request) -> None:
        # The gateway writes its own access log event per request.
        pass
