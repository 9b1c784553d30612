"""Inference-aware routing through the real plugin, against simulated vLLM
servers (the mock's inference mode): models and adapters routed only where
they are served, conversations kept on the backend that holds their prefix
until it is much busier than the rest, scraping faults harmless, and the
health paths of the common servers followed without tuning."""

import json
from typing import Any, Callable, Dict

import pytest
import pytest_twisted
import treq

from harness import Sim, http_client, sleep, start_gateway, stop_gateway, within

INFERENCE = ["--set", "balancer.algorithm=inference", "--set", "health.interval_seconds=0.2",
             "--set", "balancer.scrape_interval_seconds=0.1",
             "--set", "balancer.scrape_timeout_seconds=0.3", "--set", "cache.enabled=false"]
SYSTEM = "You are the assistant of a very long system prompt. " * 150  # ~7.5 KB


def backends_arg(*sims: Sim) -> list:
    return [a for s in sims for a in ("--backend", s.address)]


async def backends(client, gw) -> Dict[str, Any]:
    r = await within(client.get(gw.admin_url + "/backends"), 5)
    doc = await within(treq.json_content(r), 5)
    return {b["name"]: b for b in doc["backends"]}


async def wait_backends(client, gw, predicate: Callable[[Dict[str, Any]], bool],
                        timeout: float = 10.0) -> Dict[str, Any]:
    """Poll GET /backends until ``predicate`` holds, at most ``timeout``."""
    waited = 0.0
    while True:
        state = await backends(client, gw)
        if predicate(state):
            return state
        if waited > timeout:
            raise AssertionError(f"/backends never satisfied the condition: {state}")
        await sleep(0.05)
        waited += 0.05


async def chat(client, gw, messages, model="sim-llm", max_tokens=4, stream=False):
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens,
                       "stream": stream}).encode()
    r = await within(client.post(gw.url + "/v1/chat/completions", data=body,
                                 headers={b"Content-Type": [b"application/json"]}), 20)
    content = await within(treq.content(r), 20)
    backend = (r.headers.getRawHeaders(b"x-backend") or [b""])[0].decode()
    return r.code, backend, content


@pytest_twisted.ensureDeferred
async def test_models_and_unknown_model():
    a, b = Sim("a", model="llama-a"), Sim("b", model="llama-b")
    gw = await start_gateway(backends_arg(a, b) + INFERENCE)
    client = http_client()
    try:
        await wait_backends(client, gw, lambda s: all(x["models"] for x in s.values()))
        for i in range(6):
            code, backend, _ = await chat(client, gw, [{"role": "user", "content": f"hi {i}"}],
                                          model="llama-b")
            assert (code, backend) == (200, b.address)
        assert (a.engine.stats.requests, b.engine.stats.requests) == (0, 6)
        code, _, content = await chat(client, gw, [{"role": "user", "content": "x"}],
                                      model="no-such-model")
        err = json.loads(content)["error"]
        assert code == 404 and err["code"] == "model_not_found" and "no-such-model" in \
            err["message"], content
        assert a.engine.stats.requests + b.engine.stats.requests == 6  # nothing sent
        r = await within(client.get(gw.url + "/v1/models"), 5)
        ids = {m["id"] for m in (await treq.json_content(r))["data"]}
        assert {"llama-a", "llama-b"} <= ids
    finally:
        await stop_gateway(gw)
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_lora_request_goes_where_the_adapter_is_loaded():
    a, b = (Sim(n, loras=("sql-lora", "chat-lora"), max_loras=1, lora_load_ms=300.0)
            for n in ("a", "b"))
    gw = await start_gateway(backends_arg(a, b) + INFERENCE)
    client = http_client()
    try:
        # Load the adapter on b, as an earlier user of b would have.
        r = await within(client.post(f"http://{b.address}/v1/chat/completions", data=json.dumps(
            {"model": "sql-lora", "max_tokens": 1,
             "messages": [{"role": "user", "content": "warm"}]}).encode(),
            headers={b"Content-Type": [b"application/json"]}), 10)
        await treq.content(r)
        await wait_backends(client, gw, lambda s: "sql-lora" in
                            ((s[b.address]["scraped"] or {}).get("loras_loaded") or []))
        for i in range(5):
            code, backend, _ = await chat(
                client, gw, [{"role": "user", "content": f"a new question {i} " * 20}],
                model="sql-lora")
            assert (code, backend) == (200, b.address), i
        assert a.engine.stats.lora_loads == 0 and b.engine.stats.lora_loads == 1
    finally:
        await stop_gateway(gw)
        await a.stop()
        await b.stop()


