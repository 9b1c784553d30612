"""The inference scorer's parts: prefix index, latency model, scoring, the
metrics page parser, model filtering and its settings."""

import random

import attrs
import pytest
from twisted.internet.task import Clock

from ntonix.config import BackendConfig, Config, ConfigError, load
from ntonix.gateway import Gateway
from ntonix.routing.backend import ScrapedLoad
from ntonix.routing.latency import LatencyModel, RecursiveLeastSquares
from ntonix.routing.prefix import PrefixIndex, block_hashes, render_prompt
from ntonix.routing.scrape import ScrapeError, parse_load


def chat(*contents, model="m"):
    roles = ["system", "user", "assistant"]
    return {"model": model, "messages": [{"role": roles[min(i, 1) if i < 2 else 2 - i % 2],
                                          "content": c} for i, c in enumerate(contents)]}


# -- prefix blocks and index

def test_block_hashes_chain_so_one_hash_names_the_whole_prefix():
    a = block_hashes(b"x" * 64 + b"y" * 64 + b"z" * 10, 64, 100)
    b = block_hashes(b"q" * 64 + b"y" * 64, 64, 100)
    assert len(a) == 2  # the short tail is not a block
    assert a[1] != b[1]  # same second block, different prefix
    assert block_hashes(b"x" * 640, 64, 3) == block_hashes(b"x" * 640, 64, 100)[:3]


def test_render_follows_messages_in_order_and_the_model():
    one = render_prompt("chat", chat("sys", "hi"))
    assert render_prompt("chat", chat("sys", "hi", "there")).startswith(one)
    assert render_prompt("chat", chat("sys", "hi", model="other")) != one
    assert render_prompt("completions", {"model": "m", "prompt": "abc"}).endswith(b"abc")
    # Odd shapes render, they do not raise.
    render_prompt("chat", {"messages": [None, {"role": 3, "content": [{"type": "text"}]}]})


def test_index_matches_leading_blocks_per_backend():
    idx = PrefixIndex(capacity_blocks=100)
    h = block_hashes(bytes(range(256)) * 4, 64, 100)  # 16 blocks
    idx.add("a", h[:10])
    idx.add("b", h[:3])
    assert idx.match(h) == {"a": 10, "b": 3}
    assert idx.match(block_hashes(b"other" * 100, 64, 100)) == {}
    assert idx.match([]) == {}
    idx.forget("a")
    assert idx.match(h) == {"b": 3}


def test_index_evicts_least_recent_per_backend():
    idx = PrefixIndex(capacity_blocks=4)
    first = block_hashes(b"a" * 256, 64, 100)
    second = block_hashes(b"b" * 256, 64, 100)
    idx.add("x", first)
    idx.add("x", second)  # four more: the first four go
    assert idx.match(first) == {}
    assert idx.match(second) == {"x": 4}
    assert idx.blocks_of("x") == 4
    idx.resize(2)
    assert idx.blocks_of("x") == 2


# -- latency model

def test_rls_recovers_a_linear_law():
    rng = random.Random(3)
    m = RecursiveLeastSquares(3, forgetting=1.0)
    for _ in range(200):
        x = (1.0, rng.uniform(0, 3000), rng.randint(0, 10))
        m.update(x, 0.004 + 0.00005 * x[1] + 0.002 * x[2])
    assert m.theta == pytest.approx([0.004, 0.00005, 0.002], rel=1e-3, abs=1e-6)


def test_latency_model_says_nothing_before_it_has_seen_requests():
    m = LatencyModel()
    assert m.predict_ttft(100, 0) is None
    for n in range(5):
        m.observe_ttft(100 * n, 0, 0.01 + 0.0001 * 100 * n)
    assert m.predict_ttft(1000, 0) == pytest.approx(0.11, rel=0.05)
    assert m.as_json()["samples"]["ttft"] == 5


# -- scoring

def make_gateway(n=3, **balancer):
    cfg = Config()
    cfg = attrs.evolve(cfg, backends=tuple(BackendConfig("127.0.0.1", 9000 + i)
                                           for i in range(n)),
                       balancer=attrs.evolve(cfg.balancer, algorithm="inference", **balancer))
    clock = Clock()
    clock.advance(100)
    gw = Gateway(cfg, clock)
    gw.balancer.rng = random.Random(5)
    return gw, clock


