"""A backend and what the gateway knows about it right now."""

from typing import Any, Dict, Optional

import attrs

from ntonix.routing.breaker import CLOSED, CircuitBreaker

HEALTHY, UNHEALTHY, DRAINING = "healthy", "unhealthy", "draining"


@attrs.define(eq=False)
class Backend:
    """One upstream LLM server; counters are updated by the relay."""

    host: str
    port: int
    breaker: CircuitBreaker
    weight: int = 1
    draining: bool = False
    # Gone from the configuration: dropped once its last request ends.
    removed: bool = False
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    latency_total: float = 0.0
    latency_count: int = 0
    last_error: Optional[str] = None
    tls: bool = False  # HTTPS to the backend
    # Derived from host and port (which never change: they are the
    # backend's identity), computed once rather than per request.
    name: str = attrs.field(init=False)
    host_header: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.name = f"https://{self.host}:{self.port}" if self.tls else f"{self.host}:{self.port}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = f"{host}:{self.port}".encode("idna")

    @property
    def base_url(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}".encode("idna")

    @property
    def state(self) -> str:
        if self.draining:
            return DRAINING
        return HEALTHY if self.breaker.state == CLOSED else UNHEALTHY

    @property
    def available(self) -> bool:
        """May take a new request now (a half-open circuit's free trial counts)."""
        return not self.draining and self.breaker.available()

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
        b = self.breaker
        return {
            "name": self.name, "host": self.host, "port": self.port, "weight": self.weight,
            "tls": self.tls,
            "state": self.state, "circuit": b.state, "reason": b.reason,
            "state_changed_at": b.changed_at, "opened_at": b.opened_at, "retry_at": b.retry_at,
            "consecutive_failures": b.failures,
            "in_flight": self.in_flight, "requests": self.requests, "errors": self.errors,
            "latency_avg_ms": round(self.latency_avg_ms, 3),
            "error_rate": round(self.errors / self.requests, 4) if self.requests else 0.0,
            "last_error": self.last_error,
        }
