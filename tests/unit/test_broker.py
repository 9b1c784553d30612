"""The slot broker (the supervisor's side of fleet-wide limits) and a
worker's slot client, on a Clock, talking through plain lists."""

import attrs
from twisted.internet.task import Clock

from ntonix.config import BackendConfig, Config
from ntonix.gateway import Gateway
from ntonix.workers.broker import SlotBroker
from ntonix.workers.slots import SlotClient


def make_broker(queue_size=100, timeout=10.0):
    clock = Clock()
    cfg = Config()
    cfg = attrs.evolve(cfg, balancer=attrs.evolve(cfg.balancer, queue_size=queue_size,
                                                  queue_timeout_seconds=timeout))
    out = []
    broker = SlotBroker(lambda: cfg, clock, lambda worker, msg: out.append((worker, msg)))
    return broker, clock, out


def ask(broker, worker, n, prefs=("a",), caps=(4,), tenant="t", priority="standard"):
    broker.acquire(worker, {"id": n, "prefs": list(prefs), "caps": list(caps),
                            "tenant": tenant, "priority": priority, "weight": 1})


def grants(out, worker=None):
    return [(w, m["id"], m["backend"]) for w, m in out
            if m["op"] == "slot_grant" and (worker is None or w == worker)]


def test_a_limit_holds_over_every_worker_and_a_freed_slot_goes_to_the_next_waiter():
    broker, clock, out = make_broker()
    for i in range(10):
        ask(broker, i % 2, i)
    assert [n for _, n, _ in grants(out)] == [0, 1, 2, 3]
    assert broker.fleet.held == {"a": 4} and broker.admission.waiting == 6
    broker.release(1, {"backends": {"a": 1}})
    assert grants(out)[-1] == (0, 4, "a")  # the next in order, on the other worker
    assert broker.fleet.held == {"a": 4}


def test_a_worker_cannot_give_back_more_than_it_holds():
    broker, clock, out = make_broker()
    ask(broker, 0, 1)
    broker.release(1, {"backends": {"a": 5}})  # worker 1 holds none
    broker.release(0, {"backends": {"a": "x", "b": 3}})
    assert broker.fleet.held == {"a": 1}


def test_the_first_preference_with_room_is_granted():
    broker, clock, out = make_broker()
    ask(broker, 0, 1, prefs=("b", "a"), caps=(1, 1))
    ask(broker, 1, 2, prefs=("b", "a"), caps=(1, 1))
    assert grants(out) == [(0, 1, "b"), (1, 2, "a")]


def test_a_dead_workers_slots_come_back_and_its_waits_end():
    broker, clock, out = make_broker()
    for i in range(4):
        ask(broker, 0, i, caps=(2,))
    ask(broker, 1, 10, caps=(2,))
    assert broker.admission.waiting == 3
    broker.worker_ended(0)
    # Its two slots are free again: the other worker's waiter has one.
    assert grants(out, 1) == [(1, 10, "a")]
    assert broker.admission.waiting == 0 and broker.fleet.held == {"a": 1}


def test_a_cancelled_wait_leaves_the_queue():
    broker, clock, out = make_broker()
    ask(broker, 0, 1, caps=(1,))
    ask(broker, 0, 2, caps=(1,))
    ask(broker, 1, 3, caps=(1,))
    broker.cancel(0, {"ids": [2, "junk"]})
    broker.release(0, {"backends": {"a": 1}})
    assert grants(out)[-1] == (1, 3, "a")


def test_priority_and_fair_order_compare_across_workers():
    broker, clock, out = make_broker()
    ask(broker, 0, 1, caps=(1,))  # takes the slot
    ask(broker, 0, 2, caps=(1,), tenant="free", priority="sheddable")
    ask(broker, 0, 3, caps=(1,), tenant="big")
    ask(broker, 0, 4, caps=(1,), tenant="big")
    ask(broker, 1, 5, caps=(1,), tenant="small")
    ask(broker, 1, 6, caps=(1,), tenant="gold", priority="critical")
    order = []
    for _ in range(5):
        holder = grants(out)[-1][0]
        broker.release(holder, {"backends": {"a": 1}})
        order.append(grants(out)[-1][1])
    assert order == [6, 3, 5, 4, 2]


