"""The admission queue's order and arithmetic, on a Clock."""

import attrs
from twisted.internet.task import Clock

from ntonix.config import Config
from ntonix.gateway import Gateway
from ntonix.identity import Identity, key_digest, parse_networks
from ntonix.routing.admission import ClassQueue, Waiter


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


def test_tenant_from_credential_is_a_keyed_hash_never_the_secret():
    ident = Identity(b"deployment secret")
    t = ident.tenant(None, b"Bearer sk-very-secret")
    assert t.startswith("key-") and "secret" not in t and len(t) == 16
    assert t == ident.tenant(None, b"Bearer sk-very-secret") == ident.tenant(None, b"sk-very-secret")
    assert t != ident.tenant(None, b"Bearer sk-other")
    assert t != Identity(b"another secret").tenant(None, b"Bearer sk-very-secret")
    assert ident.tenant(None, None) == "anonymous"
    assert ident.tenant(b"team-a", b"Bearer sk-x") == "team-a"
    assert len(ident.tenant(b"x" * 500, None)) == 64


def test_listed_keys_name_their_tenant_and_every_other_key_shares_one():
    ident = Identity(b"s", keys={key_digest("sk-ops")[len("sha256:"):]: "ops"})
    assert ident.tenant(None, b"Bearer sk-ops") == "ops"
    assert ident.tenant(None, b"Bearer sk-made-up-1") == "unlisted"
    assert ident.tenant(None, b"Bearer sk-made-up-2") == "unlisted"


def test_trusted_proxies_by_address_and_cidr():
    ident = Identity(b"s", trusted=parse_networks(["10.0.0.0/8", "::1"]))
    assert ident.trusts("10.1.2.3") and ident.trusts("::1") and ident.trusts("::ffff:10.0.0.1")
    assert not ident.trusts("11.0.0.1") and not ident.trusts("not an address")
    assert not Identity(b"s").trusts("10.1.2.3")


def test_retry_after_follows_the_drain_rate():
    clock = Clock()
    cfg = Config()
    cfg = attrs.evolve(cfg, balancer=attrs.evolve(cfg.balancer, queue_timeout_seconds=7.0))
    gw = Gateway(cfg, clock)
    gw.limited = True  # as with a backend's max_concurrency: requests may wait
    adm = gw.admission
    assert adm.retry_after() == 7  # nothing finished yet: the timeout
    for _ in range(20):  # 4 requests a second
        clock.advance(0.25)
        adm.released()
    assert 3.9 < adm.drain_rate() < 4.3
    assert adm.retry_after() == 1
    adm.waiting = 39  # 40 ahead at 4/s
    assert adm.retry_after() == 10
    adm.waiting = 0
    clock.advance(30)  # the window forgets
    assert adm.drain_rate() is None


class Ex:
    """Just what the admission queue asks of an exchange."""

    def __init__(self, tenant, priority="standard"):
        self.tenant, self.priority = tenant, priority
        self.tried, self.model, self.same_backend_ok = [], None, False
        self.waiter = self.deadline_at = self.info = None
        self.outcome = None

    def refused(self, why, reason, retry_after):
        self.outcome = reason

    def send(self, room):
        self.outcome = "sent"

    def no_backend(self):
        self.outcome = "503"


def full_gateway(queue_size):
    from ntonix.config import BackendConfig
    clock = Clock()
    cfg = Config()
    cfg = attrs.evolve(cfg, backends=(BackendConfig("127.0.0.1", 9, max_concurrency=1),),
                       balancer=attrs.evolve(cfg.balancer, queue_size=queue_size))
    gw = Gateway(cfg, clock)
    gw.backends[0].in_flight = 1  # full
    return gw


def test_full_queue_makes_room_for_a_tenant_under_its_share():
    gw = full_gateway(4)
    big = [Ex("big") for _ in range(4)]
    for e in big:
        gw.admission.admit(e)
    assert gw.admission.total == 4
    small = Ex("small")
    gw.admission.admit(small)
    assert small.outcome is None and small.waiter is not None  # queued
    assert big[-1].outcome == "queue_full" and [e.outcome for e in big[:3]] == [None] * 3
    # The flood's next request finds no one further over the share than itself.
    again = Ex("big")
    gw.admission.admit(again)
    assert again.outcome == "queue_full"


def test_full_queue_sheds_a_lower_class_for_a_higher_one():
    gw = full_gateway(2)
    low = [Ex("batch", "sheddable"), Ex("std")]
    for e in low:
        gw.admission.admit(e)
    urgent = Ex("ops", "critical")
    gw.admission.admit(urgent)
    assert low[0].outcome == "shed" and urgent.waiter is not None


def test_a_request_a_backend_can_take_now_is_never_refused_for_a_full_queue():
    from ntonix.config import BackendConfig
    cfg = Config()
    cfg = attrs.evolve(cfg, backends=(BackendConfig("127.0.0.1", 9, max_concurrency=1,
                                                    models=("x",)),
                                      BackendConfig("127.0.0.1", 10, max_concurrency=1,
                                                    models=("y",))),
                       balancer=attrs.evolve(cfg.balancer, queue_size=2))
    gw = Gateway(cfg, Clock())
    gw.backends[0].in_flight = 1  # x's backend is full; y's is idle
    waiting = [Ex("t") for _ in range(2)]
    for e in waiting:
        e.model = "x"
        gw.admission.admit(e)
    assert gw.admission.total == 2
    for tenant, priority in (("t", "standard"), ("other", "sheddable")):
        y = Ex(tenant, priority)
        y.model = "y"
        gw.admission.admit(y)
        assert y.outcome == "sent", (tenant, y.outcome)
    assert [e.outcome for e in waiting] == [None, None]  # nobody evicted for it


def test_waiters_get_a_503_when_every_backend_goes_away():
    gw = full_gateway(4)
    waiter = Ex("t")
    gw.admission.admit(waiter)
    assert waiter.waiter is not None
    gw.backends[0].draining = True  # the only backend leaves
    gw.reactor.advance(0.1)  # the queue looks again on its own
    assert waiter.outcome == "503" and gw.admission.total == 0