@pytest_twisted.ensureDeferred
async def test_conversation_follows_its_prefix_then_spills_when_holder_is_busy():
    sims = [Sim(n, decode_ms_base=1.0, max_running=64) for n in ("a", "b", "c")]
    by_address = {s.address: s for s in sims}
    gw = await start_gateway(backends_arg(*sims) + INFERENCE)
    client = http_client()
    held = []
    try:
        await wait_backends(client, gw, lambda s: all(x["scraped"] for x in s.values()))
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": "first question"}]
        code, holder, content = await chat(client, gw, messages)
        assert code == 200
        for turn in range(4):
            messages += [{"role": "assistant",
                          "content": json.loads(content)["choices"][0]["message"]["content"]},
                         {"role": "user", "content": f"follow-up {turn}"}]
            code, backend, content = await chat(client, gw, messages)
            assert (code, backend) == (200, holder), f"turn {turn + 2} left its prefix"
        hits = by_address[holder].engine.stats.prefix_hits
        assert hits > 4 * 1500, f"the holder's cache served {hits} tokens"

        # The holder gets busy with other work (60 slow requests): the next
        # turn spills to a backend that is not.
        engine = by_address[holder].engine
        for i in range(60):
            held.append(engine.submit("sim-llm", f"other work {i}".encode(),
                                      lambda r: None, lambda r: None, max_tokens=4000))
        await wait_backends(client, gw, lambda s: (s[holder]["scraped"] or {}).get(
            "running", 0) + (s[holder]["scraped"] or {}).get("waiting", 0) >= 60)
        messages += [{"role": "user", "content": "one more"}]
        code, backend, _ = await chat(client, gw, messages)
        assert code == 200 and backend != holder, "a much busier holder kept its affinity"
    finally:
        for req in held:
            engine.cancel(req)
        await stop_gateway(gw)
        for s in sims:
            await s.stop()


@pytest.mark.parametrize("fault", ["hang", "garbage"])
@pytest_twisted.ensureDeferred
async def test_scrape_faults_change_only_a_log_line_and_a_metric(fault):
    bad, good = Sim("bad"), Sim("good")
    bad.fault.mode = fault
    gw = await start_gateway(backends_arg(bad, good) + INFERENCE)
    client = http_client()
    try:
        state = await wait_backends(client, gw, lambda s: s[bad.address]["scrape_error"]
                                    and s[good.address]["scraped"])
        assert state[good.address]["scrape_error"] is None
        codes = []
        for i in range(12):
            code, _, _ = await chat(client, gw, [{"role": "user", "content": f"q {i} " * 50}])
            codes.append(code)
        assert codes == [200] * 12
        assert bad.engine.stats.requests > 0, "the backend with broken metrics got no traffic"
        state = await backends(client, gw)
        assert state[bad.address]["circuit"] == "closed"
        series = f'ntonix_backend_scrape_failures_total{{backend="{bad.address}"}}'
        for _ in range(100):  # every failed scrape counts (bounded: 5 s)
            r = await within(client.get(gw.admin_url + "/metrics/prometheus"), 5)
            text = (await treq.content(r)).decode()
            line = next(x for x in text.splitlines() if x.startswith(series))
            if float(line.split()[-1]) >= 3:
                break
            await sleep(0.05)
        assert float(line.split()[-1]) >= 3, line
        logged = gw.output.decode().count(f"backend {bad.address} metrics at /metrics unusable")
        assert logged == 1, gw.output.decode()[-3000:]
        if fault == "hang":
            # Each hung scrape was given up (its connection closed) at the
            # timeout, not left to pile up.
            assert len(bad.fault.hung) >= 2
            assert sum(1 for req in bad.fault.hung if not req._disconnected) <= 1
    finally:
        await stop_gateway(gw)
        for req in bad.fault.hung:
            if not req._disconnected:
                req.finish()
        await bad.stop()
        await good.stop()


@pytest_twisted.ensureDeferred
async def test_ollama_and_llamacpp_health_paths_need_no_tuning():
    ollama, llama = Sim("ollama"), Sim("llama")
    ollama.fault.ollama = True
    gw = await start_gateway(backends_arg(ollama, llama) + INFERENCE
                             + ["--set", "health.failure_threshold=1"])
    client = http_client()
    try:
        await wait_backends(client, gw, lambda s: s[ollama.address]["health_path"] == "/")
        await sleep(0.6)  # three more checks on /
        state = await backends(client, gw)
        assert state[ollama.address]["circuit"] == "closed", state[ollama.address]
        assert "checking / instead" in gw.output.decode()

        # llama.cpp answers 503 while it loads a model: no traffic, no failure.
        llama.engine.update({"loading": True})
        state = await wait_backends(client, gw, lambda s: s[llama.address]["state"] == "loading")
        assert state[llama.address]["circuit"] == "closed"
        before = llama.engine.stats.requests
        for i in range(6):
            code, backend, _ = await chat(client, gw, [{"role": "user", "content": f"l {i}"}])
            assert (code, backend) == (200, ollama.address)
        assert llama.engine.stats.requests == before
        llama.engine.update({"loading": False})
        await wait_backends(client, gw, lambda s: s[llama.address]["state"] == "healthy")
        seen = set()
        for i in range(12):
            _, backend, _ = await chat(client, gw, [{"role": "user", "content": f"m {i} " * 30}])
            seen.add(backend)
        assert llama.address in seen
    finally:
        await stop_gateway(gw)
        await ollama.stop()
        await llama.stop()
