"""An inference-mode mock backend: a deterministic model of a vLLM server.

The plain mock (:mod:`ntonix_mock.server`) answers at a fixed pace. This one
answers at the pace a vLLM server would, in the ways that matter to a gateway's
scheduler: requests queue for a bounded running set, prompts are prefilled one
at a time, a prefix cache makes a repeated prefix cheap, the time per token
grows with the batch, LoRA adapters take slots and load time. Everything runs
on an injected clock (``IReactorTime``), so a test drives it with
``twisted.internet.task.Clock`` and every duration below is exact.

Start it with ``python -m ntonix_mock --inference --port P --id a``.

The model
=========

Parameters are :class:`SimParams` (``POST /control`` changes them at run time).
Times are in milliseconds; ``P`` is the request's prompt, as UTF-8 bytes.

Rendering (what ``P`` is)
    chat: for each message ``"<|" + role + "|>\\n" + content + "\\n"``, then
    ``"<|assistant|>\\n"``; ``content`` is a string, or for a list of parts the
    concatenated ``text`` of its text parts. Completions: the ``prompt`` string,
    or a list of strings joined with no separator.

Tokens
    ``prompt_tokens = max(1, ceil(len(P) / bytes_per_token))``.
    ``max_tokens`` (or ``max_completion_tokens``) when the request gives it:
    ``n = min(max_tokens, 4096)`` and ``finish_reason = "length"``; otherwise
    ``n = min(output_tokens, 4096)`` and ``finish_reason = "stop"`` (the
    simulated model "chose" to stop). ``prompt_tokens + n > max_model_len`` is
    a 400, as in vLLM.

Prefix cache
    ``B = block_tokens * bytes_per_token`` bytes per block; only the
    ``floor(len(P) / B)`` full blocks are cacheable. ``h[-1] = 0`` for the base
    model and ``xxh64(adapter name)`` for an adapter (vLLM keys blocks by LoRA
    too: a prefix computed under one adapter is no use to another);
    ``h[i] = xxh64_intdigest(h[i-1].to_bytes(8, "little") + P[i*B:(i+1)*B])``,
    so a hash names the whole prefix up to its block. The cache is an LRU of
    at most ``kv_blocks`` hashes.
    At prefill start: ``cached = `` the number of leading ``h[i]`` present
    (they are touched, most recent); ``cached_tokens = min(cached *
    block_tokens, prompt_tokens - 1)`` (vLLM always computes one token);
    ``uncached = prompt_tokens - cached_tokens``. At prefill end every full
    block is inserted as most recent, then the least recent beyond
    ``kv_blocks`` are evicted. Touches and inserts go from the last block to
    the first, so that the first block is the most recent: eviction eats a
    prompt from its tail and what is left is still a usable prefix (vLLM frees
    a request's blocks tail first for the same reason).
    Counters, in tokens: ``prefix_queries += prompt_tokens`` and
    ``prefix_hits += cached_tokens`` at each prefill start.

Scheduler
    A request waits in a FIFO queue. A scan of the queue, in order, admits
    every request it can: one is admissible when ``len(running) <
    max_running`` and its adapter (if the model asked for is an adapter) is
    loaded; one waiting for its adapter does not block those behind it; the
    scan stops when the running set is full. A request whose adapter is
    neither loaded nor loading starts its load, if fewer than ``max_loras``
    adapters are loaded or loading, or else by unloading the least recently
    used loaded adapter that no running request uses (none: it keeps
    waiting). A load takes ``lora_load_ms`` and counts in ``lora_loads``; an
    adapter is "used" (LRU order) when it finishes loading and when a request
    using it is admitted. The scan runs on every arrival, every departure
    (last token or cancel), every finished load and every ``/control``
    change. A model that is neither the base model nor an adapter is a 404.

Prefill lane
    Admitted requests are prefilled one at a time, FIFO (a GPU does one
    prefill at a time, so a long prompt delays everyone's first token):
    ``prefill = prefill_ms_base + prefill_ms_per_token * uncached``. At its
    end the request emits its first token; ``TTFT = now - arrival``.

Decode
    After each token but the last, the next one comes after ``decode =
    decode_ms_base + decode_ms_per_running * len(running)``, ``len(running)``
    taken when the token is scheduled. The running set counts every admitted
    request (waiting for the prefill lane, in it, or decoding). A request
    leaves it with its last token.

Backpressure and disconnects
    A paused stream gets the token already scheduled, and no next one is
    scheduled until it resumes (then after a full ``decode``). A client that
    goes away is removed at once from the queue, the prefill lane (the next
    prefill starts now) or the running set, and the queue is scanned again.

KV usage (``vllm:kv_cache_usage_perc``)
    ``min(1, sum over running of ceil((prompt_tokens + generated) /
    block_tokens) / kv_blocks)``.

HTTP
====

``POST /v1/chat/completions`` and ``/v1/completions`` (streamed as SSE in the
plain mock's format, the role chunk coming with the first token, or one JSON
answer when the last token is generated), ``GET /v1/models`` (vLLM's shape,
adapters with ``parent``), ``GET /health`` (``{}``; 503 ``Loading model``
while ``loading``, which also refuses generation), ``GET /metrics`` (vLLM's
Prometheus names), ``GET /stats`` (JSON), ``POST /control`` (SimParams
changes; ``{"reset": true}`` zeroes the statistics and empties the prefix
cache). Every answer carries ``X-Backend-Id``.
"""

