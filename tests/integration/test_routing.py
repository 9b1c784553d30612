"""Routing that survives failure, with the real plugin and real mock backends."""

import json

import pytest_twisted
from twisted.internet import reactor

from harness import JSON, Mock, chat_body, http_client, sleep, until, within


async def chat(gw, stream=False, **kw):
    r = await http_client().post(gw.url + "/v1/chat/completions",
                                 data=chat_body(stream=stream, **kw), headers=JSON)
    body = await within(r.content(), 20)
    return r, body


async def backends(gw):
    doc = await (await http_client().get(gw.admin_url + "/backends")).json()
    return {b["name"]: b for b in doc["backends"]}


@pytest_twisted.ensureDeferred
async def test_weights_1_and_2_split_300_requests_exactly(mocks, gateway_factory):
    a, b = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address + ":1",
                               "--backend", b.address + ":2")
    for i in range(300):
        r, _ = await chat(gw, max_tokens=1)
        assert r.code == 200
    assert (a.count(), b.count()) == (100, 200)


@pytest_twisted.ensureDeferred
async def test_least_outstanding_spreads_by_load(mocks, gateway_factory):
    a, b = mocks
    a.knobs.ttft_ms = 300  # a is slow: its requests stay in flight
    gw = await gateway_factory("--port", "0", "--backend", a.address, "--backend", b.address,
                               "--balancer", "least_outstanding")
    from twisted.internet import defer
    pending = []
    for _ in range(40):  # arriving 10 ms apart: a's stay in flight, b's are done
        pending.append(defer.Deferred.fromCoroutine(chat(gw, max_tokens=1)))
        await sleep(0.01)
    results = await defer.gatherResults(pending)
    assert all(r.code == 200 for r, _ in results)
    assert b.count() > 2 * a.count() and a.count() >= 1


@pytest_twisted.ensureDeferred
async def test_dead_backend_cut_off_after_threshold_and_back_after_recovery(
        mocks, gateway_factory):
    a, b = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address, "--backend", b.address,
                               "--set", "health.interval_seconds=600",  # passive detection only
                               "--set", "health.failure_threshold=3",
                               "--set", "health.recovery_seconds=1")
    for _ in range(10):
        r, _ = await chat(gw, max_tokens=1)
        assert r.code == 200
    assert (a.count(), b.count()) == (5, 5)
    await b.kill()
    for i in range(30):
        r, _ = await chat(gw, max_tokens=1)
        assert r.code == 200, f"request {i} failed: no client request may fail"
    state = (await backends(gw))[b.address]
    assert state["circuit"] == "open" and state["state"] == "unhealthy"
    assert state["errors"] == 3, state  # at most failure_threshold failed attempts
    assert "3 consecutive failures" in state["reason"]
    assert state["retry_at"] - state["opened_at"] == 1
    assert a.count() == 5 + 30

    b.restart()
    await sleep(1.1)  # the recovery time is the behaviour under test
    got = 0
    for _ in range(10):
        r, _ = await chat(gw, max_tokens=1)
        assert r.code == 200
        got = b.count()
        if got >= 3:
            break
    assert got >= 3
    assert (await backends(gw))[b.address]["circuit"] == "closed"


@pytest_twisted.ensureDeferred
async def test_health_checks_open_and_close_the_circuit(mocks, gateway_factory):
    a, b = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address, "--backend", b.address,
                               "--set", "health.interval_seconds=0.1",
                               "--set", "health.timeout_seconds=0.5",
                               "--set", "health.recovery_seconds=0.3")
    await b.kill()

    async def circuit():
        return (await backends(gw))[b.address]["circuit"]

    deadline = reactor.seconds() + 5
    while await circuit() != "open":
        assert reactor.seconds() < deadline
        await sleep(0.05)
    assert "health check failed" in (await backends(gw))[b.address]["reason"]
    await until(lambda: b"circuit closed -> open" in gw.output, timeout=5)
    b.restart()
    deadline = reactor.seconds() + 5
    while await circuit() != "closed":
        assert reactor.seconds() < deadline
        await sleep(0.05)
    assert b.count("/health") >= 1


