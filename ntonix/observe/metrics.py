"""Metrics: one prometheus-client registry per gateway, no global state.

Histograms (kept in plain numbers, built at scrape time) and counters are
observed as requests finish; backend, cache and
connection figures are read from the live objects at scrape time by a
collector, so there is one source for each number. The JSON view of
``GET /metrics`` is computed from the same registry.
"""

import os
import resource
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from ntonix._version import __version__
from ntonix.observe.access import RequestInfo
from ntonix.routing.breaker import CLOSED, HALF_OPEN, OPEN

if TYPE_CHECKING:
    from ntonix.gateway import Gateway

# LLM answers range from a cached hit (milliseconds) to a long generation (a minute).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                   30.0, 60.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
CIRCUIT_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}
# The OpenTelemetry GenAI semantic conventions' advised bucket boundaries.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# Models with their own label value; the rest are counted as "other".
MAX_MODEL_LABELS = 50


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class GatewayCollector:
    """Figures read from the gateway's live state at scrape time."""

    def __init__(self, gateway: "Gateway", metrics: "Metrics") -> None:
        self.gateway = gateway
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        gw = self.gateway
        m = self.metrics
        g = GaugeMetricFamily
        c = CounterMetricFamily
        info = g("ntonix_build_info", "The gateway's version (always 1; for marking deploys)",
                 labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield g("ntonix_uptime_seconds", "Seconds since the gateway started", value=gw.uptime())
        yield g("ntonix_process_resident_memory_bytes", "Resident memory of the gateway process",
                value=_rss_bytes())
        yield g("ntonix_requests_active", "Requests being handled", value=self.metrics.active)
        yield g("ntonix_connections_active", "Open client connections",
                value=self.metrics.connections_active())
        yield c("ntonix_connections", "Client connections accepted",
                value=self.metrics.connections_total)
        yield from client_caps(self.metrics.sites)
        yield c("ntonix_tenant_header_ignored", "Requests whose tenant header was ignored: "
                "not sent by one of tenants.trusted_proxies",
                value=self.metrics.tenant_header_ignored)
        req = c("ntonix_backend_requests", "Requests sent to each backend", labels=["backend"])
        err = c("ntonix_backend_errors", "Failed requests and health checks per backend",
                labels=["backend"])
        inflight = g("ntonix_backend_in_flight", "Requests in flight per backend",
                     labels=["backend"])
        circuit = g("ntonix_backend_circuit_state",
                    "Circuit breaker state per backend: 0 closed, 1 half-open, 2 open",
                    labels=["backend"])
        avg = g("ntonix_backend_latency_avg_seconds", "Mean backend latency per backend",
                labels=["backend"])
        opened = c("ntonix_backend_connections_opened",
                   "New connections opened to each backend; flat under steady traffic, "
                   "rising only as more requests are in flight at once",
                   labels=["backend"])
        idle = g("ntonix_backend_connections_idle",
                 "Kept-alive connections to each backend waiting for a request",
                 labels=["backend"])
        scrape_failed = c("ntonix_backend_scrape_failures",
                          "Failed scrapes of each backend's metrics (inference balancer)",
                          labels=["backend"])
        prefill = g("ntonix_backend_prefill_pending_tokens",
                    "Prompt tokens sent to each backend whose prefill has not ended "
                    "(estimate)", labels=["backend"])
        loading = g("ntonix_backend_loading",
                    "1 while a backend's health check says it is loading a model (HTTP 503)",
                    labels=["backend"])
        index = getattr(gw.balancer, "index", None)
        blocks = g("ntonix_backend_prefix_blocks",
                   "Prompt-prefix blocks the gateway predicts each backend's cache holds",
                   labels=["backend"])
        for b in gw.backends:
            scrape_failed.add_metric([b.name], b.scrape_failures)
            prefill.add_metric([b.name], b.pending_prefill)
            loading.add_metric([b.name], 1 if b.loading else 0)
            blocks.add_metric([b.name], index.blocks_of(b) if index is not None else 0)
            req.add_metric([b.name], b.requests)
            err.add_metric([b.name], b.errors)
            inflight.add_metric([b.name], b.in_flight)
            circuit.add_metric([b.name], CIRCUIT_VALUE.get(b.breaker.state, 2))
            avg.add_metric([b.name], b.latency_avg_ms / 1000.0)
            opened.add_metric([b.name], gw.upstream.connections_opened(b.name))
            idle.add_metric([b.name], gw.upstream.idle_connections(b.name))
        yield from (req, err, inflight, circuit, avg, opened, idle, scrape_failed, prefill,
                    loading, blocks)
        adm = gw.admission
        length = g("ntonix_queue_length", "Requests waiting for a free backend",
                   labels=["priority"])
        admitted = c("ntonix_admission_admitted", "Requests sent to a backend, at once or "
                     "after waiting", labels=["priority"])
        queued = c("ntonix_admission_queued", "Requests that had to wait for a free backend",
                   labels=["priority", "tenant"])
        refused = c("ntonix_admission_refused", "Requests refused with 429 (queue_full, "
                    "queue_timeout, shed)", labels=["priority", "tenant", "reason"])
        for p, q in adm.queues.items():
            length.add_metric([p], q.count)
            admitted.add_metric([p], adm.admitted[p])
        for (p, t), n in adm.queued.items():
            queued.add_metric([p, t], n)
        for (p, t, why), n in adm.refused.items():
            refused.add_metric([p, t, why], n)
        yield from (length, admitted, queued, refused)
        tokens = c("ntonix_tokens", "Tokens in answers, as the backends' usage says (type: "
                   "prompt, completion, cached_prompt)",
                   labels=["model", "backend", "tenant", "type"])
        for key, n in m.token_counts.items():
            tokens.add_metric(list(key), n)
        saved = c("ntonix_cache_tokens_saved", "Tokens of answers served by the cache instead "
                  "of a backend (hits and joins)", labels=["model", "type"])
        for key, n in m.saved_counts.items():
            saved.add_metric(list(key), n)
        yield from (tokens, saved)
        shared = gw.cache.shared
        if shared is not None:
            yield g("ntonix_redis_up", "1 while the shared Redis tier answers, 0 while the "
                    "gateway serves from its own cache alone", value=0 if shared.degraded else 1)
            yield c("ntonix_redis_errors", "Failed or timed-out Redis calls", value=shared.errors)
            yield c("ntonix_shared_hits", "Local misses answered from the Redis tier",
                    value=shared.hits)
            yield c("ntonix_shared_led", "Answers this gateway fetched and published for "
                    "others", value=shared.led)
            yield c("ntonix_shared_followed", "Answers followed live from another gateway",
                    value=shared.followed)
            yield c("ntonix_shared_takeovers", "Followed answers whose leader went away before "
                    "its head, asked of a backend instead", value=shared.takeovers)
            rejected = c("ntonix_redis_rejected", "Entries and live-answer records read from "
                         "Redis and refused (reason: unauthenticated, malformed): served as "
                         "misses", labels=["kind", "reason"])
            for (kind, why), n in sorted(shared.rejected.items()):
                rejected.add_metric([kind, why], n)
            yield rejected
        s = gw.cache.store
        st = s.stats
        yield c("ntonix_cache_hits", "Requests answered from the cache", value=st.hits)
        yield c("ntonix_cache_misses", "Cacheable requests sent upstream", value=st.misses)
        yield c("ntonix_cache_coalesced", "Requests that joined an identical one in flight",
                value=st.coalesced)
        yield c("ntonix_cache_bypasses", "Requests the cache let through (sampled, no-store, "
                "no-cache)", value=st.bypasses)
        yield c("ntonix_cache_evictions", "Entries evicted to make room", value=st.evictions)
        yield c("ntonix_cache_expired", "Entries dropped at the end of their TTL",
                value=st.expired)
        yield g("ntonix_cache_bytes", "Bytes held by the cache", value=s.size_bytes)
        yield g("ntonix_cache_entries", "Entries in the cache", value=len(s))


def client_caps(sites: Iterable[Any]) -> Iterable[Any]:
    """The client side's caps (ntonix/http/server.py), summed over the
    listeners' sites."""
    sites = list(sites)
    c = CounterMetricFamily
    refused = c("ntonix_connections_refused", "Client connections closed at once (reason: "
                "max_connections when accepted past the cap in one wake-up, "
                "max_connections_per_client)", labels=["reason"])
    for reason in ("max_connections", "max_connections_per_client"):
        refused.add_metric([reason], sum(s.refused[reason] for s in sites))
    yield refused
    yield c("ntonix_connections_evicted", "Idle keep-alive client connections closed to make "
            "room for a new one at server.max_connections", value=sum(s.evicted for s in sites))
    yield c("ntonix_accept_pauses", "Times the listeners stopped accepting at "
            "server.max_connections with no connection idle, until one closed",
            value=sum(s.accept_pauses for s in sites))
    yield GaugeMetricFamily("ntonix_request_body_buffered_bytes", "Request body bytes held "
                            "(received, answer not yet ended), at most "
                            "server.max_buffered_body_bytes per process",
                            value=sum(s.body_bytes for s in sites))
    rejected = c("ntonix_requests_rejected", "Requests refused while being received, before "
                 "any route (reason: the error code answered, e.g. server_busy, "
                 "request_too_large, transfer_coding_not_implemented)", labels=["reason"])
    codes: Dict[str, int] = {}
    for s in sites:
        for code, n in s.rejected.items():
            codes[code] = codes.get(code, 0) + n
    for code, n in sorted(codes.items()):
        rejected.add_metric([code], n)
    yield rejected


class LocalHistogram:
    """A Prometheus histogram kept in plain Python numbers.

    prometheus-client's histograms take a lock and walk the buckets in
    Python for every observation; the gateway observes several per request
    on one thread. Here an observation is a bisect and two additions, and
    the family is built only when scraped (``collect``), with the same name,
    labels, buckets and samples.
    """

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = tuple(buckets)
        self.children: Dict[tuple, "_HistogramChild"] = {}

    def labels(self, *values: str) -> "_HistogramChild":
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = _HistogramChild(self.bounds)
        return child

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def collect(self) -> Iterable[Any]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for values, child in self.children.items():
            cumulative, total = [], 0
            for le, n in zip(les, child.counts):
                total += n
                cumulative.append((le, total))
            family.add_metric(list(values), cumulative, child.sum)
        yield family


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Histograms:
    def __init__(self, histograms: Iterable[LocalHistogram]) -> None:
        self.histograms = list(histograms)

    def collect(self) -> Iterable[Any]:
        for h in self.histograms:
            yield from h.collect()


class Metrics:
    def __init__(self, gateway: "Gateway") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("ntonix_requests", "Requests answered",
                                ["route", "status", "cache"], registry=r)
        self.latency = LocalHistogram("ntonix_request_duration_seconds",
                                      "Time from request received to response finished",
                                      ["route"])
        self.ttft = LocalHistogram("ntonix_time_to_first_token_seconds",
                                   "Time from request received to the first token sent "
                                   "(streams)", ["route"])
        self.stream_duration = LocalHistogram("ntonix_stream_duration_seconds",
                                              "Duration of streamed responses", ["route"])
        self.chunks = Counter("ntonix_stream_chunks", "Chunks written to streaming clients",
                              ["route"], registry=r)
        self.overhead = LocalHistogram("ntonix_gateway_overhead_seconds",
                                       "Time the gateway itself adds: request received to "
                                       "upstream request sent, plus upstream first byte to "
                                       "client first byte", buckets=OVERHEAD_BUCKETS)
        self.backend_latency = LocalHistogram("ntonix_backend_latency_seconds",
                                              "Backend exchange duration", ["backend"])
        self.queue_wait = LocalHistogram("ntonix_queue_wait_seconds",
                                         "Time requests waited in the admission queue for a "
                                         "free backend (only those that waited)", ["priority"])
        # The OpenTelemetry GenAI conventions' server metrics, by model.
        self.genai_ttft = LocalHistogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from request received to the first token, streams (GenAI conventions)",
            ["gen_ai_request_model", "backend"], TTFT_BUCKETS)
        self.genai_tpot = LocalHistogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, streams (GenAI conventions)",
            ["gen_ai_request_model", "backend"], TPOT_BUCKETS)
        self.genai_duration = LocalHistogram(
            "gen_ai_server_request_duration_seconds",
            "Generation request duration (GenAI conventions)",
            ["gen_ai_request_model"], DURATION_BUCKETS)
        self.genai_tokens = LocalHistogram(
            "gen_ai_client_token_usage", "Tokens per answer (GenAI conventions; "
            "gen_ai_token_type input or output)",
            ["gen_ai_request_model", "gen_ai_token_type"], TOKEN_BUCKETS)
        # (model, backend, tenant, type) -> tokens; (model, type) -> tokens.
        self.token_counts: Dict[tuple, int] = {}
        self.saved_counts: Dict[tuple, int] = {}
        self._models: Dict[str, None] = {}
        self._genai_children: Dict[tuple, tuple] = {}
        self.gateway = gateway
        r.register(_Histograms([self.latency, self.ttft, self.stream_duration, self.overhead,
                                self.backend_latency, self.queue_wait, self.genai_ttft,
                                self.genai_tpot, self.genai_duration, self.genai_tokens]))
        self.active = 0
        # Tenant headers from clients that are not trusted proxies (ignored).
        self.tenant_header_ignored = 0
        self.sites: list = []
        self._children: Dict[tuple, tuple] = {}
        self._backend_children: Dict[str, Any] = {}
        r.register(GatewayCollector(gateway, self))

    def connections_active(self) -> int:
        return sum(len(s.channels) for s in self.sites)

    @property
    def connections_total(self) -> int:
        return sum(s.connections_total for s in self.sites)

    def model_label(self, model: Optional[str]) -> str:
        """A bounded label: the first MAX_MODEL_LABELS models asked for."""
        if not model:
            return "unknown"
        if model in self._models:
            return model
        if len(self._models) < MAX_MODEL_LABELS:
            self._models[model[:128]] = None
            return model[:128]
        return "other"

    def answered(self, exchange: Any, usage: Optional[tuple], events: int) -> None:
        """A generation answer ended complete: its tokens and GenAI timings."""
        now = self.gateway.reactor.seconds()
        backend = exchange.backend_name or "none"
        model = self.model_label(exchange.model)  # bounded: so is this dict
        key = (model, backend)
        children = self._genai_children.get(key)
        if children is None:
            children = self._genai_children[key] = (
                model, self.genai_duration.labels(model), self.genai_ttft.labels(model, backend),
                self.genai_tpot.labels(model, backend), self.genai_tokens.labels(model, "input"),
                self.genai_tokens.labels(model, "output"))
        model, duration, ttft, tpot, tokens_in, tokens_out = children
        info = exchange.info
        start = info.received_at if info is not None else exchange.attempt_started
        duration.observe(max(0.0, now - start))
        completion = None
        if usage is not None:
            prompt, completion, cached = usage
            tenant = self.gateway.admission.label(exchange.tenant)
            counts = self.token_counts
            for kind, n in (("prompt", prompt), ("completion", completion),
                            ("cached_prompt", cached)):
                if n:
                    k = (model, backend, tenant, kind)
                    counts[k] = counts.get(k, 0) + n
            tokens_in.observe(prompt)
            tokens_out.observe(completion)
            if info is not None:
                info.tokens = (prompt, completion)
        first = exchange.first_byte_at
        if exchange.sse and first is not None:
            ttft.observe(max(0.0, first - start))
            # Without usage, count the events: the role chunk, the last one
            # and [DONE] are not tokens.
            n = completion if completion is not None else events - 3
            if n > 1:
                tpot.observe((now - first) / (n - 1))

    def tokens_saved(self, model: Optional[str], usage: Any, times: int = 1) -> None:
        """The cache answered ``times`` requests whose answer had ``usage``."""
        if usage is None or times <= 0:
            return
        label = self.model_label(model)
        for kind, n in (("prompt", usage[0]), ("completion", usage[1])):
            key = (label, kind)
            self.saved_counts[key] = self.saved_counts.get(key, 0) + n * times

    def observe_queue_wait(self, priority: str, seconds: float) -> None:
        self.queue_wait.labels(priority).observe(seconds)

    def observe_backend(self, name: str, seconds: float) -> None:
        child = self._backend_children.get(name)
        if child is None:
            child = self._backend_children[name] = self.backend_latency.labels(name)
        child.observe(seconds)

    def finished(self, info: RequestInfo, status: int) -> None:
        # labels() hashes and validates its arguments on every call: keep
        # each child once (the label sets are bounded: known routes only).
        key = (info.route, status, info.cache)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(info.route, str(status), info.cache or "none"),
                self.latency.labels(info.route))
        children[0].inc()
        end = info.finished_at or info.received_at
        children[1].observe(max(0.0, end - info.received_at))
        if info.sse and status == 200 and info.first_byte_at is not None:
            self.ttft.labels(info.route).observe(info.first_byte_at - info.received_at)
            self.stream_duration.labels(info.route).observe(max(0.0, end - info.first_byte_at))
            self.chunks.labels(info.route).inc(info.chunks)
        if info.gateway_seconds is not None:
            self.overhead.observe(info.gateway_seconds)

    # -- views
    def prometheus(self, accept: Optional[bytes]) -> tuple:
        encoder, content_type = choose_encoder((accept or b"").decode("latin-1"))
        return encoder(self.registry), content_type

    def as_json(self, gateway: "Gateway") -> Dict[str, Any]:
        """The seed's JSON document, summed from the registry's samples."""
        total = success = error = 0
        values: Dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == "ntonix_requests_total":
                    n = int(sample.value)
                    total += n
                    if int(sample.labels["status"]) < 400:
                        success += n
                    else:
                        error += n
                elif not sample.labels:
                    values[sample.name] = sample.value
        hits = int(values.get("ntonix_cache_hits_total", 0))
        misses = int(values.get("ntonix_cache_misses_total", 0))
        return {
            "requests_total": total, "requests_active": int(values["ntonix_requests_active"]),
            "requests_success": success, "requests_error": error,
            "cache_hits": hits, "cache_misses": misses,
            "cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
            "uptime_seconds": round(values["ntonix_uptime_seconds"], 3),
            "connections_active": int(values["ntonix_connections_active"]),
            "connections_total": int(values["ntonix_connections_total"]),
            "memory_cache_bytes": int(values["ntonix_cache_bytes"]),
            "process_resident_memory_bytes": int(values["ntonix_process_resident_memory_bytes"]),
            "backends": [
                {"host": b.host, "port": b.port, "requests": b.requests, "errors": b.errors,
                 "latency_avg_ms": round(b.latency_avg_ms, 3),
                 "error_rate": round(b.errors / b.requests, 4) if b.requests else 0.0,
                 "state": b.state, "circuit": b.breaker.state}
                for b in gateway.backends],
        }
