"""Scheduler state shared across workers and gateways (ntonix/share/):
batching over a Clock, applying peers' prefix additions, loads and latency
samples, peer expiry, the supervisor's relay, the Redis bus, and refusing
garbage."""

import json
import random

import attrs
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from ntonix.cache.redis_client import RedisUnavailable
from ntonix.config import BackendConfig, Config, ConfigError, cluster_redis_url, load
from ntonix.gateway import Gateway
from ntonix.routing.backend import ScrapedLoad
from ntonix.routing.scorer import attempt_ended, prefill_ended
from ntonix.share import RedisBus, SchedulerShare, WorkerHub
from ntonix.share.wire import BadBatch, check_batch, decode_blocks, encode_blocks

LONG = "You are a careful assistant. " * 40


def chat(*contents):
    roles = ["system", "user", "assistant"]
    return {"model": "m", "messages": [{"role": roles[min(i, 1) if i < 2 else 2 - i % 2],
                                        "content": c} for i, c in enumerate(contents)]}


def gateway(clock, n=3, seed=0):
    cfg = Config()
    cfg = attrs.evolve(cfg, backends=tuple(BackendConfig("127.0.0.1", 9000 + i)
                                           for i in range(n)),
                       balancer=attrs.evolve(cfg.balancer, algorithm="inference"))
    gw = Gateway(cfg, clock)
    gw.balancer.rng = random.Random(seed)
    return gw


def share_of(gw, clock, sent):
    share = SchedulerShare(clock, lambda: gw.backends, lambda: getattr(gw.balancer, "index", None),
                           sent.append)
    gw.share = share
    return share


def wire(sent):
    """Through JSON, as the channel and Redis carry it."""
    return [json.loads(json.dumps(b)) for b in sent]


def route(gw, doc):
    ctx = gw.route_context("chat", doc, True)
    b = gw.pick_backend(model="m", ctx=ctx)
    b.in_flight += 1
    return b, ctx


def done(gw, b, ctx, ttft=0.01):
    prefill_ended(b, ctx, ttft)
    b.in_flight -= 1
    ctx.output_events = 12
    attempt_ended(b, ctx, 0.2)
    gw.released(b)


class Pair:
    """Two processes (workers, or gateways) joined by an in-memory relay."""

    def __init__(self, n=3):
        self.clock = Clock()
        self.clock.advance(100)
        self.gws, self.shares, self.outs = [], [], []
        for i in range(2):
            gw = gateway(self.clock, n, seed=i)
            out = []
            self.gws.append(gw)
            self.outs.append(out)
            self.shares.append(share_of(gw, self.clock, out))

    def deliver(self):
        for i, out in enumerate(self.outs):
            batches, out[:] = wire(out), []
            for batch in batches:
                assert self.shares[1 - i].apply(f"w{i}", batch)


# -- batching

def test_events_are_sent_as_one_batch_after_the_flush_delay():
    clock = Clock()
    gw = gateway(clock)
    sent = []
    share_of(gw, clock, sent)
    for i in range(5):
        done(gw, *route(gw, chat(f"{i} " + LONG, "q")))
    assert sent == []  # nothing on the request path
    clock.advance(0.004)
    assert sent == []
    clock.advance(0.001)
    assert len(sent) == 1
    batch = sent[0]
    assert len(batch["prefixes"]) == 5 and len(batch["ttft"]) == 5 and len(batch["tpot"]) == 5
    # Every request ended: nothing in flight, so no load (it was never sent).
    assert "loads" not in batch
    clock.advance(1)
    assert len(sent) == 1  # nothing new (and the heartbeat runs only once started)


def test_loads_are_snapshots_sent_when_they_change():
    clock = Clock()
    gw = gateway(clock)
    sent = []
    share = share_of(gw, clock, sent)
    b, ctx = route(gw, chat(LONG, "q"))
    clock.advance(0.005)
    assert sent[-1]["loads"] == {b.name: [1, ctx.uncached_tokens]}
    prefill_ended(b, ctx, 0.02)
    clock.advance(0.005)
    assert sent[-1]["loads"] == {b.name: [1, 0]}
    n = len(sent)
    share.loads_changed()  # nothing really changed: nothing sent
    clock.advance(0.005)
    assert len(sent) == n


