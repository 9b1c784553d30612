"""One cached answer serves both framings: a plain answer replayed as the
stream the backend would have sent, a recorded stream assembled into the
plain answer, each checked against what the mock sends for the same prompt
in the other format and read by the official openai client; concurrent
requests in both framings cost one backend request; what does not convert
faithfully (n > 1, a cut stream) is not converted."""

import json

import openai
import pytest
import pytest_twisted
import treq
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from harness import JSON, http_client, sleep, within

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string"}}}}}]


def request_doc(stream, text="convert me", include_usage=False, **kw):
    doc = {"model": "mock-llm", "temperature": 0, "max_tokens": 9, "stream": stream,
           "messages": [{"role": "user", "content": text}], **kw}
    if include_usage:
        doc["stream_options"] = {"include_usage": True}
    return doc


async def post(url, doc):
    # The credential the openai client sends too: entries are per credential.
    headers = {**JSON, b"Authorization": [b"Bearer sk-test"]}
    r = await within(http_client().post(url + "/v1/chat/completions",
                                        data=json.dumps(doc).encode(), headers=headers), 20)
    body = await within(r.content(), 20)
    cache = (r.headers.getRawHeaders(b"x-cache") or [b""])[0]
    return r, body, cache


def events(body):
    out = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            out.append(json.loads(block[6:]))
    return out


def assembled(body):
    """What the chunks say, put together: content, tool calls, the rest."""
    evs = events(body)
    content, calls, finish, usage = "", {}, None, None
    for ev in evs:
        if ev.get("usage"):
            usage = ev["usage"]
        for c in ev["choices"]:
            d = c["delta"]
            content += d.get("content") or ""
            for tc in d.get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.get("id") or call["id"]
                call["name"] += (tc.get("function") or {}).get("name") or ""
                call["arguments"] += (tc.get("function") or {}).get("arguments") or ""
            finish = c["finish_reason"] or finish
    return content, calls, finish, usage, evs


def via_openai(base_url, doc):
    """The official client reads the gateway's answer: (content, tool calls,
    finish reason, usage or None, id)."""
    client = openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0, timeout=10)
    kw = {k: v for k, v in doc.items() if k not in ("stream",)}
    if not doc["stream"]:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or []]
        return m.content, calls, r.choices[0].finish_reason, r.usage, r.id
    content, calls, finish, usage, cid = "", {}, None, None, None
    with client.chat.completions.create(stream=True, **kw) as s:
        for chunk in s:
            cid = chunk.id
            if chunk.usage:
                usage = chunk.usage
            for c in chunk.choices:
                content += c.delta.content or ""
                for tc in c.delta.tool_calls or []:
                    cur = calls.setdefault(tc.index, ["", "", ""])
                    cur[0] = tc.id or cur[0]
                    cur[1] += (tc.function.name or "") if tc.function else ""
                    cur[2] += (tc.function.arguments or "") if tc.function else ""
                finish = c.finish_reason or finish
    return content or None, [tuple(calls[i]) for i in sorted(calls)], finish, usage, cid


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["text", "tool_calls"])
@pytest_twisted.ensureDeferred
async def test_plain_answer_served_as_a_stream(mocks, gateway_factory, tools):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    extra = {"tools": TOOLS} if tools else {}
    r, plain, cache = await post(gw.url, request_doc(False, **extra))
    assert cache == b"MISS"
    want = json.loads(plain)
    # What the mock itself streams for the same prompt, for comparison.
    _, direct, _ = await post(f"http://{a.address}", request_doc(True, include_usage=True,
                                                                 **extra))
    for include_usage in (False, True):
        r, body, cache = await post(gw.url, request_doc(True, include_usage=include_usage,
                                                        **extra))
        assert (r.code, cache) == (200, b"HIT")
        assert r.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
        assert body.endswith(b"data: [DONE]\n\n")
        content, calls, finish, usage, evs = assembled(body)
        d_content, d_calls, d_finish, d_usage, d_evs = assembled(direct)
        msg = want["choices"][0]["message"]
        assert content == (msg["content"] or "") == d_content
        assert finish == want["choices"][0]["finish_reason"] == d_finish
        assert [(c["id"], c["name"], c["arguments"]) for c in calls.values()] == \
            [(c["id"], c["name"], c["arguments"]) for c in d_calls.values()]
        for ev in evs:
            assert ev["object"] == "chat.completion.chunk"
            for k in ("id", "created", "model", "system_fingerprint"):
                assert ev[k] == want[k] == d_evs[0][k]
        assert evs[0]["choices"][0]["delta"]["role"] == "assistant"
        if include_usage:
            assert usage == want["usage"] == d_usage and evs[-1]["choices"] == []
        else:
            assert usage is None and all(ev["choices"] for ev in evs)
    # The official client reads it as it reads the backend's own stream.
    doc = request_doc(True, include_usage=True, **extra)
    got = await deferToThread(via_openai, gw.url + "/v1", doc)
    direct_read = await deferToThread(via_openai, f"http://{a.address}/v1", doc)
    assert got[:3] == direct_read[:3] and got[4] == direct_read[4]
    assert got[3].completion_tokens == direct_read[3].completion_tokens
    assert a.count() == 3  # the gateway's one, and the two direct ones


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["text", "tool_calls"])
@pytest_twisted.ensureDeferred
async def test_recorded_stream_served_as_json(mocks, gateway_factory, tools):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    extra = {"tools": TOOLS} if tools else {}
    for include_usage in (True, False):
        text = f"stream first {include_usage}"
        r, _, cache = await post(gw.url, request_doc(True, text, include_usage, **extra))
        assert cache == b"MISS"
        r, body, cache = await post(gw.url, request_doc(False, text, **extra))
        assert (r.code, cache) == (200, b"HIT")
        assert r.headers.getRawHeaders(b"content-type") == [b"application/json"]
        got = json.loads(body)
        _, direct, _ = await post(f"http://{a.address}", request_doc(False, text, **extra))
        want = json.loads(direct)
        # With include_usage off the gateway asked for the usage chunk anyway
        # (proxy.stream_usage) and kept it from the streaming client: the
        # plain answer has the backend's own usage either way.
        assert got == want, (got, want)
    got = await deferToThread(via_openai, gw.url + "/v1", request_doc(False, "stream first False",
                                                                     **extra))
    assert got[0] == want["choices"][0]["message"]["content"]
    assert a.count() == 4


