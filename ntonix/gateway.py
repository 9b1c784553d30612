"""The Gateway: the one object that owns the live state.

Backends (with their circuit breakers), the balancer, the upstream client and
the counters hang off it; the HTTP routes read it, the services start and stop
it, SIGHUP reconfigures it, and the admin console shows it.
"""

from typing import Any, Callable, Iterable, List, Optional, Sequence

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from ntonix.cache.manager import ResponseCache
from ntonix.config import BackendConfig, Config, all_settings
from ntonix.deadlines import DeadlineSweep
from ntonix.identity import Identity, credential_of
from ntonix.observe.metrics import Metrics
from ntonix.routing.admission import Admission
from ntonix.routing.backend import Backend
from ntonix.routing.balancer import make_balancer
from ntonix.routing.breaker import OPEN, CircuitBreaker
from ntonix.routing.fleet import Fleet
from ntonix.routing.prefix import block_hashes, render_prompt
from ntonix.routing.scorer import RouteContext
from ntonix.upstream.client import UpstreamClient

log = Logger(namespace="ntonix.gateway")


class Gateway:
    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.started_at = reactor.seconds()
        # The backends and the per-request questions about them.
        self.fleet = Fleet(lambda: self.config, reactor)
        # Backends that exist only at run time (the demo's mocks): kept
        # across reloads, which only know the configured ones.
        self.runtime_backends: List[BackendConfig] = []
        self.balancer = make_balancer(config.balancer.algorithm, config=config,
                                      now=reactor.seconds)
        self.upstream = UpstreamClient(
            reactor,
            pool_size_per_backend=config.proxy.pool_size_per_backend,
            pool_idle_seconds=config.proxy.pool_idle_seconds,
            connect_timeout=config.proxy.connect_timeout_seconds,
            max_head_bytes=config.server.max_upstream_head_bytes,
            max_headers=config.server.max_upstream_headers,
            ca_file=config.proxy.ca_file,
        )
        # Who a request is (tenants, the cache scope): keyed by the secret.
        self.identity = Identity.from_config(config)
        self.fleet.identity = self.identity
        self.cache = ResponseCache(config.cache, reactor)
        self.cache.credential_hash = self._credential_hash
        self.admission = Admission(self.fleet, reactor)
        self.metrics = Metrics(self)
        self.admission.on_wait = self.metrics.observe_queue_wait
        self.cache.on_saved = self.metrics.tokens_saved
        self.active_relays = 0
        # Deferreds waiting for the end of the drain delay; None once it ended.
        self._drain_waiters: Optional[List[Any]] = None
        self._drain_over = False
        # Every exchange in progress: its response and stream-idle deadlines.
        self.deadlines = DeadlineSweep(reactor, 0.05)
        self.draining = False
        # Called after the backend list changes (the health checker listens).
        self.on_backends_changed: List[Callable[[], None]] = []
        # The scheduler events this process shares with its other workers
        # and other gateways (ntonix/share/), when it has any: set at start.
        self.share: Any = None
        self._set_backends(config.backends)

    @property
    def access_log_enabled(self) -> bool:
        # Twisted's Logger builds the whole event before a filter drops it:
        # at ``warn`` and above, do not build access events at all.
        return self.config.logging.level in ("trace", "debug", "info")

    # The fleet's list and facts, under the names the rest of the code uses.
    @property
    def backends(self) -> List[Backend]:
        return self.fleet.backends

    @backends.setter
    def backends(self, value: List[Backend]) -> None:
        self.fleet.backends = value

    @property
    def limited(self) -> bool:
        return self.fleet.limited

    @limited.setter
    def limited(self, value: bool) -> None:
        self.fleet.limited = value

    @property
    def models_known(self) -> bool:
        return self.fleet.models_known

    @property
    def adapters(self) -> frozenset:
        return self.fleet.adapters

    def _credential_hash(self, request: Any) -> bytes:
        return self.identity.credential_hash(credential_of(request))

    def uptime(self) -> float:
        return self.reactor.seconds() - self.started_at

    # -- backends
    def _new_backend(self, cfg: BackendConfig) -> Backend:
        name = cfg.name

        def changed(old: str, new: str, why: str) -> None:
            # An opening circuit is a backend lost to traffic: worth a WARN.
            (log.warn if new == OPEN else log.info)(
                "backend {backend} circuit {old} -> {new}: {reason}",
                backend=name, old=old, new=new, reason=why)

        h = self.config.health
        breaker = CircuitBreaker(h.failure_threshold, h.recovery_seconds,
                                 now=self.reactor.seconds, on_change=changed)
        return Backend(host=cfg.host, port=cfg.port, weight=cfg.weight, breaker=breaker,
                       tls=cfg.tls)

    @staticmethod
    def _configure_backend(b: Backend, cfg: BackendConfig) -> None:
        """The settings a reload may change on a backend that stays."""
        b.weight = cfg.weight
        b.models = frozenset(cfg.models)
        if b.health_path != cfg.health_path:
            b.health_path = cfg.health_path
            b.probe_path = None
        b.metrics_path = cfg.metrics_path
        b.max_concurrency = cfg.max_concurrency

    def _set_backends(self, configs: Sequence[BackendConfig]) -> None:
        """Make ``configs`` (plus the run-time ones) the backend list.

        Backends that stay keep their state and take their new weight; new
        ones join; removed ones drain: no new requests, and they are dropped
        when their last in-flight request ends.
        """
        wanted = [*configs, *(c for c in self.runtime_backends
                              if c.name not in {x.name for x in configs})]
        by_name = {b.name: b for b in self.backends}
        kept: List[Backend] = []
        for cfg in wanted:
            b = by_name.pop(cfg.name, None)
            if b is None:
                b = self._new_backend(cfg)
                log.info("backend {backend} added (weight {weight})", backend=b.name,
                         weight=cfg.weight)
            else:
                if b.weight != cfg.weight:
                    log.info("backend {backend} weight {old} -> {new}", backend=b.name,
                             old=b.weight, new=cfg.weight)
                if b.removed:
                    b.removed = False
                    b.draining = False
                    log.info("backend {backend} is back in the configuration", backend=b.name)
            self._configure_backend(b, cfg)
            kept.append(b)
        for gone in by_name.values():
            gone.draining = True
            gone.removed = True
            if gone.in_flight:
                log.info("backend {backend} removed: draining {n} in-flight request(s)",
                         backend=gone.name, n=gone.in_flight)
                kept.append(gone)
            else:
                self.balancer.forget(gone)
                log.info("backend {backend} removed", backend=gone.name)
        self.backends = kept
        self._backends_changed()

    def _backends_changed(self) -> None:
        self.fleet.changed()
        for listener in list(self.on_backends_changed):
            listener()

    def add_runtime_backends(self, configs: Iterable[BackendConfig]) -> None:
        self.runtime_backends.extend(configs)
        self._set_backends(self.config.backends)

    def released(self, backend: Backend) -> None:
        """A request to ``backend`` ended: a waiting request may take its
        slot, and a removed backend may now go."""
        self.admission.released()
        if self.share is not None:
            self.share.loads_changed()
        if backend.removed and backend.in_flight == 0 \
                and backend in self.backends:
            self.backends = [b for b in self.backends if b is not backend]
            self.balancer.forget(backend)
            log.info("backend {backend} drained and removed", backend=backend.name)
            self._backends_changed()

    def find(self, name: str) -> Optional[Backend]:
        return self.fleet.find(name)

    def pick_backend(self, exclude: Iterable[Backend] = (), model: Optional[str] = None,
                     ctx: Any = None) -> Optional[Backend]:
        b = self.balancer.pick(self.fleet.candidates(exclude, model), None, ctx)
        if b is not None and not b.breaker.acquire():
            return None  # cannot happen on one thread: available() was just checked
        return b

    def candidates(self, exclude: Iterable[Backend] = (),
                   model: Optional[str] = None) -> List[Backend]:
        return self.fleet.candidates(exclude, model)

    def any_available(self, exclude: Iterable[Backend] = (), model: Optional[str] = None) -> bool:
        return self.fleet.any_available(exclude, model)

    def unserved(self, model: str) -> bool:
        return self.fleet.unserved(model)

    def route_context(self, route: str, doc: Any, stream: bool) -> Optional[RouteContext]:
        """The inference scorer's view of a generation request (None for
        the other algorithms, which do not need one)."""
        if self.config.balancer.algorithm != "inference" or route not in ("chat", "completions"):
            return None
        bal = self.config.balancer
        data = render_prompt(route, doc)
        model = doc.get("model")
        model = model if isinstance(model, str) else None
        return RouteContext(model,
                            block_hashes(data, bal.prefix_block_bytes, bal.prefix_max_blocks),
                            len(data), stream, adapter=model in self.adapters,
                            share=self.share)

    def models_changed(self) -> None:
        """A backend's reported list changed: recompute the adapters."""
        self.fleet.models_changed()

    # -- reconfiguration
    def apply_config(self, new: Config) -> List[str]:
        """Take ``new`` as the configuration in force (SIGHUP).

        Returns the settings that changed but need a restart to take effect.
        """
        # Listeners, TLS, the console, the demo and the log observers are
        # built once at start: their sections keep their running values.
        fixed = ("server", "ssl", "admin", "demo", "logging")
        needs_restart = []
        for key, f in all_settings():
            section, name = key.split(".")
            old_v = getattr(getattr(self.config, section), name)
            new_v = getattr(getattr(new, section), name)
            if old_v != new_v and (section in fixed or f.metadata.get("restart")):
                needs_restart.append(key)
        new = attrs.evolve(new, **{s: getattr(self.config, s) for s in fixed})
        if new.balancer.algorithm != self.config.balancer.algorithm:
            self.balancer = make_balancer(new.balancer.algorithm, config=new,
                                          now=self.reactor.seconds)
        elif hasattr(self.balancer, "reconfigure"):
            self.balancer.reconfigure(new)
        for b in self.backends:
            b.breaker.failure_threshold = new.health.failure_threshold
            b.breaker.recovery_seconds = new.health.recovery_seconds
        self.upstream.reconfigure(new.proxy.pool_size_per_backend, new.proxy.pool_idle_seconds,
                                  new.proxy.connect_timeout_seconds)
        self.cache.reconfigure(new.cache)
        self.config = new
        self.identity = Identity.from_config(new)
        self.fleet.identity = self.identity
        self._set_backends(new.backends)
        return needs_restart

    def begin_draining(self) -> Any:
        """Shutdown starts: readiness turns to 503 at once, and the returned
        Deferred fires after ``server.drain_delay_seconds``, when the
        listeners may close. Every caller gets the same wait."""
        d: Any = defer.Deferred()
        if self._drain_over:
            d.callback(None)
            return d
        if self._drain_waiters is None:
            self.draining = True
            self._drain_waiters = []
            delay = self.config.server.drain_delay_seconds
            if delay > 0:
                log.info("shutting down: readiness is 503; still accepting for {delay:g}s "
                         "(server.drain_delay_seconds)", delay=delay)
            self.reactor.callLater(delay, self._drain_delay_ended)
        self._drain_waiters.append(d)
        return d

    def _drain_delay_ended(self) -> None:
        self._drain_over = True
        waiters, self._drain_waiters = self._drain_waiters or [], []
        for d in waiters:
            d.callback(None)

    def close(self) -> Any:
        self.deadlines.stop()
        self.admission.close()
        return self.upstream.close()
