"""server.workers > 1: the workers' figures merged into one gateway's, the
supervisor's admin views (one table, one answer for both ports), and a
worker's public port asking for them. No processes: fake supervisors and
channels over a Clock."""

import json

import attrs
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from ntonix.config import Config
from ntonix.gateway import Gateway
from ntonix.http.admin_view import Answer
from ntonix.http.routes import ADMIN_PATHS, Router
from ntonix.http.server import GatewayServer, Limits
from ntonix.workers.admin import (VIEW_SECONDS, GatewayViews, SupervisorRouter,
                                  SupervisorView)
from ntonix.workers.channel import Channel
from ntonix.workers.broker import SlotBroker
from ntonix.workers.merge import merged_admission, merged_cache_stats


def cache_doc(**over):
    doc = {"enabled": True, "hits": 3, "misses": 1, "hit_rate": 0.75, "evictions": 0,
           "expired": 1, "entries": 2, "size_bytes": 100, "max_size_bytes": 1000,
           "coalesced": 1, "bypasses": 0, "stores": 2, "too_large": 0, "ttl_seconds": 60,
           "converted": 0, "unconvertible": 0, "in_flight": 1}
    doc.update(over)
    return doc


def admission_doc(**over):
    doc = {"waiting": 2, "by_priority": {"critical": 0, "standard": 2, "sheddable": 0},
           "tenants": [{"tenant": "t1", "priority": "standard", "waiting": 2, "weight": 1,
                        "oldest_wait_seconds": 0.5}],
           "queue_size": 100, "queue_timeout_seconds": 30.0, "drain_rate_per_second": 4.0,
           "retry_after_seconds": 1,
           "admitted": {"critical": 1, "standard": 5, "sheddable": 0},
           "refused": [{"priority": "sheddable", "tenant": "t2", "reason": "queue_full",
                        "count": 2}],
           "backends": [{"name": "a:1", "in_flight": 3, "max_concurrency": 4}]}
    doc.update(over)
    return doc


# -- merging

def test_cache_stats_are_summed_at_the_top_with_each_worker_below():
    w0, w1 = cache_doc(), cache_doc(hits=1, misses=3, entries=5, size_bytes=50, enabled=True)
    merged = merged_cache_stats([w0, w1])
    assert merged["hits"] == 4 and merged["misses"] == 4 and merged["hit_rate"] == 0.5
    assert merged["entries"] == 7 and merged["size_bytes"] == 150
    assert merged["max_size_bytes"] == 2000  # one store per worker
    assert merged["in_flight"] == 2 and merged["ttl_seconds"] == 60 and merged["enabled"]
    assert merged["workers"] == [w0, w1]
    assert "shared" not in merged


def test_cache_stats_of_the_shared_tier_are_summed_and_degraded_if_any_worker_is():
    ok = {"state": "ok", "errors": 0, "hits": 2, "led": 1, "followed": 0, "takeovers": 0}
    bad = {"state": "degraded", "errors": 3, "hits": 1, "led": 0, "followed": 1,
           "takeovers": 1}
    merged = merged_cache_stats([cache_doc(shared=ok), cache_doc(shared=bad)])
    assert merged["shared"] == {"state": "degraded", "errors": 3, "hits": 3, "led": 1,
                                "followed": 1, "takeovers": 1}


def test_cache_stats_of_no_worker():
    merged = merged_cache_stats([])
    assert merged["hits"] == 0 and merged["hit_rate"] == 0.0 and merged["workers"] == []


