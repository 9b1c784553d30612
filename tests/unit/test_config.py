"""Configuration: precedence between every pair of sources, and validation."""

import json
from itertools import combinations

import pytest

from ntonix import config as c
from ntonix.config import ConfigError, Raw


def write(tmp_path, doc, name="ntonix.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(p)


def cli(**settings):
    return {k.replace("__", "."): Raw(v, f"--{k}", True) for k, v in settings.items()}


def test_defaults_match_the_seed():
    cfg = c.load({}, {})
    assert (cfg.server.port, cfg.server.ssl_port, cfg.server.bind_address) == (8080, 8443, "0.0.0.0")
    assert cfg.cache.max_size_mb == 512 and cfg.cache.ttl_seconds == 3600 and cfg.cache.enabled
    assert cfg.health.interval_seconds == 5 and cfg.health.failure_threshold == 3
    assert cfg.proxy.retries == 1 and cfg.balancer.algorithm == "weighted_round_robin"
    assert cfg.admin.user == "admin" and not cfg.admin.enabled
    assert cfg.backends == ()


# Each source sets server.port to its own value; the higher one must win for
# every pair, and the lower one must be what remains when the higher is absent.
SOURCES = ["default", "file", "env", "cli"]
PORT = {"default": 8080, "file": 1001, "env": 1002, "cli": 1003}


def load_with(tmp_path, present, via_alias=False):
    path = write(tmp_path, {"server": {"port": PORT["file"]}}) if "file" in present else None
    env = {}
    if "env" in present:
        env["NTONIX_PORT" if via_alias else "NTONIX_SERVER_PORT"] = str(PORT["env"])
    layer = cli(server__port=str(PORT["cli"])) if "cli" in present else {}
    return c.load(layer, env, path)


@pytest.mark.parametrize("low,high", list(combinations(SOURCES, 2)))
def test_precedence_every_pair(tmp_path, low, high):
    present = {low, high} - {"default"}
    assert load_with(tmp_path, present).server.port == PORT[high]
    assert load_with(tmp_path, present - {high}).server.port == PORT[low]


def test_precedence_all_four_and_alias(tmp_path):
    assert load_with(tmp_path, {"file", "env", "cli"}).server.port == PORT["cli"]
    assert load_with(tmp_path, {"file", "env"}, via_alias=True).server.port == PORT["env"]


def test_long_env_name_beats_alias():
    cfg = c.load({}, {"NTONIX_PORT": "1", "NTONIX_SERVER_PORT": "2"})
    assert cfg.server.port == 2


def test_config_file_from_env_and_cli_path_wins(tmp_path):
    a = write(tmp_path, {"server": {"port": 1111}}, "a.json")
    b = write(tmp_path, {"server": {"port": 2222}}, "b.json")
    assert c.load({}, {"NTONIX_CONFIG": a}).server.port == 1111
    assert c.load({}, {"NTONIX_CONFIG": a}, b).server.port == 2222


def test_backends_from_each_source(tmp_path):
    path = write(tmp_path, {"backends": [{"host": "a", "port": 1, "weight": 3}, "b:2"]})
    cfg = c.load({}, {}, path)
    assert [(b.host, b.port, b.weight) for b in cfg.backends] == [("a", 1, 3), ("b", 2, 1)]
    cfg = c.load({}, {"NTONIX_BACKENDS": "x:10:2, y:11"}, path)
    assert [b.name for b in cfg.backends] == ["x:10", "y:11"] and cfg.backends[0].weight == 2
    layer = {"backends": Raw("z:12", "--backend", True)}
    assert [b.name for b in c.load(layer, {"NTONIX_BACKENDS": "x:10"}, path).backends] == ["z:12"]


def test_generic_env_rule_types():
    cfg = c.load({}, {"NTONIX_CACHE_ENABLED": "false", "NTONIX_PROXY_CONNECT_TIMEOUT_SECONDS": "2.5",
                      "NTONIX_DEMO_PORTS": "9001,9002", "NTONIX_LOG_LEVEL": "debug",
                      "NTONIX_SSL_SNI": '{"a.test": {"cert_file": "c", "key_file": "k"}}'})
    assert cfg.cache.enabled is False and cfg.proxy.connect_timeout_seconds == 2.5
    assert cfg.demo.ports == [9001, 9002] and cfg.logging.level == "debug"
    assert cfg.ssl.sni["a.test"]["key_file"] == "k"


def problems(layer=None, env=None, path=None):
    with pytest.raises(ConfigError) as e:
        c.load(layer or {}, env or {}, path)
    return e.value.lines


@pytest.mark.parametrize("doc,expected", [
    ({"server": {"port": "eighty"}},
     'server.port = "eighty" (config file {p}): expected an integer'),
    ({"server": {"port": 70000}},
     "server.port = 70000 (config file {p}): must be between 0 and 65535"),
    ({"server": {"prot": 1}}, "server.prot (config file {p}): unknown setting"),
    ({"sever": {}}, "sever (config file {p}): unknown section"),
    ({"cache": {"enabled": "yes"}},
     'cache.enabled = "yes" (config file {p}): expected true or false'),
    ({"balancer": {"algorithm": "random"}},
     'balancer.algorithm = "random" (config file {p}): must be one of'),
    ({"backends": [{"host": "a", "port": 1, "weight": 0}]},
     "backends[0].weight = 0 (config file {p}): must be between 1 and 1000"),
    ({"backends": [{"host": "a"}]}, "backends[0].port (config file {p}): missing"),
    ({"backends": ["a:1", {"host": "a", "port": 1}]},
     'backends = "a:1" (config file {p}): duplicate backend'),
    ({"ssl": {"enabled": True}}, "ssl.enabled = true (config file {p}): needs ssl.cert_file"),
    ({"server": {"workers": "many"}},
     'server.workers = "many" (config file {p}): a number from 1 to 256, or auto'),
    ({"tenants": {"header": "Authorization"}},
     'tenants.header = "Authorization" (config file {p}): a credential'),
    ({"tenants": {"trusted_proxies": ["10.0.0.0/8", "not-a-net"]}},
     "tenants.trusted_proxies = "),
    ({"tenants": {"keys": {"sk-live-123": "ops"}}}, "tenants.keys (config file {p}): expected"),
    ({"server": {"workers": 0}},
     'server.workers = "0" (config file {p}): a number from 1 to 256, or auto'),
    ({"server": {"workers": 2.5}}, "server.workers = 2.5 (config file {p}): expected a string"),
    ({"server": {"workers": True}}, "server.workers = true (config file {p}): expected a string"),
    ({"ssl": {"cert_file": "c.pem"}}, 'ssl.cert_file = "c.pem" (config file {p}): needs ssl.key_file'),
    ({"ssl": {"sni": {"a.test": {"cert_file": "c"}}}}, "ssl.sni.a.test = "),
])
def test_file_validation_names_key_value_and_source(tmp_path, doc, expected):
    path = write(tmp_path, doc)
    lines = problems(path=path)
    assert len(lines) == 1
    assert lines[0].startswith(expected.format(p=path)), lines[0]


def test_every_problem_is_reported_once(tmp_path):
    path = write(tmp_path, {"server": {"port": "x", "threads": 0}})
    lines = problems(path=path)
    assert len(lines) == 2 and "server.port" in lines[0] and "server.threads" in lines[1]


@pytest.mark.parametrize("env,expected", [
    ({"NTONIX_BACKENDS": "nohost"},
     'backends = "nohost" (environment NTONIX_BACKENDS): expected host:port[:weight]'),
    ({"NTONIX_BACKENDS": "a:1:0"},
     'backends = "a:1:0" (environment NTONIX_BACKENDS): weight must be at least 1'),
    ({"NTONIX_BACKENDS": "a:99999"}, "port must be between 1 and 65535"),
    ({"NTONIX_BACKENDS": "a:1,a:1"}, "duplicate backend"),
    ({"NTONIX_PORT": "0x"}, 'server.port = "0x" (environment NTONIX_PORT): expected an integer'),
    ({"NTONIX_PROXY_RETRIES": "-1"}, "proxy.retries"),
    ({"NTONIX_HEALTH_INTERVAL_SECONDS": "nan"}, "expected a finite number"),
    # A numeric NTONIX_PORT is checked as before; only a service address is let pass.
    ({"NTONIX_PORT": "8080x", "NTONIX_SERVICE_HOST": "10.0.0.1"},
     'server.port = "8080x" (environment NTONIX_PORT): expected an integer'),
])
def test_env_validation(env, expected):
    lines = problems(env=env)
    assert any(expected in line for line in lines), lines


# Exactly what Kubernetes puts into every pod of the namespace for a Service
# named ntonix with one port, 8080, named http.
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


def test_kubernetes_service_variables_are_warnings_not_errors():
    cfg = c.load({}, K8S_ENV)
    assert cfg.server.port == 8080 and cfg.source_of("server.port") == "default"
    assert cfg == c.load({}, {})  # nothing of them was taken as a setting
    warned = {}
    for line in cfg.warnings:
        assert "\n" not in line and len(line) < 200, line
        name = next(n for n in K8S_ENV if f"environment {n})" in line or f"{n} (environment)" in line)
        assert name not in warned, line
        warned[name] = line
    assert set(warned) == set(K8S_ENV) and len(cfg.warnings) == len(K8S_ENV)
    assert warned["NTONIX_PORT"] == (
        'server.port = "tcp://10.0.0.1:8080" (environment NTONIX_PORT): a service address, '
        "not a port, ignored (as Kubernetes sets for a Service named ntonix)")
    assert warned["NTONIX_SERVICE_HOST"] == (
        "NTONIX_SERVICE_HOST (environment): not a setting, ignored "
        "(as Kubernetes sets for a Service named ntonix)")
    # The values of variables that are not settings are not repeated.
    assert not any("10.0.0.1" in warned[n] for n in K8S_ENV if n != "NTONIX_PORT")


def test_kubernetes_variables_leave_every_port_source_working(tmp_path):
    path = write(tmp_path, {"server": {"port": 1001}})
    assert c.load({}, K8S_ENV, path).server.port == 1001
    assert c.load(cli(server__port="1003"), K8S_ENV, path).server.port == 1003
    assert c.load({}, {**K8S_ENV, "NTONIX_SERVER_PORT": "1002"}, path).server.port == 1002
    # A numeric NTONIX_PORT, as today (the same name cannot hold both).
    cfg = c.load({}, {**K8S_ENV, "NTONIX_PORT": "1004"}, path)
    assert cfg.server.port == 1004 and cfg.source_of("server.port") == "environment NTONIX_PORT"
    assert len(cfg.warnings) == len(K8S_ENV) - 1


def test_service_address_in_other_port_variables_is_ignored():
    cfg = c.load({}, {"NTONIX_SSL_PORT": "tcp://10.0.0.2:8443",
                      "NTONIX_ADMIN_PORT": "tcp://10.0.0.3:2222",
                      "NTONIX_ADMIN_SERVICE_HOST": "10.0.0.3"})
    assert (cfg.server.ssl_port, cfg.admin.port) == (8443, 2222)
    assert sorted(cfg.warnings) == [
        "NTONIX_ADMIN_SERVICE_HOST (environment): not a setting, ignored "
        "(as Kubernetes sets for a Service named ntonix-admin)",
        'admin.port = "tcp://10.0.0.3:2222" (environment NTONIX_ADMIN_PORT): a service address, '
        "not a port, ignored (as Kubernetes sets for a Service named ntonix-admin)",
        'server.ssl_port = "tcp://10.0.0.2:8443" (environment NTONIX_SSL_PORT): a service '
        "address, not a port, ignored (as Kubernetes sets for a Service named ntonix-ssl)",
    ]


def test_unknown_env_variable_is_a_warning_naming_it():
    cfg = c.load({}, {"NTONIX_PORTT": "1", "NTONIX_API_KEY": "sk-secret"})
    assert cfg.server.port == 8080
    assert cfg.warnings == (
        "NTONIX_API_KEY (environment): unknown setting, ignored; see `twistd ntonix --help`",
        "NTONIX_PORTT (environment): unknown setting, ignored; see `twistd ntonix --help`",
    )
    # A known setting with a bad value is still an error, warnings or not.
    assert problems(env={"NTONIX_PORTT": "1", "NTONIX_PROXY_RETRIES": "x"}) == [
        'proxy.retries = "x" (environment NTONIX_PROXY_RETRIES): expected an integer']


def test_cli_validation_names_the_flag():
    lines = problems(layer={"server.port": Raw("0x", "--port", True)})
    assert lines == ['server.port = "0x" (--port): expected an integer']


@pytest.mark.parametrize("content,expected", [
    (None, "cannot be read"),
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object at the top"),
])
def test_unreadable_or_malformed_file(tmp_path, content, expected):
    path = str(tmp_path / "missing.json") if content is None else write(tmp_path, content)
    lines = problems(path=path)
    assert lines[0].startswith(f"config file {path}: {expected}")


def test_shipped_config_files_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "config"
    cfg = c.load({}, {}, str(root / "ntonix.json"))
    assert cfg.backends
    # The containers' admin listener is off loopback: the compose files set
    # its token from the environment, and without one it does not start.
    docker = str(root / "docker-ntonix.json")
    cfg = c.load({}, {"NTONIX_ADMIN_TOKEN": "t"}, docker)
    assert cfg.backends and cfg.admin.token == "t"
    with pytest.raises(c.ConfigError) as e:
        c.load({}, {}, docker)
    assert "admin.token" in e.value.lines[0]


@pytest.mark.parametrize("value, expected", [(2, "2"), ("2", "2"), ("auto", "auto"),
                                             (" AUTO ", " AUTO ")])
def test_workers_takes_a_json_number_a_numeric_string_or_auto(tmp_path, value, expected):
    path = write(tmp_path, {"server": {"workers": value}})
    cfg = c.load({}, {}, str(path))
    assert cfg.server.workers == expected
