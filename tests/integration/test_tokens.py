"""Token accounting through the real plugin: the counts equal the usage the
mock sent, streamed and not, on a miss and on a hit; a client that did not
ask for usage never sees a usage chunk."""

import json

import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families

from harness import JSON, http_client, within


async def scrape(gw):
    r = await within(http_client().get(gw.admin_url + "/metrics/prometheus"), 5)
    text = (await within(treq.content(r), 5)).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


async def ask(gw, text, stream, include_usage=False, tokens=7):
    doc = {"model": "mock-llm", "temperature": 0, "max_tokens": tokens, "stream": stream,
           "messages": [{"role": "user", "content": text}]}
    if include_usage:
        doc["stream_options"] = {"include_usage": True}
    r = await within(http_client().post(gw.url + "/v1/chat/completions",
                                        data=json.dumps(doc).encode(), headers=JSON), 20)
    return r, await within(treq.content(r), 20)


def events(body):
    return [json.loads(b[6:]) for b in body.decode().split("\n\n")
            if b.startswith("data: ") and b != "data: [DONE]"]


@pytest_twisted.ensureDeferred
async def test_token_counts_equal_the_backends_usage(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    backend = a.address
    # The mock's usage: prompt = words of "user:<text>", completion = max_tokens.
    cases = [("one two three", False, False, 7), ("four five", True, False, 5),
             ("six seven eight nine", True, True, 9)]
    want_prompt = want_completion = 0
    for text, stream, include_usage, n in cases:
        r, body = await ask(gw, text, stream, include_usage, n)
        assert r.code == 200
        prompt = len(f"user:{text}".split())
        want_prompt += prompt
        want_completion += n
        if not stream:
            assert json.loads(body)["usage"]["completion_tokens"] == n
        elif include_usage:
            last = events(body)[-1]
            assert last["choices"] == [] and last["usage"]["prompt_tokens"] == prompt
        else:
            # Asked of the backend by the gateway, taken out for this client.
            assert b'"usage"' not in body and all(ev["choices"] for ev in events(body))
            assert body.endswith(b"data: [DONE]\n\n") and len(events(body)) == n + 2
    m = await scrape(gw)
    assert total(m, "ntonix_tokens_total", type="prompt", model="mock-llm",
                 backend=backend, tenant="anonymous") == want_prompt
    assert total(m, "ntonix_tokens_total", type="completion") == want_completion
    assert total(m, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == \
        want_completion
    assert total(m, "gen_ai_server_time_to_first_token_seconds_count",
                 gen_ai_request_model="mock-llm") == 2
    assert total(m, "gen_ai_server_time_per_output_token_seconds_count") == 2
    assert total(m, "gen_ai_server_request_duration_seconds_count") == 3

    # Hits: no backend tokens, the saved ones counted, in either framing.
    for text, stream, include_usage, n in cases:
        r, body = await ask(gw, text, not stream, include_usage, n)
        assert r.headers.getRawHeaders(b"x-cache") == [b"HIT"]
        if not stream and not include_usage:
            # A JSON answer replayed as a stream the client did not ask
            # usage of: no usage chunk either.
            assert b'"usage"' not in body
        if stream:
            # A recorded stream served as JSON has the usage the backend
            # sent, even the one the gateway asked for and kept from the client.
            assert json.loads(body)["usage"]["completion_tokens"] == n
    m2 = await scrape(gw)
    assert total(m2, "ntonix_tokens_total", type="completion") == want_completion
    assert a.count() == 3
    assert total(m2, "ntonix_cache_tokens_saved_total", type="completion",
                 model="mock-llm") == want_completion
    assert total(m2, "ntonix_cache_tokens_saved_total", type="prompt") == want_prompt


@pytest_twisted.ensureDeferred
async def test_a_stored_stream_gives_each_client_the_usage_chunk_it_asked_for(mocks,
                                                                              gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    _, first = await ask(gw, "usage as asked", True, include_usage=False)
    assert b'"usage"' not in first
    r, asked = await ask(gw, "usage as asked", True, include_usage=True)
    assert r.headers.getRawHeaders(b"x-cache") == [b"HIT"]
    last = events(asked)[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 7
    assert asked.endswith(b"data: [DONE]\n\n")
    # Recorded with the chunk (its first client asked), replayed without.
    await ask(gw, "usage the other way", True, include_usage=True)
    r, plain = await ask(gw, "usage the other way", True, include_usage=False)
    assert r.headers.getRawHeaders(b"x-cache") == [b"HIT"] and b'"usage"' not in plain
    assert plain.endswith(b"data: [DONE]\n\n") and a.count() == 2