def test_heartbeat_repeats_the_loads_and_peers_expire_when_silent():
    p = Pair()
    a, b = p.shares
    a.start()
    gw_a, gw_b = p.gws
    x, _ = route(gw_a, chat(LONG, "q"))
    p.clock.advance(0.005)
    p.deliver()
    peer_view = gw_b.find(x.name)
    assert peer_view.peer_in_flight == 1 and "w0" in b.peers
    for _ in range(5):  # a's heartbeats keep it alive, quiet as it is
        p.clock.advance(1.0)
        p.deliver()
        b.expire()
    assert peer_view.peer_in_flight == 1
    a.stop()
    p.clock.advance(3.5)
    b.expire()
    assert b.peers == {} and peer_view.peer_in_flight == 0


# -- applying

def test_a_conversation_stays_on_its_backend_across_processes():
    p = Pair(n=4)
    holder, ctx = route(p.gws[0], chat(LONG, "one"))
    done(p.gws[0], holder, ctx)
    p.clock.advance(0.005)
    p.deliver()
    for turn in range(6):
        gw = p.gws[(turn + 1) % 2]  # every other turn on the other process
        b, ctx = route(gw, chat(LONG, "one", "answer", f"turn {turn}"))
        assert b.name == holder.name and ctx.matched_blocks > 0, turn
        done(gw, b, ctx)
        p.clock.advance(0.005)
        p.deliver()


def test_without_sharing_the_other_process_does_not_know():
    p = Pair(n=4)
    holder, ctx = route(p.gws[0], chat(LONG, "one"))
    b, ctx = route(p.gws[1], chat(LONG, "one", "answer", "two"))
    assert ctx.matched_blocks == 0


def test_peer_loads_count_for_scoring_but_not_in_flight():
    p = Pair(n=2)
    gw_a, gw_b = p.gws
    busy = gw_a.backends[0]
    for _ in range(6):
        busy.in_flight += 1
    busy.pending_prefill = 20_000
    p.shares[0].loads_changed()
    p.clock.advance(0.005)
    p.deliver()
    seen = gw_b.find(busy.name)
    assert (seen.peer_in_flight, seen.peer_prefill, seen.in_flight) == (6, 20_000, 0)
    for i in range(5):  # new prompts on b avoid what a loads
        picked, ctx = route(gw_b, chat(f"fresh {i} " * 100, "q"))
        assert picked is not seen
        done(gw_b, picked, ctx)
    # A scrape counts the peers' requests once, not twice.
    seen.set_load(ScrapedLoad(at=p.clock.seconds(), running=6, waiting=0))
    assert seen.scraped_others == 0


def test_loads_of_several_peers_add_up_and_a_dropped_peer_leaves():
    clock = Clock()
    gw = gateway(clock)
    share = share_of(gw, clock, [])
    name = gw.backends[0].name
    share.apply("w1", {"loads": {name: [2, 100]}})
    share.apply("g/0", {"loads": {name: [3, 50]}})
    b = gw.backends[0]
    assert (b.peer_in_flight, b.peer_prefill) == (5, 150)
    share.apply("w1", {"loads": {}})  # w1's requests ended
    assert (b.peer_in_flight, b.peer_prefill) == (3, 50)
    share.drop("g/0")
    assert (b.peer_in_flight, b.peer_prefill) == (0, 0)
    assert sorted(share.peers) == ["w1"]


def test_a_backend_added_by_reload_gets_the_peers_totals():
    clock = Clock()
    gw = gateway(clock, n=1)
    share = share_of(gw, clock, [])
    share.apply("w1", {"loads": {"127.0.0.1:9000": [1, 0]}})
    gw.apply_config(attrs.evolve(gw.config, backends=(
        BackendConfig("127.0.0.1", 9000), BackendConfig("127.0.0.1", 9001))))
    share.apply("w1", {"loads": {"127.0.0.1:9000": [1, 0], "127.0.0.1:9001": [4, 0]}})
    assert [b.peer_in_flight for b in gw.backends] == [1, 4]


