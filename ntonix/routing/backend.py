"""A backend and what the gateway knows about it right now."""

from typing import Any, Dict, Optional

import attrs

from ntonix.config import BackendConfig

HEALTHY, UNHEALTHY, DRAINING = "healthy", "unhealthy", "draining"


@attrs.define(eq=False)
class Backend:
    """One upstream LLM server; counters are updated by the relay."""

    host: str
    port: int
    weight: int = 1
    state: str = HEALTHY
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    latency_total: float = 0.0
    latency_count: int = 0
    last_error: Optional[str] = None
    state_changed_at: float = 0.0

    @classmethod
    def from_config(cls, cfg: BackendConfig, now: float = 0.0) -> "Backend":
        return cls(host=cfg.host, port=cfg.port, weight=cfg.weight, state_changed_at=now)

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}".encode("idna")

    @property
    def available(self) -> bool:
        return self.state == HEALTHY

    @property
    def latency_avg_ms(self) -> float:
        if not self.latency_count:
            return 0.0
        return 1000.0 * self.latency_total / self.latency_count

    def record(self, ok: bool, seconds: float, error: Optional[str] = None) -> None:
        """Account one finished exchange with this backend."""
        self.requests += 1
        self.latency_total += seconds
        self.latency_count += 1
        if not ok:
            self.errors += 1
            self.last_error = error

    def as_json(self) -> Dict[str, Any]:
        return {
            "name": self.name, "host": self.host, "port": self.port, "weight": self.weight,
            "state": self.state, "in_flight": self.in_flight, "requests": self.requests,
            "errors": self.errors, "latency_avg_ms": round(self.latency_avg_ms, 3),
            "error_rate": round(self.errors / self.requests, 4) if self.requests else 0.0,
            "last_error": self.last_error, "state_changed_at": self.state_changed_at,
        }
