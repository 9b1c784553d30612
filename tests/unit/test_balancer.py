"""Smooth weighted round-robin: exact sequences, interleaving, skipping."""

import random
from collections import Counter

from twisted.internet.task import Clock

from ntonix.routing.backend import Backend
from ntonix.routing.balancer import LeastOutstanding, SmoothWeightedRoundRobin
from ntonix.routing.breaker import CircuitBreaker


def backends(*weights, clock=None):
    clock = clock or Clock()
    return [Backend(host=chr(ord("a") + i), port=1, weight=w,
                    breaker=CircuitBreaker(3, 10.0, now=clock.seconds))
            for i, w in enumerate(weights)]


def picks(weights, n, allowed=None):
    bs = backends(*weights)
    lb = SmoothWeightedRoundRobin()
    return "".join(lb.pick(bs, allowed).host for _ in range(n))


def test_nginx_sequence_5_1_1():
    # The sequence nginx documents for weights 5, 1, 1.
    assert picks((5, 1, 1), 7) == "aabacaa"
    assert picks((5, 1, 1), 14) == "aabacaa" * 2


def test_sequence_1_2():
    assert picks((1, 2), 6) == "babbab"


def test_every_window_gets_exact_weight():
    seq = picks((3, 2, 1), 60)
    for start in range(0, 60, 6):
        window = seq[start:start + 6]
        assert (window.count("a"), window.count("b"), window.count("c")) == (3, 2, 1)


def test_skips_unavailable_and_none_when_empty():
    bs = backends(5, 1, 1)
    lb = SmoothWeightedRoundRobin()
    got = "".join(lb.pick(bs, lambda b: b.host != "a").host for _ in range(4))
    assert got == "bcbc"
    assert lb.pick(bs, lambda b: False) is None


def test_skips_open_circuits_and_comes_back_after_recovery():
    clock = Clock()
    bs = backends(5, 1, 1, clock=clock)
    lb = SmoothWeightedRoundRobin()
    for _ in range(3):
        bs[0].breaker.failed("down")
    usable = lambda b: b.available  # noqa: E731
    assert "".join(lb.pick(bs, usable).host for _ in range(4)) == "bcbc"
    clock.advance(10)
    assert bs[0].available  # half-open: its one trial is free


def test_least_outstanding_prefers_idle_and_respects_weights():
    bs = backends(1, 1)
    lb = LeastOutstanding(random.Random(7))
    bs[0].in_flight = 5
    assert all(lb.pick(bs).host == "b" for _ in range(50))
    bs[0].in_flight = 0
    heavy = backends(3, 1)
    counts = Counter()
    for _ in range(4000):
        b = lb.pick(heavy)
        counts[b.host] += 1
        b.in_flight += 1  # requests that stay in flight: load follows weight
    assert 2.5 < counts["a"] / counts["b"] < 3.5
