"""Active health checks: one LoopingCall per backend on the injected clock.

A check is an HTTP GET of the backend's ``health_path`` (``health.path`` when
it has none; ``/`` after a 404 there, as Ollama answers); a 2xx is a success,
a 503 means "loading a model" (llama.cpp): no traffic, no failure; anything
else (a status, a refused connection, no answer within
``health.timeout_seconds``) a failure. After a success the backend's
``GET /v1/models`` says which models and LoRA adapters it serves. Results feed the backend's circuit breaker, exactly like the
outcomes of real requests. An open circuit is not probed until it is due; then
the probe may be the half-open circuit's one trial.
"""

import json
from typing import Any, Dict, Optional, Tuple

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
            path = backend.probe_path or backend.health_path or h.path
            started = self.clock.seconds()
            d = self._get(backend, path, h.timeout_seconds)
            d.addCallback(self._judge, backend, path)
            d.addErrback(self._failed, backend, h.timeout_seconds, started)
            return d.addErrback(lambda f: log.failure("health check of {backend}", f,
                                                      backend=backend.name))
        except Exception:
            log.failure("health check of {backend}", backend=backend.name)
            return defer.succeed(None)

    def _get(self, backend: Backend, path: str, timeout: float) -> "defer.Deferred[Any]":
        d = self.gateway.upstream.treq.get(
            backend.base_url + path.encode("ascii", "replace"),
            headers=Headers({b"User-Agent": [b"ntonix-health"]}), allow_redirects=False)
        # Read the body so that the connection goes back to the pool.
        d.addCallback(lambda r: treq.content(r).addCallback(lambda body: (r.code, body)))
        d.addTimeout(timeout, self.clock)
        return d

    def _judge(self, answer: Tuple[int, bytes], backend: Backend,
               path: str) -> Optional["defer.Deferred[None]"]:
        code, _ = answer
        if code == 404 and path != "/" and not backend.health_path:
            # Ollama has no /health; its / answers "Ollama is running".
            log.info("backend {backend} has no {path} (404): checking / instead "
                     "(set health_path to choose)", backend=backend.name, path=path)
            backend.probe_path = "/"
            backend.breaker.release()
            return self.check(backend)
        if code == 503:
            # llama.cpp while it loads a model: not ready, not broken.
            backend.breaker.release()
            if not backend.loading:
                backend.loading = True
                log.info("backend {backend} is loading (HTTP 503 on {path}): no traffic "
                         "until it is ready", backend=backend.name, path=path)
            return None
        if backend.loading:
            backend.loading = False
            log.info("backend {backend} finished loading", backend=backend.name)
        if 200 <= code < 300:
            backend.breaker.succeeded()
            return self._refresh_models(backend)
        backend.breaker.failed(f"health check answered HTTP {code}")
        return None

    def _refresh_models(self, backend: Backend) -> "defer.Deferred[None]":
        """What the backend serves, from its GET /v1/models (vLLM lists its
        LoRA adapters there too, with their parent). A backend without the
        route keeps what was known; nothing here affects its health."""
        d = self._get(backend, "/v1/models", self.gateway.config.health.timeout_seconds)

        def got(answer: Tuple[int, bytes]) -> None:
            code, body = answer
            if code != 200:
                return
            try:
                doc = json.loads(body)
                data = doc["data"]
                models = {m["id"]: m for m in data
                          if isinstance(m, dict) and isinstance(m.get("id"), str)}
            except (ValueError, KeyError, TypeError):
                return
            if backend.reported is None or set(models) != set(backend.reported):
                log.info("backend {backend} serves {models}", backend=backend.name,
                         models=", ".join(sorted(models)) or "no model")
            backend.reported = models
            self.gateway.models_changed()

        d.addCallback(got)
        d.addErrback(lambda f: None)  # unreachable now: the next check will tell
        return d

    def _failed(self, failure: Any, backend: Backend, timeout: float, started: float) -> None:
        # A cancelled request may surface as ResponseNeverReceived rather
        # than a TimeoutError: tell them apart by the clock.
        if self.clock.seconds() - started >= timeout or failure.check(defer.TimeoutError):
            why = f"health check timed out after {timeout:g}s"
        else:
            why = f"health check failed: {failure.getErrorMessage()}"
        backend.breaker.failed(why)
