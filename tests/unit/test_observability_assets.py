"""The Prometheus and Grafana assets in docker/observability/, checked against
the gateway they watch.

The alert rules and the Prometheus configuration go through promtool (rule
syntax, the rules' own unit tests, config validity); every PromQL expression
in the dashboard and the rules may name only metrics (and labels) the
gateway's registry exports, read from an in-process gateway; the exposition
itself passes ``promtool check metrics``; and the compose file, Grafana
provisioning and Prometheus scrape target agree with each other and with the
gateway's docker configuration.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest
import yaml
from prometheus_client import Counter
from twisted.internet.task import Clock

from ntonix.config import AdminConfig, BackendConfig, Config
from ntonix.gateway import Gateway
from ntonix.observe.metrics import LocalHistogram

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
OBS = DOCKER / "observability"
DASHBOARD = OBS / "ntonix-dashboard.json"
ALERTS = OBS / "alerts.yml"
ALERTS_TEST = OBS / "alerts_test.yml"
PROMETHEUS = OBS / "prometheus.yml"
COMPOSE = OBS / "docker-compose.yml"
PROVISIONING = OBS / "grafana" / "provisioning"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool (from the Prometheus distribution) is not on PATH")

# Labels Prometheus attaches to every scraped series; `up` is the series it
# makes for each target.
TARGET_LABELS = {"job", "instance"}
PROMETHEUS_MADE = {"up": TARGET_LABELS}

# Panels the dashboard must have (titles), one per thing an operator watches.
REQUIRED_PANELS = [
    "Requests/s by route and status",
    "Error ratio",
    "Time to first token (p50 / p90 / p99)",
    "Inter-token latency (p50 / p99)",
    "Request duration by model (p50 / p99)",
    "Tokens/s by model",
    "Cache hit rate",
    "Cache tokens saved/s",
    "Circuit state per backend",
    "Backend requests in flight",
    "Admission queue length",
    "Admission queue wait p99",
    "Admission refusals/s by reason",
    "Gateway overhead (p50 / p99)",
    "Backend metric scrape failures/s",
]
REQUIRED_ALERTS = {"NtonixBackendDown", "NtonixHighErrorRatio", "NtonixSlowTimeToFirstToken",
                   "NtonixCacheHitRateCollapse", "NtonixAdmissionRefusing"}

# PromQL functions and aggregation operators, and the other bare words an
# expression may hold; any other identifier is a metric name.
PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil",
    "changes", "clamp", "clamp_max", "clamp_min", "count", "count_over_time",
    "count_values", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta",
    "deriv", "exp", "floor", "group", "histogram_quantile", "holt_winters", "hour", "idelta",
    "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10",
    "log2", "max", "max_over_time", "min", "min_over_time", "minute", "month",
    "predict_linear", "present_over_time", "quantile", "quantile_over_time", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev",
    "stddev_over_time", "stdvar", "stdvar_over_time", "sum", "sum_over_time", "time",
    "timestamp", "topk", "vector", "year",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on",
                   "ignoring", "group_left", "group_right", "inf", "nan"}
# Grafana's variables, replaced with something PromQL parses.
GRAFANA_VARIABLES = [(r"\$__rate_interval|\$\{__rate_interval\}", "1m"),
                     (r"\$__interval|\$\{__interval\}", "1m"),
                     (r"\$\{?model\}?", ".*"), (r"\$\{?backend\}?", ".*")]


# -- the gateway's exposition ----------------------------------------------

def _observe_everything(gw: Gateway) -> None:
    """One observation in every labelled family the metrics object owns, so
    the exposition has samples (and label sets) for them too."""
    m = gw.metrics
    for value in vars(m).values():
        if isinstance(value, LocalHistogram):
            value.labels(*["x"] * len(value.labelnames)).observe(0.3)
        elif isinstance(value, Counter):
            labelnames = value._labelnames
            (value.labels(*["x"] * len(labelnames)) if labelnames else value).inc()
    m.tokens_saved("model-x", (10, 5))


class Exported:
    """What the gateway's registry serves: names on the wire, labels of each."""

    def __init__(self) -> None:
        gw = Gateway(Config(backends=(BackendConfig("127.0.0.1", 9),)), Clock())
        self.empty_text = gw.metrics.prometheus(b"text/plain")[0].decode()
        _observe_everything(gw)
        self.text = gw.metrics.prometheus(b"text/plain")[0].decode()
        self.types: Dict[str, str] = dict(
            re.findall(r"^# TYPE (\S+) (\S+)$", self.text, re.M))
        self.names: Dict[str, Set[str]] = {}
        for family in gw.metrics.registry.collect():
            labels = set(getattr(family, "_labelnames", ()))
            for sample in family.samples:
                labels |= set(sample.labels) - {"le"}
            names = {family.name}
            if family.type == "counter":
                names |= {family.name + "_total", family.name + "_created"}
            elif family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
            for name in names:
                self.names.setdefault(name, set()).update(labels)
        for name in list(self.names):
            if name.endswith("_bucket"):
                self.names[name] = self.names[name] | {"le"}

    def wire_names(self) -> Set[str]:
        """Series names as they are scraped: TYPE names plus the histogram
        suffixes (and _total for a counter whose TYPE line lacks it)."""
        out = set()
        for name, kind in self.types.items():
            out.add(name)
            if kind == "histogram":
                out |= {name + "_bucket", name + "_sum", name + "_count"}
            elif kind == "counter" and not name.endswith("_total"):
                out.add(name + "_total")
        return out


