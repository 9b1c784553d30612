"""Backend limits and the admission queue hold for the whole gateway when it
runs as several workers (the supervisor's slot broker), through the real
plugin. The backends are simulated vLLM servers that log every generation
request and count the most they ever had at once."""

import json
from typing import Any, List

import pytest_twisted
import treq
from twisted.internet import defer

from harness import Sim, http_client, sleep, start_gateway, stop_gateway, within
from test_admission import env_for, post, queue_ms


def worker_of(response) -> bytes:
    """The worker that answered: request ids start with a per-process prefix."""
    return response.headers.getRawHeaders(b"x-request-id")[0][:8]


async def two_workers(env):
    gw = await start_gateway(["--port", "0", "--set", "server.workers=2"], env=env)
    client = http_client()
    waited = 0.0
    while True:  # both workers up (bounded)
        r = await within(client.get(gw.admin_url + "/workers"), 5)
        if sum(1 for w in (await treq.json_content(r))["workers"] if w["alive"]) == 2:
            return gw
        assert waited < 20, "two workers did not start"
        await sleep(0.1)
        waited += 0.1


@pytest_twisted.ensureDeferred
async def test_a_backends_limit_holds_across_workers():
    sim = Sim("a", decode_ms_base=10.0, max_running=64)
    gw = await two_workers(env_for(sim, 4, queue_size=100, queue_timeout_seconds=30))
    client = http_client()  # a new connection per request
    try:
        results = await defer.gatherResults([
            defer.ensureDeferred(post(client, gw, f"q{i}", 8)) for i in range(40)])
        codes = [r.code for r, _ in results]
        assert codes == [200] * 40, codes
        assert sim.fault.peak <= 4, \
            f"{sim.fault.peak} requests at once upstream over two workers; the limit is 4"
        assert sim.fault.peak == 4  # and the limit was used, not undershot
        answered_by = {worker_of(r) for r, _ in results}
        r = await within(client.get(gw.admin_url + "/admission"), 5)
        state = await treq.json_content(r)
        assert state["waiting"] == 0, state
        slots = {b["name"]: b for b in state["backends"]}
        assert [b["in_flight"] for b in slots.values()] == [0], state  # every slot came back
        print(f"answered by {len(answered_by)} worker(s); backend peak {sim.fault.peak}")
    finally:
        await stop_gateway(gw)
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_priority_order_holds_across_workers():
    sim = Sim("a", decode_ms_base=20.0)
    env = env_for(sim, 1, queue_size=10, queue_timeout_seconds=10)
    env["NTONIX_TENANTS_HEADER"] = "X-Tenant"
    env["NTONIX_TENANTS_TRUSTED_PROXIES"] = "127.0.0.1"  # the tests stand for the proxy
    env["NTONIX_TENANTS_CLASSES"] = json.dumps({"gold": {"priority": "critical"},
                                                "free": {"priority": "sheddable"}})
    gw = await two_workers(env)
    client = http_client()
    try:
        calls = [defer.ensureDeferred(post(client, gw, "occupies", 20, "std"))]
        await sleep(0.1)
        for i in range(3):
            calls.append(defer.ensureDeferred(post(client, gw, f"shed {i}", 2, "free")))
            await sleep(0.05)
        calls.append(defer.ensureDeferred(post(client, gw, "urgent", 2, "gold")))
        results = await defer.gatherResults(calls)
        assert [r.code for r, _ in results] == [200] * 5
        order = [t.decode() for _, t, _ in sim.fault.log]
        assert order == ["std", "gold", "free", "free", "free"], order
        assert sim.fault.peak == 1
    finally:
        await stop_gateway(gw)
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_a_flood_on_the_workers_does_not_raise_a_small_tenants_wait():
    sim = Sim("a", decode_ms_base=10.0, max_running=16)
    env = env_for(sim, 2, queue_size=200, queue_timeout_seconds=20)
    env["NTONIX_TENANTS_HEADER"] = "X-Tenant"
    env["NTONIX_TENANTS_TRUSTED_PROXIES"] = "127.0.0.1"  # the tests stand for the proxy
    gw = await two_workers(env)
    client = http_client()
    try:
        # "big" sends 40 requests at once (about 2 s of work for two slots);
        # once they wait, "small" sends 4, each after the one before it
        # ended, so it never has more than one waiting.
        big = [defer.ensureDeferred(post(client, gw, f"big {i}", 10, "big")) for i in range(40)]
        await until_waiting(client, gw, 20)
        small = []
        for i in range(4):
            small.append(await post(client, gw, f"small {i}", 10, "small"))
        big_r = await defer.gatherResults(big)
        assert all(r.code == 200 for r, _ in big_r + small)
        big_w = sorted(queue_ms(r) for r, _ in big_r)
        small_w = sorted(queue_ms(r) for r, _ in small)
        workers = {worker_of(r) for r, _ in big_r + small}
        figures = (f"small tenant waits {[round(w) for w in small_w]} ms; big tenant waits "
                   f"p50 {big_w[len(big_w) // 2]:.0f} ms, max {big_w[-1]:.0f} ms; "
                   f"{len(workers)} worker(s)")
        # Fair order over the gateway's one queue: at most one of big's
        # requests ahead per slot, about one service time (100 ms), never
        # the flood's backlog.
        assert small_w[-1] < 300, figures
        assert big_w[len(big_w) // 2] > 3 * max(small_w[-1], 50), figures
        assert sim.fault.peak <= 2, figures
    finally:
        await stop_gateway(gw)
        await sim.stop()


async def until_waiting(client, gw, n, timeout=10.0):
    """Until the gateway's queue holds ``n`` requests (bounded)."""
    waited = 0.0
    while True:
        r = await within(client.get(gw.admin_url + "/admission"), 5)
        state = await treq.json_content(r)
        if state["waiting"] >= n:
            return state
        assert waited < timeout, state
        await sleep(0.02)
        waited += 0.02


@pytest_twisted.ensureDeferred
async def test_a_full_gateway_refuses_with_retry_after_across_workers():
    sim = Sim("a", decode_ms_base=20.0, max_running=16)
    gw = await two_workers(env_for(sim, 2, queue_size=3, queue_timeout_seconds=0.3))
    client = http_client()
    try:
        results = await defer.gatherResults([
            defer.ensureDeferred(post(client, gw, f"q{i}", 25)) for i in range(8)])
        codes = sorted(r.code for r, _ in results)
        assert codes == [200, 200] + [429] * 6, codes
        reasons = sorted(json.loads(c)["error"]["code"] for r, c in results if r.code == 429)
        # One queue for the gateway: 3 wait, the rest find it full.
        assert reasons == ["queue_full"] * 3 + ["queue_timeout"] * 3, reasons
        for r, _ in results:
            if r.code == 429:
                assert r.headers.getRawHeaders(b"retry-after")[0].isdigit()
        assert sim.fault.peak == 2 and len(sim.fault.log) == 2
    finally:
        await stop_gateway(gw)
        await sim.stop()