def test_latency_samples_teach_every_process():
    p = Pair(n=1)
    for i in range(4):
        done(p.gws[0], *route(p.gws[0], chat(f"{i} " + LONG, "q")), ttft=0.05)
    p.clock.advance(0.005)
    p.deliver()
    model = p.gws[1].backends[0].latency
    assert model.ttft.count == 4 and model.tpot.count == 4
    assert model.predict_ttft(100, 0) is not None


def test_unknown_backends_are_ignored():
    clock = Clock()
    gw = gateway(clock, n=1)
    share = share_of(gw, clock, [])
    assert share.apply("w1", {"prefixes": [["10.9.9.9:1", encode_blocks([1, 2])]],
                              "loads": {"10.9.9.9:1": [3, 3]},
                              "ttft": [["10.9.9.9:1", 10, 0, 0.1]]})
    assert gw.balancer.index.match([1, 2]) == {}
    assert gw.backends[0].peer_in_flight == 0


def test_blocks_round_trip():
    hashes = [0, 1, 2 ** 64 - 1, 123456789]
    assert decode_blocks(encode_blocks(hashes)) == hashes


GARBAGE = [
    None, [], "x", 3,
    {"prefixes": "no"},
    {"prefixes": [["a"]]},
    {"prefixes": [["a", "!!!not base64"]]},
    {"prefixes": [["a", "AAAA"]]},  # 3 bytes: not whole hashes
    {"prefixes": [["", encode_blocks([1])]]},
    {"prefixes": [[7, encode_blocks([1])]]},
    {"prefixes": [["a", "A" * 800_000]]},
    {"prefixes": [["a", encode_blocks([1])]] * 5000},
    {"loads": []},
    {"loads": {"a": [1]}},
    {"loads": {"a": [-1, 0]}},
    {"loads": {"a": [True, 0]}},
    {"loads": {"a": [1.5, 0]}},
    {"loads": {"a": [10 ** 12, 0]}},
    {"loads": {f"b{i}": [1, 1] for i in range(5000)}},
    {"ttft": [["a", 1, 0, float("nan")]]},
    {"ttft": [["a", 1, 0, float("inf")]]},
    {"ttft": [["a", 1, 0, -0.5]]},
    {"ttft": [["a", "1", 0, 0.5]]},
    {"ttft": [["a", 1, 0]]},
    {"tpot": [["a", 1, 1e9]]},
    {"tpot": [["a", 1, 0.01]] * 9000},
    {"ttft": {"a": 1}},
]


@pytest.mark.parametrize("doc", GARBAGE)
def test_garbage_is_refused_and_changes_nothing(doc):
    with pytest.raises(BadBatch):
        check_batch(doc)
    clock = Clock()
    gw = gateway(clock, n=1)
    share = share_of(gw, clock, [])
    assert not share.apply("w1", doc)
    assert share.peers == {} and share.rejected == 1
    assert gw.backends[0].peer_in_flight == 0 and gw.backends[0].latency.ttft.count == 0


def test_bad_peer_ids_and_too_many_peers_are_refused():
    clock = Clock()
    gw = gateway(clock, n=1)
    share = share_of(gw, clock, [])
    assert not share.apply(None, {})
    assert not share.apply("x" * 1000, {})
    for i in range(1024):
        assert share.apply(f"p{i}", {})
    assert not share.apply("one more", {})
    assert len(share.peers) == 1024


def test_nothing_is_shared_without_peers_or_the_scorer():
    cfg = load({}, {})
    gw = Gateway(cfg, Clock())
    assert gw.route_context("chat", chat("q"), True) is None and gw.share is None


# -- the supervisor's relay

