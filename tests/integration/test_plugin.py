"""The real ``twistd ntonix`` plugin: configuration from file, environment and
command line takes effect; bad settings stop it with one line."""

import json

import pytest
import pytest_twisted
import treq

from ntonix import __version__

from harness import JSON, chat_body, http_client, run_to_exit


@pytest_twisted.ensureDeferred
async def test_file_env_and_cli_all_take_effect(tmp_path, mocks, gateway_factory):
    a, b = mocks
    taken_port = a.port.getHost().port  # the file's port is taken: env must override it
    cfg = tmp_path / "ntonix.json"
    cfg.write_text(json.dumps({
        "server": {"port": taken_port, "bind_address": "127.0.0.1"},
        "backends": [{"host": "127.0.0.1", "port": a.port.getHost().port, "weight": 3}],
        "proxy": {"retries": 4},
    }))
    gw = await gateway_factory("--config", str(cfg), "--set", "proxy.retries=0",
                               env={"NTONIX_PORT": "0", "NTONIX_HEALTH_TIMEOUT_SECONDS": "1.5"})
    http = http_client()
    listed = await (await http.get(gw.admin_url + "/backends")).json()
    assert [(x["name"], x["weight"]) for x in listed["backends"]] == [(a.address, 3)]
    r = await http.post(gw.url + "/v1/chat/completions", data=chat_body(), headers=JSON)
    assert r.code == 200 and r.headers.getRawHeaders(b"x-backend") == [a.address.encode()]
    await r.content()
    assert a.stats.requests == 1 and b.stats.requests == 0


@pytest_twisted.ensureDeferred
async def test_env_backends_override_file(tmp_path, mocks, gateway_factory):
    a, b = mocks
    cfg = tmp_path / "ntonix.json"
    cfg.write_text(json.dumps({"backends": [a.address]}))
    gw = await gateway_factory("--port", "0", env={"NTONIX_CONFIG": str(cfg),
                                                   "NTONIX_BACKENDS": b.address + ":2"})
    listed = await (await http_client().get(gw.admin_url + "/backends")).json()
    assert [(x["name"], x["weight"]) for x in listed["backends"]] == [(b.address, 2)]


@pytest.mark.parametrize("args,env,config,expected", [
    (["--port", "0x"], {}, None, 'server.port = "0x" (--port): expected an integer'),
    ([], {}, {"server": {"port": "eighty"}},
     'server.port = "eighty" (config file {cfg}): expected an integer'),
    ([], {"NTONIX_BACKENDS": "nohost"}, None,
     'backends = "nohost" (environment NTONIX_BACKENDS): expected host:port[:weight] or http(s)://host:port[:weight]'),
    (["--set", "cache.scope=everyone"], {}, None,
     'cache.scope = "everyone" (--set cache.scope): must be one of credential, global'),
])
@pytest_twisted.ensureDeferred
async def test_bad_setting_exits_with_one_line(tmp_path, args, env, config, expected):
    cfg = tmp_path / "bad.json"
    if config is not None:
        cfg.write_text(json.dumps(config))
        args = [*args, "--config", str(cfg)]
    proc = await run_to_exit(args, env)
    out = proc.output.decode()
    assert proc.exit_code != 0
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines == ["ntonix: invalid configuration: " + expected.format(cfg=cfg)]


@pytest_twisted.ensureDeferred
async def test_port_in_use_is_one_line(mocks):
    a, _ = mocks
    proc = await run_to_exit(["--bind", "127.0.0.1", "--port", str(a.port.getHost().port)])
    assert proc.exit_code != 0
    assert "Traceback" not in proc.output.decode()
    assert f"cannot listen for http on 127.0.0.1:{a.port.getHost().port}" in proc.output.decode()


@pytest_twisted.ensureDeferred
async def test_version_flag_prints_the_version():
    from ntonix._version import __version__

    proc = await run_to_exit(["--version"])
    assert proc.output.decode().strip() == f"ntonix {__version__}"


@pytest_twisted.ensureDeferred
async def test_help_lists_every_option_with_default():
    proc = await run_to_exit(["--help"])
    out = proc.output.decode()
    flat = " ".join(out.split())  # usage wraps long help lines
    for flag, default in [("--port", "8080"), ("--ssl-port", "8443"), ("--bind", '"0.0.0.0"'),
                          ("--backend", "none"), ("--config", "none"), ("--demo", "off")]:
        at = flat.index(flag + ("" if flag == "--demo" else "="))
        end = flat.index("[default:", at)
        assert flat[end:].startswith(f"[default: {default}]") and end - at < 200, flag
    assert "cache.max_size_mb = 512  [NTONIX_CACHE_MAX_SIZE_MB]" in out


@pytest_twisted.ensureDeferred
async def test_demo_answers_at_once(gateway_factory):
    gw = await gateway_factory("--demo", "--port", "0", "--bind", "127.0.0.1",
                               "--set", "demo.ports=0,0")
    http = http_client()
    health = await http.get(gw.url + "/health")
    assert health.code == 200
    assert health.headers.getRawHeaders(b"server") == [f"ntonix/{__version__}".encode()]
    assert (await health.json())["status"] == "healthy"
    root = await (await http.get(gw.url + "/")).json()
    assert root["name"] == "NTONIX"
    assert "POST /v1/chat/completions" in root["endpoints"] and "GET /health" in root["endpoints"]
    r = await http.post(gw.url + "/v1/chat/completions", data=chat_body("demo"), headers=JSON)
    doc = await r.json()
    assert r.code == 200 and doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["content"]
    assert r.headers.getRawHeaders(b"x-backend-id")[0].startswith(b"demo-")
    # A relayed answer keeps the backend's own Server header.
    assert r.headers.getRawHeaders(b"server")[0].startswith(b"TwistedWeb/")
    models = await treq.json_content(await http.get(gw.url + "/v1/models"))
    assert [m["id"] for m in models["data"]] == ["mock-llm"]


def test_daemonized_gateway_logs_to_twistd_log(tmp_path):
    """Without -n, twistd daemonizes; the log must not vanish with stdout."""
    import os
    import signal
    import subprocess
    import time
    import urllib.request

    from harness import TWISTD, free_port, gateway_env

    port = free_port()
    subprocess.run([str(TWISTD), "ntonix", "--demo", "--port", str(port), "--bind", "127.0.0.1",
                    "--set", "demo.ports=0,0"], cwd=tmp_path, env=gateway_env(), check=True,
                   timeout=30)
    pid = int((tmp_path / "twistd.pid").read_text())
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "daemon did not answer"
                time.sleep(0.1)
        log = (tmp_path / "twistd.log").read_text()
        assert f"http listening on 127.0.0.1:{port}" in log
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while (tmp_path / "twistd.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert not (tmp_path / "twistd.pid").exists()
    assert "Server Shut Down." in (tmp_path / "twistd.log").read_text()