def test_admission_counts_are_summed_and_settings_kept():
    w0 = admission_doc()
    w1 = admission_doc(
        waiting=1, by_priority={"critical": 1, "standard": 0, "sheddable": 0},
        tenants=[{"tenant": "t1", "priority": "standard", "waiting": 1, "weight": 1,
                  "oldest_wait_seconds": 2.0},
                 {"tenant": "t3", "priority": "critical", "waiting": 1, "weight": 2,
                  "oldest_wait_seconds": 0.1}],
        drain_rate_per_second=None, retry_after_seconds=7,
        refused=[{"priority": "sheddable", "tenant": "t2", "reason": "queue_full", "count": 1},
                 {"priority": "standard", "tenant": "t1", "reason": "timeout", "count": 1}],
        backends=[{"name": "a:1", "in_flight": 1, "max_concurrency": 4}])
    merged = merged_admission([w0, w1])
    assert merged["waiting"] == 3
    assert merged["by_priority"] == {"critical": 1, "standard": 2, "sheddable": 0}
    assert merged["admitted"] == {"critical": 2, "standard": 10, "sheddable": 0}
    assert merged["refused"] == [
        {"priority": "sheddable", "tenant": "t2", "reason": "queue_full", "count": 3},
        {"priority": "standard", "tenant": "t1", "reason": "timeout", "count": 1}]
    tenants = {(t["tenant"], t["priority"]): t for t in merged["tenants"]}
    assert tenants[("t1", "standard")]["waiting"] == 3
    assert tenants[("t1", "standard")]["oldest_wait_seconds"] == 2.0
    assert tenants[("t3", "critical")]["waiting"] == 1
    assert merged["backends"] == [{"name": "a:1", "in_flight": 4, "max_concurrency": 4}]
    assert merged["drain_rate_per_second"] == 4.0 and merged["retry_after_seconds"] == 7
    assert merged["queue_size"] == 100 and merged["queue_timeout_seconds"] == 30.0
    assert merged["workers"] == [w0, w1]
    # The workers' own documents are left as they were.
    assert w0["tenants"][0]["waiting"] == 2 and w0["backends"][0]["in_flight"] == 3


def test_admission_of_no_worker():
    merged = merged_admission([])
    assert merged["waiting"] == 0 and merged["refused"] == [] and merged["workers"] == []
    assert merged["drain_rate_per_second"] is None and merged["retry_after_seconds"] is None


# -- the supervisor's views

PAGE = ('# HELP ntonix_requests_total Requests answered\n# TYPE ntonix_requests_total counter\n'
        'ntonix_requests_total{{route="chat",status="200",cache="none"}} {n}\n')


@attrs.define
class FakeProc:
    index: int
    alive: bool = True
    channel: object = None


@attrs.define
class FakeSupervisor:
    """What GatewayViews uses of a Supervisor: the workers' replies by op."""

    replies: dict
    reactor: Clock = attrs.Factory(Clock)
    workers: dict = attrs.Factory(lambda: {0: FakeProc(0), 1: FakeProc(1)})
    handlers: dict = attrs.Factory(dict)
    last_metrics: dict = attrs.Factory(dict)
    retired_metrics: list = attrs.Factory(list)
    asked: list = attrs.Factory(list)
    config: Config = attrs.Factory(Config)
    broker: SlotBroker = attrs.Factory(
        lambda self: SlotBroker(Config, self.reactor, lambda worker, msg: None), takes_self=True)

    def ask_all(self, op, timeout=5.0):
        self.asked.append(op)
        reply = self.replies[op]
        return reply if isinstance(reply, defer.Deferred) else defer.succeed(list(reply))

    def live_workers(self):
        return [p for _, p in sorted(self.workers.items()) if p.alive]

    def as_json(self):
        return [{"index": i, "alive": p.alive} for i, p in sorted(self.workers.items())]


def status(cache=None, admission=None, requests=1):
    return {"metrics": {"requests_total": requests, "cache_hits": 0, "cache_misses": 0},
            "backends_available": 1, "draining": False,
            "cache": cache or cache_doc(), "admission": admission or admission_doc()}


def answer_of(d):
    out = []
    d.addCallback(out.append)
    assert out, "the view did not answer at once"
    return out[0]


