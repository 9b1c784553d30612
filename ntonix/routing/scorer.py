"""The inference scorer: pick the backend that will answer a prompt first.

Each candidate gets ``w_prefix * prefix + w_queue * queue + w_prefill *
prefill + w_lora * lora``, every term in 0..1:

- prefix: the share of the prompt's leading blocks the prefix index predicts
  the backend still holds (those are not prefilled again);
- queue: how far below the busiest candidate its load is, the load being its
  requests in flight from this gateway (this process's, plus what its other
  workers and the other gateways last said of theirs: ``peer_in_flight``,
  see ``ntonix/share/``) plus, while its last scrape is fresh,
  the running + waiting requests its metrics reported beyond ours (other
  gateways' and clients'), over the larger of the candidates' spread and
  their mean load + 1 (so one request more than an idle backend is not the
  whole range, as a plain min-max scale would make it);
- prefill: the same for the prompt tokens sent there whose prefill has not
  ended (a big prefill delays every first token behind it), over the larger
  of the spread and this prompt's own tokens;
- lora: 1 where the requested adapter is loaded (per the backend's
  ``vllm:lora_requests_info``), 0 where it would have to be loaded.

Loads are divided by the backend's weight (its relative capacity). Bounded
load: a backend carrying more than ``spill_ratio`` times the candidates' mean
load (+2) gets no prefix term, so one hot conversation cannot pile onto one
backend; the request spills to the next best. Ties go to the lowest
predicted time to first token, then at random (new prompts spread evenly).

The circuit breaker, draining and the model filter act before the scorer:
it only ever sees backends that may take the request.
"""

import random
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import attrs

from ntonix.routing.backend import Backend
from ntonix.routing.prefix import PrefixIndex

# Metrics older than this many scrape intervals are not trusted.
STALE_INTERVALS = 3.0


@attrs.define(slots=True, eq=False)
class RouteContext:
    """What the scorer knows of one request, and what it decided."""

    model: Optional[str]
    hashes: List[int]
    prompt_bytes: int
    stream: bool = False
    adapter: bool = False  # the model is a LoRA adapter somewhere
    # Filled in by the pick, per attempt.
    uncached_tokens: int = 0
    ahead: int = 0
    prefill_open: bool = False
    matched_blocks: int = 0
    output_events: int = 0
    # Where this request's scheduler events go for the other workers and
    # gateways (share.SchedulerShare), None when there are none.
    share: Any = None


