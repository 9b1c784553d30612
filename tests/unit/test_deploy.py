"""The deployment files in deploy/ agree with each other and with the gateway.

Kubernetes manifests (deploy/kubernetes/*.yaml) are parsed, the ConfigMap's
JSON is loaded through the gateway's own configuration loader (a misspelt key
fails), and the probes, ports, selectors and shutdown arithmetic are checked
against it. The systemd unit's stop timeout is checked against the example
configuration it is documented with (deploy/systemd/ntonix.json, installed as
the file its ExecStart names). Each check is also run once on a broken copy,
so that it is known to fail when it should. No network, no cluster.
"""

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import yaml

from ntonix.config import Config, ConfigError, load

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
UNIT = ROOT / "deploy" / "systemd" / "ntonix.service"
KINDS = ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget")


# --- reading ---------------------------------------------------------------

def read_manifests() -> List[Dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append(doc)
    return docs


def one(docs: List[Dict[str, Any]], kind: str) -> Dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment: Dict[str, Any]) -> Dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "expected one container in the gateway pod"
    return containers[0]


def load_config_text(text: str, tmp_path: Path, name: str = "ntonix.json") -> Config:
    """The gateway's own loader, with an empty environment: a misspelt key,
    a bad value or invalid JSON raises ConfigError."""
    path = tmp_path / name
    path.write_text(text)
    return load({}, {}, str(path))


def config_arg(argv: List[str]) -> str:
    """The --config value of a twistd ntonix command line."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no --config in {argv}")


def resolve_port(ctr: Dict[str, Any], port: Any) -> int:
    """A probe's or Service's port (a name or a number) as the container
    port it refers to; it must be one the container declares."""
    ports = ctr.get("ports", [])
    if isinstance(port, str) and not port.isdigit():
        named = [p["containerPort"] for p in ports if p.get("name") == port]
        assert named, f"port name {port!r} is not a container port"
        return named[0]
    number = int(port)
    assert number in [p["containerPort"] for p in ports], \
        f"port {number} is not a container port"
    return number


def prestop_seconds(ctr: Dict[str, Any]) -> float:
    """How long the preStop hook takes, if any (0 without one). Only a
    sleep has a known length; any other hook fails the check."""
    hook = ctr.get("lifecycle", {}).get("preStop")
    if not hook:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    words = shlex.split(command[-1]) if command[:2] in (["sh", "-c"], ["/bin/sh", "-c"]) \
        else list(command)
    if words and words[0].rsplit("/", 1)[-1] == "sleep" and len(words) == 2:
        return float(words[1])
    raise AssertionError(f"preStop hook of unknown length: {hook}")


def labels_match(selector: Dict[str, Any], labels: Dict[str, str]) -> bool:
    assert not selector.get("matchExpressions"), "only matchLabels selectors are checked"
    wanted = selector.get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


# --- the checks ------------------------------------------------------------

def configmap_config(docs: List[Dict[str, Any]], tmp_path: Path) -> Config:
    """The Deployment's --config file, as the ConfigMap mounted there holds
    it, loaded by the gateway's loader."""
    dep, cm = one(docs, "Deployment"), one(docs, "ConfigMap")
    ctr = container(dep)
    path = config_arg(ctr.get("command", []) + ctr.get("args", []))
    directory, key = path.rsplit("/", 1)
    mounts = [m for m in ctr.get("volumeMounts", []) if m["mountPath"] == directory]
    assert mounts, f"nothing is mounted at {directory}, where --config {path} is read"
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    source = volumes[mounts[0]["name"]].get("configMap", {})
    assert source.get("name") == cm["metadata"]["name"], \
        f"{directory} is not the ConfigMap {cm['metadata']['name']}"
    assert key in cm["data"], f"the ConfigMap has no key {key!r}"
    json.loads(cm["data"][key])  # a JSON syntax error shows here first
    return load_config_text(cm["data"][key], tmp_path)


