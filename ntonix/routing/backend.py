"""A backend and what the gateway knows about it right now."""

from typing import Any, Dict, FrozenSet, Optional

import attrs

from ntonix.routing.breaker import CLOSED, CircuitBreaker
from ntonix.routing.latency import LatencyModel

HEALTHY, UNHEALTHY, DRAINING, LOADING = "healthy", "unhealthy", "draining", "loading"


@attrs.define(eq=False)
class ScrapedLoad:
    """What a backend's own metrics said at ``at`` (vLLM's names)."""

    at: float
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: Optional[float] = None
    loras_loaded: FrozenSet[str] = frozenset()
    loras_waiting: FrozenSet[str] = frozenset()
    max_loras: Optional[int] = None
    # Requests there that are not the fleet's, worked out by the process
    # that scraped (worker 0) when it scraped; None: work it out on arrival.
    others: Optional[float] = None

    def as_json(self, now: float) -> Dict[str, Any]:
        return {"age_seconds": round(now - self.at, 3), "waiting": self.waiting,
                "running": self.running, "kv_cache_usage": self.kv_usage,
                "loras_loaded": sorted(self.loras_loaded),
                "loras_waiting": sorted(self.loras_waiting), "max_loras": self.max_loras}


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
    # Configured models; ``reported`` is what its GET /v1/models said last
    # (None until it answered): id -> the model object it sent.
    models: FrozenSet[str] = frozenset()
    reported: Optional[Dict[str, Dict[str, Any]]] = None
    health_path: str = ""
    max_concurrency: int = 0  # 0: no limit
    metrics_path: str = "/metrics"
    # The health path in use: health_path, or / after a 404 there (Ollama).
    probe_path: Optional[str] = None
    # It answered its health check 503 (llama.cpp while it loads a model):
    # not ready for traffic, but not failing either.
    loading: bool = False
    load: Optional[ScrapedLoad] = None
    # The requests there that are not this gateway's (running + waiting
    # minus our in-flight ones when scraped) and when: flat for the
    # scorer's loop.
    scraped_others: float = 0.0
    scraped_at: float = float("-inf")
    scrape_error: Optional[str] = None
    scrape_failures: int = 0
    # Prompt tokens sent there whose prefill has not ended (an estimate).
    pending_prefill: int = 0
    # The same two counts from this gateway's other workers and from other
    # gateways (ntonix/share/): load terms for the scorer only, never
    # for this process's limits, which count its own requests.
    peer_in_flight: int = 0
    peer_prefill: int = 0
    latency: LatencyModel = attrs.Factory(LatencyModel)
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
        if self.loading:
            return LOADING
        return HEALTHY if self.breaker.state == CLOSED else UNHEALTHY

    @property
    def available(self) -> bool:
        """May take a new request now (a half-open circuit's free trial counts)."""
        return not self.draining and not self.loading and self.breaker.available()

    @property
    def models_known(self) -> bool:
        return bool(self.models) or self.reported is not None

    def serves(self, model: str) -> bool:
        """Whether a request for ``model`` may go here: it is configured or
        reported, or nothing is known of what this backend serves."""
        if model in self.models:
            return True
        reported = self.reported
        if reported is None:
            return not self.models
        return model in reported

    def set_load(self, load: ScrapedLoad) -> None:
        self.load = load
        # Ours and our peers' are counted by in_flight and peer_in_flight
        # as they change; the page only tells what the others add. A page
        # copied from worker 0 comes with its count: subtracting this
        # process's counts of now from a page of half a second ago would
        # take requests ended since for someone else's.
        if load.others is not None:
            self.scraped_others = load.others
        else:
            self.scraped_others = max(0.0, load.running + load.waiting - self.in_flight
                                      - self.peer_in_flight)
        self.scraped_at = load.at

    def all_models(self) -> FrozenSet[str]:
        return self.models | frozenset(self.reported or ())

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
            "in_flight": self.in_flight, "max_concurrency": self.max_concurrency or None,
            "requests": self.requests, "errors": self.errors,
            "latency_avg_ms": round(self.latency_avg_ms, 3),
            "error_rate": round(self.errors / self.requests, 4) if self.requests else 0.0,
            "last_error": self.last_error,
            "models": sorted(self.all_models()) if self.models_known else None,
            "health_path": self.probe_path or self.health_path or None,
            "pending_prefill_tokens": self.pending_prefill,
            "peer_in_flight": self.peer_in_flight,
            "peer_prefill_tokens": self.peer_prefill,
            "scraped": self.load.as_json(b.now()) if self.load is not None else None,
            "scrape_error": self.scrape_error,
            "latency_model": self.latency.as_json(),
        }
