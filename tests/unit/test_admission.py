"""The admission queue's order and arithmetic, on a Clock."""

import attrs
from twisted.internet.task import Clock

from ntonix.config import Config
from ntonix.gateway import Gateway
from ntonix.routing.admission import ClassQueue, Waiter, tenant_id


def drain(q, n=None, can=lambda w: True):
    out = []
    while q.count and (n is None or len(out) < n):
        w = q.pop(can)
        if w is None:
            break
        out.append(w.exchange)
    return out


def test_flooding_tenant_waits_behind_its_own_requests():
    q = ClassQueue()
    for i in range(20):
        q.push(Waiter(f"big{i}", "big", "standard", 0.0), 1)
    assert drain(q, 2) == ["big0", "big1"]
    for i in range(3):
        q.push(Waiter(f"small{i}", "small", "standard", 1.0), 1)
    order = drain(q)
    # Each of small's requests goes within two of big's.
    assert [order.index(f"small{i}") for i in range(3)] == [1, 3, 5], order


def test_weights_share_in_proportion():
    q = ClassQueue()
    for i in range(30):
        q.push(Waiter(("a", i), "a", "standard", 0.0), 3)
        q.push(Waiter(("b", i), "b", "standard", 0.0), 1)
    first = drain(q, 20)
    assert sum(1 for t, _ in first if t == "a") == 15


def test_idle_tenant_saves_no_credit():
    q = ClassQueue()
    q.push(Waiter("old", "quiet", "standard", 0.0), 1)
    drain(q)
    for i in range(10):
        q.push(Waiter(f"busy{i}", "busy", "standard", 1.0), 1)
    drain(q, 5)
    for i in range(5):
        q.push(Waiter(f"quiet{i}", "quiet", "standard", 2.0), 1)
    order = drain(q)
    # Quiet is back: it alternates with busy, it does not jump the line.
    assert sorted(order[:4]) == ["busy5", "busy6", "quiet0", "quiet1"], order


def test_blocked_model_lets_others_go_without_losing_its_place():
    q = ClassQueue()
    q.push(Waiter("x1", "x", "standard", 0.0), 1)
    q.push(Waiter("y1", "y", "standard", 0.0), 1)
    assert drain(q, 1, can=lambda w: w.tenant != "x") == ["y1"]
    assert drain(q) == ["x1"]


def test_removed_waiter_is_gone():
    q = ClassQueue()
    w = Waiter("a", "t", "standard", 0.0)
    q.push(w, 1)
    q.remove(w)
    assert q.count == 0 and q.pop(lambda w: True) is None
    q.remove(w)  # twice: harmless


def test_tenant_from_credential_is_a_hash_never_the_secret():
    t = tenant_id(b"Bearer sk-very-secret", by_header=False)
    assert t.startswith("key-") and "secret" not in t and len(t) == 16
    assert t == tenant_id(b"Bearer sk-very-secret", by_header=False)
    assert t != tenant_id(b"Bearer sk-other", by_header=False)
    assert tenant_id(None, by_header=False) == "anonymous"
    assert tenant_id(b"team-a", by_header=True) == "team-a"
    assert len(tenant_id(b"x" * 500, by_header=True)) == 64


def test_retry_after_follows_the_drain_rate():
    clock = Clock()
    cfg = Config()
    cfg = attrs.evolve(cfg, balancer=attrs.evolve(cfg.balancer, queue_timeout_seconds=7.0))
    gw = Gateway(cfg, clock)
    adm = gw.admission
    assert adm.retry_after() == 7  # nothing finished yet: the timeout
    for _ in range(20):  # 4 requests a second
        clock.advance(0.25)
        adm.released()
    assert 3.9 < adm.drain_rate() < 4.3
    assert adm.retry_after() == 1
    adm.queues["standard"].count = 39  # 40 ahead at 4/s
    assert adm.retry_after() == 10
    adm.queues["standard"].count = 0
    clock.advance(30)  # the window forgets
    assert adm.drain_rate() is None
