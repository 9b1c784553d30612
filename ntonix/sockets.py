"""TCP transports that write to the socket at once while nothing is queued.

Twisted's TCP transport queues every ``write`` and sends it on the reactor's
next turn: one ``epoll_ctl`` to watch for writability, the poll, the send,
another ``epoll_ctl`` to stop watching. For a gateway that writes one small
answer per request and one small chunk per token, that is most of the cost of
a write. These subclasses try ``send`` first when nothing is waiting in
Twisted's buffer (the common case: the socket takes it all) and hand anything
left over to Twisted's own machinery, which then owns ordering, flow control
and producer pausing exactly as before. They are built by ``DirectWritePort``
and ``DirectWriteConnector``, the same classes ``listenTCP``/``connectTCP``
use, with only the transport class changed; ``adopt_direct`` builds one for
a connection accepted by another process (the workers' supervisor).

Plain TCP only: under TLS, the TLS layer writes ciphertext through the same
transport, so its order is kept too, but the listener for HTTPS keeps
Twisted's default transport; its cost is dominated by encryption.
"""

import itertools
import socket
from typing import Any, Callable, Iterable, Optional

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.posixbase import PosixReactorBase


class _DirectWrite:
    """Mixed into a ``tcp.Connection`` subclass."""

    # True while Twisted's buffer may hold bytes: from the first write we
    # hand it until it reports the buffer drained (``stopWriting``).
    _queued = False
    # Set by abortConnection: from then on Twisted decides (it drops writes).
    _aborted_here = False

    def abortConnection(self) -> None:
        self._aborted_here = True
        tcp.Connection.abortConnection(self)

    def write(self, data: bytes) -> None:
        if self._queued or not self.connected or self.disconnecting or self._aborted_here \
                or not data:
            if data:
                self._queued = True
            tcp.Connection.write(self, data)
            return
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Let Twisted's write path meet the error and report it the
            # usual way (connectionLost).
            sent = 0
        if sent < len(data):
            self._queued = True
            tcp.Connection.write(self, data[sent:] if sent else data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))

    def stopWriting(self) -> None:
        # Twisted calls this when its buffer is drained (or the connection
        # is gone): sending at once is safe again.
        self._queued = False
        tcp.Connection.stopWriting(self)


class DirectWriteServer(_DirectWrite, tcp.Server):
    # What Twisted may hold for a client beyond the kernel's socket buffer
    # before it pauses the producer (the upstream socket), and what one read
    # takes. Its default is 64 KB: that much per stalled reader, where a
    # stream's chunks are a few hundred bytes each and the kernel buffer
    # already absorbs bursts.
    bufferSize = 16 * 1024


class DirectWriteClient(_DirectWrite, tcp.Client):
    # Also what one read may take from the backend: with the client's
    # buffer, the most a stalled stream can hold in the gateway. (Backends
    # given by name connect through HostnameEndpoint, whose transport is
    # Twisted's own: 64 KB reads, queued writes.)
    bufferSize = 16 * 1024


class DirectWritePort(tcp.Port):
    transport = DirectWriteServer


class DirectWriteConnector(tcp.Connector):
    def _makeTransport(self) -> DirectWriteClient:
        return DirectWriteClient(self.host, self.port, self.bindAddress, self, self.reactor)


def supported(reactor: Any) -> bool:
    """Whether ``reactor`` runs Twisted's POSIX TCP transports."""
    return isinstance(reactor, PosixReactorBase)


def listen_direct(reactor: Any) -> Callable[..., Any]:
    """A ``listenTCP`` replacement whose connections write at once."""
    if not supported(reactor):
        return reactor.listenTCP

    def listen(port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        p = DirectWritePort(port, factory, backlog, interface, reactor)
        p.startListening()
        return p

    return listen


_adopted = itertools.count()


def adopt_direct(reactor: Any, skt: socket.socket, factory: Any) -> Optional[DirectWriteServer]:
    """Serve a connection accepted elsewhere with a transport that writes at
    once: what ``reactor.adoptStreamConnection`` does (it builds Twisted's
    ``tcp.Server`` from the socket the same way), with this module's
    transport class. The transport takes ``skt``; its peer address is the
    client's, read from the socket."""
    peer = skt.getpeername()
    address = (IPv6Address if skt.family == socket.AF_INET6 else IPv4Address)("TCP", *peer)
    protocol = factory.buildProtocol(address)
    if protocol is None:
        skt.close()
        return None
    transport = DirectWriteServer(skt, protocol, peer, None, next(_adopted), reactor)
    # tcp.Server names itself after its listening port, which it has none of here.
    transport.repstr = f"<{type(protocol).__name__} #{transport.sessionno} adopted>"
    protocol.makeConnection(transport)
    return transport


def connect_direct(reactor: Any, host: str, port: int, factory: Any, timeout: float,
                   bind_address: Optional[Any] = None) -> Any:
    """``connectTCP`` whose connection writes at once."""
    if not supported(reactor):
        return reactor.connectTCP(host, port, factory, timeout=timeout)
    c = DirectWriteConnector(host, port, factory, timeout, bind_address, reactor)
    c.connect()
    return c