def test_views_table_answers_each_route_from_the_workers():
    sup = FakeSupervisor({"status": [status(requests=2), status(requests=3)],
                          "metrics": [{"text": PAGE.format(n=2)}, {"text": PAGE.format(n=3)}]})
    views = GatewayViews(sup)
    a = answer_of(views.answer(b"/cache/stats", b""))
    assert a.status == 200 and a.content_type == b"application/json"
    assert json.loads(a.body)["hits"] == 6 and len(json.loads(a.body)["workers"]) == 2
    assert json.loads(answer_of(views.answer(b"/admission", b"")).body)["waiting"] == 4
    assert json.loads(answer_of(views.answer(b"/metrics", b"")).body)["requests_total"] == 5
    page = answer_of(views.answer(b"/metrics/prometheus", b""))
    assert page.content_type.startswith(b"text/plain")
    assert b'ntonix_requests_total{cache="none",route="chat",status="200"} 5.0' in page.body
    assert b"ntonix_workers 2.0" in page.body
    # /metrics with a scraper's Accept is the same page.
    assert answer_of(views.answer(b"/metrics", b"text/plain;version=0.0.4")).body == page.body
    assert answer_of(views.answer(b"/health", b"")).status == 200
    assert json.loads(answer_of(views.answer(b"/workers", b"")).body)["workers"][1]["index"] == 1
    missing = answer_of(views.answer(b"/nope", b""))
    assert missing.status == 404 and json.loads(missing.body)["error"]["code"] == "not_found"


def test_a_slow_worker_counts_with_its_last_page():
    sup = FakeSupervisor({"metrics": [{"text": PAGE.format(n=2)}, {"text": PAGE.format(n=3)}]})
    views = GatewayViews(sup)
    answer_of(views.answer(b"/metrics/prometheus", b""))
    sup.replies["metrics"] = [{"text": PAGE.format(n=4)}, None]
    page = answer_of(views.answer(b"/metrics/prometheus", b""))
    assert b"} 7.0" in page.body


def test_a_view_that_fails_is_a_500_answer_not_a_failure():
    sup = FakeSupervisor({"status": [{"no": "metrics"}]})
    a = answer_of(GatewayViews(sup).answer(b"/metrics", b""))
    assert a.status == 500 and json.loads(a.body)["error"]["code"] == "internal_error"


def test_backends_is_worker_0s_and_503_without_it():
    sup = FakeSupervisor({})
    sup.workers[0].alive = False
    a = answer_of(GatewayViews(sup).answer(b"/backends", b""))
    assert a.status == 503


def test_workers_ask_over_the_channel_op_and_get_the_same_bytes():
    sup = FakeSupervisor({"status": [status(), status()]})
    views = GatewayViews(sup)
    views.serve_workers()
    direct = answer_of(views.answer(b"/cache/stats", b""))
    msg = answer_of(defer.maybeDeferred(
        sup.handlers["admin_view"], sup.workers[1], {"op": "admin_view",
                                                     "path": "/cache/stats", "accept": ""}))
    json.dumps(msg)  # a channel message is JSON
    assert Answer.from_message(msg) == direct


def test_supervisor_router_serves_the_views_over_http():
    sup = FakeSupervisor({"status": [status(), status()]})
    server = GatewayServer(SupervisorRouter(GatewayViews(sup)), LIMITS, Clock())
    out = exchange(server, b"GET /admission HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ")
    assert json.loads(out.partition(b"\r\n\r\n")[2])["waiting"] == 4
    out = exchange(server, b"POST /admission HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 405 ")


# -- a worker's side

LIMITS = Limits(max_body_bytes=100, max_headers=20, max_header_bytes=4096,
                header_timeout=10.0, body_timeout=30.0, idle_timeout=75.0)


def exchange(server, raw):
    channel = server.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    return transport.value()


def worker_gateway(token="s3cret"):
    cfg = Config()
    cfg = attrs.evolve(cfg, admin=attrs.evolve(cfg.admin, token=token))
    clock = Clock()
    return Gateway(cfg, clock), clock


AUTH = b"Authorization: Bearer s3cret\r\n"


