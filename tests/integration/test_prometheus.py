"""A real Prometheus scrapes a running gateway: the series come back through
Prometheus's HTTP API (tokens/s by model among them), the shipped alerting
rules load in it, and promtool accepts a live scrape.

Prometheus and promtool are Debian's `prometheus` package, which
`.ci/install-services` installs; where it cannot be installed these tests
are skipped and say so."""

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlencode

import pytest
import pytest_twisted
import treq
from twisted.internet import protocol, reactor

from harness import JSON, Mock, free_port, http_client, sleep, within

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docker" / "observability" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="Debian's prometheus package is not installed here (.ci/install-services "
           "installs it where it can: as root or with sudo)")


class Output(protocol.ProcessProtocol):
    def __init__(self):
        self.text = b""
        self.ended = None

    def outReceived(self, data):
        self.text += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended = reason


async def query(base, promql):
    r = await within(http_client().get(f"{base}/api/v1/query?{urlencode({'query': promql})}"),
                     5)
    doc = await within(treq.json_content(r), 5)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


@needs_prometheus
@pytest_twisted.ensureDeferred
async def test_prometheus_scrapes_the_gateway_and_reads_tokens_by_model(gateway_factory):
    # Each backend serves one model (its /v1/models says so): the gateway
    # routes each model to its own.
    a, b = Mock("a", model="llama-a"), Mock("b", model="qwen-b")
    gw = await gateway_factory("--port", "0", "--backend", a.address, "--backend", b.address,
                               "--set", "health.interval_seconds=0.5")
    workdir = Path(tempfile.mkdtemp(prefix="ntonix-prom-"))
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(RULES)],
              "scrape_configs": [{"job_name": "ntonix", "metrics_path": "/metrics/prometheus",
                                  "static_configs": [{"targets": [
                                      f"127.0.0.1:{gw.admin_port}"]}]}]}
    (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    proc = Output()
    argv = [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn"]
    transport = reactor.spawnProcess(proc, argv[0], argv, env={"PATH": "/usr/bin:/bin"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):  # ready within 15 s
            try:
                r = await within(http_client().get(base + "/-/ready"), 1)
                await treq.content(r)
                if r.code == 200:
                    break
            except Exception:
                pass
            assert proc.ended is None, proc.text.decode(errors="replace")
            await sleep(0.1)
        else:
            raise AssertionError("prometheus never became ready: " + proc.text.decode())

        # Its first scrape (target discovery settles a few seconds after start).
        for _ in range(200):
            up = await query(base, 'up{job="ntonix"}')
            if up and up[0]["value"][1] == "1":
                break
            await sleep(0.1)
        else:
            raise AssertionError("prometheus never scraped the gateway")

        # Traffic: two models, streamed and not.
        sent_completion = 0
        for i in range(24):
            model = "llama-a" if i % 3 else "qwen-b"
            doc = {"model": model, "temperature": 0, "max_tokens": 5 + i % 4,
                   "stream": i % 2 == 0,
                   "messages": [{"role": "user", "content": f"question number {i}"}]}
            r = await within(http_client().post(gw.url + "/v1/chat/completions",
                                                data=json.dumps(doc).encode(), headers=JSON), 10)
            await treq.content(r)
            assert r.code == 200
            sent_completion += doc["max_tokens"]
            await sleep(0.15)  # over several scrapes, so that rate() sees the counts rise

        # Prometheus has the gateway's counts once a scrape after the traffic
        # is in (bounded: 20 s).
        for _ in range(200):
            got = await query(base, 'sum(ntonix_tokens_total{type="completion"})')
            if got and float(got[0]["value"][1]) == sent_completion:
                break
            await sleep(0.1)
        else:
            raise AssertionError(f"prometheus never saw {sent_completion} tokens: {got}")
        await sleep(2.5)  # a few more samples, for rate()
        rates = await query(base, 'sum by (model) (rate(ntonix_tokens_total[1m]))')
        by_model = {r["metric"]["model"]: float(r["value"][1]) for r in rates}
        print("PromQL sum by (model) (rate(ntonix_tokens_total[1m])) ->",
              json.dumps(rates))
        assert set(by_model) == {"llama-a", "qwen-b"} and all(v > 0 for v in by_model.values())
        assert a.count() == 16 and b.count() == 8  # each model only where it is served
        ttft = await query(base, "histogram_quantile(0.99, sum by (le) (rate("
                                 "gen_ai_server_time_to_first_token_seconds_bucket[1m])))")
        assert ttft and float(ttft[0]["value"][1]) > 0
        # The shipped rules are loaded and evaluated, and none fires here.
        r = await within(http_client().get(base + "/api/v1/rules"), 5)
        groups = (await treq.json_content(r))["data"]["groups"]
        rules = [rule for g in groups for rule in g["rules"]]
        assert rules and all(rule["health"] == "ok" for rule in rules), rules
        assert not [rule for rule in rules if rule["state"] == "firing"]
    finally:
        transport.signalProcess("TERM")
        for _ in range(100):
            if proc.ended is not None:
                break
            await sleep(0.1)
        shutil.rmtree(workdir, ignore_errors=True)
        await a.stop()
        await b.stop()


@needs_prometheus
@pytest_twisted.ensureDeferred
async def test_promtool_accepts_a_live_scrape_and_the_shipped_rules(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    for stream in (False, True):
        doc = {"model": "m", "temperature": 0, "stream": stream,
               "messages": [{"role": "user", "content": "hi"}]}
        r = await http_client().post(gw.url + "/v1/chat/completions",
                                     data=json.dumps(doc).encode(), headers=JSON)
        await treq.content(r)
    r = await within(http_client().get(gw.admin_url + "/metrics/prometheus"), 5)
    text = await treq.content(r)
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                          timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
