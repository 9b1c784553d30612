"""Active health checks: one LoopingCall per backend on the injected clock.

A check is an HTTP GET of ``health.path``; a 2xx is a success, anything else
(a status, a refused connection, no answer within ``health.timeout_seconds``)
a failure. Results feed the backend's circuit breaker, exactly like the
outcomes of real requests. An open circuit is not probed until it is due; then
the probe may be the half-open circuit's one trial.
"""

from typing import Any, Dict

import treq
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ntonix.gateway import Gateway
from ntonix.routing.backend import Backend

log = Logger(namespace="ntonix.routing.health")


class HealthChecker(Service):
    def __init__(self, gateway: Gateway, clock: Any) -> None:
        self.gateway = gateway
        self.clock = clock
        self.loops: Dict[Backend, LoopingCall] = {}
        self.interval = gateway.config.health.interval_seconds
        self.checks = 0

    def startService(self) -> None:
        super().startService()
        self.gateway.on_backends_changed.append(self.sync)
        self.sync()

    def stopService(self) -> Any:
        super().stopService()
        if self.sync in self.gateway.on_backends_changed:
            self.gateway.on_backends_changed.remove(self.sync)
        for loop in self.loops.values():
            if loop.running:
                loop.stop()
        self.loops.clear()

    def sync(self) -> None:
        """Start loops for new backends, stop those of removed ones, and
        restart all when the interval changed (SIGHUP)."""
        if not self.running:
            return
        interval = self.gateway.config.health.interval_seconds
        if interval != self.interval:
            self.interval = interval
            for loop in self.loops.values():
                if loop.running:
                    loop.stop()
            self.loops.clear()
        current = {b for b in self.gateway.backends if not b.removed}
        for b in list(self.loops):
            if b not in current:
                loop = self.loops.pop(b)
                if loop.running:
                    loop.stop()
        for b in current:
            if b not in self.loops:
                loop = LoopingCall(self.check, b)
                loop.clock = self.clock
                self.loops[b] = loop
                # The first check after one interval: a backend is trusted
                # until shown otherwise, so start-up does not wait for probes.
                loop.start(interval, now=False).addErrback(
                    lambda f, name=b.name: log.failure("health loop for {backend}", f,
                                                       backend=name))

    def check(self, backend: Backend) -> "defer.Deferred[None]":
        # A LoopingCall stops for good when its function raises: nothing may.
        try:
            if backend.removed or not backend.breaker.acquire():
                return defer.succeed(None)
            self.checks += 1
            h = self.gateway.config.health
            started = self.clock.seconds()
            d = self.gateway.upstream.treq.get(
                backend.base_url + h.path.encode("ascii", "replace"),
                headers=Headers({b"User-Agent": [b"ntonix-health"]}), allow_redirects=False)
            d.addCallback(self._judge, backend)
            d.addTimeout(h.timeout_seconds, self.clock)
            d.addErrback(self._failed, backend, h.timeout_seconds, started)
            return d.addErrback(lambda f: log.failure("health check of {backend}", f,
                                                      backend=backend.name))
        except Exception:
            log.failure("health check of {backend}", backend=backend.name)
            return defer.succeed(None)

    def _judge(self, response: Any, backend: Backend) -> "defer.Deferred[None]":
        def verdict(_: Any) -> None:
            if 200 <= response.code < 300:
                backend.breaker.succeeded()
            else:
                backend.breaker.failed(f"health check answered HTTP {response.code}")
        # Read the body so that the connection goes back to the pool.
        return treq.content(response).addCallback(verdict)

    def _failed(self, failure: Any, backend: Backend, timeout: float, started: float) -> None:
        # A cancelled request may surface as ResponseNeverReceived rather
        # than a TimeoutError: tell them apart by the clock.
        if self.clock.seconds() - started >= timeout or failure.check(defer.TimeoutError):
            why = f"health check timed out after {timeout:g}s"
        else:
            why = f"health check failed: {failure.getErrorMessage()}"
        backend.breaker.failed(why)