def check_kinds(docs: List[Dict[str, Any]]) -> None:
    kinds = [d.get("kind") for d in docs]
    for kind in KINDS:
        assert kind in kinds, f"no {kind} in deploy/kubernetes"
    for d in docs:
        assert d.get("apiVersion") and d.get("metadata", {}).get("name"), \
            f"{d.get('kind')} lacks apiVersion or metadata.name"


def check_probes(docs: List[Dict[str, Any]], cfg: Config) -> None:
    ctr = container(one(docs, "Deployment"))
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        assert probe in ctr, f"no {probe}"
        get = ctr[probe].get("httpGet")
        assert get, f"{probe} is not an httpGet probe"
        assert get.get("path") == path, f"{probe} path is {get.get('path')}, not {path}"
        assert get.get("scheme", "HTTP") == "HTTP", f"{probe} is not on plain HTTP"
        port = resolve_port(ctr, get["port"])
        assert port == cfg.server.port, \
            f"{probe} port {port} is not server.port {cfg.server.port}"


def check_service(docs: List[Dict[str, Any]], cfg: Config) -> None:
    dep, svc = one(docs, "Deployment"), one(docs, "Service")
    ctr = container(dep)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels_match({"matchLabels": svc["spec"]["selector"]}, pod_labels), \
        "the Service selector does not match the pod labels"
    targets = [resolve_port(ctr, p.get("targetPort", p["port"])) for p in svc["spec"]["ports"]]
    assert cfg.server.port in targets, \
        f"the Service targets {targets}, not server.port {cfg.server.port}"
    # Documented advice, not a requirement of the gateway (it tolerates them):
    # no NTONIX_* service variables in the pod.
    assert (svc["metadata"]["name"] != "ntonix"
            or dep["spec"]["template"]["spec"].get("enableServiceLinks") is False), \
        "a Service named ntonix puts NTONIX_* variables into every pod"


def check_selectors(docs: List[Dict[str, Any]]) -> None:
    dep, pdb = one(docs, "Deployment"), one(docs, "PodDisruptionBudget")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels_match(dep["spec"]["selector"], pod_labels), \
        "the Deployment selector does not match its pod labels"
    assert labels_match(pdb["spec"]["selector"], pod_labels), \
        "the PodDisruptionBudget selector does not match the pod labels"
    replicas = dep["spec"].get("replicas", 1)
    if "minAvailable" in pdb["spec"]:
        assert int(pdb["spec"]["minAvailable"]) < replicas, \
            "minAvailable >= replicas: no pod could ever be evicted (node drains block)"
    else:
        assert int(pdb["spec"]["maxUnavailable"]) >= 1


