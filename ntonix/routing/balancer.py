"""Picking a backend: smooth weighted round-robin (as nginx does it), or the
least outstanding of two random choices (the inference scorer is in
``scorer.py``).

Each pick adds every candidate's weight to its running score, takes the one
with the highest score and subtracts the total weight from it. Over any window
of sum-of-weights picks each backend is chosen exactly its weight times, and
the picks interleave (5,1,1 gives a a b a c a a, not a a a a a b c).
"""

import random
from typing import Any, Callable, Dict, Iterable, List, Optional

from ntonix.routing.backend import Backend


class SmoothWeightedRoundRobin:
    """Pure state machine: no I/O, no clock."""

    def __init__(self) -> None:
        self._current: Dict[Backend, int] = {}

    def pick(self, candidates: Iterable[Backend],
             allowed: Optional[Callable[[Backend], bool]] = None,
             ctx: Any = None) -> Optional[Backend]:
        pool: List[Backend] = [b for b in candidates if allowed is None or allowed(b)]
        if not pool:
            return None
        total = 0
        best: Optional[Backend] = None
        for b in pool:
            score = self._current.get(b, 0) + b.weight
            self._current[b] = score
            total += b.weight
            if best is None or score > self._current[best]:
                best = b
        assert best is not None
        self._current[best] -= total
        return best

    def forget(self, backend: Backend) -> None:
        self._current.pop(backend, None)

    def rank(self, candidates: List[Backend], ctx: Any = None) -> List[Backend]:
        """Preference order for a slot asked of the workers' broker: this
        turn's pick, then the rest. (Picking the granted one again alone
        leaves the rotation as it was.)"""
        return by_load(candidates, self.pick(candidates))


class LeastOutstanding:
    """Power of two choices on in-flight requests, weights respected.

    Two candidates are drawn at random in proportion to their weights; the one
    with fewer requests in flight per unit of weight wins. Cheap, and it avoids
    the herd that "always the least loaded" causes.
    """

    def __init__(self, rng: Optional[random.Random] = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, candidates: Iterable[Backend],
             allowed: Optional[Callable[[Backend], bool]] = None,
             ctx: Any = None) -> Optional[Backend]:
        pool = [b for b in candidates if allowed is None or allowed(b)]
        if len(pool) <= 1:
            return pool[0] if pool else None
        weights = [b.weight for b in pool]
        first = self.rng.choices(range(len(pool)), weights)[0]
        rest = [i for i in range(len(pool)) if i != first]
        second = self.rng.choices(rest, [weights[i] for i in rest])[0]
        a, b = pool[first], pool[second]
        return a if (a.in_flight + 1) / a.weight <= (b.in_flight + 1) / b.weight else b

    def forget(self, backend: Backend) -> None:
        pass

    def rank(self, candidates: List[Backend], ctx: Any = None) -> List[Backend]:
        return by_load(candidates, self.pick(candidates))


def by_load(candidates: List[Backend], first: Optional[Backend]) -> List[Backend]:
    """``first``, then the others from the least loaded per unit of weight."""
    rest = sorted((b for b in candidates if b is not first),
                  key=lambda b: (b.in_flight + 1) / b.weight)
    return [first, *rest] if first is not None else rest


def make_balancer(algorithm: str, rng: Optional[random.Random] = None, config: Any = None,
                  now: Optional[Callable[[], float]] = None) -> Any:
    if algorithm == "inference":
        from ntonix.routing.scorer import InferenceScorer
        assert config is not None and now is not None
        return InferenceScorer(config, now, rng)
    if algorithm == "least_outstanding":
        return LeastOutstanding(rng)
    return SmoothWeightedRoundRobin()
