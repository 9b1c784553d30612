"""One keep-alive HTTP/1.1 connection to a backend, parsed with httptools.

A connection carries one request at a time. The response head is handed to
the request's receiver as an ``UpstreamResponse``; its body goes to whatever
protocol the receiver attaches with ``deliverBody`` (the relay's pipe), whose
``transport`` is this connection: pausing it pauses the backend socket,
stopping it closes the socket, so backpressure and cancellation stay at the
transport level. A response read whole on a connection the backend keeps
alive goes back to the pool; anything else closes it.

The response head is bounded (size and header count): past the limits the
client gets a 502 and the connection is closed, never an unbounded buffer.
"""

from typing import TYPE_CHECKING, Any, Callable, List, Optional, Tuple

import httptools
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from ntonix.upstream.client import UpstreamClient, UpstreamRequest


class UpstreamClosed(Exception):
    """The backend closed the connection before the response head: it
    cannot have produced an answer, so the request may be tried again."""


class UpstreamProtocolError(Exception):
    """The backend sent bytes that are not a usable HTTP/1.1 response."""


class _Limit(Exception):
    pass


class UpstreamResponse:
    """A response head, and the body as it arrives."""

    __slots__ = ("code", "phrase", "headers", "lower", "length", "connection", "protocol",
                 "_held", "_end")

    def __init__(self, connection: "UpstreamConnection", code: int, phrase: bytes,
                 headers: List[Tuple[bytes, bytes]], length: Optional[int],
                 lower: List[bytes]) -> None:
        self.connection = connection
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.lower = lower  # the header names lower-cased, in the same order
        self.length = length  # None: chunked or until the connection closes
        self.protocol: Any = None
        self._held: List[bytes] = []
        self._end: Optional[Tuple[bool, Optional[str]]] = None

    def header(self, name: bytes) -> bytes:
        """The first value of header ``name`` (lower-case), or b""."""
        for (_, v), low in zip(self.headers, self.lower):
            if low == name:
                return v
        return b""

    def deliverBody(self, protocol: Any) -> None:
        """Send the body to ``protocol`` (``dataReceived``, then
        ``body_ended(complete, why)``); its ``transport`` is the connection."""
        self.protocol = protocol
        protocol.transport = self.connection
        protocol.connectionMade()
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)
        if self._end is not None:
            self.protocol = None
            protocol.transport = None
            protocol.body_ended(*self._end)

    def discard(self) -> None:
        """Nobody wants this body: close the connection rather than read it."""
        self.protocol = None
        self.connection.stopProducing()

    def _data(self, data: bytes) -> None:
        if self.protocol is not None:
            self.protocol.dataReceived(data)
        elif self._end is None:
            self._held.append(data)

    def _ended(self, complete: bool, why: Optional[str]) -> None:
        if self._end is not None:
            return
        self._end = (complete, why)
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            # A finished body's connection may already serve another request.
            protocol.transport = None
            protocol.body_ended(complete, why)


