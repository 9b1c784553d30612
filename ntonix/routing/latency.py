"""Predicting a backend's latency from what it is asked to do.

Two linear models per backend, fitted online by recursive least squares (one
small matrix update per completed request, no history kept):

- time to first token ~ a + b * uncached prompt tokens + c * requests ahead
  of it (the prefill the backend must do, and the queue it joins);
- time per output token ~ d + e * requests running there (decode slows as
  the batch grows).

A forgetting factor slightly below 1 lets a model follow a backend whose
speed changes (another model loaded, a GPU throttling) while averaging out
noise. Pure arithmetic: no clock, no I/O.
"""

from typing import List, Optional, Sequence

import attrs


@attrs.define(eq=False)
class RecursiveLeastSquares:
    """y ~ theta . x, with ``n`` features (the first is usually 1)."""

    n: int
    forgetting: float = 0.995
    # A large initial covariance: the first observations move theta freely.
    initial_covariance: float = 1e4
    theta: List[float] = attrs.field(init=False)
    p: List[List[float]] = attrs.field(init=False)
    count: int = 0

    def __attrs_post_init__(self) -> None:
        self.theta = [0.0] * self.n
        self.p = [[self.initial_covariance if i == j else 0.0 for j in range(self.n)]
                  for i in range(self.n)]

    def predict(self, x: Sequence[float]) -> float:
        return sum(t * v for t, v in zip(self.theta, x))

    def update(self, x: Sequence[float], y: float) -> None:
        n, lam, p = self.n, self.forgetting, self.p
        px = [sum(p[i][j] * x[j] for j in range(n)) for i in range(n)]
        denom = lam + sum(x[i] * px[i] for i in range(n))
        if denom <= 1e-12:
            return
        gain = [v / denom for v in px]
        err = y - self.predict(x)
        self.theta = [self.theta[i] + gain[i] * err for i in range(n)]
        # P = (P - k x^T P) / lambda, kept symmetric against rounding drift.
        xp = [sum(x[i] * p[i][j] for i in range(n)) for j in range(n)]
        new = [[(p[i][j] - gain[i] * xp[j]) / lam for j in range(n)] for i in range(n)]
        for i in range(n):
            for j in range(i + 1, n):
                avg = (new[i][j] + new[j][i]) / 2
                new[i][j] = new[j][i] = avg
        self.p = new
        self.count += 1


@attrs.define(eq=False)
class LatencyModel:
    """What the gateway predicts and observed for one backend (seconds)."""

    ttft: RecursiveLeastSquares = attrs.Factory(lambda: RecursiveLeastSquares(3))
    tpot: RecursiveLeastSquares = attrs.Factory(lambda: RecursiveLeastSquares(2))
    observed_ttft_ewma: Optional[float] = None
    observed_tpot_ewma: Optional[float] = None

    def observe_ttft(self, uncached_tokens: float, ahead: float, seconds: float) -> None:
        self.ttft.update((1.0, uncached_tokens, ahead), seconds)
        self.observed_ttft_ewma = _ewma(self.observed_ttft_ewma, seconds)

    def observe_tpot(self, running: float, seconds: float) -> None:
        self.tpot.update((1.0, running), seconds)
        self.observed_tpot_ewma = _ewma(self.observed_tpot_ewma, seconds)

    def predict_ttft(self, uncached_tokens: float, ahead: float) -> Optional[float]:
        """None until it has seen a few requests."""
        if self.ttft.count < 3:
            return None
        return max(0.0, self.ttft.predict((1.0, uncached_tokens, ahead)))

    def predict_tpot(self, running: float) -> Optional[float]:
        if self.tpot.count < 3:
            return None
        return max(0.0, self.tpot.predict((1.0, running)))

    def as_json(self) -> dict:
        t, d = self.ttft.theta, self.tpot.theta
        return {
            "samples": {"ttft": self.ttft.count, "tpot": self.tpot.count},
            "ttft_ms": {"base": round(1000 * t[0], 3), "per_uncached_token": round(1000 * t[1], 5),
                        "per_request_ahead": round(1000 * t[2], 3)},
            "tpot_ms": {"base": round(1000 * d[0], 3), "per_running_request": round(1000 * d[1], 4)},
            "observed_ttft_ms": None if self.observed_ttft_ewma is None
            else round(1000 * self.observed_ttft_ewma, 3),
            "observed_tpot_ms": None if self.observed_tpot_ewma is None
            else round(1000 * self.observed_tpot_ewma, 3),
        }


def _ewma(old: Optional[float], new: float, alpha: float = 0.1) -> float:
    return new if old is None else old + alpha * (new - old)
