"""Overload protection through the real plugin: backends with a concurrency
limit, a bounded admission queue, 429 with Retry-After, priority classes and
fair share between tenants. The backends are simulated vLLM servers whose
every generation request is logged (arrival, tenant, end) and counted, so
that "never more than the limit upstream" is checked at the backend."""

import json
import re
from typing import Any, Dict, List, Optional

import pytest_twisted
import treq
from twisted.internet import defer

from harness import (JSON, Sim, http_client, raw_connect, raw_post, sleep, start_gateway,
                     stop_gateway, within)


def env_for(sim: Sim, limit: int, **balancer: Any) -> Dict[str, str]:
    env = {"NTONIX_BACKENDS": json.dumps([{"host": "127.0.0.1", "port": sim.number,
                                           "max_concurrency": limit}]),
           "NTONIX_CACHE_ENABLED": "false"}
    for key, value in balancer.items():
        env[f"NTONIX_BALANCER_{key.upper()}"] = str(value)
    return env


def body(text: str, tokens: int) -> bytes:
    return json.dumps({"model": "sim-llm", "max_tokens": tokens,
                       "messages": [{"role": "user", "content": text}]}).encode()


async def post(client, gw, text: str, tokens: int, tenant: Optional[str] = None):
    headers = dict(JSON)
    if tenant is not None:
        headers[b"X-Tenant"] = [tenant.encode()]
    r = await within(client.post(gw.url + "/v1/chat/completions", data=body(text, tokens),
                                 headers=headers), 30)
    content = await within(treq.content(r), 30)
    return r, content


def queue_ms(response) -> float:
    """The wait in the admission queue, from Server-Timing (0: none)."""
    timing = (response.headers.getRawHeaders(b"server-timing") or [b""])[0].decode()
    m = re.search(r"queue;dur=([0-9.]+)", timing)
    return float(m.group(1)) if m else 0.0