def check_shutdown(docs: List[Dict[str, Any]], cfg: Config) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    ctr = container(one(docs, "Deployment"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre = prestop_seconds(ctr)
    drain, timeout = cfg.server.drain_delay_seconds, cfg.server.shutdown_timeout_seconds
    assert grace > pre + drain + timeout, (
        f"terminationGracePeriodSeconds {grace} does not cover preStop {pre:g} + "
        f"drain_delay_seconds {drain:g} + shutdown_timeout_seconds {timeout:g}")
    ready = ctr["readinessProbe"]
    noticed = ready.get("periodSeconds", 10) * ready.get("failureThreshold", 3)
    assert pre + drain > noticed, (
        f"preStop {pre:g} + drain_delay_seconds {drain:g} is not more than the "
        f"readiness probe's periodSeconds x failureThreshold ({noticed})")


def check_manifests(docs: List[Dict[str, Any]], tmp_path: Path) -> None:
    check_kinds(docs)
    cfg = configmap_config(docs, tmp_path)
    check_probes(docs, cfg)
    check_service(docs, cfg)
    check_selectors(docs)
    check_shutdown(docs, cfg)


def parse_unit(text: str) -> Dict[str, Dict[str, List[str]]]:
    sections: Dict[str, Dict[str, List[str]]] = {}
    current: Optional[Dict[str, List[str]]] = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{line!r} outside a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_seconds(value: str) -> float:
    """A systemd time span such as ``45``, ``45s`` or ``1min 30s``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def check_unit(unit_text: str, config_text: str, tmp_path: Path) -> None:
    service = parse_unit(unit_text)["Service"]
    argv = shlex.split(service["ExecStart"][-1])
    assert argv[0].endswith("/twistd") and "-n" in argv and "ntonix" in argv, argv
    assert Path(config_arg(argv)).name == "ntonix.json", \
        "the unit reads another file than the documented ntonix.json"
    cfg = load_config_text(config_text, tmp_path)
    stop = unit_seconds(service["TimeoutStopSec"][-1])
    drain, timeout = cfg.server.drain_delay_seconds, cfg.server.shutdown_timeout_seconds
    assert stop > drain + timeout, (
        f"TimeoutStopSec {stop:g} does not cover drain_delay_seconds {drain:g} + "
        f"shutdown_timeout_seconds {timeout:g}")
    assert service.get("KillSignal", ["SIGTERM"])[-1] in ("SIGTERM", "TERM", "15")
    assert service["Restart"][-1] == "on-failure"
    assert "-HUP" in service["ExecReload"][-1] and "$MAINPID" in service["ExecReload"][-1]
    assert service.get("User", ["root"])[-1] not in ("root", "0"), "runs as root"


# --- the real files pass ---------------------------------------------------

def test_manifests_parse_and_have_every_kind():
    check_kinds(read_manifests())


def test_configmap_loads_through_the_gateway_loader(tmp_path):
    cfg = configmap_config(read_manifests(), tmp_path)
    assert cfg.server.drain_delay_seconds > 0, "no drain delay for Kubernetes"
    assert cfg.backends, "no backends in the ConfigMap"
    assert cfg.warnings == ()


def test_probes_use_the_health_endpoints_on_server_port(tmp_path):
    docs = read_manifests()
    check_probes(docs, configmap_config(docs, tmp_path))


def test_service_targets_server_port(tmp_path):
    docs = read_manifests()
    check_service(docs, configmap_config(docs, tmp_path))


def test_deployment_and_pdb_selectors_match_the_pods():
    check_selectors(read_manifests())


def test_grace_period_covers_drain_and_shutdown(tmp_path):
    docs = read_manifests()
    check_shutdown(docs, configmap_config(docs, tmp_path))


def test_systemd_unit_stop_timeout_covers_drain_and_shutdown(tmp_path):
    check_unit(UNIT.read_text(), (UNIT.parent / "ntonix.json").read_text(), tmp_path)


def test_configmap_starts_beside_a_service_named_ntonix(tmp_path):
    """What Kubernetes injects for a Service named ``ntonix`` does not stop
    the gateway: the file's port stays, each variable is one warning."""
    cm = one(read_manifests(), "ConfigMap")
    (tmp_path / "ntonix.json").write_text(cm["data"]["ntonix.json"])
    environ = {
        "NTONIX_SERVICE_HOST": "10.96.0.10",
        "NTONIX_SERVICE_PORT": "8080",
        "NTONIX_SERVICE_PORT_HTTP": "8080",
        "NTONIX_PORT": "tcp://10.96.0.10:8080",
        "NTONIX_PORT_8080_TCP": "tcp://10.96.0.10:8080",
        "NTONIX_PORT_8080_TCP_PROTO": "tcp",
        "NTONIX_PORT_8080_TCP_PORT": "8080",
        "NTONIX_PORT_8080_TCP_ADDR": "10.96.0.10",
    }
    cfg = load({}, environ, str(tmp_path / "ntonix.json"))
    assert cfg.server.port == json.loads(cm["data"]["ntonix.json"])["server"]["port"]
    assert len(cfg.warnings) == len(environ)


# --- and each check fails on a broken copy ---------------------------------

def _container(docs):
    return container(one(docs, "Deployment"))


def _edit_config(docs, edit):
    cm = one(docs, "ConfigMap")
    doc = json.loads(cm["data"]["ntonix.json"])
    edit(doc)
    cm["data"]["ntonix.json"] = json.dumps(doc)


BREAKAGES = {
    "no PodDisruptionBudget": (
        lambda docs: docs.remove(one(docs, "PodDisruptionBudget")), "no PodDisruptionBudget"),
    "misspelt config key": (
        lambda docs: _edit_config(docs, lambda c: c["server"].update(drain_delay_second=5)),
        "unknown setting"),
    "bad config value": (
        lambda docs: _edit_config(docs, lambda c: c["cache"].update(scope="everyone")),
        "must be one of"),
    "config not mounted where --config points": (
        lambda docs: _container(docs)["volumeMounts"][0].update(mountPath="/etc/other"),
        "nothing is mounted"),
    "liveness on /health": (
        lambda docs: _container(docs)["livenessProbe"]["httpGet"].update(path="/health"),
        "livenessProbe path"),
    "readiness on /livez": (
        lambda docs: _container(docs)["readinessProbe"]["httpGet"].update(path="/livez"),
        "readinessProbe path"),
    "probe on an undeclared port": (
        lambda docs: _container(docs)["readinessProbe"]["httpGet"].update(port=9090),
        "not a container port"),
    "container port is not server.port": (
        lambda docs: _container(docs)["ports"][0].update(containerPort=9000),
        "not server.port"),
    "server.port is not the container port": (
        lambda docs: _edit_config(docs, lambda c: c["server"].update(port=9000)),
        "not server.port"),
    "Service targets another port": (
        lambda docs: one(docs, "Service")["spec"]["ports"][0].update(targetPort="metrics"),
        "not a container port"),
    "Service selects other pods": (
        lambda docs: one(docs, "Service")["spec"]["selector"].update(
            {"app.kubernetes.io/name": "other"}),
        "Service selector"),
    "PDB selects other pods": (
        lambda docs: one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "other"}),
        "PodDisruptionBudget selector"),
    "PDB blocks every eviction": (
        lambda docs: one(docs, "PodDisruptionBudget")["spec"].update(minAvailable=2),
        "minAvailable"),
    "grace period too short": (
        lambda docs: one(docs, "Deployment")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=30),
        "terminationGracePeriodSeconds"),
    "preStop sleep eats the grace period": (
        lambda docs: _container(docs).update(
            lifecycle={"preStop": {"exec": {"command": ["sleep", "15"]}}}),
        "terminationGracePeriodSeconds"),
    "shutdown timeout beyond the grace period": (
        lambda docs: _edit_config(
            docs, lambda c: c["server"].update(shutdown_timeout_seconds=120)),
        "terminationGracePeriodSeconds"),
    "drain delay shorter than readiness detection": (
        lambda docs: _edit_config(docs, lambda c: c["server"].update(drain_delay_seconds=1)),
        "periodSeconds x failureThreshold"),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_each_manifest_check_can_fail(name, tmp_path):
    docs = copy.deepcopy(read_manifests())
    breakage, message = BREAKAGES[name]
    breakage(docs)
    with pytest.raises((AssertionError, ConfigError), match=re.escape(message)):
        check_manifests(docs, tmp_path)


def test_a_preStop_sleep_within_the_grace_period_passes(tmp_path):
    docs = copy.deepcopy(read_manifests())
    _container(docs)["lifecycle"] = {"preStop": {"sleep": {"seconds": 5}}}
    check_manifests(docs, tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda unit, cfg: (unit.replace("TimeoutStopSec=45", "TimeoutStopSec=30"), cfg),
     "TimeoutStopSec"),
    (lambda unit, cfg: (unit, cfg.replace('"shutdown_timeout_seconds": 30',
                                          '"shutdown_timeout_seconds": 60')),
     "TimeoutStopSec"),
    (lambda unit, cfg: (unit, cfg.replace('"drain_delay_seconds"', '"drain_delay"')),
     "unknown setting"),
    (lambda unit, cfg: (unit.replace("User=ntonix", "User=root"), cfg), "runs as root"),
])
def test_unit_check_can_fail(edit, message, tmp_path):
    unit, cfg = edit(UNIT.read_text(), (UNIT.parent / "ntonix.json").read_text())
    with pytest.raises((AssertionError, ConfigError), match=re.escape(message)):
        check_unit(unit, cfg, tmp_path)