class InferenceScorer:
    def __init__(self, config: Any, now: Callable[[], float],
                 rng: Optional[random.Random] = None) -> None:
        self.rng = rng or random.Random()
        self.now = now
        self.index = PrefixIndex(config.balancer.prefix_capacity_blocks)
        self.picks = 0
        self.prefix_hits = 0  # picks whose chosen backend held a leading block
        self.reconfigure(config)

    def reconfigure(self, config: Any) -> None:
        b = config.balancer
        self.weights = dict(b.weights)
        self.model_weights: Mapping[str, Dict[str, float]] = {
            m: {**self.weights, **w} for m, w in b.model_weights.items()}
        self.block_bytes = b.prefix_block_bytes
        self.max_blocks = b.prefix_max_blocks
        self.spill_ratio = b.spill_ratio
        self.stale_after = STALE_INTERVALS * b.scrape_interval_seconds
        if self.index.capacity != b.prefix_capacity_blocks:
            self.index.resize(b.prefix_capacity_blocks)

    def forget(self, backend: Backend) -> None:
        self.index.forget(backend)

    def rank(self, candidates: List[Backend],
             ctx: Optional[RouteContext] = None) -> List[Backend]:
        """``candidates`` in the order this request would prefer them, for a
        slot asked of the workers' broker: the pick first (not recorded: the
        request may get another), then the least loaded. The one granted is
        then picked for real, alone."""
        best = self.pick(candidates, None, ctx, commit=False)
        rest = sorted((b for b in candidates if b is not best),
                      key=lambda b: (b.in_flight + b.peer_in_flight + 1) / b.weight)
        return [best, *rest] if best is not None else rest

    def pick(self, candidates: Iterable[Backend],
             allowed: Optional[Callable[[Backend], bool]] = None,
             ctx: Optional[RouteContext] = None, commit: bool = True) -> Optional[Backend]:
        pool = candidates if allowed is None and isinstance(candidates, list) \
            else [b for b in candidates if allowed is None or allowed(b)]
        if not pool:
            return None
        if ctx is None:
            # No prompt to place (an embedding, a pass-through): least loaded.
            return min(pool, key=lambda b: ((b.in_flight + b.peer_in_flight + 1) / b.weight,
                                            self.rng.random()))
        w = self.model_weights.get(ctx.model, self.weights) if ctx.model else self.weights
        wp, wq, wf, wl = w["prefix"], w["queue"], w["prefill"], w["lora"]
        n_blocks = len(ctx.hashes)
        matches = self.index.match(ctx.hashes) if n_blocks else {}
        fresh_after = self.now() - self.stale_after
        model = ctx.model

        # Comprehensions: at a hundred candidates, appends in a loop cost
        # more than the scoring itself.
        loads = [(b.in_flight + b.peer_in_flight + b.scraped_others) / b.weight
                 if b.scraped_at >= fresh_after else (b.in_flight + b.peer_in_flight) / b.weight
                 for b in pool]
        prefills = [(b.pending_prefill + b.peer_prefill) / b.weight for b in pool]
        total = sum(loads)
        qmin, qmax = min(loads), max(loads)
        fmin, fmax = min(prefills), max(prefills)
        mean = total / len(pool)
        # Differences count against a scale that means something, not only
        # against each other: one request more than an idle backend is not
        # the whole range, and 70 tokens of someone else's prefill are
        # nothing beside the 3,000 this prompt would prefill on a miss.
        qk = wq / max(qmax - qmin, mean + 1.0)
        fk = wf / max(fmax - fmin, ctx.prompt_bytes / 4.0, 1.0)
        base = 0.0
        limit = self.spill_ratio * mean + 2.0
        pk = wp / n_blocks if n_blocks else 0.0
        lora = wl and ctx.adapter

        best: Optional[Backend] = None
        best_score = -1.0
        best_tie = -1.0
        for i, b in enumerate(pool):
            q = loads[i]
            score = base + qk * (qmax - q) + fk * (fmax - prefills[i])
            if matches and q <= limit:
                score += pk * matches.get(b, 0)
            if lora:
                m = b.load
                if m is not None and model in m.loras_loaded:
                    score += wl
            if score > best_score + 1e-9:
                best, best_score, best_tie = b, score, -1.0
            elif score > best_score - 1e-9:
                # A tie: the lower predicted first token, then chance.
                if best_tie == -1.0:
                    best_tie = self._tie_key(best, ctx, matches)
                tie = self._tie_key(b, ctx, matches)
                if tie < best_tie:
                    best, best_tie = b, tie
        assert best is not None
        if commit:
            self._chose(best, ctx, matches.get(best, 0))
        return best

    def _tie_key(self, b: Any, ctx: RouteContext, matches: Mapping[Any, int]) -> float:
        uncached = self._uncached(ctx, matches.get(b, 0))
        predicted = b.latency.predict_ttft(uncached, b.in_flight + b.peer_in_flight)
        # A random part below any real difference of prediction.
        jitter = self.rng.random() * 1e-6
        return (predicted if predicted is not None else 0.0) + jitter

    def _uncached(self, ctx: RouteContext, matched: int) -> int:
        return max(0, ctx.prompt_bytes - matched * self.block_bytes) // 4

    def _chose(self, b: Backend, ctx: RouteContext, matched: int) -> None:
        self.picks += 1
        if matched:
            self.prefix_hits += 1
        ctx.matched_blocks = matched
        ctx.uncached_tokens = self._uncached(ctx, matched)
        ctx.ahead = b.in_flight + b.peer_in_flight
        ctx.prefill_open = True
        b.pending_prefill += ctx.uncached_tokens
        if ctx.hashes:
            self.index.add(b, ctx.hashes)
        share = ctx.share
        if share is not None:
            share.picked(b, ctx.hashes)

    def as_json(self) -> Dict[str, Any]:
        return {"picks": self.picks, "picks_with_prefix_match": self.prefix_hits,
                "weights": self.weights, "model_weights": dict(self.model_weights),
                "prefix_block_bytes": self.block_bytes,
                "prefix_capacity_blocks": self.index.capacity}


def prefill_ended(b: Backend, ctx: RouteContext, seconds: float) -> None:
    """The attempt's first byte (a stream's first token) came after
    ``seconds``: its prefill is over."""
    if not ctx.prefill_open:
        return
    ctx.prefill_open = False
    b.pending_prefill -= ctx.uncached_tokens
    share = ctx.share
    if ctx.stream:
        b.latency.observe_ttft(ctx.uncached_tokens, ctx.ahead, seconds)
        if share is not None:
            share.ttft(b, ctx.uncached_tokens, ctx.ahead, seconds)
    elif share is not None:
        share.loads_changed()
    ctx.ahead = b.in_flight + b.peer_in_flight  # from now on: the batch it decodes in


def attempt_ended(b: Backend, ctx: RouteContext, decode_seconds: Optional[float]) -> None:
    """The attempt is over; ``decode_seconds`` from first to last byte when
    a stream ended complete."""
    if ctx.prefill_open:
        ctx.prefill_open = False
        b.pending_prefill -= ctx.uncached_tokens
        return  # the gateway's released() tells the share
    # Events other than tokens: the role chunk, the last one, [DONE].
    tokens = ctx.output_events - 2
    if decode_seconds is not None and tokens > 1:
        running = (ctx.ahead + b.in_flight + b.peer_in_flight) / 2 + 1
        per_token = decode_seconds / (tokens - 1)
        b.latency.observe_tpot(running, per_token)
        share = ctx.share
        if share is not None:
            share.tpot(b, running, per_token)
