"""The client side of the data plane: HTTP/1.1 on httptools (llhttp, strict).

One ``HTTPServerProtocol`` per connection feeds the bytes it receives to an
``httptools.HttpRequestParser``; the parser's callbacks fill in the request,
check every limit as the bytes arrive, and hand each complete request to the
router, in order (pipelined requests wait their turn). Nothing here is
twisted.web: the limits, deadlines and error answers are ours, and each is
answered with OpenAI-shaped JSON the moment the offending bytes arrive.

Deadlines (a time per connection, set per phase, checked by one sweep over
every connection a few times a second: no timer is created, moved or
cancelled per request):
- the head, from the first byte of a request (and from the connection itself,
  so a client that connects and says nothing is dropped),
- the body, from the end of the head (a body trickled a byte a second is cut),
- idle keep-alive, between requests.
While a request is being answered no deadline runs on the client: the relay
has its own (first token, stream idle).
"""

from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

import attrs
import httptools
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from ntonix.deadlines import DeadlineSweep
from ntonix.http.errors import raw_error_response, send_error
from ntonix.http.request import Request
from ntonix.observe.access import access_log
from ntonix.upstream.headers import sane_request_id

log = Logger(namespace="ntonix.http.server")

IDLE, HEAD, BODY, HANDLING = "idle", "head", "body", "handling"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Pipelined requests parsed ahead of the one being answered; past this many
# the connection stops reading until the queue drains.
PIPELINE_DEPTH = 4
# A client that will not read our error answer must not keep the socket.
ABORT_AFTER_SECONDS = 15.0


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


