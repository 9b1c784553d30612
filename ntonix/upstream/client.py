"""The HTTP client to the backends: our own keep-alive pool on the data
plane, treq on the control plane.

Forwarded requests go over ``UpstreamConnection``s (httptools), kept per
backend. Under load the pool keeps every connection a finished answer frees
(the next request takes it at once, most recently used first); once traffic
calms, connections idle for a second beyond ``proxy.pool_size_per_backend``
are closed, and any idle for ``proxy.pool_idle_seconds``. Closing a freed
connection while requests are still arriving would only open another one for
the next request: a connect and a close per request. New ones are opened with
``proxy.connect_timeout_seconds`` and counted per backend (the pool churn an
operator sizes the pool by). A request that fails on a reused connection
before any byte of answer (the backend closed it while it sat idle) is sent
once more on a fresh one.

The gateway's own small requests (``/v1/models``, health checks) go through
treq over Twisted's Agent and a pool of their own: they are few, and their
answers are read whole.
"""

from collections import Counter
from http.cookiejar import CookieJar
from ipaddress import ip_address
from typing import Any, Dict, List, Optional

from treq.client import HTTPClient
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from ntonix.sockets import connect_direct
from ntonix.upstream.connection import UpstreamConnection

log = Logger(namespace="ntonix.upstream.client")


