"""The Gateway: the one object that owns the live state.

Backends, the balancer, the upstream client and the counters hang off it;
the HTTP routes read it, the services start and stop it, and the admin console
shows it.
"""

from typing import Any, Iterable, List, Optional, Sequence

from twisted.logger import Logger

from ntonix.config import BackendConfig, Config
from ntonix.routing.backend import Backend
from ntonix.routing.balancer import SmoothWeightedRoundRobin
from ntonix.upstream.client import UpstreamClient

log = Logger(namespace="ntonix.gateway")


class Gateway:
    def __init__(self, config: Config, reactor: Any) -> None:
        self.config = config
        self.reactor = reactor
        self.started_at = reactor.seconds()
        self.backends: List[Backend] = []
        self.balancer = SmoothWeightedRoundRobin()
        self.upstream = UpstreamClient(
            reactor,
            pool_size_per_backend=config.proxy.pool_size_per_backend,
            pool_idle_seconds=config.proxy.pool_idle_seconds,
            connect_timeout=config.proxy.connect_timeout_seconds,
        )
        self.active_relays = 0
        self.draining = False
        self.set_backends(config.backends)

    def uptime(self) -> float:
        return self.reactor.seconds() - self.started_at

    def set_backends(self, configs: Sequence[BackendConfig]) -> None:
        """Make ``configs`` the backend list, keeping the state of those that stay."""
        now = self.reactor.seconds()
        by_name = {b.name: b for b in self.backends}
        new: List[Backend] = []
        for cfg in configs:
            b = by_name.pop(cfg.name, None)
            if b is None:
                b = Backend.from_config(cfg, now)
                log.info("backend {backend} added (weight {weight})", backend=b.name,
                         weight=b.weight)
            b.weight = cfg.weight
            new.append(b)
        for gone in by_name.values():
            self.balancer.forget(gone)
            log.info("backend {backend} removed", backend=gone.name)
        self.backends = new

    def add_backends(self, configs: Iterable[BackendConfig]) -> None:
        self.set_backends([*(BackendConfig(b.host, b.port, b.weight) for b in self.backends),
                           *configs])

    def pick_backend(self, exclude: Iterable[Backend] = ()) -> Optional[Backend]:
        skip = set(exclude)
        return self.balancer.pick(self.backends,
                                  lambda b: b.available and b not in skip)

    def close(self) -> Any:
        return self.upstream.close()
