"""Picking a backend: smooth weighted round-robin, as nginx does it.

Each pick adds every candidate's weight to its running score, takes the one
with the highest score and subtracts the total weight from it. Over any window
of sum-of-weights picks each backend is chosen exactly its weight times, and
the picks interleave (5,1,1 gives a a b a c a a, not a a a a a b c).
"""

from typing import Callable, Dict, Iterable, List, Optional

from ntonix.routing.backend import Backend


class SmoothWeightedRoundRobin:
    """Pure state machine: no I/O, no clock."""

    def __init__(self) -> None:
        self._current: Dict[Backend, int] = {}

    def pick(self, candidates: Iterable[Backend],
             allowed: Optional[Callable[[Backend], bool]] = None) -> Optional[Backend]:
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