@attrs.define(eq=False)
class FakeChannel:
    told: list = attrs.Factory(list)

    def tell(self, op, **args):
        self.told.append((op, args))

    def send_encoded(self, data):
        msg = json.loads(data)
        self.told.append((msg.pop("op"), msg))


@attrs.define(eq=False)
class FakeProc:
    index: int
    alive: bool = True
    channel: FakeChannel = attrs.Factory(FakeChannel)


class FakeSupervisor:
    def __init__(self, n):
        self.workers = {i: FakeProc(i) for i in range(n)}
        self.handlers = {}
        self.on_worker_ended = []

    def live_workers(self):
        return [p for p in self.workers.values() if p.alive]


class FakeBus:
    def __init__(self):
        self.published, self.ended_sources = [], []

    def publish(self, src, batch):
        self.published.append((src, batch))

    def ended(self, src):
        self.ended_sources.append(src)


def test_the_supervisor_relays_to_the_other_live_workers_and_to_redis():
    sup = FakeSupervisor(3)
    bus = FakeBus()
    WorkerHub(sup, bus)
    w0, w1, w2 = sup.workers.values()
    w2.alive = False
    sup.handlers["share"](w0, {"op": "share", "b": {"loads": {}}})
    assert w0.channel.told == [] and w2.channel.told == []
    assert w1.channel.told == [("share", {"src": "w0", "b": {"loads": {}}})]
    assert bus.published == [("w0", {"loads": {}})]
    w1.alive = False
    for listener in sup.on_worker_ended:
        listener(w1)
    assert w0.channel.told == [("share_gone", {"src": "w1"})]
    assert bus.ended_sources == ["w1"]


# -- between gateways: the Redis bus over a fake client

class FakeRedis:
    """One stream: XADD appends (answered by ``settle``), XREAD answers what
    is newer than its id at once, else waits for ``wake`` or ``timeout``."""

    def __init__(self):
        self.records = []
        self.reads = []
        self.down = False
        self.adds = []

    def execute(self, *args):
        if self.down:
            return defer.fail(RedisUnavailable("down"))
        assert args[0] == b"XADD"
        d = defer.Deferred()
        self.adds.append((args, d))
        return d

    def settle(self):
        """Redis answers the XADDs out now, in order."""
        adds, self.adds = self.adds, []
        for args, d in adds:
            rid = b"%d-0" % (len(self.records) + 1)
            self.records.append([rid, [args[-2], args[-1]]])
            d.callback(rid)
            self.wake()

    def _newer(self, after):
        n = int(after.split(b"-")[0])
        return [r for r in self.records if int(r[0].split(b"-")[0]) > n]

    def blocking(self, *args, timeout):
        if self.down:
            return defer.fail(RedisUnavailable("down"))
        after = args[-1]
        if after == b"$":
            after = self.records[-1][0] if self.records else b"0-0"
        new = self._newer(after)
        if new:
            return defer.succeed([[b"k", new]])
        d = defer.Deferred()
        self.reads.append((after, d))
        return d

    def wake(self):
        reads, self.reads = self.reads, []
        for after, d in reads:
            new = self._newer(after)
            if new:
                d.callback([[b"k", new]])
            else:
                self.reads.append((after, d))

    def timeout(self):
        """BLOCK ran out for every waiting read."""
        reads, self.reads = self.reads, []
        for _, d in reads:
            d.callback(None)

    def inject(self, data):
        self.records.append([b"%d-0" % (len(self.records) + 1), [b"d", data]])
        self.wake()


def bus_pair():
    redis, clock = FakeRedis(), Clock()
    got = {0: [], 1: []}
    gone = {0: [], 1: []}
    buses = [RedisBus(redis, "t:", clock, lambda p, b, i=i: got[i].append((p, b)),
                      gone[i].append, gateway_id=f"g{i}") for i in range(2)]
    for bus in buses:
        bus.start()
    return redis, clock, buses, got, gone


