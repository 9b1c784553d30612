"""One client request and its answer, as the routes, the relay and the cache
see it.

It offers the part of twisted.web's ``IRequest`` the gateway uses, under the
same names (``setResponseCode``, ``setHeader``, ``write``, ``finish``,
``registerProducer``), so the relay and the cache read as before, but it is a
small slotted object with no ``Headers`` instances, no ``BytesIO`` and no
Deferreds: the head is built as one bytes string and goes out with the first
body bytes, and the body is framed here (Content-Length, chunked, or
close-delimited for an HTTP/1.0 client).

A producer given to ``registerProducer`` is registered on the connection's
transport itself: when the client stops reading, Twisted pauses it; when the
client goes away, Twisted stops it. That is the backpressure and the
cancellation path of every relayed stream.
"""

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

from ntonix._version import __version__

if TYPE_CHECKING:
    from ntonix.http.server import HTTPServerProtocol

SERVER = b"ntonix/" + __version__.encode()

# Callbacks given to ``when_done`` get None when the answer was written whole,
# else the reason the connection was lost first.
DoneCallback = Callable[[Any], None]

_PHRASES = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_date_cache: List[Any] = [0, b""]


def http_date(now: Optional[float] = None) -> bytes:
    """The Date header's value, formatted once per second."""
    second = int(now if now is not None else time.time())
    if _date_cache[0] != second:
        _date_cache[0] = second
        _date_cache[1] = formatdate(second, usegmt=True).encode("ascii")
    return _date_cache[1]


def reason_phrase(code: int) -> bytes:
    return _PHRASES.get(code, b"Unknown")


class RequestHeaders:
    """The request's headers in the order received, names as sent, with
    their lower-cased names (``lower``), made once by the parser.

    ``getRawHeaders`` has twisted.web's signature, so code written for
    ``Headers`` reads these unchanged; lookups are a scan of a short list.
    """

    __slots__ = ("raw", "lower")

    def __init__(self, raw: List[Tuple[bytes, bytes]],
                 lower: Optional[List[bytes]] = None) -> None:
        self.raw = raw
        self.lower = lower if lower is not None else [n.lower() for n, _ in raw]

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:
        name = name.lower()
        if name not in self.lower:
            return default
        return [v for (_, v), low in zip(self.raw, self.lower) if low == name]



