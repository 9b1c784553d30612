"""Smooth weighted round-robin: exact sequences, interleaving, skipping."""

from ntonix.routing.backend import Backend
from ntonix.routing.balancer import SmoothWeightedRoundRobin


def backends(*weights):
    return [Backend(host=chr(ord("a") + i), port=1, weight=w) for i, w in enumerate(weights)]


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