def test_bus_batches_while_an_xadd_is_out_and_ignores_its_own_records():
    redis, clock, (a, b), got, _ = bus_pair()
    a.publish("w0", {"loads": {}})
    a.publish("w1", {"loads": {"x:1": [1, 0]}})  # while the first XADD is out
    assert len(redis.adds) == 1
    redis.settle()  # the second goes out as the first is answered
    assert len(redis.adds) == 1
    redis.settle()
    clock.advance(0)
    assert got[0] == []  # its own
    assert got[1] == [("g0/w0", {"loads": {}}), ("g0/w1", {"loads": {"x:1": [1, 0]}})]
    a.ended("w1")
    redis.settle()
    clock.advance(0)
    assert got[1][-1][0] == "g0/w1"


@pytest.mark.parametrize("data", [
    b"not json", b"[]", b'{"b": []}', b'{"g": "gx", "b": [["w0", {"loads": "x"}]]}',
    b'{"g": "gx", "b": "no"}', b'{"g": "gx", "b": [[1, {}]]}', b'{"g": "gx", "x": [1]}',
    b'{"g": "' + b"g" * 100 + b'"}', b"[" * 100_000,
])
def test_bus_refuses_bad_records_and_keeps_reading(data):
    redis, clock, (a, b), got, _ = bus_pair()
    redis.inject(data)
    clock.advance(0)
    assert got[1] == [] and b.refused == 1
    a.publish("w0", {"loads": {}})
    redis.settle()
    clock.advance(0)
    assert got[1] == [("g0/w0", {"loads": {}})]


def test_bus_refuses_replies_of_the_wrong_shape():
    redis, clock, (a, b), got, _ = bus_pair()
    for reply in ([[b"k", [[b"1-0", [b"x", b"y"]]]]], [[b"k", [[b"no-id", [b"d", b"{}"]]]]],
                  [[b"k"]], [[b"k", [b"junk"]]]):
        _, d = redis.reads.pop()
        d.callback(reply)
        clock.advance(0)
    assert got[1] == [] and b.refused == 4


def test_redis_down_drops_other_gateways_then_rejoins():
    redis, clock, (a, b), got, gone = bus_pair()
    a.publish("w0", {"loads": {}})
    redis.settle()
    clock.advance(0)
    assert got[1] and b.up
    redis.down = True
    for _, d in redis.reads:
        d.errback(RedisUnavailable("connection lost"))
    redis.reads = []
    assert not b.up and gone[1] == ["g0/w0"]
    b.publish("w0", {"loads": {}})  # dropped at once, nothing waits
    clock.advance(1.0)  # the retry fails too: no second warning
    assert not b.up
    redis.down = False
    clock.advance(1.0)
    assert b.up is False  # the read is out, not answered yet
    redis.timeout()
    assert a.up and b.up
    clock.advance(0)
    a.publish("w0", {"loads": {"x:1": [1, 0]}})
    redis.settle()
    clock.advance(0)
    assert got[1][-1] == ("g0/w0", {"loads": {"x:1": [1, 0]}})


# -- the setting

def test_cluster_redis_url_defaults_to_the_cache_one():
    assert cluster_redis_url(load({}, {})) == ""
    env = {"NTONIX_CACHE_REDIS_URL": "redis://h:1/0"}
    assert cluster_redis_url(load({}, env)) == "redis://h:1/0"
    assert cluster_redis_url(load({}, {**env, "NTONIX_CLUSTER_REDIS_URL": "redis://k:2/1"})) \
        == "redis://k:2/1"
    assert cluster_redis_url(load({}, {**env, "NTONIX_CLUSTER_REDIS_URL": "off"})) == ""
    with pytest.raises(ConfigError) as e:
        load({}, {"NTONIX_CLUSTER_REDIS_URL": "http://x"})
    assert "cluster.redis_url" in str(e.value)


# -- wiring

class FakeWorker:
    def __init__(self):
        self.handlers = {}
        self.channel = FakeChannel()