import json
import math
import random
from collections import OrderedDict, deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import attrs
import xxhash
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from ntonix_mock.server import CREATED, VOCAB, QuietSite, answer_seed, error_body

log = Logger(namespace="ntonix_mock.simulator")

MAX_TOKENS_CAP = 4096


# -- parameters


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v >= 1


def _non_negative_number(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _name(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def _names(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(_name(x) for x in v)


def _dedup(v: Any) -> Tuple[str, ...]:
    return tuple(dict.fromkeys(v))


# field -> (check, what the check wants, conversion to the stored type)
_RULES: Dict[str, Tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    "model": (_name, "a non-empty string", str),
    "kv_blocks": (_positive_int, "an integer >= 1", int),
    "block_tokens": (_positive_int, "an integer >= 1", int),
    "bytes_per_token": (_positive_int, "an integer >= 1", int),
    "max_running": (_positive_int, "an integer >= 1", int),
    "prefill_ms_base": (_non_negative_number, "a number >= 0", float),
    "prefill_ms_per_token": (_non_negative_number, "a number >= 0", float),
    "decode_ms_base": (_non_negative_number, "a number >= 0", float),
    "decode_ms_per_running": (_non_negative_number, "a number >= 0", float),
    "output_tokens": (_positive_int, "an integer >= 1", int),
    "max_model_len": (_positive_int, "an integer >= 1", int),
    "loras": (_names, "a list of non-empty strings", _dedup),
    "max_loras": (_positive_int, "an integer >= 1", int),
    "lora_load_ms": (_non_negative_number, "a number >= 0", float),
    "loading": (lambda v: isinstance(v, bool), "a boolean", bool),
}


@attrs.define
class SimParams:
    """The simulated server's shape; every field can be changed at run time."""

    model: str = "sim-llm"
    kv_blocks: int = 2048
    block_tokens: int = 16
    bytes_per_token: int = 4
    max_running: int = 16
    prefill_ms_base: float = 2.0
    prefill_ms_per_token: float = 0.05
    decode_ms_base: float = 5.0
    decode_ms_per_running: float = 0.25
    output_tokens: int = 32
    max_model_len: int = 32768
    loras: Tuple[str, ...] = attrs.field(default=(), converter=_dedup)
    max_loras: int = 2
    lora_load_ms: float = 150.0
    loading: bool = False

    def check(self, changes: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
        """The converted changes and the problems with them (unknown or mistyped keys)."""
        problems: List[str] = []
        converted: Dict[str, Any] = {}
        for key, value in changes.items():
            rule = _RULES.get(key)
            if rule is None:
                problems.append(f"unknown parameter {key!r}")
                continue
            ok, wants, convert = rule
            if not ok(value):
                problems.append(f"parameter {key!r} expects {wants}")
                continue
            converted[key] = convert(value)
        # An adapter named like the base model would make the model ambiguous.
        model = converted.get("model", self.model)
        if model in converted.get("loras", self.loras):
            problems.append(f"adapter {model!r} has the base model's name")
        return converted, problems

    def update(self, changes: Dict[str, Any]) -> List[str]:
        """Apply ``changes`` all or nothing; returns the problems (then nothing changed)."""
        converted, problems = self.check(changes)
        if not problems:
            for key, value in converted.items():
                setattr(self, key, value)
        return problems

    def as_json(self) -> Dict[str, Any]:
        d = attrs.asdict(self)
        d["loras"] = list(self.loras)
        return d


# -- prompts, tokens, blocks


def message_text(content: Any) -> Optional[str]:
    """A chat message's content as text; None when it is neither a string nor parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text" \
                    and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "".join(texts)
    return None


def render_prompt(route: str, body: Dict[str, Any]) -> Optional[str]:
    """The prompt as a chat template would render it; None when the body has none."""
    if route == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        parts = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return None
            text = message_text(m.get("content"))
            if text is None:
                return None
            parts.append(f"<|{m['role']}|>\n{text}\n")
        parts.append("<|assistant|>\n")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "".join(prompt)
    return None


def prompt_token_count(n_bytes: int, bytes_per_token: int) -> int:
    # At least one: an empty prompt still has a token to compute (vLLM's BOS).
    return max(1, -(-n_bytes // bytes_per_token))


def chain_seed(adapter: Optional[str]) -> int:
    """The hash before a prompt's first block: the adapter's, 0 for the base model."""
    return 0 if adapter is None else xxhash.xxh64_intdigest(adapter.encode("utf-8"))


def block_hashes(prompt: bytes, block_bytes: int, seed: int = 0) -> List[int]:
    """The chained hashes of the prompt's full blocks."""
    hashes = []
    h = seed
    for start in range(0, len(prompt) - block_bytes + 1, block_bytes):
        h = xxhash.xxh64_intdigest(h.to_bytes(8, "little") + prompt[start:start + block_bytes])
        hashes.append(h)
    return hashes


class PrefixCache:
    """An LRU set of block hashes (first = least recently used)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: "OrderedDict[int, None]" = OrderedDict()

    def __len__(self) -> int:
        return len(self.blocks)

    def __contains__(self, h: int) -> bool:
        return h in self.blocks

    def lookup(self, hashes: List[int]) -> int:
        """How many leading blocks are cached; touches them."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        # Last to first, so that the first block ends up the most recent.
        for i in range(n - 1, -1, -1):
            self.blocks.move_to_end(hashes[i])
        return n

    def insert(self, hashes: List[int]) -> None:
        blocks = self.blocks
        for i in range(len(hashes) - 1, -1, -1):
            h = hashes[i]
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        self.trim()

    def trim(self) -> None:
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)

    def clear(self) -> None:
        self.blocks.clear()


# -- the engine

WAITING = "waiting"
QUEUED = "queued"  # admitted, waiting for the prefill lane
PREFILLING = "prefilling"
DECODING = "decoding"
DONE = "done"
CANCELLED = "cancelled"


class UnknownModel(ValueError):
    """The model asked for is neither the base model nor an adapter."""


TokenCallback = Callable[["SimRequest"], None]


@attrs.define(eq=False)
class SimRequest:
    """One request inside the engine; ``generated`` counts the tokens emitted."""

    rid: int
    model: str
    adapter: Optional[str]
    prompt_tokens: int
    block_hashes: List[int]
    max_tokens: int
    finish_reason: str
    arrival: float
    on_token: TokenCallback
    on_done: TokenCallback
    on_first_token: Optional[TokenCallback] = None
    state: str = WAITING
    cached_tokens: int = 0
    generated: int = 0
    paused: bool = False
    ttft_ms: Optional[float] = None
    timer: Optional[IDelayedCall] = None


@attrs.define
class SimStats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    lora_loads: int = 0
    by_model: Dict[str, int] = attrs.Factory(dict)
    by_finish_reason: Dict[str, int] = attrs.Factory(lambda: {"stop": 0, "length": 0})
    ttfts_ms: List[float] = attrs.Factory(list)


def percentile(sorted_values: List[float], q: float) -> float:
    """Nearest-rank percentile of sorted values; 0 when there are none."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class InferenceEngine:
    """Waiting queue, prefill lane, running set, prefix cache and LoRA slots.

    Pure of HTTP: a caller submits a prompt with callbacks and gets them
    called on the clock (``on_first_token`` and ``on_token`` at each token,
    ``on_done`` after the last one). ``cancel``, ``pause`` and ``resume`` are
    the client going away, and pushing back.
    """

    def __init__(self, params: Optional[SimParams] = None,
                 clock: Optional[IReactorTime] = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        self.params = params if params is not None else SimParams()
        self.clock: IReactorTime = clock
        self.cache = PrefixCache(self.params.kv_blocks)
        self.stats = SimStats()
        self.waiting: Deque[SimRequest] = deque()
        # Insertion-ordered, so that anything listing it is repeatable.
        self.running: Dict[int, SimRequest] = {}
        self.prefill_queue: Deque[SimRequest] = deque()
        self.prefilling: Optional[SimRequest] = None
        self.lora_ready: "OrderedDict[str, None]" = OrderedDict()  # first = LRU
        self.lora_loading: Dict[str, IDelayedCall] = {}
        self.lora_in_use: Dict[str, int] = {}
        self._next_rid = 0

    # -- what is served

    def adapter_of(self, model: str) -> Optional[str]:
        """The adapter a model name asks for (None: the base model); raises UnknownModel."""
        if model == self.params.model:
            return None
        if model in self.params.loras:
            return model
        raise UnknownModel(model)

    def serves(self, model: str) -> bool:
        return model == self.params.model or model in self.params.loras

    def prompt_tokens(self, prompt: bytes) -> int:
        return prompt_token_count(len(prompt), self.params.bytes_per_token)

    # -- requests

    def submit(self, model: str, prompt: bytes, on_token: TokenCallback,
               on_done: TokenCallback, max_tokens: Optional[int] = None,
               on_first_token: Optional[TokenCallback] = None) -> SimRequest:
        """Queue a request; raises UnknownModel, or ValueError for max_tokens < 1."""
        adapter = self.adapter_of(model)
        p = self.params
        if max_tokens is None:
            n, reason = min(p.output_tokens, MAX_TOKENS_CAP), "stop"
        else:
            if max_tokens < 1:
                raise ValueError("max_tokens must be at least 1")
            n, reason = min(max_tokens, MAX_TOKENS_CAP), "length"
        self._next_rid += 1
        req = SimRequest(
            rid=self._next_rid, model=model, adapter=adapter,
            prompt_tokens=self.prompt_tokens(prompt),
            block_hashes=block_hashes(prompt, p.block_tokens * p.bytes_per_token,
                                      chain_seed(adapter)),
            max_tokens=n, finish_reason=reason, arrival=self.clock.seconds(),
            on_token=on_token, on_done=on_done, on_first_token=on_first_token)
        self.stats.requests += 1
        self.stats.by_model[model] = self.stats.by_model.get(model, 0) + 1
        self.waiting.append(req)
        self._admit()
        return req

    def cancel(self, req: SimRequest) -> bool:
        """Remove a request from wherever it is; False when it had already ended."""
        state = req.state
        if state in (DONE, CANCELLED):
            return False
        req.state = CANCELLED
        self._cancel_timer(req)
        if state == WAITING:
            self.waiting.remove(req)
        else:
            self._leave_running(req)
            if state == QUEUED:
                self.prefill_queue.remove(req)
            elif state == PREFILLING:
                self.prefilling = None
                self._next_prefill()
        self.stats.cancelled += 1
        self._admit()
        return True

    def pause(self, req: SimRequest) -> None:
        req.paused = True

    def resume(self, req: SimRequest) -> None:
        if not req.paused:
            return
        req.paused = False
        # A token that came while paused scheduled no next one: do it now.
        if req.state == DECODING and req.timer is None:
            self._schedule_decode(req)

    # -- control

    def update(self, changes: Dict[str, Any]) -> List[str]:
        """Change parameters (all or nothing) and bring the state in line with them."""
        p = self.params
        old_block = (p.block_tokens, p.bytes_per_token)
        problems = p.update(changes)
        if problems:
            return problems
        if changes:
            log.info("simulator parameters changed: {changes}", changes=changes)
        if (p.block_tokens, p.bytes_per_token) != old_block:
            # Hashes of blocks of another size name nothing any more.
            self.cache.clear()
        self.cache.capacity = p.kv_blocks
        self.cache.trim()
        for name in list(self.lora_ready):
            if name not in p.loras and not self.lora_in_use.get(name):
                self._unload(name)
        while len(self.lora_ready) + len(self.lora_loading) > p.max_loras:
            if self._evict_adapter() is None:
                break
        self._admit()
        return []

    def reset(self) -> None:
        """Zero the statistics and empty the prefix cache (between bench runs)."""
        self.stats = SimStats()
        self.cache.clear()

    # -- scheduling

    def _admit(self) -> None:
        p = self.params
        if not self.waiting or len(self.running) >= p.max_running:
            return
        kept: Deque[SimRequest] = deque()
        waiting = self.waiting
        while waiting:
            if len(self.running) >= p.max_running:
                kept.extend(waiting)
                break
            req = waiting.popleft()
            if req.adapter is not None and req.adapter not in self.lora_ready:
                self._want_adapter(req.adapter)
                kept.append(req)
                continue
            self._start_running(req)
        self.waiting = kept

    def _want_adapter(self, name: str) -> None:
        if name in self.lora_loading:
            return
        while len(self.lora_ready) + len(self.lora_loading) >= self.params.max_loras:
            if self._evict_adapter() is None:
                return
        self.stats.lora_loads += 1
        log.debug("loading adapter {name}", name=name)
        self.lora_loading[name] = self.clock.callLater(
            self.params.lora_load_ms / 1000.0, self._adapter_loaded, name)

    def _evict_adapter(self) -> Optional[str]:
        """Unload the least recently used adapter that no running request uses."""
        for name in self.lora_ready:
            if not self.lora_in_use.get(name):
                self._unload(name)
                return name
        return None

    def _unload(self, name: str) -> None:
        del self.lora_ready[name]
        log.debug("unloaded adapter {name}", name=name)

    def _adapter_loaded(self, name: str) -> None:
        del self.lora_loading[name]
        self.lora_ready[name] = None
        self._admit()

    def _start_running(self, req: SimRequest) -> None:
        self.running[req.rid] = req
        if req.adapter is not None:
            self.lora_in_use[req.adapter] = self.lora_in_use.get(req.adapter, 0) + 1
            self.lora_ready.move_to_end(req.adapter)
        req.state = QUEUED
        self.prefill_queue.append(req)
        self._next_prefill()

    def _leave_running(self, req: SimRequest) -> None:
        del self.running[req.rid]
        if req.adapter is not None:
            left = self.lora_in_use[req.adapter] - 1
            if left:
                self.lora_in_use[req.adapter] = left
            else:
                del self.lora_in_use[req.adapter]

    def _next_prefill(self) -> None:
        if self.prefilling is not None or not self.prefill_queue:
            return
        p = self.params
        req = self.prefill_queue.popleft()
        cached_blocks = self.cache.lookup(req.block_hashes)
        req.cached_tokens = min(cached_blocks * p.block_tokens, req.prompt_tokens - 1)
        self.stats.prefix_queries += req.prompt_tokens
        self.stats.prefix_hits += req.cached_tokens
        req.state = PREFILLING
        self.prefilling = req
        ms = p.prefill_ms_base + p.prefill_ms_per_token * (req.prompt_tokens - req.cached_tokens)
        req.timer = self.clock.callLater(ms / 1000.0, self._prefill_done, req)

    def _prefill_done(self, req: SimRequest) -> None:
        req.timer = None
        self.prefilling = None
        self.cache.insert(req.block_hashes)
        self.stats.prompt_tokens += req.prompt_tokens
        req.state = DECODING
        self._next_prefill()
        self._emit(req)

    def _schedule_decode(self, req: SimRequest) -> None:
        p = self.params
        ms = p.decode_ms_base + p.decode_ms_per_running * len(self.running)
        req.timer = self.clock.callLater(ms / 1000.0, self._decode_tick, req)

    def _decode_tick(self, req: SimRequest) -> None:
        req.timer = None
        self._emit(req)

    def _emit(self, req: SimRequest) -> None:
        req.generated += 1
        self.stats.generation_tokens += 1
        if req.generated == 1:
            req.ttft_ms = (self.clock.seconds() - req.arrival) * 1000.0
            self.stats.ttfts_ms.append(req.ttft_ms)
            if req.on_first_token is not None:
                req.on_first_token(req)
        req.on_token(req)
        if req.state != DECODING:  # cancelled from inside a callback
            return
        if req.generated >= req.max_tokens:
            self._finish(req)
        elif not req.paused:
            self._schedule_decode(req)

    def _finish(self, req: SimRequest) -> None:
        req.state = DONE
        self._leave_running(req)
        self.stats.completed += 1
        reasons = self.stats.by_finish_reason
        reasons[req.finish_reason] = reasons.get(req.finish_reason, 0) + 1
        req.on_done(req)
        self._admit()

    @staticmethod
    def _cancel_timer(req: SimRequest) -> None:
        if req.timer is not None and req.timer.active():
            req.timer.cancel()
        req.timer = None

    # -- observation

    def kv_usage(self) -> float:
        """Blocks held by the running requests over kv_blocks, at most 1."""
        bt = self.params.block_tokens
        used = sum(-(-(r.prompt_tokens + r.generated) // bt) for r in self.running.values())
        return min(1.0, used / self.params.kv_blocks)

    def running_adapters(self) -> List[str]:
        """Adapters loaded (in use or idle), as vLLM's running_lora_adapters."""
        return sorted(self.lora_ready)

    def waiting_adapters(self) -> List[str]:
        """Adapters that waiting requests ask for and that are not loaded."""
        return sorted({r.adapter for r in self.waiting
                       if r.adapter is not None and r.adapter not in self.lora_ready})

    def stats_json(self, backend_id: str) -> Dict[str, Any]:
        s = self.stats
        ttfts = sorted(s.ttfts_ms)
        return {
            "id": backend_id,
            "requests": s.requests,
            "completed": s.completed,
            "cancelled": s.cancelled,
            "rejected": s.rejected,
            "running": len(self.running),
            "waiting": len(self.waiting),
            "prefix_queries_tokens": s.prefix_queries,
            "prefix_hits_tokens": s.prefix_hits,
            "prefix_hit_rate": s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
            "prefix_cache_blocks": len(self.cache),
            "kv_cache_usage": self.kv_usage(),
            "prompt_tokens": s.prompt_tokens,
            "generation_tokens": s.generation_tokens,
            "lora_loads": s.lora_loads,
            "loaded_loras": list(self.lora_ready),
            "loading_loras": sorted(self.lora_loading),
            "by_model": dict(s.by_model),
            "by_finish_reason": dict(s.by_finish_reason),
            "ttft_ms": {"count": len(ttfts), "sum": sum(ttfts),
                        "p50": percentile(ttfts, 0.50), "p90": percentile(ttfts, 0.90),
                        "p99": percentile(ttfts, 0.99)},
            "params": self.params.as_json(),
        }


# -- Prometheus


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(engine: InferenceEngine) -> bytes:
    """vLLM's metrics that a gateway's scheduler reads, in Prometheus text format."""
    s = engine.stats
    model = f'model_name="{_label(engine.params.model)}"'
    lines: List[str] = []

    def family(name: str, kind: str, help_: str, samples: List[Tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{{{labels}}} {float(value)!r}")

    family("vllm:num_requests_running", "gauge",
           "Number of requests in model execution batches.", [(model, len(engine.running))])
    family("vllm:num_requests_waiting", "gauge",
           "Number of requests waiting to be processed.", [(model, len(engine.waiting))])
    usage = engine.kv_usage()
    family("vllm:kv_cache_usage_perc", "gauge",
           "KV-cache usage. 1 means 100 percent usage.", [(model, usage)])
    family("vllm:gpu_cache_usage_perc", "gauge",
           "GPU KV-cache usage. 1 means 100 percent usage.", [(model, usage)])
    family("vllm:prefix_cache_queries_total", "counter",
           "Prefix cache queries, in terms of number of queried tokens.",
           [(model, s.prefix_queries)])
    family("vllm:prefix_cache_hits_total", "counter",
           "Prefix cache hits, in terms of number of cached tokens.", [(model, s.prefix_hits)])
    family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
           [(model, s.prompt_tokens)])
    family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
           [(model, s.generation_tokens)])
    family("vllm:request_success_total", "counter", "Count of successfully processed requests.",
           [(f'finished_reason="{_label(reason)}",{model}', n)
            for reason, n in sorted(s.by_finish_reason.items())])
    family("vllm:lora_requests_info", "gauge", "Running stats on lora requests.",
           [(f'max_lora="{engine.params.max_loras}",'
             f'running_lora_adapters="{_label(",".join(engine.running_adapters()))}",'
             f'waiting_lora_adapters="{_label(",".join(engine.waiting_adapters()))}"', 1)])
    lines.append("")
    return "\n".join(lines).encode("utf-8")


# -- HTTP

# A token event is fixed text around the token's JSON string: encode each
# word once, so that a token costs a dict lookup and a concatenation.
_WORD_JSON = {w: json.dumps(w).encode() for w in VOCAB}
_SPACED_WORD_JSON = {w: json.dumps(" " + w).encode() for w in VOCAB}


def _event(payload: Dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def usage_json(req: SimRequest) -> Dict[str, Any]:
    return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.generated,
            "total_tokens": req.prompt_tokens + req.generated,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}


class _Answer:
    """What a generation request answers: its identity and its words."""

    def __init__(self, resource: "SimulatorResource", request: server.Request, route: str,
                 model: str, text: str) -> None:
        self.resource = resource
        self.request = request
        self.route = route
        self.model = model
        seed = answer_seed(model, text)
        self.rng = random.Random(seed)
        self.id = ("chatcmpl-" if route == "chat" else "cmpl-") + f"{seed:016x}"
        self.req: Optional[SimRequest] = None

    def lost(self, reason: Failure) -> None:
        """The client went away: free whatever the request held."""
        if self.req is not None:
            self.resource.engine.cancel(self.req)

    def chunk(self, delta: Dict[str, Any], finish: Optional[str],
              text: str = "") -> Dict[str, Any]:
        if self.route == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": CREATED, "model": self.model,
                "system_fingerprint": "fp_mock", "choices": [choice]}


class _Whole(_Answer):
    """A non-streamed answer, written when the last token is generated."""

    def on_token(self, req: SimRequest) -> None:
        pass

    def on_done(self, req: SimRequest) -> None:
        content = " ".join(self.rng.choice(VOCAB) for _ in range(req.generated))
        if self.route == "chat":
            obj = {"id": self.id, "object": "chat.completion", "created": CREATED,
                   "model": self.model, "system_fingerprint": "fp_mock",
                   "choices": [{"index": 0,
                                "message": {"role": "assistant", "content": content},
                                "logprobs": None, "finish_reason": req.finish_reason}],
                   "usage": usage_json(req)}
        else:
            obj = {"id": self.id, "object": "text_completion", "created": CREATED,
                   "model": self.model, "system_fingerprint": "fp_mock",
                   "choices": [{"index": 0, "text": content, "logprobs": None,
                                "finish_reason": req.finish_reason}],
                   "usage": usage_json(req)}
        self.request.write(json.dumps(obj, separators=(",", ":")).encode())
        self.request.finish()


@implementer(IPushProducer)
class _Stream(_Answer):
    """An SSE answer; the transport's push back pauses the request in the engine."""

    def __init__(self, *args: Any, include_usage: bool = False) -> None:
        super().__init__(*args)
        self.include_usage = include_usage
        marker = "\x00"
        event = _event(self.chunk({"content": marker}, None, text=marker))
        # The token is the chunk's last string (the model name, chosen by the
        # client, comes before it).
        self.token_prefix, self.token_suffix = event.rsplit(json.dumps(marker).encode(), 1)

    def start(self, req: SimRequest) -> None:
        self.req = req
        self.request.setHeader(b"Content-Type", b"text/event-stream")
        self.request.setHeader(b"Cache-Control", b"no-cache")
        self.request.registerProducer(self, True)
        # Headers now, the body at the first token, as vLLM behind uvicorn does.
        self.request.write(b"")

    # -- IPushProducer
    def pauseProducing(self) -> None:
        if self.req is not None:
            self.resource.engine.pause(self.req)

    def resumeProducing(self) -> None:
        if self.req is not None:
            self.resource.engine.resume(self.req)

    def stopProducing(self) -> None:
        if self.req is not None:
            self.resource.engine.cancel(self.req)

    # -- engine callbacks
    def on_token(self, req: SimRequest) -> None:
        word = self.rng.choice(VOCAB)
        if req.generated == 1:
            data = self.token_prefix + _WORD_JSON[word] + self.token_suffix
            if self.route == "chat":
                data = _event(self.chunk({"role": "assistant", "content": ""}, None)) + data
        else:
            data = self.token_prefix + _SPACED_WORD_JSON[word] + self.token_suffix
        self.request.write(data)

    def on_done(self, req: SimRequest) -> None:
        data = _event(self.chunk({}, req.finish_reason))
        if self.include_usage:
            usage = self.chunk({}, None)
            usage["choices"] = []
            usage["usage"] = usage_json(req)
            data += _event(usage)
        self.request.write(data + b"data: [DONE]\n\n")
        self.request.unregisterProducer()
        self.request.finish()


class SimulatorResource(Resource):
    """The simulated vLLM server as one resource; routes by path."""

    isLeaf = True

    def __init__(self, backend_id: str, params: Optional[SimParams] = None,
                 clock: Optional[IReactorTime] = None,
                 engine: Optional[InferenceEngine] = None) -> None:
        super().__init__()
        self.backend_id = backend_id
        self.engine = engine if engine is not None else InferenceEngine(params, clock)

    def render(self, request: server.Request) -> Any:
        path = request.path.decode("latin-1").split("?", 1)[0].rstrip("/") or "/"
        method = request.method.decode("latin-1")
        request.setHeader(b"X-Backend-Id", self.backend_id.encode())
        routes = {
            ("GET", "/health"): self._health,
            ("GET", "/v1/models"): self._models,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/stats"): self._stats,
            ("POST", "/control"): self._control,
            ("POST", "/v1/chat/completions"): lambda r: self._generate(r, "chat"),
            ("POST", "/v1/completions"): lambda r: self._generate(r, "completions"),
        }
        handler = routes.get((method, path))
        if handler is None:
            if path in {p for (_, p) in routes}:
                return self._error(request, 405, f"method {method} not allowed on {path}",
                                   "invalid_request_error", "method_not_allowed")
            return self._error(request, 404, f"no route {path}", "invalid_request_error",
                               "not_found")
        return handler(request)

    # -- helpers
    @staticmethod
    def _json(request: server.Request, obj: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(obj, separators=(",", ":")).encode()

    @staticmethod
    def _error(request: server.Request, code: int, message: str, type_: str,
               err_code: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return error_body(message, type_, err_code)

    def _loading(self, request: server.Request) -> bytes:
        # llama.cpp's answer while its model loads.
        return self._error(request, 503, "Loading model", "unavailable_error", 503)

    @staticmethod
    def _read_json(request: server.Request) -> Optional[Dict[str, Any]]:
        try:
            body = json.loads(request.content.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        return body if isinstance(body, dict) else None

    # -- routes
    def _health(self, request: server.Request) -> bytes:
        if self.engine.params.loading:
            return self._loading(request)
        return self._json(request, {})

    def _models(self, request: server.Request) -> bytes:
        p = self.engine.params
        data = [{"id": p.model, "object": "model", "created": CREATED, "owned_by": "vllm",
                 "root": p.model, "parent": None, "max_model_len": p.max_model_len}]
        for name in p.loras:
            data.append({"id": name, "object": "model", "created": CREATED, "owned_by": "vllm",
                         "root": name, "parent": p.model, "max_model_len": p.max_model_len})
        return self._json(request, {"object": "list", "data": data})

    def _metrics(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return render_metrics(self.engine)

    def _stats(self, request: server.Request) -> bytes:
        return self._json(request, self.engine.stats_json(self.backend_id))

    def _control(self, request: server.Request) -> bytes:
        body = self._read_json(request)
        if body is None:
            return self._error(request, 400, "expected a JSON object of parameters",
                               "invalid_request_error", "invalid_json")
        reset = body.pop("reset", False)
        if not isinstance(reset, bool):
            return self._error(request, 400, "'reset' expects a boolean",
                               "invalid_request_error", "invalid_parameter")
        _, problems = self.engine.params.check(body)
        if problems:
            return self._error(request, 400, "; ".join(problems), "invalid_request_error",
                               "invalid_parameter")
        if reset:
            self.engine.reset()
        self.engine.update(body)
        return self._json(request, self.engine.params.as_json())

    def _generate(self, request: server.Request, route: str) -> Any:
        engine = self.engine
        p = engine.params
        if p.loading:
            return self._loading(request)
        body = self._read_json(request)
        if body is None:
            return self._bad(request, "request body must be a JSON object", "invalid_json")
        model = body.get("model") or p.model
        if not isinstance(model, str):
            return self._bad(request, "model must be a string", "invalid_model")
        text = render_prompt(route, body)
        if text is None:
            what = ("messages must be a non-empty list of messages with a role and a content"
                    if route == "chat" else "prompt must be a string or a list of strings")
            return self._bad(request, what, "invalid_prompt")
        if not engine.serves(model):
            engine.stats.rejected += 1
            return self._error(request, 404, f"The model `{model}` does not exist.",
                               "invalid_request_error", "model_not_found")
        n = body.get("max_completion_tokens", body.get("max_tokens"))
        if n is not None and not _positive_int(n):
            return self._bad(request, "max_tokens must be an integer >= 1", "invalid_max_tokens")
        prompt = text.encode("utf-8", "surrogatepass")
        prompt_tokens = engine.prompt_tokens(prompt)
        asked = min(n if n is not None else p.output_tokens, MAX_TOKENS_CAP)
        if prompt_tokens + asked > p.max_model_len:
            return self._bad(
                request,
                f"This model's maximum context length is {p.max_model_len} tokens. However, "
                f"you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the "
                f"messages, {asked} in the completion). Please reduce the length of the "
                f"messages or completion.", "context_length_exceeded")
        answer: _Answer
        if body.get("stream") is True:
            opts = body.get("stream_options")
            include = isinstance(opts, dict) and opts.get("include_usage") is True
            answer = _Stream(self, request, route, model, text, include_usage=include)
        else:
            request.setHeader(b"Content-Type", b"application/json")
            answer = _Whole(self, request, route, model, text)
        req = engine.submit(model, prompt, answer.on_token, answer.on_done, max_tokens=n)
        answer.req = req
        if isinstance(answer, _Stream):
            answer.start(req)
        request.notifyFinish().addErrback(answer.lost)
        return server.NOT_DONE_YET

    def _bad(self, request: server.Request, message: str, code: str) -> bytes:
        self.engine.stats.rejected += 1
        return self._error(request, 400, message, "invalid_request_error", code)


def make_sim_site(backend_id: str, params: Optional[SimParams] = None,
                  clock: Optional[IReactorTime] = None) -> server.Site:
    return QuietSite(SimulatorResource(backend_id, params, clock))
