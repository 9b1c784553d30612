"""The mock LLM backend on its own, over loopback: framing, determinism, pacing
and each fault knob."""

import itertools
import json
import sys

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.web.client import ResponseFailed

from harness import JSON, Mock, chat_body, http_client, raw_connect, raw_post, sleep, until, within


def events(body: bytes):
    assert body.endswith(b"\n\n")
    out = []
    for block in body.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: "), block
        out.append(block[len(b"data: "):])
    return out


@pytest_twisted.async_yield_fixture
async def mock():
    m = Mock("m1", tokens=8)
    yield m
    await m.stop()


def url(m, path):
    return f"http://{m.address}{path}"


@pytest_twisted.ensureDeferred
async def test_chat_non_streamed_shape_and_headers(mock):
    r = await http_client().post(url(mock, "/v1/chat/completions"), data=chat_body("hi"),
                                 headers=JSON)
    doc = await r.json()
    assert r.code == 200 and r.headers.getRawHeaders(b"x-backend-id") == [b"m1"]
    assert doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["role"] == "assistant"
    assert len(doc["choices"][0]["message"]["content"].split()) == 8
    assert doc["usage"] == {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9}


@pytest_twisted.ensureDeferred
async def test_stream_framing(mock):
    r = await http_client().post(url(mock, "/v1/chat/completions"),
                                 data=chat_body("hi", stream=True, max_tokens=5,
                                                stream_options={"include_usage": True}),
                                 headers=JSON)
    assert r.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    evs = events(await r.content())
    assert evs[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in evs[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:6]]
    assert len(content) == 5 and all(content)
    assert chunks[6]["choices"][0]["finish_reason"] == "stop"
    assert chunks[7]["usage"]["completion_tokens"] == 5 and chunks[7]["choices"] == []
    # The streamed text is the non-streamed answer, token for token.
    r2 = await http_client().post(url(mock, "/v1/chat/completions"),
                                  data=chat_body("hi", max_tokens=5), headers=JSON)
    assert "".join(content) == (await r2.json())["choices"][0]["message"]["content"]


@pytest_twisted.ensureDeferred
async def test_deterministic_per_prompt(mock):
    http = http_client()

    async def ask(text, stream):
        r = await http.post(url(mock, "/v1/chat/completions"), data=chat_body(text, stream),
                            headers=JSON)
        return await r.content()

    for stream in (False, True):
        assert await ask("same", stream) == await ask("same", stream)
        assert await ask("same", stream) != await ask("other", stream)


@pytest_twisted.ensureDeferred
async def test_stream_events_are_canonical_json_whatever_the_model_name(mock):
    # Token events are built from a per-stream template: each must still be
    # exactly the compact JSON of its chunk, for chat and completions, even
    # with a model name holding quotes, a NUL and non-ASCII text.
    for model, path in itertools.product(
            ('we"ird\u0000 m\u00f6del "\\u0000"', "\u0000"),
            ("/v1/chat/completions", "/v1/completions")):
        body = json.dumps({"model": model, "prompt": "x", "stream": True, "max_tokens": 6,
                           "messages": [{"role": "user", "content": "x"}]}).encode()
        r = await http_client().post(url(mock, path), data=body, headers=JSON)
        evs = events(await r.content())
        assert evs[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in evs[:-1]]
        assert len(chunks) >= 7 and all(c["model"] == model for c in chunks)
        for raw, chunk in zip(evs[:-1], chunks):
            assert raw == json.dumps(chunk, separators=(",", ":")).encode()


@pytest_twisted.ensureDeferred
async def test_completions_embeddings_models_health(mock):
    http = http_client()
    r = await http.post(url(mock, "/v1/completions"),
                        data=json.dumps({"prompt": "x", "max_tokens": 3}).encode(), headers=JSON)
    doc = await r.json()
    assert doc["object"] == "text_completion" and len(doc["choices"][0]["text"].split()) == 3
    r = await http.post(url(mock, "/v1/completions"),
                        data=json.dumps({"prompt": "x", "max_tokens": 3, "stream": True}).encode(),
                        headers=JSON)
    evs = events(await r.content())
    assert evs[-1] == b"[DONE]" and json.loads(evs[0])["object"] == "text_completion"
    r = await http.post(url(mock, "/v1/embeddings"),
                        data=json.dumps({"input": ["a", "b"], "dimensions": 4}).encode(),
                        headers=JSON)
    doc = await r.json()
    assert [len(d["embedding"]) for d in doc["data"]] == [4, 4]
    assert (await (await http.get(url(mock, "/v1/models"))).json())["data"][0]["id"] == "mock-llm"
    assert (await (await http.get(url(mock, "/health"))).json())["status"] == "ok"
    stats = await (await http.get(url(mock, "/stats"))).json()
    assert stats["requests"] == 5 and stats["by_path"]["/v1/completions"] == 2