@pytest.fixture(scope="module")
def exported() -> Exported:
    return Exported()


# -- PromQL parsing ------------------------------------------------------------

def grafana_to_promql(expr: str) -> str:
    for pattern, value in GRAFANA_VARIABLES:
        expr = re.sub(pattern, value, expr)
    return expr


def metric_names(expr: str) -> Set[str]:
    """The metric names an expression selects (not functions, keywords,
    label names or values, durations or numbers)."""
    s = grafana_to_promql(expr)
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', s)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", s)
    s = re.sub(r"(?<![\w:])\d+(\.\d+)?([eE][+-]?\d+)?", " ", s)
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        word = m.group()
        if word.lower() in PROMQL_KEYWORDS:
            continue
        if re.match(r"\s*\(", s[m.end():]):
            assert word in PROMQL_FUNCTIONS, f"unknown PromQL function {word!r} in {expr!r}"
        else:
            names.add(word)
    return names


def selector_labels(expr: str) -> Iterator[Tuple[str, str]]:
    """(metric, label) for every label matcher written in a selector."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', grafana_to_promql(expr))
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", s):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)):
            yield m.group(1), label


def grouping_labels(expr: str) -> Set[str]:
    out = set()
    for m in re.finditer(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)",
                         expr):
        out |= {x.strip() for x in m.group(1).split(",") if x.strip()}
    return out


def check_expression(expr: str, exported: Exported, where: str) -> Set[str]:
    """Assert ``expr`` names only exported metrics and their labels; return
    the labels its result may carry."""
    wire = exported.wire_names()
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    for name in names:
        assert name in wire or name in PROMETHEUS_MADE, \
            f"{where}: {name!r} is not a metric the gateway exports ({expr!r})"
    available = set(TARGET_LABELS)
    for name in names:
        available |= exported.names.get(name, PROMETHEUS_MADE.get(name, set()))
    for name, label in selector_labels(expr):
        known = exported.names.get(name, PROMETHEUS_MADE.get(name, set())) | TARGET_LABELS
        assert label in known, f"{where}: {name} has no label {label!r} ({expr!r})"
    for label in grouping_labels(expr):
        assert label in available, f"{where}: no metric in {expr!r} has label {label!r}"
    return available


# -- the files -----------------------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: List[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def alert_rules() -> List[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def promtool(*args: str, stdin: str = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


# -- the gateway's exposition ----------------------------------------------------

def test_every_family_is_announced_before_any_traffic(exported):
    """The dashboard and rules may name any family: all of them are in the
    exposition of a gateway that has answered nothing yet."""
    before = set(re.findall(r"^# TYPE (\S+) ", exported.empty_text, re.M))
    after = set(exported.types)
    # prometheus-client adds a *_created gauge beside each counter child.
    assert {n for n in after - before if not n.endswith("_created")} == set()


@needs_promtool
def test_promtool_finds_nothing_wrong_with_the_exposition(exported):
    # Exit 1 is a parse error, 3 a lint problem (naming, units, suffixes).
    # None is acceptable: the exposition is clean today, keep it so.
    for text in (exported.empty_text, exported.text):
        result = promtool("check", "metrics", stdin=text)
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
            result.stdout + result.stderr


# -- the alert rules --------------------------------------------------------------

@needs_promtool
def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_the_alert_rules_unit_tests_pass():
    """alerts_test.yml: each alert fires on its failure and not on a near miss."""
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_are_complete_and_tested():
    doc = yaml.safe_load(ALERTS.read_text())
    assert [g["name"] for g in doc["groups"]] == ["ntonix"]
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert REQUIRED_ALERTS <= names
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
    # Every alert has a unit test in which it fires.
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    fired = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]
             if case["exp_alerts"]}
    assert names <= fired, names - fired


def test_alert_rules_name_only_exported_metrics_and_labels(exported):
    for rule in alert_rules():
        available = check_expression(rule["expr"], exported, rule["alert"])
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in available, (rule["alert"], label)


# -- the dashboard -------------------------------------------------------------------

def test_dashboard_has_the_panels_each_with_a_query():
    d = dashboard()
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "backend"):
        assert variables[name]["type"] == "query"
        assert variables[name]["definition"].startswith("label_values(")
    panels = [p for p in all_panels(d["panels"]) if p["type"] != "row"]
    titles = [p["title"] for p in panels]
    missing = [t for t in REQUIRED_PANELS if t not in titles]
    assert not missing, missing
    assert len(set(titles)) == len(titles)
    ids = [p["id"] for p in all_panels(d["panels"])]
    assert len(set(ids)) == len(ids)
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        exprs = [t.get("expr", "") for t in p.get("targets", [])]
        assert exprs and all(e.strip() for e in exprs), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


def test_dashboard_panels_do_not_overlap():
    cells: Dict[Tuple[int, int], str] = {}
    for p in all_panels(dashboard()["panels"]):
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[(x, y)] = p["title"]


def test_dashboard_names_only_exported_metrics_and_labels(exported):
    d = dashboard()
    for p in all_panels(d["panels"]):
        for t in p.get("targets", []):
            available = check_expression(t["expr"], exported, p["title"])
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
                assert label in available, (p["title"], label)
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", v["definition"])
            assert m, v["definition"]
            assert m.group(1) in exported.wire_names(), v["definition"]
            assert m.group(2) in exported.names[m.group(1)], v["definition"]
            assert v["query"]["query"] == v["definition"]


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """Each query, Grafana variables filled in, parsed by promtool as a
    recording rule."""
    exprs = [grafana_to_promql(t["expr"]) for p in all_panels(dashboard()["panels"])
             for t in p.get("targets", [])]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_name_extraction():
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, backend) (rate(x_bucket{backend=~"$backend", '
        'le!="1e3"}[$__rate_interval] offset 1d))) > 2 and on (job) up == 0 '
        'or vector(1e-3) unless sum without (instance) (y_total)') == {"x_bucket", "up",
                                                                        "y_total"}
    assert grouping_labels("sum by (le, backend) (x) / on(job) group_left(a) y") == \
        {"le", "backend", "job", "a"}
    assert list(selector_labels('x{a="}", b=~"$model"} + y')) == [("x", "a"), ("x", "b")]


# -- Prometheus, Grafana and compose ---------------------------------------------------

def gateway_config() -> Tuple[dict, dict]:
    """The base compose file's gateway service, and the JSON config it mounts."""
    base = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    gw = base["services"]["gateway"]
    mounted = gw["volumes"][0].split(":")
    assert mounted[1] in gw["command"]
    return gw, json.loads((DOCKER / mounted[0]).read_text())


