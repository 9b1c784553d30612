"""Reading each backend's own load from its Prometheus metrics.

vLLM reports its queue (``vllm:num_requests_waiting``), its batch
(``vllm:num_requests_running``), how full its KV cache is
(``vllm:kv_cache_usage_perc``, ``vllm:gpu_cache_usage_perc`` before 0.10) and
which LoRA adapters it holds (``vllm:lora_requests_info``); llama.cpp's
server reports the first three under its own names. The inference scorer
uses these when they are fresh: they count the requests other gateways sent.

One LoopingCall scrapes every backend each ``balancer.scrape_interval_seconds``,
only while ``balancer.algorithm`` is ``inference``. A scrape is bounded by
``balancer.scrape_timeout_seconds`` and a body cap, a backend still being
scraped is skipped, and a failure (no answer, an error status, a page without
these series) changes nothing but a log line when the state changes, a counter
and ``scrape_error`` in ``GET /backends``: routing goes on with the gateway's
own counts.
"""

import re
from typing import Any, Dict, FrozenSet, Optional, Set

import treq
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ntonix.gateway import Gateway
from ntonix.routing.backend import Backend, ScrapedLoad

log = Logger(namespace="ntonix.routing.scrape")

MAX_BODY = 4 * 1024 * 1024

# Series name -> the ScrapedLoad field it feeds (summed over the model_name
# series, except the cache usage: the fullest).
SERIES = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",
    "llamacpp:requests_deferred": "waiting",
    "llamacpp:requests_processing": "running",
    "llamacpp:kv_cache_usage_ratio": "kv_usage",
}
LORA_INFO = "vllm:lora_requests_info"
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class ScrapeError(Exception):
    pass


def parse_load(text: str, now: float) -> ScrapedLoad:
    """The load series of a Prometheus text page; ScrapeError when it has
    none of them (not a vLLM or llama.cpp page)."""
    values: Dict[str, float] = {}
    found = False
    lora_at = -1.0
    loaded: FrozenSet[str] = frozenset()
    waiting_loras: FrozenSet[str] = frozenset()
    max_loras: Optional[int] = None
    for line in text.splitlines():
        if not line or line[0] == "#" or ":" not in line:
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, raw = m.groups()
        field = SERIES.get(name)
        if field is None and name != LORA_INFO:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if value != value:  # NaN
            continue
        found = True
        if field == "kv_usage":
            values[field] = max(values.get(field, 0.0), value)
        elif field is not None:
            values[field] = values.get(field, 0.0) + value
        elif value >= lora_at:
            # vLLM keeps one sample per change, valued with its time: the
            # latest says what is loaded now.
            lora_at = value
            lab = dict(_LABEL.findall(labels or ""))
            loaded = _names(lab.get("running_lora_adapters", ""))
            waiting_loras = _names(lab.get("waiting_lora_adapters", ""))
            try:
                max_loras = int(lab["max_lora"])
            except (KeyError, ValueError):
                max_loras = None
    if not found:
        raise ScrapeError("no vLLM or llama.cpp load series in the page")
    kv = values.get("kv_usage")
    return ScrapedLoad(at=now, waiting=values.get("waiting", 0.0),
                       running=values.get("running", 0.0),
                       kv_usage=kv if kv is None else min(max(kv, 0.0), 1.0),
                       loras_loaded=loaded, loras_waiting=waiting_loras, max_loras=max_loras)


def _names(value: str) -> FrozenSet[str]:
    return frozenset(n for n in (p.strip() for p in value.split(",")) if n)


class _CappedBody:
    def __init__(self) -> None:
        self.parts: list = []
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_BODY:
            raise ScrapeError(f"metrics page over {MAX_BODY // (1024 * 1024)} MB")
        self.parts.append(data)


class MetricsScraper(Service):
    def __init__(self, gateway: Gateway, clock: Any) -> None:
        self.gateway = gateway
        self.clock = clock
        self.loop: Optional[LoopingCall] = None
        self.interval = 0.0
        self.in_progress: Set[Backend] = set()
        self.scrapes = 0

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> Any:
        super().stopService()
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.loop = None

    def _schedule(self) -> None:
        interval = self.gateway.config.balancer.scrape_interval_seconds
        if self.loop is not None and self.loop.running:
            if interval == self.interval:
                return
            self.loop.stop()
        self.interval = interval
        self.loop = LoopingCall(self.tick)
        self.loop.clock = self.clock
        self.loop.start(interval, now=True).addErrback(
            lambda f: log.failure("metrics scrape loop", f))

    def tick(self) -> None:
        # A LoopingCall stops for good when its function raises: nothing may.
        try:
            self._schedule()  # follows a reloaded interval
            if self.gateway.config.balancer.algorithm != "inference":
                return
            for b in list(self.gateway.backends):
                if b.metrics_path and not b.removed and b not in self.in_progress \
                        and b.breaker.state != "open":
                    self.scrape(b)
        except Exception:
            log.failure("scraping backend metrics")

    def scrape(self, backend: Backend) -> "defer.Deferred[None]":
        self.in_progress.add(backend)
        self.scrapes += 1
        timeout = self.gateway.config.balancer.scrape_timeout_seconds
        d = self.gateway.upstream.treq.get(
            backend.base_url + backend.metrics_path.encode("ascii", "replace"),
            headers=Headers({b"User-Agent": [b"ntonix-scrape"]}), allow_redirects=False)

        def read(response: Any) -> Any:
            body = _CappedBody()
            got = treq.collect(response, body)
            if response.code != 200:
                return got.addCallback(lambda _: _raise(f"HTTP {response.code}"))
            return got.addCallback(lambda _: b"".join(body.parts))

        d.addCallback(read)
        d.addTimeout(timeout, self.clock)
        d.addCallback(lambda data: parse_load(data.decode("utf-8", "replace"),
                                              self.clock.seconds()))
        d.addCallbacks(lambda load: self._ok(backend, load),
                       lambda f: self._failed(backend, f, timeout))
        d.addErrback(lambda f: log.failure("scraping {backend}", f, backend=backend.name))
        d.addBoth(lambda _: self.in_progress.discard(backend))
        return d

    def _ok(self, backend: Backend, load: ScrapedLoad) -> None:
        if backend.scrape_error is not None:
            log.info("backend {backend} metrics readable again", backend=backend.name)
            backend.scrape_error = None
        backend.set_load(load)

    def _failed(self, backend: Backend, failure: Any, timeout: float) -> None:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            why = f"no answer within {timeout:g}s (balancer.scrape_timeout_seconds)"
        else:
            why = failure.getErrorMessage() or failure.type.__name__
        backend.scrape_failures += 1
        if backend.scrape_error is None:
            # Once per change: a backend without metrics would fill the log.
            log.info("backend {backend} metrics at {path} unusable ({why}); routing on the "
                     "gateway's own counts", backend=backend.name, path=backend.metrics_path,
                     why=why)
        backend.scrape_error = why


def _raise(why: str) -> None:
    raise ScrapeError(why)