class UpstreamConnection(Protocol):
    """A pooled connection to one backend."""

    def __init__(self, client: "UpstreamClient", name: str,
                 on_connected: Optional[Callable[["UpstreamConnection"], None]] = None) -> None:
        self.client = client
        self.name = name
        self.on_connected = on_connected
        self.parser = httptools.HttpResponseParser(self)
        self.request: Optional["UpstreamRequest"] = None
        self.response: Optional[UpstreamResponse] = None
        self.connected = False
        self.aborted = False  # by us: whatever it was doing is abandoned
        self.pooled = False
        self.release_due = False  # an answer read whole, to pool once parsing returns
        self.paused = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.phrase = b""
        self.headers: List[Tuple[bytes, bytes]] = []
        self.lower: List[bytes] = []
        self.head_bytes = 0
        self.length: Optional[int] = None
        self.chunked = False
        self.interim = False
        self.got_bytes = False
        self.unparsed = 0

    # -- sending
    def send(self, request: "UpstreamRequest") -> None:
        self.request = request
        request.connection = self
        self.got_bytes = False
        self.unparsed = 0
        self.transport.write(request.data)

    # -- the consumer's producer (the relay pipe drives these)
    def pauseProducing(self) -> None:
        if self.connected:
            self.paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.connected:
            self.paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """Abandon whatever is in progress: the socket closes at once, so
        the backend stops generating for nobody."""
        self.request = None
        self.release_due = False
        if self.connected and not self.aborted:
            self.aborted = True
            self.transport.abortConnection()

    # -- connection events
    def connectionMade(self) -> None:
        self.connected = True
        # One write per request, sent at once (see the client side).
        self.transport.setTcpNoDelay(True)
        if self.on_connected is not None:
            on_connected, self.on_connected = self.on_connected, None
            on_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.request is None:
            # Nothing was asked: an idle connection the backend writes on
            # is not one to reuse.
            self.transport.abortConnection()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Limit):
                self._protocol_error(str(e.__context__))
                return
            raise
        except httptools.HttpParserUpgrade:
            self._protocol_error("a protocol upgrade (101) to a request that asked for none")
            return
        except httptools.HttpParserError as e:
            self._protocol_error(f"an invalid HTTP/1.1 response ({str(e)[:120]})")
            return
        if self.release_due:
            # Pooled only once the whole read is parsed: bytes after the end
            # of an answer are an error of this connection, not the start of
            # the next request's answer.
            self.release_due = False
            if self.connected and not self.aborted:
                if self.paused:
                    # Resumed before it is pooled, or the next request never reads.
                    self.resumeProducing()
                self.client.release(self)
        elif self.response is None and self.request is not None:
            # Still in the head: llhttp holds a header line it has not
            # finished, so bound what it may hold before the line ends.
            self.unparsed += len(data)
            if self.unparsed > self.client.max_head_bytes + 4096:
                self._protocol_error(f"a response head larger than "
                                     f"{self.client.max_head_bytes} bytes "
                                     "(server.max_upstream_head_bytes)")

    def connectionLost(self, reason: Failure = None) -> None:
        self.connected = False
        self.client.forget(self)
        request, self.request = self.request, None
        response, self.response = self.response, None
        if response is not None:
            if self.length is None and not self.chunked and not self.interim \
                    and not self.aborted and reason is not None and reason.check(ConnectionDone):
                # No length and no chunks: a clean close is the end of the
                # body (a reset, or our own abort, is not).
                response._ended(True, None)
            else:
                response._ended(False, f"connection closed mid-response "
                                       f"({reason.getErrorMessage() if reason else 'closed'})")
        elif request is not None:
            request.lost(UpstreamClosed(
                "connection closed before the response head"
                + (f" ({reason.getErrorMessage()})" if reason is not None else "")),
                self.got_bytes)

    def _protocol_error(self, why: str) -> None:
        request, self.request = self.request, None
        response, self.response = self.response, None
        self.release_due = False
        if not self.aborted:
            self.aborted = True
            self.transport.abortConnection()
        if response is not None:
            response._ended(False, f"backend {self.name} sent an invalid response: {why}")
        elif request is not None:
            request.failed(UpstreamProtocolError(f"backend {self.name} sent {why}"))

    # -- parser callbacks
    def on_message_begin(self) -> None:
        if self.request is None:
            raise _Limit("bytes after the end of its answer")
        self._reset()
        self.got_bytes = True

    def on_status(self, status: bytes) -> None:
        self.phrase += status
        self.head_bytes += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        client = self.client
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > client.max_head_bytes:
            raise _Limit(f"a response head larger than {client.max_head_bytes} bytes "
                         "(server.max_upstream_head_bytes)")
        if len(self.headers) >= client.max_headers:
            raise _Limit(f"more than {client.max_headers} response headers "
                         "(server.max_upstream_headers)")
        self.headers.append((name, value))
        lower = name.lower()
        self.lower.append(lower)
        if lower == b"content-length":
            self.length = int(value)
        elif lower == b"transfer-encoding":
            self.chunked = True

    def on_headers_complete(self) -> None:
        code = self.parser.get_status_code()
        if 100 <= code < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real
            # one follows on the same connection.
            self.interim = True
            return
        request = self.request
        if request is None:
            return
        response = UpstreamResponse(self, code, self.phrase, self.headers,
                                    None if self.chunked else self.length, self.lower)
        self.response = response
        request.got_response(response)

    def on_body(self, data: bytes) -> None:
        response = self.response
        if response is not None:
            response._data(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        # Read here: llhttp resets its flags once the message is complete.
        keep_alive = self.parser.should_keep_alive()
        response, self.response = self.response, None
        wanted = self.request is not None
        self.request = None
        if keep_alive and wanted and self.connected and not self.aborted:
            self.release_due = True
        elif self.connected and not self.aborted:
            self.transport.loseConnection()
        if response is not None:
            response._ended(True, None)