LONG = "You are a careful assistant. " * 40


def route(gw, doc):
    ctx = gw.route_context("chat", doc, True)
    b = gw.pick_backend(model=doc.get("model"), ctx=ctx)
    b.in_flight += 1
    return b, ctx


def done(b, ctx):
    """The request ended, as the relay reports it."""
    from ntonix.routing.scorer import attempt_ended, prefill_ended
    prefill_ended(b, ctx, 0.01)
    b.in_flight -= 1
    attempt_ended(b, ctx, None)


def test_turns_of_a_conversation_follow_their_prefix():
    gw, _ = make_gateway()
    first, ctx = route(gw, chat(LONG, "question one"))
    done(first, ctx)
    for turn in range(5):
        b, ctx = route(gw, chat(LONG, "question one", "answer", f"next {turn}"))
        done(b, ctx)
        assert b is first
        assert ctx.matched_blocks > 0


def test_new_prompts_spread_over_idle_backends():
    gw, _ = make_gateway(4)
    seen = set()
    for i in range(40):
        b, ctx = route(gw, chat(f"{i} " + LONG, "q"))
        done(b, ctx)
        seen.add(b.name)
    assert len(seen) == 4


def test_a_much_busier_holder_spills_to_the_next_best():
    gw, _ = make_gateway(3)
    holder, ctx = route(gw, chat(LONG, "q"))
    done(holder, ctx)
    holder.in_flight = 30  # the others have none: far above 1.5 x mean + 2
    b, ctx = route(gw, chat(LONG, "q", "a", "q2"))
    assert b is not holder
    assert ctx.matched_blocks == 0


def test_prefill_load_steers_away_from_a_big_prefill():
    gw, _ = make_gateway(2)
    a, b = gw.backends
    a.pending_prefill = 50_000
    picked, _ = route(gw, chat("fresh " * 100, "q"))
    assert picked is b


def test_scraped_queue_counts_when_fresh_only():
    gw, clock = make_gateway(2)
    a, b = gw.backends
    a.set_load(ScrapedLoad(at=clock.seconds(), waiting=40, running=16))
    picked, ctx = route(gw, chat("x " * 200, "q"))
    assert picked is b
    done(picked, ctx)
    clock.advance(10)  # older than three scrape intervals: ignored
    picks = set()
    for i in range(20):
        p, ctx = route(gw, chat(f"{i} " * 200, "q"))
        done(p, ctx)
        picks.add(p)
    assert picks == {a, b}


def test_loaded_adapter_wins_over_one_that_must_load():
    gw, clock = make_gateway(2)
    a, b = gw.backends
    for x in (a, b):
        x.reported = {"base": {"id": "base"}, "sql-lora": {"id": "sql-lora", "parent": "base"}}
    gw.models_changed()
    b.set_load(ScrapedLoad(at=clock.seconds(), loras_loaded=frozenset({"sql-lora"})))
    for i in range(5):
        p, ctx = route(gw, chat(f"{i} fresh " * 50, "q", model="sql-lora"))
        assert ctx.adapter
        assert p is b
        done(p, ctx)


def test_per_model_weights_override():
    gw, _ = make_gateway(2, model_weights={"m": {"prefix": 0}})
    holder, ctx = route(gw, chat(LONG, "q"))
    done(holder, ctx)
    other = next(b for b in gw.backends if b is not holder)
    holder.in_flight = 1  # a little busier: without the prefix term it loses
    b, _ = route(gw, chat(LONG, "q", "a", "q2"))
    assert b is other


def test_prefill_bookkeeping_returns_to_zero():
    from ntonix.routing.scorer import attempt_ended, prefill_ended
    gw, _ = make_gateway(1)
    b, ctx = route(gw, chat(LONG, "q"))
    assert b.pending_prefill == ctx.uncached_tokens > 0
    prefill_ended(b, ctx, 0.05)
    assert b.pending_prefill == 0
    ctx.output_events = 12
    b.in_flight -= 1
    attempt_ended(b, ctx, 0.5)
    assert b.latency.ttft.count == 1 and b.latency.tpot.count == 1
    b2, ctx2 = route(gw, chat("other " * 100, "q"))
    attempt_ended(b2, ctx2, None)  # failed before its first byte
    assert b2.pending_prefill == 0


