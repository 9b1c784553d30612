"""The gateway's latency model learns the simulator's true costs.

The simulator (the mock's inference mode) is driven on a Clock; what a
gateway would observe of each request (time to first token against the
uncached prompt tokens and the requests ahead, time per output token against
the batch) feeds the backend's LatencyModel, and its coefficients must come
out as the simulator's parameters.
"""

import random

import pytest
from twisted.internet.task import Clock

from ntonix.routing.latency import LatencyModel
from ntonix_mock.simulator import InferenceEngine, SimParams

MS = 0.001


def run_until_idle(clock: Clock, engine: InferenceEngine, limit: float = 600.0) -> None:
    """Fire timers one at a time at their own times until nothing is left."""
    start = clock.seconds()
    while clock.getDelayedCalls():
        nxt = min(c.getTime() for c in clock.getDelayedCalls())
        clock.advance(max(nxt - clock.seconds(), 0.0))
        assert clock.seconds() - start < limit


def test_ttft_model_converges_on_prefill_costs():
    params = SimParams(prefill_ms_base=3.0, prefill_ms_per_token=0.04, decode_ms_base=5.0,
                       decode_ms_per_running=0.5, max_running=64, kv_blocks=100_000)
    clock = Clock()
    engine = InferenceEngine(params, clock)
    model = LatencyModel()
    rng = random.Random(11)
    for i in range(60):
        # Groups of 1-4 requests arriving together: the k-th waits for the
        # prefills ahead of it, which the model sees as "requests ahead".
        group = []
        for k in range(rng.randint(1, 4)):
            size = rng.randint(50, 4000)
            prompt = f"{i}-{k} ".encode() + b"z" * (size * 4)
            sent = clock.seconds()
            req = engine.submit("sim-llm", prompt, lambda r: None, lambda r: None, max_tokens=2)
            group.append((req, sent, k))
        run_until_idle(clock, engine)
        for req, sent, ahead in group:
            uncached = req.prompt_tokens - req.cached_tokens
            if ahead == 0:
                model.observe_ttft(uncached, 0, req.ttft_ms * MS)
    theta = model.ttft.theta
    assert theta[0] == pytest.approx(3.0 * MS, rel=0.02), theta
    assert theta[1] == pytest.approx(0.04 * MS, rel=0.02), theta


def test_tpot_model_converges_on_decode_costs():
    params = SimParams(prefill_ms_base=1.0, prefill_ms_per_token=0.0, decode_ms_base=6.0,
                       decode_ms_per_running=0.75, max_running=64)
    clock = Clock()
    engine = InferenceEngine(params, clock)
    model = LatencyModel()
    rng = random.Random(5)
    for i in range(40):
        batch = rng.randint(1, 24)
        reqs = []
        for k in range(batch):
            times: list = []
            req = engine.submit("sim-llm", f"{i} {k}".encode(),
                                lambda r, times=times: times.append(clock.seconds()),
                                lambda r: None, max_tokens=20)
            reqs.append((req, times))
        run_until_idle(clock, engine)
        # The last request of the batch decodes beside all the others from
        # its first token to the end: its pace is the batch's.
        req, times = reqs[-1]
        per_token = (times[-1] - times[0]) / (len(times) - 1)
        model.observe_tpot(batch, per_token)
    theta = model.tpot.theta
    assert theta[0] == pytest.approx(6.0 * MS, rel=0.05), theta
    assert theta[1] == pytest.approx(0.75 * MS, rel=0.05), theta