@needs_promtool
def test_promtool_accepts_the_prometheus_config():
    result = promtool("check", "config", str(PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_gateways_admin_listener():
    doc = yaml.safe_load(PROMETHEUS.read_text())
    assert doc["rule_files"] == [ALERTS.name]
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    job = jobs["ntonix"]  # the alert rules select job="ntonix"
    assert job["metrics_path"] == "/metrics/prometheus"
    assert job["scrape_interval"] == "5s"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    _, config = gateway_config()
    admin = config.get("admin", {})
    port = admin.get("http_port", AdminConfig().http_port)
    assert admin.get("http_bind") == "0.0.0.0"  # reachable from the prometheus container
    assert targets == [f"gateway:{port}", f"gateway-b:{port}"]  # both compose replicas
    assert "job=\"ntonix\"" in ALERTS.read_text()


def test_compose_adds_prometheus_and_grafana_to_the_demo():
    doc = yaml.safe_load(COMPOSE.read_text())
    base_path = (COMPOSE.parent / doc["include"][0]).resolve()
    assert base_path == (DOCKER / "docker-compose.yml").resolve()
    base = yaml.safe_load(base_path.read_text())
    assert doc["name"] == base["name"]  # one project whichever file starts it
    services = doc["services"]
    assert set(services) == {"prometheus", "grafana"}
    assert not set(services) & set(base["services"])
    everything = {**base["services"], **services}
    for name, svc in services.items():
        image, _, tag = svc["image"].partition(":")
        assert tag and tag != "latest", svc["image"]
        assert "healthcheck" in svc, name
        for dep, rule in svc.get("depends_on", {}).items():
            assert dep in everything, dep
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in everything[dep], dep
        for volume in svc.get("volumes", []):
            assert (COMPOSE.parent / volume.split(":")[0]).exists(), volume

    prom = services["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prom["volumes"])
    assert mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    # rule_files are relative to the configuration file.
    assert mounts["./alerts.yml"] == "/etc/prometheus/" + ALERTS.name
    assert "9090:9090" in prom["ports"]
    assert prom["depends_on"]["gateway"]["condition"] == "service_healthy"

    graf = services["grafana"]
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert "3000:3000" in graf["ports"]
    mounts = dict(v.split(":")[:2] for v in graf["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dash_target = mounts["./" + DASHBOARD.name]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dash_target

    # The provisioned dashboard folder is where the dashboard is mounted.
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "ntonix.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == str(Path(dash_target).parent)
    # The data source is the compose Prometheus, with the uid the dashboard uses.
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    [source] = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == source["uid"]
    scrape = yaml.safe_load(PROMETHEUS.read_text())["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape


def test_readme_describes_every_panel_and_alert():
    text = (OBS / "README.md").read_text()
    for p in all_panels(dashboard()["panels"]):
        if p["type"] != "row":
            assert p["title"] in text, p["title"]
    for rule in alert_rules():
        assert rule["alert"] in text, rule["alert"]