# -- models per backend

def test_model_filter_and_unserved():
    gw, _ = make_gateway(2)
    a, b = gw.backends
    assert not gw.unserved("anything")  # nothing known: anything goes
    a.reported = {"m1": {"id": "m1"}}
    gw.models_changed()  # as the health checker does after reading a list
    assert not gw.unserved("m2")  # b's list is unknown: it may serve m2
    b.models = frozenset({"m2"})
    gw.models_changed()
    assert gw.unserved("m3")
    assert gw.candidates(model="m1") == [a]
    assert gw.candidates(model="m2") == [b]
    assert gw.candidates(model=None) == [a, b]


def test_loading_backend_takes_no_traffic_but_is_not_failed():
    gw, _ = make_gateway(2)
    a, b = gw.backends
    a.loading = True
    assert gw.candidates() == [b]
    assert a.state == "loading" and a.breaker.state == "closed"


# -- the metrics page

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 7.0
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.42
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a",waiting_lora_adapters="c"} 1.6e9
vllm:prompt_tokens_total{model_name="m"} 1234
"""


def test_parse_vllm_page():
    load_ = parse_load(VLLM_PAGE, 5.0)
    assert (load_.running, load_.waiting, load_.kv_usage) == (7.0, 3.0, 0.42)
    assert load_.loras_loaded == {"a", "b"} and load_.loras_waiting == frozenset()
    assert load_.max_loras == 2


def test_parse_llamacpp_and_refuse_garbage():
    page = "llamacpp:requests_processing 2\nllamacpp:requests_deferred 5\n"
    assert (parse_load(page, 0).running, parse_load(page, 0).waiting) == (2, 5)
    for junk in ("", "<html>nope</html>", "vllm:num_requests_running{ x", "\x00\xff" * 100,
                 "vllm:num_requests_running NaN\n"):
        with pytest.raises(ScrapeError):
            parse_load(junk, 0)


# -- settings

def test_backend_object_settings_and_weights():
    cfg = load({}, {"NTONIX_BACKENDS": '[{"url": "http://gpu1:8000", "models": ["llama"], '
                    '"health_path": "/", "metrics_path": ""}]',
                    "NTONIX_BALANCER_ALGORITHM": "inference",
                    "NTONIX_BALANCER_WEIGHTS": '{"prefix": 4}'})
    (b,) = cfg.backends
    assert (b.host, b.port, b.models, b.health_path, b.metrics_path) == \
        ("gpu1", 8000, ("llama",), "/", "")
    assert cfg.balancer.weights == {"prefix": 4, "queue": 1.0, "prefill": 3.0, "lora": 1.0}


@pytest.mark.parametrize("env, line", [
    ({"NTONIX_BALANCER_WEIGHTS": '{"prefx": 1}'},
     "balancer.weights.prefx (environment NTONIX_BALANCER_WEIGHTS): unknown weight"),
    ({"NTONIX_BALANCER_MODEL_WEIGHTS": '{"m": {"queue": "high"}}'},
     "balancer.model_weights.m.queue = \"high\" (environment NTONIX_BALANCER_MODEL_WEIGHTS)"),
    ({"NTONIX_BACKENDS": '[{"host": "a", "port": 1, "models": "llama"}]'},
     "backends[0].models = \"llama\" (environment NTONIX_BACKENDS): expected a list of names"),
    ({"NTONIX_BACKENDS": '[{"url": "ftp://a"}]'},
     "backends[0].url (environment NTONIX_BACKENDS): scheme 'ftp' is not http or https"),
])
def test_bad_inference_settings_are_one_line_each(env, line):
    with pytest.raises(ConfigError) as e:
        load({}, env)
    assert any(x.startswith(line) for x in e.value.lines), e.value.lines