@pytest_twisted.ensureDeferred
async def test_stream_without_usage_gives_a_plain_answer_without_usage(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "proxy.stream_usage=false")
    r, body, cache = await post(gw.url, request_doc(True, "no usage anywhere"))
    assert cache == b"MISS" and b'"usage"' not in body
    r, body, cache = await post(gw.url, request_doc(False, "no usage anywhere"))
    got = json.loads(body)
    assert cache == b"HIT" and "usage" not in got  # none rather than a made-up one
    assert got["choices"][0]["message"]["content"]


@pytest.mark.parametrize("leader_streams", [True, False], ids=["stream-first", "plain-first"])
@pytest_twisted.ensureDeferred
async def test_concurrent_stream_and_plain_cost_one_backend_request(mocks, gateway_factory,
                                                                    leader_streams):
    a, _ = mocks
    a.knobs.ttft_ms = 200
    a.knobs.itl_ms = 20
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    first = defer.ensureDeferred(post(gw.url, request_doc(leader_streams, "twins",
                                                          include_usage=True)))
    second = defer.ensureDeferred(post(gw.url, request_doc(not leader_streams, "twins",
                                                           include_usage=True)))
    (r1, b1, c1), (r2, b2, c2) = await defer.gatherResults([first, second])
    assert a.count() == 1
    assert sorted([c1, c2]) == [b"HIT", b"MISS"]
    stream_body, plain_body = (b1, b2) if leader_streams else (b2, b1)
    plain = json.loads(plain_body)
    content, _, finish, usage, _ = assembled(stream_body)
    assert content == plain["choices"][0]["message"]["content"]
    assert len(content.split()) == 9 and finish == "stop"
    assert usage == plain["usage"]


@pytest_twisted.ensureDeferred
async def test_n_above_one_and_cut_streams_are_not_converted(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    r, body, cache = await post(gw.url, request_doc(False, "two please", n=2))
    assert cache == b"MISS" and len(json.loads(body)["choices"]) == 2
    r, body, cache = await post(gw.url, request_doc(True, "two please", n=2))
    assert cache == b"MISS" and body.endswith(b"data: [DONE]\n\n")
    r, again, cache = await post(gw.url, request_doc(False, "two please", n=2))
    assert cache == b"HIT"  # each framing keeps its own entry
    assert a.count() == 2

    # A stream cut mid-way: its plain twin in flight gets an error, not a
    # made-up answer, and nothing is kept.
    a.knobs.reset_rate = 1.0
    a.knobs.reset_after = 3
    a.knobs.itl_ms = 30
    a.knobs.ttft_ms = 300
    first = defer.ensureDeferred(post(gw.url, request_doc(True, "cut me")))
    await sleep(0.1)  # the stream leads; the plain request follows it
    second = defer.ensureDeferred(post(gw.url, request_doc(False, "cut me")))
    (r1, b1, _), (r2, b2, _) = await defer.gatherResults([first, second])
    assert b"data: [DONE]" not in b1
    err = json.loads(b2)["error"]
    assert r2.code == 502 and err["code"] == "shared_answer_unusable" and "cut" in err["message"]
    assert a.count() == 3
    r_stats = await within(http_client().get(gw.admin_url + "/cache/stats"), 5)
    s = await treq.json_content(r_stats)
    assert s["unconvertible"] >= 3 and s["converted"] >= 1, s