@pytest_twisted.ensureDeferred
async def test_5xx_before_body_retried_on_another_backend(mocks, gateway_factory):
    a, b = mocks
    a.knobs.fail_rate = 1.0
    gw = await gateway_factory("--port", "0", "--backend", a.address, "--backend", b.address,
                               "--set", "health.interval_seconds=600")
    for _ in range(6):
        r, body = await chat(gw)
        assert r.code == 200 and r.headers.getRawHeaders(b"x-backend") == [b.address.encode()]
    assert a.stats.faults_500 == 3  # then its circuit opened
    gw1 = await gateway_factory("--port", "0", "--backend", a.address,
                                "--set", "health.interval_seconds=600")
    r, body = await chat(gw1)
    assert r.code == 500 and json.loads(body)["error"]["code"] == "injected_failure"


@pytest_twisted.ensureDeferred
async def test_stall_before_first_token_served_by_other_backend(mocks, gateway_factory):
    a, b = mocks
    a.knobs.ttft_ms = 10_000  # sends its role prelude, then nothing for 10 s
    gw = await gateway_factory("--port", "0", "--backend", a.address, "--backend", b.address,
                               "--set", "proxy.first_token_timeout_seconds=0.5",
                               "--set", "health.interval_seconds=600")
    start = reactor.seconds()
    r, body = await chat(gw, stream=True, max_tokens=5)
    elapsed = reactor.seconds() - start
    assert r.code == 200 and b"event: error" not in body
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b'"role":"assistant"') == 1
    assert r.headers.getRawHeaders(b"x-backend") == [b.address.encode()]
    assert 0.5 <= elapsed < 2.5
    assert a.stats.streams_started == 1 and b.stats.streams_completed == 1
    await until(lambda: a.stats.disconnects == 1, timeout=2)
    state = (await backends(gw))[a.address]
    assert state["errors"] == 1 and "first token" in state["last_error"]
    # Alone, the stalled backend gets the full response timeout, then 504.
    gw1 = await gateway_factory("--port", "0", "--backend", a.address,
                                "--set", "proxy.first_token_timeout_seconds=0.2",
                                "--response-timeout", "0.8")
    start = reactor.seconds()
    r, body = await chat(gw1, stream=True)
    assert r.code == 504 and 0.8 <= reactor.seconds() - start < 3
    assert b"proxy.response_timeout_seconds" in body


@pytest_twisted.ensureDeferred
async def test_all_circuits_open_is_503_with_retry_after(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "health.interval_seconds=600",
                               "--set", "health.failure_threshold=1",
                               "--set", "proxy.retries=0")
    await a.kill()
    r, _ = await chat(gw)
    assert r.code == 502
    r, body = await chat(gw)
    assert r.code == 503 and r.headers.getRawHeaders(b"retry-after") == [b"1"]
    assert (await (await http_client().get(gw.url + "/health")).json())["status"] == "unhealthy"


@pytest_twisted.ensureDeferred
async def test_sighup_adds_removes_and_drains(tmp_path, gateway_factory):
    a, b, c = Mock("a", itl_ms=50), Mock("b"), Mock("c")
    try:
        cfg = tmp_path / "ntonix.json"
        cfg.write_text(json.dumps({"backends": [a.address, b.address]}))
        gw = await gateway_factory("--port", "0", "--config", str(cfg))
        # A stream in flight through a (the first pick) for about a second.
        from twisted.internet import defer
        stream = defer.Deferred.fromCoroutine(chat(gw, stream=True, max_tokens=20))
        await until(lambda: a.stats.streams_started == 1, timeout=5)

        cfg.write_text(json.dumps({"backends": [b.address, c.address + ":1"],
                                   "server": {"max_body_bytes": 5000}}))
        gw.terminate("HUP")
        await until(lambda: b"configuration reloaded" in gw.output, timeout=5)
        assert b"server.max_body_bytes changed; it takes effect after a restart" in gw.output
        listed = await backends(gw)
        assert listed[a.address]["state"] == "draining"
        for _ in range(6):
            r, _ = await chat(gw, max_tokens=1)
            assert r.code == 200
        assert (a.count(), b.count(), c.count()) == (1, 3, 3)
        r, body = await within(stream, 10)
        assert body.endswith(b"data: [DONE]\n\n") and b"event: error" not in body
        await until(lambda: b"drained and removed" in gw.output, timeout=5)
        assert set(await backends(gw)) == {b.address, c.address}

        # A bad file on reload is refused and the running configuration stays.
        cfg.write_text('{"backends": ["nohost"]}')
        gw.terminate("HUP")
        await until(lambda: b"reload refused" in gw.output, timeout=5)
        assert set(await backends(gw)) == {b.address, c.address}
    finally:
        for m in (a, b, c):
            await m.stop()
