"""What choosing a backend costs the gateway, per request, at N backends.

Times the whole choice the forwarding path makes for a chat request under
``balancer.algorithm = inference``: rendering the prompt, hashing its blocks,
matching them in the prefix index, scoring every candidate (the circuit and
model filter included) and the bookkeeping after the pick; beside it the
round-robin and least-outstanding pickers over the same candidates. The index
is warmed with conversations spread over the backends, every backend has
requests in flight and fresh scraped metrics, so no term is skipped.

    .venv/bin/python bench/scorer_bench.py [--backends 100] [--requests 20000]
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ntonix.config import BackendConfig, Config  # noqa: E402
from ntonix.gateway import Gateway  # noqa: E402
from ntonix.routing.backend import ScrapedLoad  # noqa: E402
from ntonix.routing.balancer import make_balancer  # noqa: E402


class _Reactor:
    """Just enough of a reactor for a Gateway that never runs."""

    def __init__(self) -> None:
        self.t = 1000.0

    def seconds(self) -> float:
        return self.t

    def callLater(self, *a, **kw):  # noqa: ANN
        class _Call:
            def cancel(self) -> None:
                pass

            def active(self) -> bool:
                return False
        return _Call()


def conversation(rng: random.Random, systems: list, turns: int) -> dict:
    messages = [{"role": "system", "content": rng.choice(systems)}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"question {t} " + "words " * rng.randint(20, 80)})
        messages.append({"role": "assistant", "content": "answer " * rng.randint(20, 80)})
    messages.append({"role": "user", "content": "and then?"})
    return {"model": "sim-llm", "messages": messages, "stream": True}


def run(n_backends: int, n_requests: int, algorithm: str) -> float:
    import attrs
    cfg = Config()
    cfg = attrs.evolve(cfg, backends=tuple(BackendConfig("10.0.%d.%d" % (i // 250, i % 250), 8000)
                                           for i in range(n_backends)),
                       balancer=attrs.evolve(cfg.balancer, algorithm=algorithm))
    reactor = _Reactor()
    gw = Gateway(cfg, reactor)
    gw.balancer = make_balancer(algorithm, config=cfg, now=reactor.seconds,
                                rng=random.Random(1))
    rng = random.Random(7)
    systems = ["You are a helpful assistant. " * 60 + str(i) for i in range(8)]
    docs = [conversation(rng, systems, rng.randint(0, 6)) for _ in range(500)]
    for b in gw.backends:
        b.in_flight = rng.randint(0, 12)
        b.set_load(ScrapedLoad(at=reactor.t, waiting=rng.randint(0, 5), running=rng.randint(0, 16)))
    # Warm the prefix index as a day of traffic would.
    for doc in docs:
        ctx = gw.route_context("chat", doc, True)
        b = gw.pick_backend(model="sim-llm", ctx=ctx)
        if ctx is not None:
            b.pending_prefill = 0
    t0 = time.perf_counter()
    for i in range(n_requests):
        doc = docs[i % len(docs)]
        ctx = gw.route_context("chat", doc, True)
        b = gw.pick_backend(model="sim-llm", ctx=ctx)
        if ctx is not None:
            b.pending_prefill -= ctx.uncached_tokens  # keep the fleet's state steady
    return (time.perf_counter() - t0) / n_requests * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", type=int, nargs="+", default=[4, 16, 100])
    p.add_argument("--requests", type=int, default=20000)
    args = p.parse_args()
    print("| backends | weighted_round_robin | least_outstanding | inference |")
    print("|---|---|---|---|")
    for n in args.backends:
        row = [f"{run(n, args.requests, a):.1f} us" for a in
               ("weighted_round_robin", "least_outstanding", "inference")]
        print(f"| {n} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
