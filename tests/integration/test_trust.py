"""Trust boundaries through the real plugin: what a client may claim to be
(its tenant, its address), what it may reach on a backend (passthrough),
and what it may not do to others (open a backend's circuit). The backend
here records every request it gets, so "never reached the backend" is
checked where it matters."""

import json
from typing import Any, Dict, List, Optional

import pytest_twisted
import treq
from twisted.internet import defer, reactor
from twisted.web import resource, server

from harness import (JSON, Sim, chat_body, http_client, raw_connect, run_to_exit, sleep,
                     start_gateway, stop_gateway, until, within)
from test_admission import env_for, post


class Recorder(resource.Resource):
    """A backend that logs (method, path, headers) of every request; chat
    answers 200, ``/v1/rerank`` answers 500 (a route failing on its own)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Dict[str, Any]] = []

    def render(self, request: server.Request) -> bytes:
        path = request.path.decode("latin-1")
        self.seen.append({"method": request.method.decode(), "path": path,
                          "uri": request.uri.decode("latin-1"),
                          "headers": {k.decode().lower(): [x.decode() for x in v] for k, v in
                                      request.requestHeaders.getAllRawHeaders()}})
        request.setHeader(b"Content-Type", b"application/json")
        if path == "/health":
            return b'{"status": "ok"}'
        if path == "/v1/rerank":
            request.setResponseCode(500)
            return b'{"error": {"message": "rerank model not loaded"}}'
        return json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": "ok"}}],
                           "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                     "total_tokens": 2}}).encode()

    def upstream(self, path: str) -> List[Dict[str, Any]]:
        return [s for s in self.seen if s["path"] != "/health" and path in s["uri"]]


def recorders(n: int = 2):
    out = []
    for _ in range(n):
        r = Recorder()
        port = reactor.listenTCP(0, server.Site(r), interface="127.0.0.1")
        out.append((r, port, f"127.0.0.1:{port.getHost().port}"))
    return out


async def raw_request(port: int, head: bytes, timeout: float = 5.0) -> bytes:
    c = await raw_connect(port)
    c.transport.write(head)
    await within(c.closed, timeout)
    return c.received


@pytest_twisted.ensureDeferred
async def test_a_client_cannot_name_its_tenant_without_a_trusted_proxy():
    sim = Sim("a", decode_ms_base=20.0)
    env = env_for(sim, 1, queue_size=10, queue_timeout_seconds=10)
    env["NTONIX_TENANTS_HEADER"] = "X-Tenant"
    env["NTONIX_TENANTS_CLASSES"] = json.dumps({"oncall": {"priority": "critical"}})
    env["NTONIX_TENANTS_TRUSTED_PROXIES"] = "10.9.9.9"  # not the test client
    gw = await start_gateway(["--port", "0"], env=env)
    client = http_client()
    try:
        calls = [defer.ensureDeferred(post(client, gw, "occupies", 20, "std0"))]
        await sleep(0.1)
        for i in (1, 2):
            calls.append(defer.ensureDeferred(post(client, gw, f"first {i}", 2, f"std{i}")))
            await sleep(0.05)
        calls.append(defer.ensureDeferred(post(client, gw, "claims oncall", 2, "oncall")))
        results = await defer.gatherResults(calls)
        assert [r.code for r, _ in results] == [200] * 4
        # Served in arrival order: the claim bought nothing (on a gateway
        # that believed it, "oncall" was served second).
        order = [t.decode() for _, t, _ in sim.fault.log]
        assert order == ["std0", "std1", "std2", "oncall"], order
        r = await within(client.get(gw.admin_url + "/metrics/prometheus"), 5)
        text = (await treq.content(r)).decode()
        assert "ntonix_tenant_header_ignored_total 4.0" in text
        r = await within(client.get(gw.admin_url + "/admission"), 5)
        state = await treq.json_content(r)
        assert state["admitted"]["critical"] == 0, state
    finally:
        await stop_gateway(gw)
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_a_trusted_proxy_names_the_tenant():
    sim = Sim("a", decode_ms_base=20.0)
    env = env_for(sim, 1, queue_size=10, queue_timeout_seconds=10)
    env["NTONIX_TENANTS_HEADER"] = "X-Tenant"
    env["NTONIX_TENANTS_CLASSES"] = json.dumps({"oncall": {"priority": "critical"}})
    env["NTONIX_TENANTS_TRUSTED_PROXIES"] = "127.0.0.0/8"
    gw = await start_gateway(["--port", "0"], env=env)
    client = http_client()
    try:
        r, _ = await post(client, gw, "as oncall", 2, "oncall")
        assert r.code == 200
        r = await within(client.get(gw.admin_url + "/admission"), 5)
        state = await treq.json_content(r)
        assert state["admitted"]["critical"] == 1, state
    finally:
        await stop_gateway(gw)
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_made_up_keys_share_one_tenant_when_keys_are_listed():
    sim = Sim("a", decode_ms_base=20.0)
    env = env_for(sim, 1, queue_size=20, queue_timeout_seconds=10)
    from ntonix.identity import key_digest
    env["NTONIX_TENANTS_KEYS"] = json.dumps({key_digest("sk-ops"): "ops"})
    gw = await start_gateway(["--port", "0"], env=env)
    client = http_client()
    try:
        def send(key):
            headers = dict(JSON)
            headers[b"Authorization"] = [b"Bearer " + key.encode()]
            body = json.dumps({"model": "sim-llm", "max_tokens": 10,
                               "messages": [{"role": "user", "content": key}]}).encode()
            return client.post(gw.url + "/v1/chat/completions", data=body, headers=headers)

        calls = [send(f"sk-made-up-{i}") for i in range(5)] + [send("sk-ops")]
        state: Dict[str, Any] = {}

        async def tenants_listed():
            nonlocal state
            r = await within(client.get(gw.admin_url + "/admission"), 5)
            state = await treq.json_content(r)
            return state["waiting"] >= 4

        for _ in range(100):  # bounded: until the queue holds the made-up keys
            if await tenants_listed():
                break
            await sleep(0.02)
        tenants = {t["tenant"] for t in state["tenants"]}
        assert tenants <= {"unlisted", "ops"} and "unlisted" in tenants, state
        for r in await defer.gatherResults([within(c, 30) for c in calls]):
            await treq.content(r)
        r = await within(client.get(gw.admin_url + "/metrics/prometheus"), 5)
        text = (await treq.content(r)).decode()
        assert "sk-made-up" not in text and "Bearer" not in text
    finally:
        await stop_gateway(gw)
        await sim.stop()


@pytest_twisted.ensureDeferred
async def test_a_credential_header_is_refused_as_the_tenant_header():
    proc = await run_to_exit(["--port", "0"], env={"NTONIX_TENANTS_HEADER": "Authorization"})
    out = proc.output.decode()
    assert proc.exit_code != 0
    assert "tenants.header" in out and "credential" in out and "Traceback" not in out, out


@pytest_twisted.ensureDeferred
async def test_passthrough_reaches_only_listed_routes_in_normal_form():
    (rec, port, address), = recorders(1)
    gw = await start_gateway(["--port", "0", "--backend", address])
    try:
        cases = [
            (b"GET /v1/../metrics HTTP/1.1", 400),
            (b"GET /v1/%2e%2e/metrics HTTP/1.1", 400),
            (b"GET /v1/%2E%2e/admin HTTP/1.1", 400),
            (b"DELETE /v1/models/../../admin HTTP/1.1", 400),
            (b"GET /v1//models HTTP/1.1", 400),
            (b"PUT /v1/load_lora_adapter HTTP/1.1", 404),
            (b"POST /v1/load_lora_adapter HTTP/1.1", 404),
            (b"POST /v1/unload_lora_adapter HTTP/1.1", 404),
            (b"POST /v1/rerank HTTP/1.1", 500),  # listed: relayed (and it fails)
        ]
        for line, status in cases:
            data = await raw_request(gw.port, line + b"\r\nHost: x\r\nConnection: close\r\n"
                                     b"Content-Type: application/json\r\n"
                                     b"Content-Length: 2\r\n\r\n{}")
            assert data.split(b" ", 2)[1] == str(status).encode(), (line, data[:300])
            body = json.loads(data.partition(b"\r\n\r\n")[2] or b"{}")
            if status != 500:
                assert body["error"]["code"] in ("invalid_path", "not_found"), body
        reached = [s["uri"] for s in rec.seen if s["path"] != "/health"]
        assert reached == ["/v1/rerank"], reached
    finally:
        await stop_gateway(gw)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_client_cannot_open_a_backends_circuit_and_posts_are_not_resent():
    (a, pa, addr_a), (b, pb, addr_b) = recorders(2)
    gw = await start_gateway(["--port", "0", "--backend", addr_a, "--backend", addr_b,
                              "--set", "health.failure_threshold=3",
                              "--set", "health.interval_seconds=30"])
    client = http_client()
    try:
        for _ in range(6):
            r = await within(client.post(gw.url + "/v1/rerank", data=b"{}", headers=JSON), 5)
            await treq.content(r)
            assert r.code == 500  # the backend's own answer, relayed
        # Each POST went to one backend once: not resent after its 500.
        assert len(a.upstream("/v1/rerank")) + len(b.upstream("/v1/rerank")) == 6
        r = await within(client.get(gw.admin_url + "/backends"), 5)
        circuits = {x["name"]: x["circuit"] for x in (await treq.json_content(r))["backends"]}
        assert set(circuits.values()) == {"closed"}, circuits
        for i in range(4):
            r = await within(client.post(gw.url + "/v1/chat/completions",
                                         data=chat_body(f"still served {i}"), headers=JSON), 5)
            await treq.content(r)
            assert r.code == 200
    finally:
        await stop_gateway(gw)
        await pa.stopListening()
        await pb.stopListening()


@pytest_twisted.ensureDeferred
async def test_two_credentials_are_refused_and_forwarding_headers_are_not_believed():
    (rec, port, address), = recorders(1)
    gw = await start_gateway(["--port", "0", "--backend", address,
                              "--set", "cache.enabled=false"])
    try:
        body = chat_body("two keys")
        data = await raw_request(gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                 b"Authorization: Bearer sk-a\r\nAuthorization: Bearer sk-b\r\n"
                                 b"Connection: close\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert data.split(b" ", 2)[1] == b"400", data[:300]
        assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == \
            "duplicate_credentials"
        assert rec.upstream("/v1/chat/completions") == []
        r = await within(http_client().post(
            gw.url + "/v1/chat/completions", data=body,
            headers={**JSON, b"X-Forwarded-For": [b"1.2.3.4"], b"X-Real-IP": [b"1.2.3.4"]}), 5)
        await treq.content(r)
        seen = rec.upstream("/v1/chat/completions")[-1]["headers"]
        assert seen["x-forwarded-for"] == ["127.0.0.1"] and seen["x-real-ip"] == ["127.0.0.1"]
    finally:
        await stop_gateway(gw)
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_backends_are_not_named_to_clients_when_hidden():
    (rec, port, address), = recorders(1)
    dead = socket_port_closed()
    gw = await start_gateway(["--port", "0", "--backend", address, "--backend", dead,
                              "--set", "proxy.expose_backend=false",
                              "--set", "health.interval_seconds=30",
                              "--set", "proxy.retries=0", "--set", "cache.enabled=false"])
    try:
        bodies = []
        for i in range(4):  # round-robin: some go to the dead one
            r = await within(http_client().post(gw.url + "/v1/chat/completions",
                                                data=chat_body(f"q{i}"), headers=JSON), 10)
            bodies.append((r.code, await treq.content(r), r.headers.getRawHeaders(b"x-backend")))
        assert any(code == 502 for code, _, _ in bodies), bodies
        for code, body, shown in bodies:
            assert shown is None
            assert dead.encode() not in body and dead.split(":")[1].encode() not in body, body
        assert dead.encode() in gw.output  # the log keeps it
    finally:
        await stop_gateway(gw)
        await port.stopListening()


def socket_port_closed() -> str:
    """host:port where nothing listens (bound a moment ago, then closed)."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"
