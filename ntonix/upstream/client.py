"""The HTTP client to the backends: treq over one persistent connection pool."""

from http.cookiejar import CookieJar
from typing import Any

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
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
    """A request body already in memory, written in one go.

    treq would wrap bytes in a FileBodyProducer, which writes from a
    cooperator task on a later reactor turn: latency for nothing.
    """

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


class QuietPool(HTTPConnectionPool):
    """A pool whose connection factories do not log each new connection."""

    class _factory(HTTPConnectionPool._factory):  # type: ignore[name-defined]
        noisy = False


class UpstreamClient:
    """Sends requests to backends over pooled keep-alive connections."""

    def __init__(self, reactor: Any, pool_size_per_backend: int, pool_idle_seconds: float,
                 connect_timeout: float) -> None:
        self.pool = QuietPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = pool_size_per_backend
        self.pool.cachedConnectionTimeout = pool_idle_seconds
        # Retrying is the relay's decision (another backend, bounded), and the
        # pool would only ever retry idempotent methods anyway.
        self.pool.retryAutomatically = False
        agent = Agent(reactor, connectTimeout=connect_timeout, pool=self.pool)
        self.http = HTTPClient(agent, cookiejar=NoCookies())

    def request(self, method: bytes, url: str, headers: Headers,
                body: bytes = b"") -> "defer.Deferred[IResponse]":
        return self.http.request(
            method.decode("ascii"), url, headers=headers,
            data=BytesProducer(body) if body or method == b"POST" else None,
            allow_redirects=False, unbuffered=True,
        )

    def close(self) -> "defer.Deferred[None]":
        return self.pool.closeCachedConnections()