class NoCookies(CookieJar):
    """A jar that keeps nothing: one client serves every user, so a cookie
    from one backend answer must never ride along on another user's request."""

    def set_cookie(self, cookie: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


class TrustError(ValueError):
    """``proxy.ca_file`` cannot be used; the message says why, in one line."""


def load_trust_root(ca_file: str) -> Any:
    """The CAs that HTTPS backends are checked against: those in the PEM
    file ``ca_file``, or the system's when it is empty."""
    if not ca_file:
        return ssl.platformTrust()
    try:
        with open(ca_file, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise TrustError(f'proxy.ca_file = "{ca_file}": cannot read it: {e.strerror}') from None
    marker = b"-----END CERTIFICATE-----"
    blocks = [b + marker for b in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in b]
    try:
        certificates = [ssl.Certificate.loadPEM(b) for b in blocks]
    except Exception:
        certificates = []
    if not certificates:
        raise TrustError(f'proxy.ca_file = "{ca_file}": no PEM certificate in it')
    return ssl.trustRootFromCertificates(certificates)


@implementer(IPolicyForHTTPS)
class _TrustPolicy:
    """The control plane's HTTPS checks, against the same CAs as the data plane."""

    def __init__(self, client: "UpstreamClient") -> None:
        self.client = client

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.client.tls_options(hostname.decode("idna"))


class UpstreamRequest:
    """One request on its way to one backend.

    Its receiver gets ``got_response(request, response)`` once, or
    ``failed(request, exception)`` once; ``cancel()`` drops it at any stage.
    """

    __slots__ = ("client", "host", "port", "name", "data", "receiver", "connection",
                 "connecting", "reused", "done", "tls")

    def __init__(self, client: "UpstreamClient", host: str, port: int, name: str, data: bytes,
                 receiver: Any, tls: bool = False) -> None:
        self.client = client
        self.tls = tls
        self.host = host
        self.port = port
        self.name = name
        self.data = data
        self.receiver = receiver
        self.connection: Optional[UpstreamConnection] = None
        self.connecting: Any = None  # a connector or an endpoint's Deferred
        self.reused = False
        self.done = False

    def got_response(self, response: Any) -> None:
        if not self.done:
            self.done = True
            # From here the response owns the connection (and hands it back
            # to the pool); a late cancel must not reach it.
            self.connection = None
            self.receiver.got_response(self, response)

    def failed(self, reason: Exception) -> None:
        if not self.done:
            self.done = True
            self.connection = None
            self.receiver.failed(self, reason)

    def lost(self, reason: Exception, got_bytes: bool) -> None:
        """The connection ended before the response head."""
        self.connection = None
        if self.done:
            return
        if self.reused and not got_bytes:
            # Closed by the backend while idle in the pool: nothing was
            # answered, so a fresh connection may carry the request.
            self.reused = False
            self.client.connect(self)
            return
        self.failed(reason)

    def cancel(self) -> None:
        if self.done and self.connection is None:
            return
        self.done = True
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.stopProducing()
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            if isinstance(connecting, defer.Deferred):
                connecting.cancel()
            else:
                connecting.disconnect()


class _ConnectFactory(ClientFactory):
    """Opens one connection for one request."""

    noisy = False

    def __init__(self, client: "UpstreamClient", request: UpstreamRequest) -> None:
        self.client = client
        self.name = request.name
        self.request: Optional[UpstreamRequest] = request

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self.client, self.name, on_connected=self.connected)

    def connected(self, conn: UpstreamConnection) -> None:
        # The connector keeps its factory as long as the connection lives:
        # it must not keep the request (and its body) that long.
        request, self.request = self.request, None
        request.connecting = None
        if request.done:
            conn.client.release(conn)  # a cancelled request's connection is still good
        else:
            conn.send(request)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        request, self.request = self.request, None
        if request is not None:
            request.connecting = None
            request.failed(reason.value)


class UpstreamClient:
    """Sends requests to backends over pooled keep-alive connections."""

    def __init__(self, reactor: Any, pool_size_per_backend: int, pool_idle_seconds: float,
                 connect_timeout: float, max_head_bytes: int = 32 * 1024,
                 max_headers: int = 100, ca_file: str = "") -> None:
        self.reactor = reactor
        # HTTPS backends: checked against these CAs, SNI and name per host.
        self.trust = load_trust_root(ca_file)
        self._tls_options: Dict[str, Any] = {}
        # Bounds on a backend's response head (server.max_upstream_*).
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.idle: Dict[str, List[UpstreamConnection]] = {}
        self.opened: Counter = Counter()
        self.max_idle = pool_size_per_backend
        self.idle_seconds = pool_idle_seconds
        self.connect_timeout = connect_timeout
        self.sweeper: Optional[IDelayedCall] = None
        # Connections past the idle cap go when idle this long: long enough
        # to be reused under load, short enough to free the backend's sockets.
        self.surplus_seconds = 1.0
        # For the gateway's own requests, whose answers it reads whole.
        self.control_pool = HTTPConnectionPool(reactor, persistent=True)
        self.control_pool.maxPersistentPerHost = 2
        self.control_pool._factory.noisy = False
        self.treq = HTTPClient(Agent(reactor, contextFactory=_TrustPolicy(self),
                                     pool=self.control_pool), cookiejar=NoCookies())

    def tls_options(self, host: str) -> Any:
        """Client TLS for ``host``: SNI, certificate checked against
        ``self.trust`` and for that name (or address)."""
        options = self._tls_options.get(host)
        if options is None:
            options = self._tls_options[host] = ssl.optionsForClientTLS(
                host, trustRoot=self.trust)
        return options

    def reconfigure(self, pool_size_per_backend: int, pool_idle_seconds: float,
                    connect_timeout: float) -> None:
        self.max_idle = pool_size_per_backend
        self.idle_seconds = pool_idle_seconds
        self.connect_timeout = connect_timeout

    def connections_opened(self, backend_name: str) -> int:
        """New connections opened to a backend so far (attempts included)."""
        return self.opened[backend_name]

    def idle_connections(self, backend_name: str) -> int:
        return len(self.idle.get(backend_name, ()))

    def forward(self, host: str, port: int, name: str, data: bytes,
                receiver: Any, tls: bool = False) -> UpstreamRequest:
        """Send ``data`` (a whole request) to the backend; the answer goes to
        ``receiver``."""
        request = UpstreamRequest(self, host, port, name, data, receiver, tls)
        idle = self.idle.get(name)
        if idle:
            limit = self.reactor.seconds() - self.idle_seconds
            while idle:
                conn = idle.pop()  # the most recently used: the least likely stale
                conn.pooled = False
                if conn.connected and conn.idle_since >= limit:
                    request.reused = True
                    conn.send(request)
                    return request
                conn.transport.loseConnection()
        self.connect(request)
        return request

    def connect(self, request: UpstreamRequest) -> None:
        self.opened[request.name] += 1
        factory = _ConnectFactory(self, request)
        try:
            if request.tls:
                raise ValueError("through an endpoint")
            ip_address(request.host)
        except ValueError:
            # A name (resolved per connection: the pool keeps them few), or
            # HTTPS (Twisted's TLS over a plain endpoint).
            ep: Any = HostnameEndpoint(self.reactor, request.host.encode("idna"), request.port,
                                       timeout=self.connect_timeout)
            if request.tls:
                ep = wrapClientTLS(self.tls_options(request.host), ep)
            d = ep.connect(factory)
            request.connecting = d

            def failed(f: Failure) -> None:
                if request.connecting is d:
                    request.connecting = None
                    request.failed(f.value)

            d.addErrback(failed)
            return
        request.connecting = connect_direct(self.reactor, request.host, request.port, factory,
                                            self.connect_timeout)

    def release(self, conn: UpstreamConnection) -> None:
        """A connection whose answer was read whole: keep it for the next
        request (the sweeper trims the surplus once traffic calms)."""
        if not conn.connected or conn.pooled:
            return
        conn.pooled = True
        idle = self.idle.get(conn.name)
        if idle is None:
            idle = self.idle[conn.name] = []
        conn.idle_since = self.reactor.seconds()
        idle.append(conn)
        if self.sweeper is None:
            self.sweeper = self.reactor.callLater(self.surplus_seconds, self._sweep)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: it is no longer in the pool."""
        if conn.pooled:
            conn.pooled = False
            idle = self.idle.get(conn.name)
            if idle and conn in idle:
                idle.remove(conn)

    def _sweep(self) -> None:
        """Close the surplus past the idle cap once it has sat idle for a
        second, and anything idle past ``proxy.pool_idle_seconds``."""
        self.sweeper = None
        now = self.reactor.seconds()
        expired, surplus = now - self.idle_seconds, now - self.surplus_seconds
        left = False
        for idle in self.idle.values():
            # Oldest first: the list's head is the least recently used.
            extra = len(idle) - self.max_idle
            keep = []
            for conn in idle:
                if conn.idle_since < expired or (extra > 0 and conn.idle_since < surplus):
                    extra -= 1
                    conn.pooled = False
                    conn.transport.loseConnection()
                else:
                    keep.append(conn)
            idle[:] = keep
            left = left or bool(keep)
        if left:
            self.sweeper = self.reactor.callLater(
                min(self.surplus_seconds, self.idle_seconds / 2), self._sweep)

    def close(self) -> "defer.Deferred[None]":
        if self.sweeper is not None and self.sweeper.active():
            self.sweeper.cancel()
        self.sweeper = None
        for idle in self.idle.values():
            for conn in list(idle):
                conn.pooled = False
                conn.transport.loseConnection()
        self.idle.clear()
        return self.control_pool.closeCachedConnections()