@pytest_twisted.ensureDeferred
async def test_saturated_fleet_queues_then_refuses_with_retry_after():
    sim = Sim("a", decode_ms_base=20.0, max_running=16)
    gw = await start_gateway(["--port", "0"], env=env_for(sim, 2, queue_size=3,
                                             queue_timeout_seconds=0.3))
    client = http_client()
    try:
        results = await defer.gatherResults([
            defer.ensureDeferred(post(client, gw, f"q{i}", 25)) for i in range(6)])
        codes = sorted(r.code for r, _ in results)
        assert codes == [200, 200, 429, 429, 429, 429], codes
        reasons = sorted(json.loads(c)["error"]["code"] for r, c in results if r.code == 429)
        assert reasons == ["queue_full", "queue_timeout", "queue_timeout", "queue_timeout"]
        for r, c in results:
            if r.code == 429:
                err = json.loads(c)["error"]
                assert err["type"] == "fleet_saturated" and "saturated" in err["message"]
                retry = r.headers.getRawHeaders(b"retry-after")[0]
                assert retry.isdigit() and 1 <= int(retry) <= 60, retry
        assert sim.fault.peak == 2, f"{sim.fault.peak} requests at once upstream; the limit is 2"
        assert len(sim.fault.log) == 2  # the refused ones never reached it
    finally:
        await stop_gateway(gw)
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_queued_request_goes_the_moment_a_slot_frees():
    sim = Sim("a", decode_ms_base=20.0)
    gw = await start_gateway(["--port", "0"], env=env_for(sim, 1, queue_timeout_seconds=5))
    client = http_client()
    try:
        first = defer.ensureDeferred(post(client, gw, "first", 20))
        await sleep(0.1)
        second, _ = await post(client, gw, "second", 2)
        r1, _ = await first
        assert (r1.code, second.code) == (200, 200)
        (a_in, _, a_out), (b_in, _, _) = sim.fault.log
        gap = b_in - a_out
        assert 0 <= gap < 0.05, f"the waiting request reached the backend {gap * 1000:.1f} ms " \
            "after the slot freed"
        assert queue_ms(second) > 200, second.headers.getRawHeaders(b"server-timing")
        assert sim.fault.peak == 1
    finally:
        await stop_gateway(gw)
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_the_queue_frees_its_place_at_once():
    sim = Sim("a", decode_ms_base=25.0)
    gw = await start_gateway(["--port", "0"], env=env_for(sim, 1, queue_size=1, queue_timeout_seconds=5))
    client = http_client()
    try:
        first = defer.ensureDeferred(post(client, gw, "first", 40))  # ~1 s
        await sleep(0.1)
        leaver = await raw_connect(gw.port)
        leaver.transport.write(raw_post(body("leaver", 2)))
        await sleep(0.1)
        r, c = await post(client, gw, "no room", 2)
        assert (r.code, json.loads(c)["error"]["code"]) == (429, "queue_full")
        leaver.transport.loseConnection()
        await within(leaver.closed, 5)
        await sleep(0.05)
        r_admin = await within(client.get(gw.admin_url + "/admission"), 5)
        state = await treq.json_content(r_admin)
        assert state["waiting"] == 0, state
        taker = defer.ensureDeferred(post(client, gw, "takes the place", 2))
        r1, _ = await first
        r2, _ = await taker
        assert (r1.code, r2.code) == (200, 200)
        prompts = len(sim.fault.log)
        assert prompts == 2, "the request whose client left was sent anyway"
    finally:
        await stop_gateway(gw)
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_critical_request_queued_after_sheddable_ones_is_served_first():
    sim = Sim("a", decode_ms_base=20.0)
    env = env_for(sim, 1, queue_size=10, queue_timeout_seconds=10)
    env["NTONIX_TENANTS_HEADER"] = "X-Tenant"
    env["NTONIX_TENANTS_TRUSTED_PROXIES"] = "127.0.0.1"  # the tests stand for the proxy
    env["NTONIX_TENANTS_CLASSES"] = json.dumps({"gold": {"priority": "critical"},
                                                "free": {"priority": "sheddable"}})
    gw = await start_gateway(["--port", "0"], env=env)
    client = http_client()
    try:
        calls = [defer.ensureDeferred(post(client, gw, "occupies", 20, "std"))]
        await sleep(0.1)
        for i in range(2):
            calls.append(defer.ensureDeferred(post(client, gw, f"shed {i}", 2, "free")))
            await sleep(0.05)
        calls.append(defer.ensureDeferred(post(client, gw, "urgent", 2, "gold")))
        results = await defer.gatherResults(calls)
        assert [r.code for r, _ in results] == [200] * 4
        order = [t.decode() for _, t, _ in sim.fault.log]
        assert order == ["std", "gold", "free", "free"], order
    finally:
        await stop_gateway(gw)
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_a_flooding_tenant_does_not_raise_another_tenants_wait():
    sim = Sim("a", decode_ms_base=10.0, max_running=16)
    env = env_for(sim, 2, queue_size=200, queue_timeout_seconds=20)
    env["NTONIX_TENANTS_HEADER"] = "X-Tenant"
    env["NTONIX_TENANTS_TRUSTED_PROXIES"] = "127.0.0.1"  # the tests stand for the proxy
    gw = await start_gateway(["--port", "0"], env=env)
    client = http_client()
    try:
        # "big" sends 40 requests at once; "small" 4, one every 150 ms:
        # ten times less. Each takes about 100 ms; two run at a time.
        big = [defer.ensureDeferred(post(client, gw, f"big {i}", 10, "big")) for i in range(40)]
        small: List[Any] = []
        for i in range(4):
            await sleep(0.15)
            small.append(defer.ensureDeferred(post(client, gw, f"small {i}", 10, "small")))
        big_r = await defer.gatherResults(big)
        small_r = await defer.gatherResults(small)
        assert all(r.code == 200 for r, _ in big_r + small_r)
        big_w = sorted(queue_ms(r) for r, _ in big_r)
        small_w = sorted(queue_ms(r) for r, _ in small_r)
        figures = (f"small tenant waits {[round(w) for w in small_w]} ms; big tenant waits "
                   f"p50 {big_w[len(big_w) // 2]:.0f} ms, max {big_w[-1]:.0f} ms")
        # Fair share: one of big's requests at most ahead per slot, so
        # about one service time (100 ms), never the flood's 2 s backlog.
        assert small_w[-1] < 300, figures
        assert big_w[len(big_w) // 2] > 3 * max(small_w[-1], 50), figures
        assert sim.fault.peak <= 2
    finally:
        await stop_gateway(gw)
        await sim.stop()