# Headers the parser picks out as they arrive (one dict lookup per header).
_LENGTH, _HOST, _TYPE, _ID, _TE, _EXPECT = range(6)
_NOTED = {b"content-length": _LENGTH, b"host": _HOST, b"content-type": _TYPE,
          b"x-request-id": _ID, b"transfer-encoding": _TE, b"expect": _EXPECT}


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer an error."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HTTPServerProtocol(Protocol):
    """One client connection."""

    def __init__(self, factory: "GatewayServer") -> None:
        self.factory = factory
        self.limits: Limits = factory.limits
        self.clock: IReactorTime = factory.clock
        self.router = factory.router
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self.secure = False
        self.current: Optional[Request] = None
        self.queue: Deque[Request] = deque()
        self.phase = IDLE
        self.deadline_at: Optional[float] = None
        self.abort_timer: Optional[IDelayedCall] = None
        self.closing = False
        self.bytes_seen = False
        self.read_paused = False
        self.upgraded = False
        self.serving = False
        self.pending_reject: Optional[Tuple[int, str, str]] = None
        self.in_message = False
        self.in_head = False  # from a message's first byte to the end of its head
        self.continue_due = False  # a 100 Continue owed once the answer before is done
        # Flow control of the client's side of the connection: the channel
        # is its transport's producer for the connection's whole life, and
        # passes pauses on to the producer of the answer in progress.
        self.write_paused = False
        self.answer_producer: Any = None
        # Head bytes received and not yet parsed into a complete head.
        self.unparsed_head = 0
        self._reset_message()

    def _reset_message(self) -> None:
        self.url: List[bytes] = []
        self.headers: List[Tuple[bytes, bytes]] = []
        self.lower: List[bytes] = []
        self.head_bytes = 0
        self.body: List[bytes] = []
        self.body_bytes = 0
        self.content_length: Optional[int] = None
        self.hosts = 0
        self.expect_continue = False
        self.chunked = False
        self.request_id = b""
        self.content_type: Optional[bytes] = None

    # -- connection
    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            # Every answer is written whole or as a stream of small chunks
            # meant to leave at once: Nagle's algorithm would hold a write
            # behind an unacknowledged one (a TLS session ticket, the last
            # token) for the client's delayed ACK, 40 ms.
            self.transport.setTcpNoDelay(True)
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", None) or str(peer)
        self.secure = ISSLTransport.providedBy(self.transport)
        self.factory.connection_made(self)
        self.transport.registerProducer(self, True)
        # From the connection on, not the first byte: a client that connects
        # and sends nothing (or stalls in the TLS handshake, which happens
        # below this protocol) is dropped at the head deadline too.
        self._enter(HEAD, self.limits.header_timeout)

    def connectionLost(self, reason: Any = None) -> None:
        self._enter(IDLE, None)
        if self.abort_timer is not None and self.abort_timer.active():
            self.abort_timer.cancel()
        self.abort_timer = None
        self.factory.connection_lost(self)
        self.closing = True
        self.queue.clear()
        current, self.current = self.current, None
        self.answer_producer = None
        if current is not None:
            current.connection_lost(reason)

    # -- IPushProducer: the transport says when the client stops reading
    def pauseProducing(self) -> None:
        # Stop reading too: no new request is taken while the client does
        # not read the answers already written.
        self.write_paused = True
        if not self.read_paused:
            self.transport.pauseProducing()
        if self.answer_producer is not None:
            self.answer_producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.write_paused = False
        if not self.read_paused and not self.closing:
            self.transport.resumeProducing()
        if self.answer_producer is not None:
            self.answer_producer.resumeProducing()
        if self.current is None and self.queue:
            self._serve_next()

    def stopProducing(self) -> None:
        producer, self.answer_producer = self.answer_producer, None
        if producer is not None:
            producer.stopProducing()

    def register_answer_producer(self, producer: Any) -> None:
        """The producer of the answer being written (the upstream socket, a
        flight, a replay): paused whenever the client stops reading."""
        self.answer_producer = producer
        if self.write_paused:
            producer.pauseProducing()

    def unregister_answer_producer(self) -> None:
        self.answer_producer = None

    @property
    def busy(self) -> bool:
        """Whether a request (from its first byte on) is being received or
        answered on this connection; a silent or idle one is not."""
        return self.current is not None or bool(self.queue) or self.in_message

    def dataReceived(self, data: bytes) -> None:
        if self.closing or self.upgraded:
            return
        self.bytes_seen = True
        if self.phase == IDLE and self.current is None:
            self._enter(HEAD, self.limits.header_timeout)
        if self.in_head or not self.in_message:
            self.unparsed_head += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request asking for it was complete (and had no body, else
            # it was refused): it is answered, then the connection closes.
            self.upgraded = True
            return
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Reject):
                self.reject(cause.status, cause.message, cause.code)
            else:
                log.failure("parsing a request from {client}", client=self.client_ip)
                self.reject(500, "internal gateway error", "internal_error")
            return
        except httptools.HttpParserError as e:
            self.reject(400, f"malformed HTTP request: {_reason(e)}", "bad_request")
            return
        if self.in_head and self.unparsed_head > self.limits.max_header_bytes:
            # A head still incomplete past the limit: no need to wait for it.
            self.reject(431, f"request head larger than {self.limits.max_header_bytes} bytes "
                        "(server.max_header_bytes)", "headers_too_large")

    # -- parser callbacks
    def on_message_begin(self) -> None:
        self.in_message = True
        self.in_head = True
        self._reset_message()
        if self.current is None and self.phase != HEAD:
            self._enter(HEAD, self.limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url.append(url)
        self.head_bytes += len(url)
        if self.head_bytes > self.limits.max_header_bytes:
            raise _Reject(431, f"request head larger than {self.limits.max_header_bytes} bytes "
                          "(server.max_header_bytes)", "headers_too_large")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            # A chunked body's trailer: not a header of the request, and
            # never forwarded as one.
            return
        headers = self.headers
        if len(headers) >= self.limits.max_headers:
            raise _Reject(431, f"more than {self.limits.max_headers} request headers "
                          "(server.max_headers)", "headers_too_large")
        self.head_bytes += len(name) + len(value) + 4
        headers.append((name, value))
        lower = name.lower()
        self.lower.append(lower)
        kind = _NOTED.get(lower)
        if kind is None:
            return
        if kind == _LENGTH:
            self.content_length = int(value)
        elif kind == _HOST:
            self.hosts += 1
        elif kind == _TYPE:
            self.content_type = value
        elif kind == _ID:
            self.request_id = value
        elif kind == _TE:
            self.chunked = True
        else:
            self.expect_continue = value.strip().lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        limits = self.limits
        self.unparsed_head = 0
        self.in_head = False
        if self.head_bytes > limits.max_header_bytes:
            raise _Reject(431, f"request head larger than {limits.max_header_bytes} bytes "
                          "(server.max_header_bytes)", "headers_too_large")
        version = self.parser.get_http_version()
        if version == "1.1" and self.hosts != 1:
            # RFC 9112 section 3.2: exactly one Host in an HTTP/1.1 request.
            raise _Reject(400, "an HTTP/1.1 request needs exactly one Host header"
                          if self.hosts else "an HTTP/1.1 request needs a Host header",
                          "bad_request")
        length = self.content_length
        if length is not None and length > limits.max_body_bytes:
            raise _Reject(413, f"request body of {length} bytes exceeds the limit of "
                          f"{limits.max_body_bytes} bytes (server.max_body_bytes)",
                          "request_too_large")
        if length or (length is None and self.chunked):
            if self.expect_continue and version == "1.1":
                if self.current is None:
                    self.transport.write(CONTINUE)
                else:
                    self.continue_due = True  # after the answer in progress
            if self.current is None:
                self._enter(BODY, limits.body_timeout)
            else:
                self.phase = BODY

    def on_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.body_bytes > self.limits.max_body_bytes:
            # Chunked bodies have no length up front: counted as they come.
            raise _Reject(413, f"request body of {self.body_bytes} bytes or more exceeds the "
                          f"limit of {self.limits.max_body_bytes} bytes "
                          "(server.max_body_bytes)", "request_too_large")
        self.body.append(data)

    def on_message_complete(self) -> None:
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():
            if self.body_bytes or self.content_length or \
                    (self.content_length is None and self.chunked):
                raise _Reject(400, "protocol upgrade is not supported; send the request "
                              "without Upgrade", "upgrade_not_supported")
            keep_alive = False
        url = b"".join(self.url)
        self.continue_due = False
        if url[:1] == b"/":
            path = url.split(b"?", 1)[0]
        else:
            url, path = _origin_form(url)
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        version = parser.get_http_version()
        request = Request(self, parser.get_method(), url, path,
                          b"HTTP/1.1" if version == "1.1" else b"HTTP/" + version.encode(),
                          self.headers, body, keep_alive, self.lower, self.request_id,
                          self.content_type)
        self.in_message = False
        # The rest of the per-message state is reset when the next begins.
        self.request_id = b""
        self.queue.append(request)
        if len(self.queue) > PIPELINE_DEPTH and not self.read_paused:
            self.read_paused = True
            self.transport.pauseProducing()
        self._serve_next()

    # -- answering, one request at a time and in order
    def _serve_next(self) -> None:
        if self.serving:
            return  # the loop below, further up the stack, takes it
        self.serving = True
        try:
            while self.current is None and self.queue and not self.closing \
                    and not self.write_paused:
                request = self.queue.popleft()
                self.current = request
                self._enter(HANDLING, None)
                try:
                    self.router.handle(request)
                except Exception:
                    self._handler_failed(request)
        finally:
            self.serving = False
        if self.read_paused and len(self.queue) <= PIPELINE_DEPTH // 2 and not self.closing:
            self.read_paused = False
            if not self.write_paused:
                self.transport.resumeProducing()

    def _handler_failed(self, request: Request) -> None:
        # A bug of ours must not show the client a traceback.
        log.failure("while handling {method} {uri}", method=request.method,
                    uri=request.uri.decode("latin-1"))
        if request.finished or request.disconnected:
            return
        if request.started:
            request.abort()
            return
        send_error(request, 500, "internal gateway error", "internal_error")

    def request_done(self, request: Request) -> None:
        """Called by a request once its answer is written whole."""
        if request is not self.current:
            return
        self.current = None
        if not request.keep_alive or self.upgraded:
            # The answer said the connection ends with it: whatever the
            # client sent after, even a malformed request, gets no answer.
            self.pending_reject = None
            self._close()
            return
        if self.pending_reject is not None:
            status, message, code = self.pending_reject
            self.pending_reject = None
            self.closing = False
            self.reject(status, message, code)
            return
        if self.closing:
            self._close()
            return
        if self.queue:
            self._serve_next()
        if self.current is None:
            if self.continue_due:
                self.continue_due = False
                self.transport.write(CONTINUE)
            if self.in_message:
                self._enter(BODY if self.phase == BODY else HEAD,
                            self.limits.body_timeout if self.phase == BODY
                            else self.limits.header_timeout)
            else:
                self._enter(IDLE, self.limits.idle_timeout)

    def _close(self) -> None:
        self.closing = True
        self._enter(IDLE, None)
        self.transport.loseConnection()
        if self.abort_timer is None:
            self.abort_timer = self.clock.callLater(ABORT_AFTER_SECONDS, self._abort)

    def _abort(self) -> None:
        self.abort_timer = None
        self.transport.abortConnection()

    # -- deadlines
    def _enter(self, phase: str, timeout: Optional[float]) -> None:
        self.phase = phase
        self.deadline_at = None if timeout is None else self.clock.seconds() + timeout

    def check(self, now: float) -> None:
        """Called by the factory's sweep."""
        if self.deadline_at is not None and self.deadline_at <= now:
            self.deadline_passed()

    def deadline_passed(self) -> None:
        self.deadline_at = None
        phase = self.phase
        if phase == IDLE:
            log.debug("closing idle keep-alive connection from {client}", client=self.client_ip)
            self._close()
            return
        if not self.bytes_seen:
            # Nothing was ever said (or the TLS handshake never finished):
            # there is no one to answer, just let go of the socket.
            log.debug("dropping silent connection from {client}", client=self.client_ip)
            self.closing = True
            self.transport.abortConnection()
            return
        log.info("closing {client}: request {phase} not received within its deadline",
                 client=self.client_ip, phase=phase)
        setting = "server.header_timeout_seconds" if phase == HEAD else \
            "server.body_timeout_seconds"
        self.reject(408, f"request {phase} not received in time ({setting})", "request_timeout")

    # -- errors found while receiving
    def reject(self, status: int, message: str, code: str) -> None:
        """Answer ``status`` as a whole raw response and close the connection.

        If an answer is still being written for an earlier request, this one
        waits for it (answers never interleave) and nothing more is read.
        """
        if self.closing:
            return
        if self.current is not None:
            self.closing = True
            self.pending_reject = (status, message, code)
            self.queue.clear()
            return
        self.closing = True
        self.queue.clear()
        self._enter(IDLE, None)
        request_id = sane_request_id(self.request_id)
        self.transport.write(raw_error_response(status, message, code, request_id))
        access_log.info("{client} - - {status} rejected: {reason} request_id={request_id}",
                        client=self.client_ip, status=status, reason=code,
                        request_id=request_id.decode("ascii", "replace"), outcome="rejected")
        self._close()

    def log_failure(self, fmt: str, **kw: Any) -> None:
        log.failure(fmt, **kw)


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text.replace("\r", " ").replace("\n", " ")[:200]


def _origin_form(url: bytes) -> Tuple[bytes, bytes]:
    """(uri, path) for an absolute-form target (``http://host/v1/...``); the
    target's authority stands in for Host, as RFC 9112 section 3.2.2 says."""
    lower = url[:8].lower()
    if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
        raise _Reject(400, "request target must be a path or an absolute http(s) URL",
                      "bad_request")
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        raise _Reject(400, "request target is not a valid URL", "bad_request") from None
    path = parsed.path or b"/"
    return (path + b"?" + parsed.query if parsed.query else path), path


class GatewayServer(Factory):
    """Builds one protocol per client connection; tracks them for shutdown
    and metrics, and checks their deadlines."""

    noisy = False

    def __init__(self, router: Any, limits: Limits, clock: IReactorTime) -> None:
        self.router = router
        self.limits = limits
        self.clock = clock
        self.channels: "set[HTTPServerProtocol]" = set()
        self.connections_total = 0
        # Told when a connection opens or closes: a worker reports its count
        # to the supervisor, which gives new connections to the least busy.
        self.on_connections: Optional[Callable[[], None]] = None
        # How late a deadline may be noticed: a small share of the shortest.
        self.deadlines = DeadlineSweep(
            clock, min(0.25, limits.header_timeout / 8, limits.body_timeout / 8), self.channels)

    def buildProtocol(self, addr: Any) -> HTTPServerProtocol:
        return HTTPServerProtocol(self)

    def connection_made(self, channel: HTTPServerProtocol) -> None:
        self.connections_total += 1
        self.deadlines.add(channel)
        if self.on_connections is not None:
            self.on_connections()

    def connection_lost(self, channel: HTTPServerProtocol) -> None:
        self.channels.discard(channel)
        if self.on_connections is not None:
            self.on_connections()