class Request:
    """A parsed request and the answer being written for it."""

    __slots__ = (
        "channel", "method", "uri", "path", "clientproto", "requestHeaders", "body",
        "client_ip", "secure", "keep_alive", "code", "phrase", "headers_out",
        "started", "finished", "disconnected", "chunked", "sent_length", "producer",
        "info", "request_id", "given_request_id", "content_type", "_done", "_has_length",
        "_no_body",
    )

    def __init__(self, channel: "HTTPServerProtocol", method: bytes, uri: bytes, path: bytes,
                 clientproto: bytes, headers: List[Tuple[bytes, bytes]], body: bytes,
                 keep_alive: bool, lower: Optional[List[bytes]] = None,
                 request_id: bytes = b"", content_type: Optional[bytes] = None) -> None:
        self.channel = channel
        self.method = method
        self.uri = uri
        self.path = path
        self.clientproto = clientproto
        self.requestHeaders = RequestHeaders(headers, lower)
        # Read by every forwarded request: picked out by the parser.
        self.given_request_id = request_id
        self.content_type = content_type
        self.body = body
        self.client_ip: str = channel.client_ip
        self.secure: bool = channel.secure
        self.keep_alive = keep_alive
        self.code = 200
        self.phrase: Optional[bytes] = None
        self.headers_out: List[Tuple[bytes, bytes]] = []
        self.started = False
        self.finished = False
        self.disconnected = False
        self.chunked = False
        self.sent_length = 0
        self.producer: Any = None
        self.info: Any = None
        self.request_id = b""
        self._done: List[DoneCallback] = []
        self._has_length = False
        self._no_body = method == b"HEAD"

    # -- reading the request
    def getHeader(self, name: bytes) -> Optional[bytes]:
        values = self.requestHeaders.getRawHeaders(name)
        return values[0] if values else None

    # -- the answer's head
    def setResponseCode(self, code: int, phrase: Optional[bytes] = None) -> None:
        self.code = code
        self.phrase = phrase

    def setHeader(self, name: bytes, value: bytes) -> None:
        """Set ``name`` to one value, replacing any it had."""
        lower = name.lower()
        out = self.headers_out
        for i in range(len(out) - 1, -1, -1):
            if out[i][0].lower() == lower:
                del out[i]
        out.append((name, value))

    def addHeader(self, name: bytes, value: bytes) -> None:
        """Add one more value for ``name`` (repeated headers keep their order)."""
        self.headers_out.append((name, value))

    def _head(self) -> bytes:
        code = self.code
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, self.phrase or reason_phrase(code))]
        lines.extend([b"%s: %s\r\n" % nv for nv in self.headers_out])
        head = b"".join(lines)
        # One lower-casing of the whole head instead of one per header.
        low = head.lower()
        lines = [head]
        self._has_length = b"\ncontent-length:" in low
        if b"\ndate:" not in low:
            lines.append(b"Date: %s\r\n" % http_date())
        if b"\nserver:" not in low:
            lines.append(b"Server: %s\r\n" % SERVER)
        if code in (204, 304) or 100 <= code < 200:
            self._no_body = True
        elif not self._has_length:
            if self.clientproto == b"HTTP/1.1":
                self.chunked = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                # An HTTP/1.0 client knows no chunks: the end of the
                # connection ends the body.
                self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self.clientproto != b"HTTP/1.1":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    # -- the answer's body
    def write(self, data: bytes) -> None:
        if self.finished or self.disconnected:
            return
        info = self.info
        if info is not None and data:
            if info.first_byte_at is None:
                info.first_byte_at = self.channel.clock.seconds()
            info.chunks += 1
        out = b""
        if not self.started:
            self.started = True
            out = self._head()
        if data and not self._no_body:
            self.sent_length += len(data)
            if self.chunked:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            out = out + data if out else data
        if out:
            self.channel.transport.write(out)

    def finish(self) -> None:
        """The answer is whole: end its body and let the next request in."""
        if self.finished or self.disconnected:
            return
        tail = b""
        if not self.started:
            self.started = True
            if self.code not in (204, 304) and \
                    not any(n.lower() == b"content-length" for n, _ in self.headers_out):
                self.headers_out.append((b"Content-Length", b"0"))
            tail = self._head()
        if self.chunked and not self._no_body:
            tail += b"0\r\n\r\n"
        if tail:
            self.channel.transport.write(tail)
        if self.producer is not None:
            self.unregisterProducer()
        self.finished = True
        self._fire(None)
        self.channel.request_done(self)

    def abort(self) -> None:
        """Cut the connection: the only way to tell a client that a body
        already started is incomplete."""
        if not self.finished and not self.disconnected:
            self.channel.transport.abortConnection()

    # -- flow control
    def registerProducer(self, producer: Any, streaming: bool = True) -> None:
        """``producer`` (a push producer) is paused while the client does
        not read, and stopped if it leaves."""
        if self.disconnected:
            producer.stopProducing()
            return
        self.producer = producer
        self.channel.register_answer_producer(producer)

    def unregisterProducer(self) -> None:
        if self.producer is not None:
            self.producer = None
            self.channel.unregister_answer_producer()

    # -- the end, either way
    def when_done(self, callback: DoneCallback) -> None:
        """Call ``callback(None)`` once the answer is written whole, or
        ``callback(reason)`` if the connection is lost first."""
        if self.finished:
            callback(None)
        elif self.disconnected:
            callback(Exception("connection lost"))
        else:
            self._done.append(callback)

    def connection_lost(self, reason: Any) -> None:
        if self.finished or self.disconnected:
            return
        self.disconnected = True
        # The channel, the transport's producer, stops the answer's producer.
        self.producer = None
        self._fire(reason)

    def _fire(self, reason: Any) -> None:
        callbacks, self._done = self._done, []
        for cb in callbacks:
            try:
                cb(reason)
            except Exception:
                self.channel.log_failure("after request {request_id}",
                                         request_id=self.request_id.decode("ascii", "replace"))