@pytest_twisted.ensureDeferred
async def test_bad_json_is_400(mock):
    r = await http_client().post(url(mock, "/v1/chat/completions"), data=b"{nope", headers=JSON)
    assert r.code == 400 and (await r.json())["error"]["code"] == "invalid_json"


@pytest_twisted.ensureDeferred
async def test_fail_rate_answers_500(mock):
    mock.knobs.fail_rate = 1.0
    r = await http_client().post(url(mock, "/v1/chat/completions"), data=chat_body(), headers=JSON)
    assert r.code == 500 and (await r.json())["error"]["type"] == "server_error"
    assert mock.stats.faults_500 == 1


@pytest_twisted.ensureDeferred
async def test_hang_never_sends_headers_and_counts_disconnect(mock):
    mock.knobs.hang_rate = 1.0
    client = await raw_connect(mock.port.getHost().port)
    body = chat_body()
    client.transport.write(raw_post(body))
    await sleep(0.3)  # a bounded observation window: nothing may arrive in it
    assert client.received == b"" and mock.stats.faults_hang == 1 and mock.stats.active == 1
    client.transport.loseConnection()
    await within(client.closed, 5)
    await until(lambda: mock.stats.disconnects == 1, timeout=5)
    assert mock.stats.active == 0


@pytest_twisted.ensureDeferred
async def test_reset_mid_stream(mock):
    mock.knobs.reset_rate = 1.0
    mock.knobs.reset_after = 3
    r = await http_client().post(url(mock, "/v1/chat/completions"),
                                 data=chat_body(stream=True), headers=JSON)
    assert r.code == 200
    with pytest.raises(ResponseFailed):
        await r.content()
    assert mock.stats.faults_reset == 1 and mock.stats.streams_completed == 0


@pytest_twisted.ensureDeferred
async def test_pacing_ttft_and_itl(mock):
    mock.knobs.ttft_ms = 150
    mock.knobs.itl_ms = 40
    arrivals = []

    class Timed(protocol.Protocol):
        def __init__(self):
            self.done = defer.Deferred()

        def dataReceived(self, data):
            arrivals.append((reactor.seconds(), data))

        def connectionLost(self, reason):
            self.done.callback(None)

    start = reactor.seconds()
    r = await http_client().post(url(mock, "/v1/chat/completions"),
                                 data=chat_body(stream=True, max_tokens=4), headers=JSON)
    p = Timed()
    r.deliverBody(p)
    await within(p.done, 5)
    content = [t for t, d in arrivals if b'"content":"' in d and b'"content":""' not in d]
    assert content[0] - start >= 0.14
    gaps = [b - a for a, b in zip(content, content[1:])]
    assert len(gaps) == 3 and all(g >= 0.03 for g in gaps)


@pytest_twisted.ensureDeferred
async def test_control_changes_knobs_and_resets_stats(mock):
    http = http_client()
    await (await http.get(url(mock, "/health"))).content()
    r = await http.post(url(mock, "/control"),
                        data=json.dumps({"tokens": 3, "reset_stats": True}).encode(), headers=JSON)
    assert r.code == 200 and (await r.json())["tokens"] == 3
    assert mock.stats.requests == 0
    r = await http.post(url(mock, "/control"), data=json.dumps({"tokenz": 1}).encode(),
                        headers=JSON)
    assert r.code == 400 and "unknown knob" in (await r.json())["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_standalone_command_line():
    class Proc(protocol.ProcessProtocol):
        def __init__(self):
            self.out = b""
            self.up = defer.Deferred()
            self.ended = defer.Deferred()

        def outReceived(self, data):
            self.out += data
            if b"listening on" in self.out and not self.up.called:
                self.up.callback(None)

        def processEnded(self, reason):
            self.ended.callback(None)

    p = Proc()
    reactor.spawnProcess(p, sys.executable, [sys.executable, "-m", "ntonix_mock", "--port", "0",
                                             "--id", "cli", "--tokens", "2"],
                         env={"PYTHONUNBUFFERED": "1"})
    try:
        await within(p.up, 15)
        port = int(p.out.split(b"127.0.0.1:")[1].split()[0])
        r = await http_client().post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     data=chat_body(), headers=JSON)
        assert r.headers.getRawHeaders(b"x-backend-id") == [b"cli"]
        assert len((await r.json())["choices"][0]["message"]["content"].split()) == 2
    finally:
        p.transport.signalProcess("TERM")
        await within(p.ended, 10)