def test_a_worker_shares_through_its_channel_and_takes_its_peers_ops():
    from twisted.application.service import MultiService

    from ntonix.share import share_gateway
    clock = Clock()
    gw = gateway(clock)
    worker, top = FakeWorker(), MultiService()
    share = share_gateway(top, gw, gw.config, clock, worker)
    assert gw.share is share and set(worker.handlers) == {"share", "share_gone"}
    top.startService()
    done(gw, *route(gw, chat(LONG, "q")))
    clock.advance(0.005)
    (op, args), = worker.channel.told
    assert op == "share" and set(args["b"]) >= {"prefixes", "ttft"}
    worker.handlers["share"]({"op": "share", "src": "w1",
                              "b": {"loads": {gw.backends[0].name: [2, 0]}}})
    assert gw.backends[0].peer_in_flight == 2
    worker.handlers["share_gone"]({"op": "share_gone", "src": "w1"})
    assert gw.backends[0].peer_in_flight == 0
    top.stopService()


def test_nothing_is_built_without_the_scorer_or_anyone_to_share_with():
    from twisted.application.service import MultiService

    from ntonix.share import share_gateway
    clock = Clock()
    gw = gateway(clock)
    top = MultiService()
    assert share_gateway(top, gw, gw.config, clock, None) is None  # one process, no Redis
    plain = Gateway(load({}, {}), clock)
    assert share_gateway(top, plain, plain.config, clock, FakeWorker()) is None
    assert list(top) == [] and gw.share is None


def test_requests_without_a_prompt_also_avoid_peers_load():
    clock = Clock()
    gw = gateway(clock, n=2)
    a, b = gw.backends
    a.peer_in_flight = 5
    assert {gw.pick_backend() for _ in range(10)} == {b}
    assert a.as_json()["peer_in_flight"] == 5


def test_a_redis_url_the_share_cannot_take_is_logged_without_its_password():
    from twisted.logger import globalLogPublisher

    from ntonix.share import make_bus
    cfg = load({}, {"NTONIX_CLUSTER_REDIS_URL": "redis://:hunter2@h:1/0"})
    cfg = attrs.evolve(cfg, cluster=attrs.evolve(cfg.cluster,
                                                 redis_url="redis://:hunter2@h:port/0"))
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        assert make_bus(cfg, Clock(), None, None) is None
    finally:
        globalLogPublisher.removeObserver(seen.append)
    text = " ".join(str(e.get("why", "")) for e in seen)
    assert "port" in text
    assert "hunter2" not in text


def test_a_burst_is_cut_to_what_a_peer_takes():
    from ntonix.share.wire import MAX_BLOCKS_PER_BATCH
    clock = Clock()
    gw = gateway(clock, n=1)
    sent = []
    share = share_of(gw, clock, sent)
    b = gw.backends[0]
    for i in range(MAX_BLOCKS_PER_BATCH // 60000 + 2):
        share.picked(b, list(range(i, i + 60000)))
    clock.advance(0.005)
    batch = wire(sent)[0]
    check_batch(batch)  # a peer takes it
    assert len(batch["prefixes"]) == MAX_BLOCKS_PER_BATCH // 60000


def test_worker_0s_page_reaches_the_others_with_its_count_of_others():
    """A page copied to another worker half a second later keeps the count
    of other clients' requests made when it was scraped: the requests of
    this gateway that ended since are not taken for someone else's."""
    from ntonix.workers.child import apply_fleet, fleet_of
    clock = Clock()
    clock.advance(100)
    w0, w1 = gateway(clock, n=1), gateway(clock, n=1)
    a, b = w0.backends[0], w1.backends[0]
    a.in_flight, a.peer_in_flight = 2, 3  # worker 0's and worker 1's requests
    a.set_load(ScrapedLoad(at=clock.seconds(), running=5, waiting=1))
    assert a.scraped_others == 1
    clock.advance(0.5)  # the next copy; meanwhile every request of the gateway ended
    a.in_flight = a.peer_in_flight = 0
    apply_fleet(w1, json.loads(json.dumps(fleet_of(w0))))
    assert b.scraped_others == 1 and b.scraped_at == pytest.approx(100.0)
