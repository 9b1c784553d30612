"""The real ``twistd ntonix`` in a Kubernetes pod's environment: a Service
named ``ntonix`` puts ``NTONIX_PORT=tcp://...`` and friends into every pod of
its namespace. The gateway starts, serves, and says once per variable that it
ignored it."""

import json
import re

import pytest_twisted

from harness import JSON, chat_body, http_client

# Exactly what Kubernetes injects for a Service named ntonix with one port,
# 8080, named http.
K8S_ENV = {
    "NTONIX_SERVICE_HOST": "10.0.0.1",
    "NTONIX_SERVICE_PORT": "8080",
    "NTONIX_SERVICE_PORT_HTTP": "8080",
    "NTONIX_PORT": "tcp://10.0.0.1:8080",
    "NTONIX_PORT_8080_TCP": "tcp://10.0.0.1:8080",
    "NTONIX_PORT_8080_TCP_PROTO": "tcp",
    "NTONIX_PORT_8080_TCP_PORT": "8080",
    "NTONIX_PORT_8080_TCP_ADDR": "10.0.0.1",
}


@pytest_twisted.ensureDeferred
async def test_starts_and_serves_with_kubernetes_service_variables(tmp_path, mocks, gateway_factory):
    a, _ = mocks
    # The port comes from the file (0: a free one); NTONIX_PORT's service
    # address must not override it, nor stop the start.
    cfg = tmp_path / "ntonix.json"
    cfg.write_text(json.dumps({"server": {"port": 0, "bind_address": "127.0.0.1"},
                               "backends": [a.address]}))
    gw = await gateway_factory("--config", str(cfg), env=K8S_ENV)
    http = http_client()
    health = await http.get(gw.url + "/health")
    assert health.code == 200
    await health.content()
    r = await http.post(gw.url + "/v1/chat/completions", data=chat_body("in a pod"), headers=JSON)
    assert r.code == 200 and (await r.json())["object"] == "chat.completion"

    out = gw.output.decode(errors="replace")
    assert "Traceback" not in out and "invalid configuration" not in out
    warnings = [line for line in out.splitlines() if "configuration warning:" in line]
    assert all(re.search(r"\bWARN\b", line) for line in warnings), warnings
    # One readable line per variable, naming it.
    for name in K8S_ENV:
        named = [line for line in warnings
                 if f"{name} (environment)" in line or f"(environment {name})" in line]
        assert len(named) == 1, (name, warnings)
    assert len(warnings) == len(K8S_ENV)
    assert any('server.port = "tcp://10.0.0.1:8080" (environment NTONIX_PORT): '
               "a service address, not a port, ignored" in line for line in warnings)
    # Logged before the listener's line, at start.
    assert out.index("configuration warning:") < out.index("http listening on")