def test_a_wait_that_runs_out_is_refused_with_retry_after():
    broker, clock, out = make_broker(timeout=1.0)
    ask(broker, 0, 1, caps=(1,))
    ask(broker, 1, 2, caps=(1,))
    clock.advance(0.5)
    assert [m for _, m in out if m["op"] == "slot_refused"] == []
    for _ in range(12):
        clock.advance(0.05)
    refused = [(w, m) for w, m in out if m["op"] == "slot_refused"]
    assert len(refused) == 1
    worker, msg = refused[0]
    assert worker == 1 and msg["id"] == 2 and msg["reason"] == "queue_timeout"
    assert 1 <= msg["retry_after"] <= 60
    assert broker.admission.waiting == 0


def test_a_full_queue_refuses_at_once():
    broker, clock, out = make_broker(queue_size=1)
    ask(broker, 0, 1, caps=(1,))
    ask(broker, 0, 2, caps=(1,))
    ask(broker, 1, 3, caps=(1,))
    refused = [(w, m["id"], m["reason"]) for w, m in out if m["op"] == "slot_refused"]
    assert refused == [(1, 3, "queue_full")]


def test_a_message_that_does_not_parse_is_ignored():
    broker, clock, out = make_broker()
    broker.acquire(0, {"id": "x", "prefs": None})
    broker.acquire(0, {"op": "slot_acquire"})
    ask(broker, 0, 1, priority="root")  # an unknown class: standard
    assert grants(out) == [(0, 1, "a")]


def test_queue_over_the_limit_holds_requests_until_it_drains():
    broker, clock, out = make_broker()
    broker.set_queue_over(["a"])
    ask(broker, 0, 1)
    assert grants(out) == [] and broker.admission.waiting == 1
    broker.set_queue_over([])
    assert grants(out) == [(0, 1, "a")]


# -- a worker's client, against the broker


class Ex:
    """What the slot client asks of an exchange."""

    def __init__(self, tenant="t"):
        self.tenant, self.priority = tenant, "standard"
        self.tried, self.model, self.same_backend_ok = [], None, False
        self.waiter = self.deadline_at = self.info = None
        self.route = None
        self.done = False
        self.backend = None
        self.remote_slot = False
        self.request_id = "r"
        self.outcome = None

    def send(self, room):
        self.backend = room[0]
        room[0].in_flight += 1
        self.outcome = ("sent", room[0].name)

    def refused(self, why, reason, retry_after):
        self.outcome = ("refused", reason)

    def no_backend(self):
        self.outcome = "503"


def worker_gateway(clock):
    cfg = Config()
    cfg = attrs.evolve(cfg, backends=(BackendConfig("127.0.0.1", 9, max_concurrency=1),))
    return Gateway(cfg, clock)


def wired():
    """Two workers' clients and one broker, messages passed at once."""
    clock = Clock()
    clients = {}
    broker = SlotBroker(lambda: Config(), clock,
                        lambda w, msg: clients[w].handlers()[msg["op"]](msg))
    for i in (0, 1):
        gw = worker_gateway(clock)
        client = SlotClient(gw.fleet, gw.admission, lambda gw=gw: gw.balancer,
                            lambda op, i=i, **kw: getattr(broker, op[len("slot_"):])(
                                i, kw), clock)
        gw.admission.remote = client
        clients[i] = client
    return clock, broker, clients


def test_two_workers_clients_share_one_slot():
    clock, broker, clients = wired()
    a, b = Ex(), Ex()
    clients[0].admission.admit(a)
    clients[1].admission.admit(b)
    assert a.outcome == ("sent", "127.0.0.1:9") and a.remote_slot
    assert b.outcome is None and b.waiter is not None
    clients[0].release(a.backend)
    clock.advance(0)  # the release leaves with the turn's other messages
    assert b.outcome == ("sent", "127.0.0.1:9")


def test_a_grant_for_a_request_that_left_is_given_back():
    clock, broker, clients = wired()
    a, b = Ex(), Ex()
    clients[0].admission.admit(a)
    clients[1].admission.admit(b)
    b.done = True  # its client left just as the slot came
    clients[0].release(a.backend)
    clock.advance(0)
    clock.advance(0)
    assert b.outcome is None and broker.fleet.held == {"127.0.0.1:9": 0}


def test_a_worker_without_its_supervisor_fails_its_waits_at_once():
    clock, broker, clients = wired()
    a, b = Ex(), Ex()
    clients[0].admission.admit(a)
    clients[0].admission.admit(b)
    clients[0].supervisor_gone()
    assert b.outcome == "503" and b.waiter is None
    c = Ex()
    clients[0].admission.admit(c)
    assert c.outcome == "503"
