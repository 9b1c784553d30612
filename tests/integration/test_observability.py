"""Logs, the access log and metrics, checked against a known sequence."""

import json

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor

from harness import JSON, chat_body, free_port, http_client, sleep, until, within

PROMETHEUS_ACCEPT = (b"application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     b"version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


async def post(gw, body, headers=None):
    h = dict(JSON)
    h.update(headers or {})
    r = await http_client().post(gw.url + "/v1/chat/completions", data=body, headers=h)
    await within(r.content(), 10)
    return r


def samples(text, name):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest_twisted.ensureDeferred
async def test_known_sequence_gives_exact_counts(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    det = chat_body("counted", temperature=0)
    assert (await post(gw, det)).headers.getRawHeaders(b"x-cache") == [b"MISS"]
    assert (await post(gw, det)).headers.getRawHeaders(b"x-cache") == [b"HIT"]
    await post(gw, chat_body("sampled"))
    await post(gw, chat_body("streamed", stream=True))
    assert (await post(gw, b"{bad json")).code == 400
    r = await http_client().get(gw.url + "/nope")
    await r.content()
    assert r.code == 404

    doc = await (await http_client().get(gw.admin_url + "/metrics")).json()
    assert (doc["requests_total"], doc["requests_success"], doc["requests_error"]) == (6, 4, 2)
    assert (doc["cache_hits"], doc["cache_misses"], doc["cache_hit_rate"]) == (1, 1, 0.5)
    assert doc["requests_active"] == 1  # this one
    assert doc["connections_total"] >= 1 and doc["uptime_seconds"] > 0
    assert doc["memory_cache_bytes"] > 0
    [b] = doc["backends"]
    assert (b["host"], b["requests"], b["errors"], b["error_rate"]) == ("127.0.0.1", 3, 0, 0.0)
    assert b["latency_avg_ms"] > 0

    r = await http_client().get(gw.admin_url + "/metrics", headers={b"Accept": [PROMETHEUS_ACCEPT]})
    assert r.headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text")
    text = (await r.content()).decode()
    plain = (await (await http_client().get(gw.admin_url + "/metrics/prometheus")).content()).decode()
    for t in (text, plain):
        # Parsed with prometheus-client's own parser.
        reqs = samples(t, "ntonix_requests_total")
        assert reqs[(("cache", "MISS"), ("route", "chat"), ("status", "200"))] == 1
        assert reqs[(("cache", "HIT"), ("route", "chat"), ("status", "200"))] == 1
        assert reqs[(("cache", "BYPASS"), ("route", "chat"), ("status", "200"))] == 2
        assert reqs[(("cache", "none"), ("route", "chat"), ("status", "400"))] == 1
        assert reqs[(("cache", "none"), ("route", "unknown"), ("status", "404"))] == 1
        assert reqs[(("cache", "none"), ("route", "metrics"), ("status", "200"))] >= 1
        assert samples(t, "ntonix_time_to_first_token_seconds_count") == {(("route", "chat"),): 1}
        assert samples(t, "ntonix_cache_hits_total") == {(): 1}
        assert samples(t, "ntonix_backend_requests_total") == {(("backend", a.address),): 3}
        assert samples(t, "ntonix_backend_circuit_state") == {(("backend", a.address),): 0}
        assert samples(t, "ntonix_gateway_overhead_seconds_count")[()] >= 5
        assert samples(t, "ntonix_process_resident_memory_bytes")[()] > 1e6


@pytest_twisted.ensureDeferred
async def test_json_log_file_access_events_and_rotation(tmp_path, mocks, gateway_factory):
    a, _ = mocks
    log_path = tmp_path / "logs" / "ntonix.log"
    gw = await gateway_factory("--backend", a.address, "--log-file", str(log_path),
                               "--set", "logging.max_file_size_mb=0.02",
                               "--set", "logging.max_files=2",
                               env={"NTONIX_LOG_LEVEL": "info"}, port=free_port())
    r = await post(gw, chat_body("secret-prompt-marker stream", stream=True),
                   headers={b"X-Request-ID": [b"trace-me-1"]})
    assert r.headers.getRawHeaders(b"x-request-id") == [b"trace-me-1"]
    assert a.stats.last_headers["x-request-id"] == "trace-me-1"
    timing = r.headers.getRawHeaders(b"server-timing")[0].decode()
    assert timing.startswith("gateway;dur=") and ", upstream;dur=" in timing

    def records():
        return [json.loads(line) for line in log_path.read_text().splitlines() if line]

    await until(lambda: log_path.exists() and any(
        rec.get("request_id") == "trace-me-1" for rec in records()), timeout=5)
    [event] = [rec for rec in records() if rec.get("request_id") == "trace-me-1"]
    assert event["component"] == "ntonix.access" and event["level"] == "info"
    assert event["stream"] is True and event["ttft_ms"] > 0 and event["status"] == 200
    assert event["backend"] == a.address and event["outcome"] == "ok" and event["bytes_sent"] > 0
    assert "trace-me-1" in event["message"] and event["timestamp"].endswith("+00:00")
    # stdout stays quiet when logging to a file
    assert b"ntonix.access" not in gw.output

    for i in range(150):  # about 60 KB of access events: several rotations
        await post(gw, chat_body(f"secret-prompt-marker {i}"))
    rotated = sorted(p.name for p in log_path.parent.iterdir())
    assert rotated == ["ntonix.log", "ntonix.log.1", "ntonix.log.2"], rotated
    for p in log_path.parent.iterdir():
        assert p.stat().st_size <= 0.02 * 1024 * 1024 + 2048
        text = p.read_text()
        assert "secret-prompt-marker" not in text  # prompts never reach the log
        for line in text.splitlines():
            assert set(json.loads(line)) >= {"timestamp", "level", "component", "message"}


@pytest_twisted.ensureDeferred
async def test_client_disconnect_marked_in_access_log(tmp_path, mocks, gateway_factory):
    from harness import raw_connect, raw_post

    a, _ = mocks
    a.knobs.itl_ms = 50
    log_path = tmp_path / "ntonix.log"
    gw = await gateway_factory("--backend", a.address, "--log-file", str(log_path),
                               port=free_port())
    c = await raw_connect(gw.port)
    body = chat_body(stream=True, max_tokens=100)
    c.transport.write(raw_post(body, extra=b"X-Request-ID: gone-1\r\n"))
    await c.wait_data(5)
    c.transport.loseConnection()

    def event():
        if not log_path.exists():
            return None
        for line in log_path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("request_id") == "gone-1":
                return rec
        return None

    await until(lambda: event() is not None, timeout=5)
    assert event()["outcome"] == "client_closed"


@pytest_twisted.ensureDeferred
async def test_relayed_5xx_is_an_upstream_error_and_an_opening_circuit_a_warning(
        tmp_path, mocks, gateway_factory):
    a, _ = mocks
    a.knobs.fail_rate = 1.0  # every answer a 500
    log_path = tmp_path / "ntonix.log"
    gw = await gateway_factory("--backend", a.address, "--log-file", str(log_path),
                               "--set", "proxy.retries=0", "--set", "health.failure_threshold=2",
                               "--set", "health.interval_seconds=3600", port=free_port())
    for i in range(2):
        r = await post(gw, chat_body(f"fails {i}"), headers={b"X-Request-ID": [b"fail-%d" % i]})
        assert r.code == 500
        await r.content()

    def records():
        if not log_path.exists():
            return []
        return [json.loads(line) for line in log_path.read_text().splitlines() if line]

    await until(lambda: any(rec.get("request_id") == "fail-1" for rec in records()), timeout=5)
    events = {rec["request_id"]: rec for rec in records() if rec.get("request_id")}
    assert events["fail-0"]["status"] == 500 and events["fail-0"]["outcome"] == "upstream_error"
    opened = [rec for rec in records() if "circuit closed -> open" in rec["message"]]
    assert opened and opened[0]["level"] == "warn", records()


@pytest_twisted.ensureDeferred
async def test_upstream_error_marked_and_level_filter(tmp_path, mocks, gateway_factory):
    a, _ = mocks
    await a.kill()
    gw = await gateway_factory("--backend", a.address, "--log-level", "warn", port=free_port())
    r = await post(gw, chat_body(), headers={b"X-Request-ID": [b"fails-1"]})
    assert r.code == 502
    r = await http_client().get(gw.url + "/health")
    await r.content()
    assert b"ntonix.access" not in gw.output  # info events filtered out at warn


@pytest_twisted.ensureDeferred
async def test_backend_connections_opened_shows_pool_churn(mocks, gateway_factory):
    # Requests one at a time reuse a pooled connection; more requests in
    # flight than before open new ones, and the counter is how an operator
    # sees it. Under load the pool keeps what it frees (the next burst opens
    # nothing); once traffic calms the surplus past the pool size goes.
    a, _ = mocks
    a.knobs.ttft_ms = 300.0  # so that the concurrent ones overlap upstream
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "proxy.pool_size_per_backend=2")

    async def metric(name):
        r = await http_client().get(gw.admin_url + "/metrics/prometheus")
        text = (await r.content()).decode()
        return samples(text, name)[(("backend", a.address),)]

    async def opened():
        return await metric("ntonix_backend_connections_opened_total")

    for i in range(4):
        assert (await post(gw, chat_body(f"one at a time {i}"))).code == 200
    sequential = await opened()
    assert 1 <= sequential <= 2  # a health check may have needed one of its own
    replies = await within(defer.gatherResults([
        defer.ensureDeferred(post(gw, chat_body(f"together {i}"))) for i in range(8)]), 10)
    assert all(r.code == 200 for r in replies)
    after_burst = await opened()
    assert after_burst >= sequential + 6
    replies = await within(defer.gatherResults([
        defer.ensureDeferred(post(gw, chat_body(f"again {i}"))) for i in range(8)]), 10)
    assert all(r.code == 200 for r in replies)
    assert await opened() == after_burst
    assert await metric("ntonix_backend_connections_idle") == 8
    idle = []

    async def trimmed():
        idle.append(await metric("ntonix_backend_connections_idle"))
        return idle[-1] <= 2

    deadline = reactor.seconds() + 5
    while not await trimmed():
        assert reactor.seconds() < deadline, idle
        await sleep(0.1)
