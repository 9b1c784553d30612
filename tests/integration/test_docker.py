"""The container set-up, exercised without a Docker engine (none runs here).

The Dockerfile's build and install steps are two scripts; this runs the same
scripts into a fresh virtual environment and then the image's own entry and
health-check commands (ports swapped for free ones). The compose file is
checked against a schema subset written from the Compose Specification, and
against the repository (mounts that exist, dependencies that are
health-checked, ports that match the configuration).
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def dockerfile():
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and
            not line.strip().startswith("#")]


def exec_form(line: str, keyword: str):
    return json.loads(line[line.index(keyword) + len(keyword):].strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def swap_port(argv, old, new):
    return [str(new) if a == str(old) else a for a in argv]


def wait_accepting(port, proc, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited: {proc.stdout.read().decode(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listening on {port} after {seconds}s")


def test_dockerfile_steps_work_outside_docker(tmp_path):
    lines = dockerfile()
    assert "RUN sh docker/build-wheels.sh /src /wheels" in lines
    install = next(line for line in lines if line.startswith("RUN sh /tmp/install-runtime.sh"))
    assert "useradd" in install and any(line.startswith("USER ntonix") for line in lines)
    cmd = exec_form(next(line for line in lines if line.startswith("CMD")), "CMD")
    health = exec_form(next(line for line in lines if line.startswith("HEALTHCHECK")), " CMD ")
    config_copy = next(line for line in lines if line.startswith("COPY config/"))
    src_config, dest_config = config_copy.split()[1:3]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NTONIX_", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    env["PYTHONUNBUFFERED"] = "1"
    wheels = tmp_path / "wheels"
    subprocess.run(["sh", str(DOCKER / "build-wheels.sh"), str(ROOT), str(wheels)], env=env,
                   check=True, timeout=600, capture_output=True)
    subprocess.run(["sh", str(DOCKER / "install-runtime.sh"), str(wheels)], env=env,
                   check=True, timeout=300, capture_output=True)
    caches = list(venv.glob("lib/python*/site-packages/twisted/plugins/dropin.cache"))
    assert caches and b"ntonix" in caches[0].read_bytes()

    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    mock_cmd = compose["services"]["mock-a"]["command"]
    mock_health = compose["services"]["mock-a"]["healthcheck"]["test"][1:]
    mock_port, gw_port = free_port(), free_port()
    procs = []
    workdir = tmp_path / "run"
    workdir.mkdir()
    try:
        mock = subprocess.Popen(swap_port(mock_cmd, 8001, mock_port), env=env, cwd=workdir,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(mock)
        wait_accepting(mock_port, mock)
        assert subprocess.run(swap_port(mock_health, 8001, mock_port), env=env,
                              timeout=30).returncode == 0
        # The admin token as the compose file sets it: the container's
        # admin listener is off loopback and refuses to start without one.
        gw_env = {**env, "NTONIX_PORT": str(gw_port),
                  "NTONIX_BACKENDS": f"127.0.0.1:{mock_port}",
                  "NTONIX_ADMIN_TOKEN": "test-admin-token"}
        gw_cmd = [str(ROOT / src_config) if a == dest_config else a for a in cmd]
        gateway = subprocess.Popen(gw_cmd, env=gw_env, cwd=workdir,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(gateway)
        wait_accepting(gw_port, gateway)
        assert subprocess.run(swap_port(health, 8080, gw_port), env=env,
                              timeout=30).returncode == 0
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        req = urllib.request.Request(f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                                     data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and r.headers["X-Backend-Id"] == "mock-a"
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    # The health check fails when nothing answers.
    assert subprocess.run(swap_port(health, 8080, gw_port), env=env, timeout=30,
                          capture_output=True).returncode == 1


# What this file uses of the Compose Specification's schema, written from the
# specification (https://compose-spec.io), strict about unknown keys.
DURATION = {"type": "string", "pattern": r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$"}
SERVICE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "image": {"type": "string"},
        "build": {"type": "object", "additionalProperties": False,
                  "properties": {"context": {"type": "string"},
                                 "dockerfile": {"type": "string"}},
                  "required": ["context"]},
        "command": {"type": "array", "items": {"type": "string"}},
        "environment": {"type": "array", "items": {"type": "string",
                                                   "pattern": r"^[A-Z_][A-Z0-9_]*=.*$"}},
        "ports": {"type": "array", "items": {"type": "string",
                                             "pattern": r"^(\d+:)?\d+(/(tcp|udp))?$"}},
        "volumes": {"type": "array", "items": {"type": "string",
                                               "pattern": r"^[^:]+:/[^:]+(:(ro|rw))?$"}},
        "depends_on": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": False,
            "properties": {"condition": {"enum": ["service_started", "service_healthy",
                                                  "service_completed_successfully"]},
                           "restart": {"type": "boolean"}, "required": {"type": "boolean"}},
            "required": ["condition"]}},
        "healthcheck": {"type": "object", "additionalProperties": False,
                        "properties": {
                            "test": {"type": "array", "minItems": 2,
                                     "items": {"type": "string"},
                                     "prefixItems": [{"enum": ["CMD", "CMD-SHELL"]}]},
                            "interval": DURATION, "timeout": DURATION,
                            "start_period": DURATION, "start_interval": DURATION,
                            "retries": {"type": "integer", "minimum": 1},
                            "disable": {"type": "boolean"}},
                        "required": ["test"]},
    },
    "anyOf": [{"required": ["image"]}, {"required": ["build"]}],
}
COMPOSE = {"type": "object", "additionalProperties": False,
           "properties": {"name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"},
                          "services": {"type": "object", "additionalProperties": SERVICE,
                                       "minProperties": 1}},
           "required": ["services"]}


def test_compose_file_is_valid_and_matches_the_repository():
    path = DOCKER / "docker-compose.yml"
    doc = yaml.safe_load(path.read_text())
    jsonschema.validate(doc, COMPOSE, cls=jsonschema.Draft202012Validator)
    services = doc["services"]
    assert set(services) == {"gateway", "gateway-b", "mock-a", "mock-b", "redis"}
    for name, svc in services.items():
        assert "healthcheck" in svc, name
        if "build" in svc:
            ctx = (path.parent / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"]["dockerfile"]).is_file()
        for volume in svc.get("volumes", []):
            assert (path.parent / volume.split(":")[0]).exists(), volume
        for dep, rule in svc.get("depends_on", {}).items():
            assert dep in services
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[dep]
    from ntonix.cache.redis_client import parse_redis_url
    for name, host_port in (("gateway", "8080"), ("gateway-b", "8081")):
        gw = services[name]
        assert gw["depends_on"] == {"mock-a": {"condition": "service_healthy"},
                                    "mock-b": {"condition": "service_healthy"},
                                    "redis": {"condition": "service_healthy"}}
        mounted = gw["volumes"][0].split(":")
        config = json.loads((path.parent / mounted[0]).read_text())
        assert mounted[1] in gw["command"]  # the gateway reads the mounted file
        assert gw["ports"] == [f"{host_port}:{config['server']['port']}"]
        # Both replicas share the compose file's Redis.
        env = dict(e.split("=", 1) for e in gw["environment"])
        assert parse_redis_url(env["NTONIX_CACHE_REDIS_URL"])[:2] == ("redis", 6379)
        # The admin listener is off loopback there: a token, and the secret
        # the replicas share for their shared cache.
        assert env["NTONIX_ADMIN_TOKEN"] and env["NTONIX_SERVER_SECRET"]
    # The configured backends are the mock services, on the ports they listen on.
    for backend in config["backends"]:
        cmd = services[backend["host"]]["command"]
        assert cmd[cmd.index("--port") + 1] == str(backend["port"])
        assert cmd[cmd.index("--bind") + 1] == "0.0.0.0"
