"""The inference-mode mock: its model of a vLLM server, on a Clock, exactly."""

import io
import json
from typing import Any, Dict, List, Optional

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from ntonix_mock.__main__ import parse_args, sim_params_from
from ntonix_mock.simulator import (
    InferenceEngine, SimParams, SimRequest, SimulatorResource, UnknownModel, block_hashes,
    make_sim_site, render_prompt)

MS = 0.001


def ms(clock: Clock) -> float:
    return clock.seconds() * 1000.0


class Probe:
    """Callbacks that record when each token and the end came, in ms."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.tokens: List[float] = []
        self.done_at: Optional[float] = None

    def on_token(self, req: SimRequest) -> None:
        self.tokens.append(ms(self.clock))

    def on_done(self, req: SimRequest) -> None:
        self.done_at = ms(self.clock)


def make(**params: Any):
    clock = Clock()
    return InferenceEngine(SimParams(**params), clock), clock


def submit(engine: InferenceEngine, prompt: bytes, model: str = "sim-llm",
           max_tokens: Optional[int] = 1):
    probe = Probe(engine.clock)
    req = engine.submit(model, prompt, probe.on_token, probe.on_done, max_tokens=max_tokens)
    return req, probe


def run(clock: Clock, until_ms: float) -> None:
    """Advance to ``until_ms`` from one timer to the next, so that each fires at
    its own time (a plain advance runs them at the time advanced to)."""
    until = until_ms * MS
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls()]
        nxt = min(due) if due else None
        if nxt is None or nxt > until + 1e-12:
            break
        clock.advance(max(nxt - clock.seconds(), 0.0))
    if clock.seconds() < until:
        clock.advance(until - clock.seconds())


# -- the engine


def test_cold_ttft_is_base_plus_per_token_times_prompt():
    engine, clock = make()
    req, probe = submit(engine, b"x" * 400)  # 100 tokens
    assert req.prompt_tokens == 100
    clock.advance(6.99 * MS)
    assert probe.tokens == []
    run(clock, 7.0)
    assert probe.tokens == [pytest.approx(7.0)]  # 2 + 0.05 * 100
    assert req.ttft_ms == pytest.approx(7.0)
    assert req.cached_tokens == 0
    assert probe.done_at == pytest.approx(7.0)
    assert engine.stats.completed == 1 and not engine.running


def test_shared_prefix_is_cached_and_shortens_ttft_exactly():
    engine, clock = make()
    prefix = bytes(range(256)) * 2 + b"p" * 128  # 640 bytes: 10 blocks of 64
    a, pa = submit(engine, prefix + b"a" * 100)
    run(clock, 20)
    b, pb = submit(engine, prefix + b"b" * 100)
    run(clock, 40)
    assert a.prompt_tokens == b.prompt_tokens == 185
    assert a.cached_tokens == 0 and b.cached_tokens == 160
    assert a.ttft_ms == pytest.approx(2 + 0.05 * 185)
    assert b.ttft_ms == pytest.approx(2 + 0.05 * 25)
    assert a.ttft_ms - b.ttft_ms == pytest.approx(0.05 * 160)
    assert (engine.stats.prefix_queries, engine.stats.prefix_hits) == (370, 160)


def test_a_whole_cached_prompt_still_computes_one_token():
    engine, clock = make()
    submit(engine, b"z" * 128)  # exactly 2 blocks, 32 tokens
    run(clock, 10)
    again, _ = submit(engine, b"z" * 128)
    run(clock, 20)
    assert again.cached_tokens == 31
    assert again.ttft_ms == pytest.approx(2 + 0.05 * 1)


def test_adapter_prefixes_do_not_share_blocks_with_the_base_model():
    assert block_hashes(b"q" * 128, 64) != block_hashes(b"q" * 128, 64, seed=7)
    engine, clock = make(loras=("a",), lora_load_ms=0.0)
    submit(engine, b"q" * 200)
    run(clock, 20)
    lora_req, _ = submit(engine, b"q" * 200, model="a")
    run(clock, 40)
    assert lora_req.cached_tokens == 0


def test_lru_evicts_least_recent_blocks_tail_first():
    engine, clock = make(kv_blocks=4, prefill_ms_per_token=0.0)
    a = bytes(range(256))  # 4 blocks
    submit(engine, a)
    run(clock, 5)
    assert len(engine.cache) == 4
    submit(engine, b"B" * 128)  # 2 more blocks: 2 of a's go
    run(clock, 10)
    assert len(engine.cache) == 4
    hashes = block_hashes(a, 64)
    # a's tail went first: what is left of a is still a usable prefix.
    assert [h in engine.cache for h in hashes] == [True, True, False, False]
    again, _ = submit(engine, a)
    run(clock, 15)
    assert again.cached_tokens == 32
    # a, inserted again, is the most recent: b's blocks went, not a's.
    assert [h in engine.cache for h in hashes] == [True] * 4
    assert not any(h in engine.cache for h in block_hashes(b"B" * 128, 64))
    submit(engine, b"C" * 64)
    run(clock, 20)
    assert [h in engine.cache for h in hashes] == [True, True, True, False]


def test_a_prompt_longer_than_the_cache_keeps_its_head():
    engine, clock = make(kv_blocks=3, prefill_ms_per_token=0.0)
    prompt = bytes(range(256)) * 2  # 8 blocks
    submit(engine, prompt)
    run(clock, 5)
    assert [h in engine.cache for h in block_hashes(prompt, 64)] == [True] * 3 + [False] * 5


def test_max_running_queues_the_excess_and_admits_in_order():
    engine, clock = make(max_running=2, prefill_ms_per_token=0.0, prefill_ms_base=10.0)
    reqs = [submit(engine, b"r%d" % i)[0] for i in range(5)]
    assert [r.rid for r in engine.running.values()] == [1, 2]
    assert [r.rid for r in engine.waiting] == [3, 4, 5]
    clock.advance(10 * MS)  # 1 done (one token), 3 admitted
    assert [r.rid for r in engine.running.values()] == [2, 3]
    clock.advance(10 * MS)
    assert [r.rid for r in engine.running.values()] == [3, 4]
    run(clock, 50)
    assert [r.ttft_ms for r in reqs] == [pytest.approx(10.0 * (i + 1)) for i in range(5)]
    assert engine.stats.completed == 5


def test_prefill_lane_serializes_prefills():
    engine, clock = make()
    sizes = [400, 4000, 40]  # 100, 1000, 10 tokens
    reqs = [submit(engine, b"%d" % i + b"x" * (n - 1))[0] for i, n in enumerate(sizes)]
    assert len(engine.running) == 3  # all admitted, one prefilling
    run(clock, 100)
    d = [2 + 0.05 * 100, 2 + 0.05 * 1000, 2 + 0.05 * 10]
    assert reqs[0].ttft_ms == pytest.approx(d[0])
    assert reqs[1].ttft_ms == pytest.approx(d[0] + d[1])
    # The small one waited for the big one: the lane is FIFO.
    assert reqs[2].ttft_ms == pytest.approx(d[0] + d[1] + d[2])


def test_decode_time_grows_with_the_running_count():
    engine, clock = make(prefill_ms_base=1.0, prefill_ms_per_token=0.0)
    _, alone = submit(engine, b"solo", max_tokens=3)
    run(clock, 50)
    assert alone.tokens == [pytest.approx(t) for t in (1, 1 + 5.25, 1 + 2 * 5.25)]

    engine, clock = make(prefill_ms_base=1.0, prefill_ms_per_token=0.0)
    probes = [submit(engine, b"p%d" % i, max_tokens=3)[1] for i in range(4)]
    run(clock, 50)
    # 4 running: 5 + 0.25 * 4 between tokens.
    assert probes[0].tokens == [pytest.approx(t) for t in (1, 7, 13)]
    assert probes[3].tokens == [pytest.approx(t) for t in (4, 10, 16)]
    assert probes[0].done_at == pytest.approx(13)


def test_default_output_tokens_and_finish_reasons():
    engine, clock = make(output_tokens=3)
    free, free_probe = submit(engine, b"a", max_tokens=None)
    capped, _ = submit(engine, b"b", max_tokens=10_000)
    assert (free.max_tokens, free.finish_reason) == (3, "stop")
    assert (capped.max_tokens, capped.finish_reason) == (4096, "length")
    run(clock, 40)
    assert len(free_probe.tokens) == 3
    with pytest.raises(ValueError):
        submit(engine, b"c", max_tokens=0)


def test_unknown_model_is_refused():
    engine, _ = make(loras=("a",))
    with pytest.raises(UnknownModel):
        submit(engine, b"x", model="nope")
    assert not engine.waiting and engine.stats.requests == 0


def test_lora_load_delays_the_first_request_only():
    engine, clock = make(loras=("a",), lora_load_ms=100.0, prefill_ms_per_token=0.0)
    first, _ = submit(engine, b"x", model="a")
    assert engine.waiting_adapters() == ["a"] and not engine.running
    run(clock, 200)
    assert first.ttft_ms == pytest.approx(102.0)
    second, _ = submit(engine, b"y", model="a")
    run(clock, 300)
    assert second.ttft_ms == pytest.approx(2.0)
    assert engine.stats.lora_loads == 1
    assert engine.running_adapters() == ["a"]


def test_max_loras_and_only_unused_adapters_are_evicted():
    engine, clock = make(loras=("a", "b", "c"), max_loras=2, lora_load_ms=10.0,
                         prefill_ms_per_token=0.0, decode_ms_per_running=0.0)
    long_a, _ = submit(engine, b"a1", model="a", max_tokens=100)  # holds a for ~500 ms
    submit(engine, b"b1", model="b")
    run(clock, 20)
    assert engine.running_adapters() == ["a", "b"] and engine.stats.lora_loads == 2
    # b is idle, a is in use: c takes b's slot.
    c1, _ = submit(engine, b"c1", model="c", max_tokens=100)
    assert engine.running_adapters() == ["a"] and set(engine.lora_loading) == {"c"}
    run(clock, 40)
    assert c1.state == "decoding" and engine.running_adapters() == ["a", "c"]
    # Both slots in use: b waits, loads nothing, and does not block the base model.
    b2, _ = submit(engine, b"b2", model="b")
    base, _ = submit(engine, b"base")
    assert b2.state == "waiting" and base.state != "waiting"
    assert engine.waiting_adapters() == ["b"] and not engine.lora_loading
    run(clock, 100)
    assert b2.state == "waiting" and engine.stats.lora_loads == 3
    engine.cancel(long_a)  # a is free: b loads in its slot
    assert set(engine.lora_loading) == {"b"} and engine.running_adapters() == ["c"]
    run(clock, 120)
    assert b2.state == "done"
    # arrived at 40, load from 100 to 110, prefill 2 ms
    assert b2.ttft_ms == pytest.approx(72.0)
    assert engine.stats.lora_loads == 4


def test_cancel_a_waiting_request():
    engine, clock = make(max_running=1)
    submit(engine, b"one", max_tokens=50)
    waiting, probe = submit(engine, b"two")
    assert engine.cancel(waiting) is True
    assert not engine.waiting and engine.stats.cancelled == 1
    run(clock, 500)
    assert probe.tokens == [] and probe.done_at is None
    assert engine.cancel(waiting) is False


def test_cancel_the_request_being_prefilled_starts_the_next_at_once():
    engine, clock = make(prefill_ms_per_token=0.0, prefill_ms_base=10.0)
    first, p1 = submit(engine, b"one")
    second, _ = submit(engine, b"two")
    clock.advance(4 * MS)
    engine.cancel(first)
    assert engine.prefilling is second and len(engine.running) == 1
    run(clock, 50)
    assert second.ttft_ms == pytest.approx(14.0)
    assert p1.tokens == []


def test_cancel_a_queued_or_decoding_request_frees_its_slot():
    engine, clock = make(max_running=2, prefill_ms_per_token=0.0)
    decoding, p = submit(engine, b"a", max_tokens=100)
    queued, _ = submit(engine, b"b", max_tokens=100)
    third, _ = submit(engine, b"c")
    assert third.state == "waiting"
    engine.cancel(queued)  # still waiting for the prefill lane
    assert third.state == "queued" and queued not in engine.prefill_queue
    run(clock, 10)
    assert decoding.state == "decoding" and third.state == "done"
    fourth, _ = submit(engine, b"d")
    fifth, _ = submit(engine, b"e")
    assert fifth.state == "waiting"
    n = len(p.tokens)
    engine.cancel(decoding)
    assert fifth.state == "queued" and decoding.rid not in engine.running
    run(clock, 200)
    assert len(p.tokens) == n  # its pending token never came


def test_a_paused_stream_gets_no_next_token_until_resumed():
    engine, clock = make(prefill_ms_base=1.0, prefill_ms_per_token=0.0)
    req, probe = submit(engine, b"x", max_tokens=3)
    engine.pause(req)
    run(clock, 100)
    assert probe.tokens == [pytest.approx(1.0)]
    engine.resume(req)
    run(clock, 200)
    assert probe.tokens[1:] == [pytest.approx(105.25), pytest.approx(110.5)]


def test_update_checks_types_and_applies_all_or_nothing():
    engine, _ = make()
    assert engine.update({"max_running": 0, "decode_ms_base": 1}) \
        == ["parameter 'max_running' expects an integer >= 1"]
    assert engine.params.decode_ms_base == 5.0
    problems = engine.update({"kv_blocks": True, "loras": [1], "nope": 1, "loading": "yes"})
    assert len(problems) == 4
    assert engine.update({"decode_ms_base": 1, "loras": ["x", "x", "y"]}) == []
    assert engine.params.decode_ms_base == 1.0 and engine.params.loras == ("x", "y")
    assert engine.update({"loras": ["sim-llm"]}) != []


def test_raising_max_running_admits_the_waiting():
    engine, _ = make(max_running=1)
    submit(engine, b"a", max_tokens=10)
    waiting, _ = submit(engine, b"b")
    assert waiting.state == "waiting"
    engine.update({"max_running": 2})
    assert waiting.state in ("queued", "prefilling")


def test_kv_usage_counts_the_running_requests_blocks():
    engine, clock = make(kv_blocks=10, prefill_ms_per_token=0.0)
    submit(engine, b"x" * 64, max_tokens=100)  # 16 tokens: 1 block
    submit(engine, b"y" * 68, max_tokens=100)  # 17 tokens: 2 blocks
    assert engine.kv_usage() == pytest.approx(0.3)
    run(clock, 5)  # both have their first token: 17 and 18 tokens
    assert engine.kv_usage() == pytest.approx(0.4)
    engine.update({"kv_blocks": 1})
    assert engine.kv_usage() == 1.0


# -- rendering


def test_render_prompt_like_a_chat_template():
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi "},
                                                      {"type": "image_url", "image_url": {}},
                                                      {"type": "text", "text": "there"}]}]}
    assert render_prompt("chat", body) == \
        "<|system|>\nbe brief\n<|user|>\nhi there\n<|assistant|>\n"
    assert render_prompt("completions", {"prompt": ["ab", "cd"]}) == "abcd"
    assert render_prompt("chat", {"messages": []}) is None
    assert render_prompt("completions", {"prompt": 3}) is None


# -- HTTP


class Req(DummyRequest):
    """A DummyRequest that keeps a push producer instead of pulling from it."""

    def __init__(self, method: bytes, path: bytes, body: Optional[bytes] = None) -> None:
        super().__init__([])
        self.method = method
        self.path = self.uri = path
        self.content = io.BytesIO(body or b"")
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def body(self) -> bytes:
        return b"".join(self.written)

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: bytes) -> Optional[bytes]:
        values = self.responseHeaders.getRawHeaders(name)
        return values[-1] if values else None


def call(resource: SimulatorResource, method: str, path: str, body: Any = None) -> Req:
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = Req(method.encode(), path.encode(), raw)
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    return request


def sim(**params: Any):
    clock = Clock()
    return SimulatorResource("a", SimParams(**params), clock), clock


def events(request: Req) -> List[Any]:
    out = []
    for chunk in request.body.split(b"\n\n"):
        if chunk:
            assert chunk.startswith(b"data: ")
            data = chunk[len(b"data: "):]
            out.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return out


CHAT = {"model": "sim-llm", "messages": [{"role": "user", "content": "x" * 200}]}


def test_stream_chat_sse_format_and_usage():
    resource, clock = sim(prefill_ms_per_token=0.0)
    call(resource, "POST", "/v1/chat/completions", dict(CHAT, max_tokens=3))
    run(clock, 1000)
    request = call(resource, "POST", "/v1/chat/completions",
                   dict(CHAT, max_tokens=3, stream=True,
                        stream_options={"include_usage": True}))
    assert request.header(b"X-Backend-Id") == b"a"
    assert request.header(b"Content-Type") == b"text/event-stream"
    assert request.body == b""  # headers only, until the first token
    clock.advance(1.9 * MS)
    assert request.body == b""
    run(clock, 1002)
    evs = events(request)
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert evs[1]["choices"][0]["delta"]["content"] in resource_vocab()
    run(clock, 2000)
    evs = events(request)
    assert evs[-1] == "[DONE]" and request.finished
    words = [e["choices"][0]["delta"]["content"] for e in evs[1:4]]
    assert evs[4]["choices"][0]["finish_reason"] == "length"
    usage = evs[5]["usage"]
    assert evs[5]["choices"] == [] and evs[5]["model"] == "sim-llm"
    prompt_tokens = -(-len("<|user|>\n" + "x" * 200 + "\n<|assistant|>\n") // 4)
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == prompt_tokens + 3
    assert usage["prompt_tokens_details"]["cached_tokens"] == 48  # 3 full blocks
    # The same answer, whole.
    whole = call(resource, "POST", "/v1/chat/completions", dict(CHAT, max_tokens=3))
    run(clock, 3000)
    assert whole.json()["choices"][0]["message"]["content"] == "".join(words)


def resource_vocab() -> set:
    from ntonix_mock.server import VOCAB
    return set(VOCAB)


def test_stream_without_usage_and_completions_route():
    resource, clock = sim(output_tokens=2)
    request = call(resource, "POST", "/v1/completions", {"prompt": "hello", "stream": True})
    run(clock, 100)
    evs = events(request)
    assert [e["object"] for e in evs[:-1]] == ["text_completion"] * 3
    assert evs[2]["choices"][0]["finish_reason"] == "stop"
    assert evs[-1] == "[DONE]" and not any("usage" in e for e in evs[:-1])


def test_non_stream_completion_answers_at_the_last_token():
    resource, clock = sim(prefill_ms_per_token=0.0, decode_ms_per_running=0.0)
    request = call(resource, "POST", "/v1/completions",
                   {"model": "sim-llm", "prompt": "abcd" * 10, "max_tokens": 4})
    run(clock, 16.9)
    assert request.body == b""
    run(clock, 17)  # 2 + 3 * 5
    obj = request.json()
    assert obj["object"] == "text_completion" and obj["model"] == "sim-llm"
    assert obj["choices"][0]["finish_reason"] == "length"
    assert len(obj["choices"][0]["text"].split()) == 4
    assert obj["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert request.header(b"Content-Type") == b"application/json"


def test_http_errors():
    resource, _ = sim(loras=("ad",))
    bad = call(resource, "POST", "/v1/chat/completions", b"{nope")
    assert bad.responseCode == 400 and "error" in bad.json()
    assert call(resource, "POST", "/v1/chat/completions", {"messages": "x"}).responseCode == 400
    assert call(resource, "POST", "/v1/completions",
                {"prompt": "x", "max_tokens": 0}).responseCode == 400
    missing = call(resource, "POST", "/v1/chat/completions", dict(CHAT, model="gpt-9"))
    assert missing.responseCode == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert missing.header(b"X-Backend-Id") == b"a"
    assert call(resource, "GET", "/nowhere").responseCode == 404
    assert call(resource, "GET", "/v1/completions").responseCode == 405
    too_long = call(resource, "POST", "/v1/completions",
                    {"prompt": "x" * 4 * 32768, "max_tokens": 1})
    assert too_long.responseCode == 400
    assert resource.engine.stats.requests == 0


def test_health_models_and_loading():
    resource, _ = sim(loras=("ad1", "ad2"))
    health = call(resource, "GET", "/health")
    assert (health.responseCode or 200, health.json()) == (200, {})
    models = call(resource, "GET", "/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["root"], m["parent"], m["owned_by"]) for m in models["data"]] == [
        ("sim-llm", "sim-llm", None, "vllm"), ("ad1", "ad1", "sim-llm", "vllm"),
        ("ad2", "ad2", "sim-llm", "vllm")]
    assert all(m["object"] == "model" and m["max_model_len"] for m in models["data"])
    call(resource, "POST", "/control", {"loading": True})
    health = call(resource, "GET", "/health")
    assert health.responseCode == 503
    assert health.json() == {"error": {"message": "Loading model", "type": "unavailable_error",
                                       "code": 503}}
    assert call(resource, "POST", "/v1/chat/completions", CHAT).responseCode == 503
    call(resource, "POST", "/control", {"loading": False})
    assert call(resource, "GET", "/health").json() == {}


def test_disconnect_frees_the_slot():
    resource, clock = sim(max_running=1, prefill_ms_per_token=0.0)
    first = call(resource, "POST", "/v1/chat/completions", dict(CHAT, stream=True,
                                                                 max_tokens=100))
    second = call(resource, "POST", "/v1/chat/completions", dict(CHAT, max_tokens=1))
    engine = resource.engine
    assert len(engine.running) == 1 and len(engine.waiting) == 1
    run(clock, 10)
    first.processingFailed(Failure(ConnectionDone()))
    assert not engine.waiting and engine.stats.cancelled == 1
    run(clock, 20)
    assert second.json()["usage"]["completion_tokens"] == 1
    # A non-streamed request that goes away while waiting is dropped too.
    resource.engine.update({"max_running": 1})
    call(resource, "POST", "/v1/chat/completions", dict(CHAT, stream=True, max_tokens=100))
    gone = call(resource, "POST", "/v1/chat/completions", dict(CHAT, max_tokens=1))
    gone.processingFailed(Failure(ConnectionDone()))
    assert not engine.waiting and engine.stats.cancelled == 2


def test_backpressure_pauses_the_stream():
    resource, clock = sim(prefill_ms_base=1.0, prefill_ms_per_token=0.0)
    request = call(resource, "POST", "/v1/completions",
                   {"prompt": "x", "stream": True, "max_tokens": 3})
    request.producer.pauseProducing()
    run(clock, 100)
    assert len(events(request)) == 1
    request.producer.resumeProducing()
    run(clock, 200)
    assert len(events(request)) == 5 and request.finished


def metrics(resource: SimulatorResource) -> Dict[str, Dict[str, Any]]:
    request = call(resource, "GET", "/metrics")
    assert request.header(b"Content-Type").startswith(b"text/plain")
    out: Dict[str, Dict[str, Any]] = {}
    for family in text_string_to_metric_families(request.body.decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_parse_with_vllm_names_and_values():
    resource, clock = sim(max_running=2, loras=("l1", "l2", "l3"), max_loras=2,
                          lora_load_ms=10.0, prefill_ms_per_token=0.0, kv_blocks=100)
    model = (("model_name", "sim-llm"),)
    call(resource, "POST", "/v1/completions", {"prompt": "p" * 128, "max_tokens": 1})
    run(clock, 5)
    call(resource, "POST", "/v1/completions", {"prompt": "p" * 128, "max_tokens": 1})
    run(clock, 10)
    call(resource, "POST", "/v1/completions", {"model": "l1", "prompt": "a", "max_tokens": 50})
    call(resource, "POST", "/v1/completions", {"model": "l2", "prompt": "b", "max_tokens": 50})
    call(resource, "POST", "/v1/completions", {"model": "l3", "prompt": "c", "max_tokens": 50})
    run(clock, 30)
    m = metrics(resource)
    assert m["vllm:num_requests_running"][model] == 2
    assert m["vllm:num_requests_waiting"][model] == 1
    # two running requests of 1 prompt token plus their tokens so far: 1 block each
    assert m["vllm:kv_cache_usage_perc"][model] == pytest.approx(0.02)
    assert m["vllm:gpu_cache_usage_perc"][model] == pytest.approx(0.02)
    assert m["vllm:prefix_cache_queries_total"][model] == 32 + 32 + 1 + 1
    assert m["vllm:prefix_cache_hits_total"][model] == 31
    success = m["vllm:request_success_total"]
    assert success[(("finished_reason", "length"),) + model] == 2
    (labels, value), = m["vllm:lora_requests_info"].items()
    assert dict(labels) == {"max_lora": "2", "running_lora_adapters": "l1,l2",
                            "waiting_lora_adapters": "l3"}
    assert value == 1


def test_stats_hit_rate_ttft_and_by_model():
    resource, clock = sim(prefill_ms_per_token=0.0, loras=("ad",), lora_load_ms=0.0)
    for model in ("sim-llm", "sim-llm", "ad"):
        call(resource, "POST", "/v1/completions", {"model": model, "prompt": "q" * 128,
                                                   "max_tokens": 1})
        run(clock, ms(clock) + 10)
    stats = call(resource, "GET", "/stats").json()
    assert stats["id"] == "a"
    assert (stats["requests"], stats["completed"], stats["running"], stats["waiting"]) \
        == (3, 3, 0, 0)
    assert stats["prefix_queries_tokens"] == 96 and stats["prefix_hits_tokens"] == 31
    assert stats["prefix_hit_rate"] == pytest.approx(31 / 96)
    assert stats["by_model"] == {"sim-llm": 2, "ad": 1}
    assert stats["lora_loads"] == 1 and stats["loaded_loras"] == ["ad"]
    assert stats["ttft_ms"]["count"] == 3
    assert stats["ttft_ms"]["p50"] == pytest.approx(2.0)
    assert stats["params"]["model"] == "sim-llm" and stats["params"]["loras"] == ["ad"]


def test_control_updates_rejects_and_resets():
    resource, clock = sim()
    ok = call(resource, "POST", "/control", {"max_running": 4, "decode_ms_base": 1,
                                             "loras": ["x"]})
    assert ok.responseCode in (None, 200)
    assert ok.json()["max_running"] == 4 and ok.json()["decode_ms_base"] == 1.0
    bad = call(resource, "POST", "/control", {"max_running": "4", "bogus": 1})
    assert bad.responseCode == 400
    assert "max_running" in bad.json()["error"]["message"]
    assert "bogus" in bad.json()["error"]["message"]
    assert resource.engine.params.max_running == 4
    assert call(resource, "POST", "/control", b"[1]").responseCode == 400
    call(resource, "POST", "/v1/completions", {"prompt": "q" * 128, "max_tokens": 1})
    run(clock, 20)
    assert len(resource.engine.cache) == 2
    reset = call(resource, "POST", "/control", {"reset": True})
    assert reset.responseCode in (None, 200)
    stats = call(resource, "GET", "/stats").json()
    assert stats["requests"] == 0 and stats["prefix_queries_tokens"] == 0
    assert stats["ttft_ms"] == {"count": 0, "sum": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    assert len(resource.engine.cache) == 0


def test_cli_flags():
    args = parse_args([])
    assert args.model == "mock-llm" and not args.inference
    args = parse_args(["--inference", "--id", "b", "--lora", "x", "--lora", "y",
                       "--max-running", "4", "--kv-blocks", "64", "--prefill-ms-base", "1",
                       "--prefill-ms-per-token", "0.1", "--decode-ms-base", "3",
                       "--decode-ms-per-running", "0.5", "--output-tokens", "8",
                       "--max-loras", "1", "--lora-load-ms", "20"])
    params = sim_params_from(args)
    assert params == SimParams(model="sim-llm", kv_blocks=64, max_running=4,
                               prefill_ms_base=1.0, prefill_ms_per_token=0.1,
                               decode_ms_base=3.0, decode_ms_per_running=0.5,
                               output_tokens=8, loras=("x", "y"), max_loras=1,
                               lora_load_ms=20.0)
    assert sim_params_from(parse_args(["--inference", "--model", "m"])).model == "m"
    with pytest.raises(SystemExit):
        parse_args(["--inference", "--max-running", "0"])
    site = make_sim_site("b", params, Clock())
    assert site.resource.engine.params is params