class FakeView:
    def __init__(self):
        self.asked = []

    def __call__(self, path, accept):
        d = defer.Deferred()
        self.asked.append((path, accept, d))
        return d


def test_a_workers_public_admin_routes_answer_with_the_view():
    gw, clock = worker_gateway()
    view = FakeView()
    server = GatewayServer(Router(gw, admin_view=view), LIMITS, clock)
    channel = server.buildProtocol(None)
    t = StringTransport()
    channel.makeConnection(t)
    channel.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: text/plain\r\n"
                         + AUTH + b"\r\n")
    assert [(p, a) for p, a, _ in view.asked] == [(b"/metrics", b"text/plain")]
    assert t.value() == b""  # waiting for the supervisor
    view.asked[0][2].callback(Answer(200, b"text/plain; version=0.0.4", b"ntonix_workers 2.0\n"))
    head, _, body = t.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Type: text/plain; version=0.0.4" \
        in head and body == b"ntonix_workers 2.0\n"
    # Every admin route goes there; without the token none does.
    for path in sorted(ADMIN_PATHS):
        exchange(server, b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (path, AUTH))
    assert {p for p, _, _ in view.asked} == set(ADMIN_PATHS)
    out = exchange(server, b"GET /cache/stats HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 401 ") and len(view.asked) == 1 + len(ADMIN_PATHS)
    # Health stays the worker's own (a load balancer's probe of this process).
    out = exchange(server, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and len(view.asked) == 1 + len(ADMIN_PATHS)


def test_a_supervisor_that_does_not_answer_is_a_503_within_the_bound():
    gw, clock = worker_gateway()
    ctx = attrs.make_class("Ctx", ["channel"])(Channel())
    ctx.channel.makeConnection(StringTransport())
    server = GatewayServer(Router(gw, admin_view=SupervisorView(ctx, clock)), LIMITS, clock)
    channel = server.buildProtocol(None)
    t = StringTransport()
    channel.makeConnection(t)
    channel.dataReceived(b"GET /admission HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
    sent = ctx.channel.transport.value()
    assert b'"op":"admin_view"' in sent and b'"path":"/admission"' in sent
    clock.advance(VIEW_SECONDS - 0.1)
    assert t.value() == b""
    clock.advance(0.2)
    head, _, body = t.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head
    assert json.loads(body)["error"]["code"] == "admin_view_unavailable"
    assert ctx.channel.pending == {}  # the call was given up


def test_the_supervisors_reply_over_the_channel_is_the_answer():
    gw, clock = worker_gateway()
    ctx = attrs.make_class("Ctx", ["channel"])(Channel())
    ctx.channel.makeConnection(StringTransport())
    server = GatewayServer(Router(gw, admin_view=SupervisorView(ctx, clock)), LIMITS, clock)
    channel = server.buildProtocol(None)
    t = StringTransport()
    channel.makeConnection(t)
    channel.dataReceived(b"GET /cache/stats HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
    (n,) = ctx.channel.pending
    reply = {"re": n, **Answer(200, b"application/json", b'{"hits":9}\n').to_message()}
    ctx.channel.stringReceived(json.dumps(reply).encode())
    assert t.value().endswith(b'\r\n\r\n{"hits":9}\n')


def test_no_channel_yet_is_a_503_too():
    gw, clock = worker_gateway()
    ctx = attrs.make_class("Ctx", ["channel"])(None)
    server = GatewayServer(Router(gw, admin_view=SupervisorView(ctx, clock)), LIMITS, clock)
    out = exchange(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
    assert out.startswith(b"HTTP/1.1 503 ")


def test_a_single_gateway_answers_from_its_own_state():
    gw, clock = worker_gateway()
    router = Router(gw)
    assert router.routes[(b"GET", b"/cache/stats")][0] == router.cache_stats
    out = exchange(GatewayServer(router, LIMITS, clock),
                   b"GET /cache/stats HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and b'"workers"' not in out
