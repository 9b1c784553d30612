"""The HTTP client to the backends: one persistent connection pool.

Forwarded requests go through Twisted's ``Agent`` directly; the gateway's own
small requests (``/v1/models``, health checks) go through treq on the same
pool. treq's request path wraps every call in a cookie agent, a gzip-decoding
agent and a URL re-parse: a third of the gateway's CPU per forwarded request
at 64 clients, for behaviour a transparent proxy must not have (see
docs/adr/0002-agent-for-forwarding.md).
"""

from collections import Counter
from http.cookiejar import CookieJar
from ipaddress import IPv4Address, ip_address
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IConsumer, IStreamClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer


class NoCookies(CookieJar):
    """A jar that keeps nothing: one client serves every user, so a cookie
    from one backend answer must never ride along on another user's request."""

    def set_cookie(self, cookie: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go (treq would write
    bytes from a cooperator task on a later reactor turn)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> "defer.Deferred[None]":
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IStreamClientEndpoint)
class CountingEndpoint:
    """An endpoint that counts the connections it is asked to open.

    The pool only calls ``connect`` when it has no idle connection to reuse,
    so the count is the connection churn an operator tunes the pool by.
    """

    def __init__(self, inner: IStreamClientEndpoint, counts: Counter, name: str) -> None:
        self.inner = inner
        self.counts = counts
        self.name = name

    def connect(self, factory: Any) -> "defer.Deferred[Any]":
        self.counts[self.name] += 1
        return self.inner.connect(factory)


@implementer(IAgentEndpointFactory)
class DirectEndpointFactory:
    """Connects straight to IP literals, counting new connections per
    ``host:port`` (the backends' names).

    The Agent's default goes through HostnameEndpoint, which resolves every
    new connection's host in the thread pool, even ``127.0.0.1``.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self.reactor = reactor
        self.timeout = connect_timeout
        self.opened: Counter = Counter()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        name = f"{host}:{uri.port}"
        try:
            ip = ip_address(host)
        except ValueError:
            inner: Any = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.timeout)
        else:
            cls = TCP4ClientEndpoint if isinstance(ip, IPv4Address) else TCP6ClientEndpoint
            inner = cls(self.reactor, host, uri.port, timeout=self.timeout)
        return CountingEndpoint(inner, self.opened, name)


class QuietPool(HTTPConnectionPool):
    """A pool whose connection factories do not log each new connection."""

    class _factory(HTTPConnectionPool._factory):  # type: ignore[name-defined]
        noisy = False


class UpstreamClient:
    """Sends requests to backends over pooled keep-alive connections."""

    def __init__(self, reactor: Any, pool_size_per_backend: int, pool_idle_seconds: float,
                 connect_timeout: float) -> None:
        self.pool = QuietPool(reactor, persistent=True)
        # Retrying is the relay's decision (another backend, bounded), and the
        # pool would only ever retry idempotent methods anyway.
        self.pool.retryAutomatically = False
        self.endpoints = DirectEndpointFactory(reactor, connect_timeout)
        self.reconfigure(pool_size_per_backend, pool_idle_seconds, connect_timeout)
        self.agent = Agent.usingEndpointFactory(reactor, self.endpoints, pool=self.pool)
        # For the gateway's own requests, whose answers it reads whole.
        self.treq = HTTPClient(self.agent, cookiejar=NoCookies())

    def reconfigure(self, pool_size_per_backend: int, pool_idle_seconds: float,
                    connect_timeout: float) -> None:
        self.pool.maxPersistentPerHost = pool_size_per_backend
        self.pool.cachedConnectionTimeout = pool_idle_seconds
        self.endpoints.timeout = connect_timeout

    def connections_opened(self, backend_name: str) -> int:
        """New connections opened to a backend so far (attempts included)."""
        return self.endpoints.opened[backend_name]

    def forward(self, method: bytes, url: bytes, headers: Headers,
                body: bytes) -> "defer.Deferred[IResponse]":
        """Send a client's request as is; the response body is not read."""
        return self.agent.request(method, url, headers, BytesProducer(body))

    def close(self) -> "defer.Deferred[None]":
        return self.pool.closeCachedConnections()
