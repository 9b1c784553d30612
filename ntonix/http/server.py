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

Caps, per process (each worker has its own):
- ``server.max_connections``: at the cap, a new connection first closes the
  connection idle longest between requests; with none idle, the listeners
  stop accepting (clients wait in the kernel's backlog) until one closes.
  Connections accepted in the same wake-up past the cap are closed at once.
- ``server.max_connections_per_client``: one address's connections past it
  are closed at once (not loopback's, nor those of a proxy the ``exempt``
  function names: ``tenants.trusted_proxies``).
- ``server.max_buffered_body_bytes``: request body bytes held over every
  connection, from their first byte until their answer ends; past it the
  request is answered 503 (Retry-After) and its connection closed.
"""

import resource
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

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
# Seconds between two log lines about the same cap being reached.
CAP_LOG_SECONDS = 10.0
# Why a connection was closed at once (the metric's reason label).
MAX_CONNECTIONS, MAX_PER_CLIENT = "max_connections", "max_connections_per_client"


@attrs.frozen
class Limits:
    max_body_bytes: int
    max_headers: int
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    idle_timeout: float
    # The caps' defaults are the settings' (config.py says why).
    max_connections: int = 4096
    max_connections_per_client: int = 256  # 0: none
    max_buffered_body_bytes: int = 128 * 1024 * 1024

    @classmethod
    def from_config(cls, server_cfg: Any) -> "Limits":
        return cls(
            max_body_bytes=server_cfg.max_body_bytes,
            max_headers=server_cfg.max_headers,
            max_header_bytes=server_cfg.max_header_bytes,
            header_timeout=server_cfg.header_timeout_seconds,
            body_timeout=server_cfg.body_timeout_seconds,
            idle_timeout=server_cfg.idle_timeout_seconds,
            max_connections=server_cfg.max_connections,
            max_connections_per_client=server_cfg.max_connections_per_client,
            max_buffered_body_bytes=server_cfg.max_buffered_body_bytes,
        )


# Headers the parser picks out as they arrive (one dict lookup per header).
_LENGTH, _HOST, _TYPE, _ID, _TE, _EXPECT = range(6)
_NOTED = {b"content-length": _LENGTH, b"host": _HOST, b"content-type": _TYPE,
          b"x-request-id": _ID, b"transfer-encoding": _TE, b"expect": _EXPECT}


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer an error."""

    def __init__(self, status: int, message: str, code: str,
                 retry_after: Optional[int] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.retry_after = retry_after


def chunked_alone(value: bytes) -> bool:
    """Whether a Transfer-Encoding value (every such header's, joined by
    commas) is ``chunked`` and nothing else. Any other coding (gzip,
    deflate, the obsolete identity: RFC 9112 section 6.1) is one the gateway
    does not decode, and relaying the bytes as if it had would give the
    backend a different body than the client sent."""
    if value == b"chunked":
        return True
    return [c for c in (p.strip(b" \t").lower() for p in value.split(b",")) if c] == [b"chunked"]


class _Refused(Protocol):
    """A connection over a cap: closed at once, before any byte of it is
    read (under TLS, before the handshake costs anything)."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


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
        self.pending_reject: Optional[Tuple[int, str, str, Optional[int]]] = None
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
        # Body bytes of this connection counted in the factory's total
        # (server.max_buffered_body_bytes): the message being received, the
        # requests queued and the one being answered.
        self.held = 0
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
        self.transfer_encoding = b""
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
        self._release(self.held)
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
            idle = self.factory.idle
            if self in idle:  # busy again: no longer the one to close first
                del idle[self]
                if not idle:
                    self.factory.none_idle()
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
                self.reject(cause.status, cause.message, cause.code, cause.retry_after)
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
            self.transfer_encoding = value if not self.transfer_encoding else \
                self.transfer_encoding + b"," + value
        else:
            self.expect_continue = value.strip().lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        limits = self.limits
        self.unparsed_head = 0
        self.in_head = False
        if self.head_bytes > limits.max_header_bytes:
            raise _Reject(431, f"request head larger than {limits.max_header_bytes} bytes "
                          "(server.max_header_bytes)", "headers_too_large")
        if self.chunked and not chunked_alone(self.transfer_encoding):
            # llhttp decodes "gzip, chunked" as chunked alone, and refuses
            # only the lists where chunked is not last (a 400, as RFC 9112
            # section 6.3 asks). The connection closes: the body's end
            # cannot be known, so neither can the next request's start.
            shown = self.transfer_encoding.decode("latin-1")[:100]
            raise _Reject(501, f"Transfer-Encoding {shown!r} is not implemented: send the "
                          "body with Content-Length, or Transfer-Encoding: chunked alone",
                          "transfer_coding_not_implemented")
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
        if length and self.factory.body_bytes + length > limits.max_buffered_body_bytes:
            raise self._busy()  # refused before it is read
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
        n = len(data)
        self.body_bytes += n
        if self.body_bytes > self.limits.max_body_bytes:
            # Chunked bodies have no length up front: counted as they come.
            raise _Reject(413, f"request body of {self.body_bytes} bytes or more exceeds the "
                          f"limit of {self.limits.max_body_bytes} bytes "
                          "(server.max_body_bytes)", "request_too_large")
        factory = self.factory
        self.held += n
        factory.body_bytes += n
        if factory.body_bytes > self.limits.max_buffered_body_bytes:
            raise self._busy()
        self.body.append(data)

    def _busy(self) -> _Reject:
        return _Reject(503, "the gateway holds as many request bodies as it may "
                       f"({self.limits.max_buffered_body_bytes} bytes, "
                       "server.max_buffered_body_bytes); try again", "server_busy",
                       retry_after=1)

    def _release(self, n: int) -> None:
        """Body bytes this connection no longer holds."""
        if n:
            self.held -= n
            self.factory.body_bytes -= n

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
        n = len(request.body)
        if n:  # its body is let go (inline: once per request)
            self.held -= n
            self.factory.body_bytes -= n
        if not request.keep_alive or self.upgraded:
            # The answer said the connection ends with it: whatever the
            # client sent after, even a malformed request, gets no answer.
            self.pending_reject = None
            self._close()
            return
        if self.pending_reject is not None:
            status, message, code, retry_after = self.pending_reject
            self.pending_reject = None
            self.closing = False
            self.reject(status, message, code, retry_after)
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
                factory = self.factory
                factory.idle[self] = None  # the last to become idle, last to be closed
                if factory.paused:
                    factory.resume()  # a new connection can have this one's place now

    def evict(self) -> None:
        """Closed while idle to make room for a new connection."""
        log.debug("closing idle keep-alive connection from {client}: server.max_connections "
                  "reached", client=self.client_ip)
        self._close()

    def _close(self) -> None:
        self.factory.idle.pop(self, None)
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
    def reject(self, status: int, message: str, code: str,
               retry_after: Optional[int] = None) -> None:
        """Answer ``status`` as a whole raw response and close the connection.

        If an answer is still being written for an earlier request, this one
        waits for it (answers never interleave) and nothing more is read.
        """
        if self.closing:
            return
        # Whatever was received after the request being answered (queued
        # requests, a partial one) is dropped with the connection.
        self._release(self.held - (len(self.current.body) if self.current is not None else 0))
        self.body = []
        if self.current is not None:
            self.closing = True
            self.pending_reject = (status, message, code, retry_after)
            self.queue.clear()
            return
        self.closing = True
        self.queue.clear()
        self._enter(IDLE, None)
        rejected = self.factory.rejected
        rejected[code] = rejected.get(code, 0) + 1
        request_id = sane_request_id(self.request_id)
        self.transport.write(raw_error_response(status, message, code, request_id,
                                                retry_after))
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
    and metrics, checks their deadlines, and keeps the caps (the module's
    docstring says what each does).

    ``exempt(ip)`` says whether an address is spared the per-client cap (a
    proxy in front speaks for many clients; loopback always is); the
    listeners that bring connections are given with ``add_listener``, to be
    paused at the cap.
    """

    noisy = False

    def __init__(self, router: Any, limits: Limits, clock: IReactorTime,
                 exempt: Optional[Callable[[str], bool]] = None) -> None:
        self.router = router
        self.limits = limits
        self.clock = clock
        self.exempt = exempt
        self.channels: "set[HTTPServerProtocol]" = set()
        self.connections_total = 0
        self.per_client: Dict[str, int] = {}
        # Connections idle between requests, the longest idle first (a dict
        # keeps insertion order; a connection leaves it when it is busy).
        self.idle: Dict[HTTPServerProtocol, None] = {}
        # Ports (push producers) to pause while at server.max_connections.
        self.listeners: List[Any] = []
        self.paused = False
        # Request body bytes held over all connections.
        self.body_bytes = 0
        # Counters, read at scrape time.
        self.refused = {MAX_CONNECTIONS: 0, MAX_PER_CLIENT: 0}
        self.evicted = 0
        self.accept_pauses = 0
        self.rejected: Dict[str, int] = {}  # requests refused while received, by code
        self._logged_at: Dict[str, float] = {}
        # Told when a connection opens or closes: a worker reports its count
        # to the supervisor, which gives new connections to the least busy.
        self.on_connections: Optional[Callable[[], None]] = None
        # How late a deadline may be noticed: a small share of the shortest.
        self.deadlines = DeadlineSweep(
            clock, min(0.25, limits.header_timeout / 8, limits.body_timeout / 8), self.channels)

    def buildProtocol(self, addr: Any) -> Protocol:
        limits = self.limits
        host = getattr(addr, "host", None) or ""
        cap = limits.max_connections_per_client
        if cap and self.per_client.get(host, 0) >= cap and not self._exempt(host):
            return self._refuse(MAX_PER_CLIENT, host)
        if len(self.channels) >= limits.max_connections and not self._evict_idle():
            return self._refuse(MAX_CONNECTIONS, host)
        return HTTPServerProtocol(self)

    def _exempt(self, host: str) -> bool:
        # Loopback is this machine: a sidecar proxy, or the operator's own
        # load test.
        return host.startswith(("127.", "::ffff:127.")) or host == "::1" or \
            (self.exempt is not None and self.exempt(host))

    def _refuse(self, reason: str, host: str) -> Protocol:
        self.refused[reason] += 1
        self._log_cap(reason, "closing a new connection from {client} at once: server.{cap} "
                      "reached ({refused} so far)", client=host, cap=reason,
                      refused=self.refused[reason])
        return _Refused()

    def _evict_idle(self) -> bool:
        """Close the connection idle longest, if any is idle."""
        for channel in self.idle:
            break
        else:
            return False
        del self.idle[channel]
        self.evicted += 1
        channel.evict()
        return True

    def none_idle(self) -> None:
        """The last idle connection is busy again."""
        if len(self.channels) >= self.limits.max_connections:
            self._pause()  # none left to make room with

    def add_listener(self, port: Any) -> None:
        """``port`` brings connections: paused while at the cap."""
        self.listeners.append(port)
        if self.paused:
            port.pauseProducing()

    def remove_listener(self, port: Any) -> None:
        if port in self.listeners:
            self.listeners.remove(port)

    def _pause(self) -> None:
        if self.paused or not self.listeners:
            return  # (a worker's connections come from its supervisor: refused instead)
        self.paused = True
        self.accept_pauses += 1
        for port in self.listeners:
            port.pauseProducing()
        self._log_cap("paused", "server.max_connections ({cap}) reached, none idle: not "
                      "accepting until one closes", cap=self.limits.max_connections)

    def resume(self) -> None:
        self.paused = False
        for port in self.listeners:
            port.resumeProducing()

    def _log_cap(self, kind: str, fmt: str, **fields: Any) -> None:
        # Once per CAP_LOG_SECONDS per kind: a flood must not flood the log.
        now = self.clock.seconds()
        if now - self._logged_at.get(kind, float("-inf")) >= CAP_LOG_SECONDS:
            self._logged_at[kind] = now
            log.warn(fmt, **fields)

    def connection_made(self, channel: HTTPServerProtocol) -> None:
        self.connections_total += 1
        self.deadlines.add(channel)
        ip = channel.client_ip
        self.per_client[ip] = self.per_client.get(ip, 0) + 1
        if len(self.channels) >= self.limits.max_connections and not self.idle:
            self._pause()
        if self.on_connections is not None:
            self.on_connections()

    def connection_lost(self, channel: HTTPServerProtocol) -> None:
        self.channels.discard(channel)
        self.idle.pop(channel, None)
        ip = channel.client_ip
        n = self.per_client.get(ip, 0) - 1
        if n > 0:
            self.per_client[ip] = n
        else:
            self.per_client.pop(ip, None)
        if self.paused and len(self.channels) < self.limits.max_connections:
            self.resume()
        if self.on_connections is not None:
            self.on_connections()


def fd_headroom_warning(limits: Limits) -> Optional[str]:
    """A warning when the process may open fewer files than its connections
    can need: past the limit accept() fails (EMFILE) and Twisted closes each
    new connection at once, whatever server.max_connections says."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # A client connection and its backend connection, and some to spare.
    needed = 2 * limits.max_connections + 64
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    return (f"server.max_connections is {limits.max_connections}, but this process may open "
            f"{soft} files (ulimit -n) and each connection can need two (client and backend): "
            f"raise the limit to {needed} or more, or lower server.max_connections")
