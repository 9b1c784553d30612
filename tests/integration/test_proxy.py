"""The proxy path end to end: the real plugin in front of real mock backends."""

import json

import pytest_twisted
from twisted.internet import defer, protocol, reactor

from harness import (
    JSON,
    Mock,
    chat_body,
    raw_post,
    http_client,
    raw_connect,
    sleep,
    until,
    within,
)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def post(url, body, headers=None, **kw):
    h = dict(JSON)
    h.update(headers or {})
    return await http_client().post(url, data=body, headers=h, **kw)


@pytest_twisted.ensureDeferred
async def test_answers_byte_identical_to_backend(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    for stream in (False, True):
        body = chat_body("identical?", stream=stream, max_tokens=40)
        direct = await (await post(f"http://{a.address}/v1/chat/completions", body)).content()
        via = await post(gw.url + "/v1/chat/completions", body)
        assert via.code == 200
        assert await via.content() == direct
        if stream:
            assert via.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    for path, doc in [("/v1/completions", {"prompt": "p", "max_tokens": 5}),
                      ("/v1/embeddings", {"input": "e"})]:
        body = json.dumps(doc).encode()
        direct = await (await post(f"http://{a.address}{path}", body)).content()
        assert await (await post(gw.url + path, body)).content() == direct


class Timed(protocol.Protocol):
    def __init__(self, on_data=None):
        self.chunks = []
        self.done = defer.Deferred()
        self.on_data = on_data

    def dataReceived(self, data):
        self.chunks.append((reactor.seconds(), data))
        if self.on_data:
            self.on_data(data)

    def connectionLost(self, reason):
        self.done.callback(None)


@pytest_twisted.ensureDeferred
async def test_chunks_reach_client_before_backend_finishes(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.itl_ms = 60
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    backend_done_at_first_token = []

    def seen(data):
        if b'"content":"' in data and b'"content":""' not in data \
                and not backend_done_at_first_token:
            backend_done_at_first_token.append(a.stats.streams_completed)

    r = await post(gw.url + "/v1/chat/completions", chat_body(stream=True, max_tokens=8))
    p = Timed(seen)
    r.deliverBody(p)
    await within(p.done, 10)
    # When the first token reached the client the backend had not finished...
    assert backend_done_at_first_token == [0]
    assert a.stats.streams_completed == 1
    # ...and tokens arrived spread out, as generated, not in one burst at the end.
    times = [t for t, d in p.chunks]
    assert times[-1] - times[0] >= 0.3
    assert len(p.chunks) >= 5


@pytest_twisted.ensureDeferred
async def test_stalled_reader_pauses_backend_and_bounds_gateway_memory(gateway_factory):
    # About 40 MB of SSE if it were all generated.
    big = Mock("big", tokens=200_000)
    try:
        gw = await gateway_factory("--port", "0", "--backend", big.address)
        # Warm the gateway up once so the RSS baseline includes its code paths.
        warm = await post(gw.url + "/v1/chat/completions", chat_body(stream=True, max_tokens=50))
        await warm.content()
        base_rss = rss_kb(gw.transport.pid)
        sent_before = big.stats.bytes_sent

        client = await raw_connect(gw.port)
        body = chat_body("big one", stream=True)
        client.transport.write(raw_post(body))
        await client.wait_data(5)
        client.transport.pauseProducing()  # stop reading: the client socket fills up
        await until(lambda: big.stats.pauses >= 1, timeout=10)
        # The buffers between the two fill up, then the backend stays paused:
        # nothing more is generated. (On a loaded machine the filling takes
        # a while: wait until the count holds still, bounded.)
        seen = [-1, 0]

        def settled():
            now = big.stats.bytes_sent
            seen[:] = [now, seen[1] + 1 if now == seen[0] else 0]
            return seen[1] >= 3

        await until(settled, timeout=10, step=0.1)
        sent_paused = big.stats.bytes_sent
        await sleep(0.5)
        assert big.stats.bytes_sent == sent_paused, (sent_paused, big.stats.bytes_sent,
                                                     big.stats.pauses)
        in_flight = sent_paused - sent_before - len(client.received)
        growth_kb = rss_kb(gw.transport.pid) - base_rss
        # Bounded by socket buffers, nowhere near the 40 MB stream.
        assert in_flight < 16 * 1024 * 1024, in_flight
        assert growth_kb < 8 * 1024, growth_kb

        # Reading again resumes the backend, and the whole stream arrives.
        client.transport.resumeProducing()
        await until(lambda: client.received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"),
                    timeout=60)
        assert big.stats.streams_completed == 2
        client.transport.loseConnection()
    finally:
        await big.stop()


@pytest_twisted.ensureDeferred
async def test_client_disconnect_reaches_backend_within_a_second(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.itl_ms = 50
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    client = await raw_connect(gw.port)
    body = chat_body(stream=True, max_tokens=1000)
    client.transport.write(raw_post(body))
    await client.wait_data(5)
    assert a.stats.active == 1
    client.transport.loseConnection()
    gone_at = reactor.seconds()
    await until(lambda: a.stats.disconnects == 1, timeout=1.0)
    assert reactor.seconds() - gone_at < 1.0
    assert a.stats.active == 0 and a.stats.streams_completed == 0
    # The gateway carries on.
    r = await post(gw.url + "/v1/chat/completions", chat_body())
    assert r.code == 200
    await r.content()


@pytest_twisted.ensureDeferred
async def test_disconnect_before_response_head_cancels_upstream(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.hang_rate = 1.0
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    client = await raw_connect(gw.port)
    body = chat_body()
    client.transport.write(raw_post(body))
    await until(lambda: a.stats.active == 1, timeout=5)
    client.transport.loseConnection()
    await until(lambda: a.stats.disconnects == 1, timeout=1.0)


async def error_of(response, status):
    assert response.code == status, (response.code, await response.content())
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert response.headers.getRawHeaders(b"x-request-id")
    doc = await response.json()
    assert set(doc["error"]) == {"message", "type", "code"}
    return doc["error"]


@pytest_twisted.ensureDeferred
async def test_client_errors_are_openai_json(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "server.max_body_bytes=4000")
    http = http_client()
    url = gw.url + "/v1/chat/completions"
    e = await error_of(await http.get(gw.url + "/nothing"), 404)
    assert e["code"] == "not_found"
    r = await http.get(url)
    e = await error_of(r, 405)
    assert r.headers.getRawHeaders(b"allow") == [b"POST"]
    e = await error_of(await http.post(url, data=chat_body(),
                                       headers={b"Content-Type": [b"text/plain"]}), 415)
    assert "application/json" in e["message"]
    cases = [
        (b"{nope", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"messages": []}).encode(), "non-empty list"),
        (json.dumps({"messages": [{"content": "x"}]}).encode(), "messages[0] has no role"),
        (json.dumps({"messages": ["x"]}).encode(), "messages[0] must be an object"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 1500 + b"]" * 1500, "nested too deeply"),
        (json.dumps({"messages": [{"role": "user"}], "stream": "yes"}).encode(),
         "stream must be"),
    ]
    for body, words in cases:
        e = await error_of(await post(url, body), 400)
        assert words in e["message"], (body[:20], e)
    e = await error_of(await post(url, b'{"messages": [' + b" " * 5000 + b"]}"), 413)
    assert "server.max_body_bytes" in e["message"]
    e = await error_of(await post(gw.url + "/v1/embeddings", b"{}"), 400)
    assert "input" in e["message"]
    assert a.stats.requests == 0  # none of these reached the backend


@pytest_twisted.ensureDeferred
async def test_backend_errors_pass_through_unchanged(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.fail_rate = 1.0
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    direct = await post(f"http://{a.address}/v1/chat/completions", chat_body())
    via = await post(gw.url + "/v1/chat/completions", chat_body())
    assert via.code == direct.code == 500
    assert await via.content() == await direct.content()


@pytest_twisted.ensureDeferred
async def test_no_backend_503_with_retry_after(gateway_factory):
    gw = await gateway_factory("--port", "0")
    # Logged just after the listening line, which may arrive in another read.
    await until(lambda: b"no backends configured" in gw.output, timeout=5)
    r = await post(gw.url + "/v1/chat/completions", chat_body())
    e = await error_of(r, 503)
    assert e["code"] == "no_backend_available" and r.headers.getRawHeaders(b"retry-after")
    health = await http_client().get(gw.url + "/health")
    assert health.code == 503 and (await health.json())["status"] == "unhealthy"


@pytest_twisted.ensureDeferred
async def test_refused_backend_retried_on_another_else_502(mocks, gateway_factory):
    a, b = mocks
    dead = Mock("dead")
    dead_address = dead.address
    await dead.stop()
    gw = await gateway_factory("--port", "0", "--backend", dead_address, "--backend", a.address)
    for _ in range(4):
        r = await post(gw.url + "/v1/chat/completions", chat_body())
        assert r.code == 200 and r.headers.getRawHeaders(b"x-backend") == [a.address.encode()]
        await r.content()
    gw2 = await gateway_factory("--port", "0", "--backend", dead_address)
    e = await error_of(await post(gw2.url + "/v1/chat/completions", chat_body()), 502)
    assert e["code"] == "upstream_unreachable" and dead_address in e["message"]


@pytest_twisted.ensureDeferred
async def test_no_response_head_in_time_is_504(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.hang_rate = 1.0
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--response-timeout", "0.5")
    start = reactor.seconds()
    e = await error_of(await post(gw.url + "/v1/chat/completions", chat_body()), 504)
    assert 0.5 <= reactor.seconds() - start < 5
    assert "proxy.response_timeout_seconds" in e["message"]
    # The abandoned upstream request was closed, not left generating.
    await until(lambda: a.stats.disconnects == 1, timeout=2)


@pytest_twisted.ensureDeferred
async def test_backend_dying_mid_stream_ends_with_sse_error_event(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.reset_rate = 1.0
    a.knobs.reset_after = 3
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    r = await post(gw.url + "/v1/chat/completions", chat_body(stream=True))
    body = await r.content()  # a clean end of the response, no exception
    blocks = body.split(b"\n\n")
    assert blocks[-1] == b""
    assert blocks[-2].startswith(b"event: error\ndata: ")
    err = json.loads(blocks[-2].split(b"data: ", 1)[1])["error"]
    assert err["code"] == "upstream_stream_failed" and a.address in err["message"]
    assert sum(1 for blk in blocks if b'"content":"' in blk) == 4  # role prelude + 3 tokens
    a.knobs.reset_rate = 0.0
    r = await post(gw.url + "/v1/chat/completions", chat_body(stream=True))
    assert (await r.content()).endswith(b"data: [DONE]\n\n")


@pytest_twisted.ensureDeferred
async def test_stream_idle_timeout(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.itl_ms = 2000
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "proxy.stream_idle_timeout_seconds=0.4")
    r = await post(gw.url + "/v1/chat/completions", chat_body(stream=True, max_tokens=5))
    body = await within(r.content(), 5)
    assert b"event: error" in body and b"proxy.stream_idle_timeout_seconds" in body
    await until(lambda: a.stats.disconnects == 1, timeout=2)


@pytest_twisted.ensureDeferred
async def test_stalled_client_is_let_go_without_blaming_the_backend(gateway_factory):
    big = Mock("big", tokens=200_000)
    try:
        gw = await gateway_factory("--port", "0", "--backend", big.address,
                                   "--set", "proxy.stream_idle_timeout_seconds=0.5")
        client = await raw_connect(gw.port)
        client.transport.write(raw_post(chat_body("stall", stream=True)))
        await client.wait_data(5)
        client.transport.pauseProducing()
        await until(lambda: big.stats.pauses >= 1, timeout=10)
        # The gateway drops the client that reads nothing, and the backend's
        # stream is closed with it...
        await until(lambda: big.stats.disconnects == 1, timeout=5)
        # The log line travels on another channel than the backend's socket.
        await until(lambda: b"client read nothing for 0.5s" in gw.output, timeout=5)
        # ...and the backend is not blamed for the silence.
        doc = await (await http_client().get(gw.admin_url + "/backends")).json()
        [b] = doc["backends"]
        assert b["errors"] == 0 and b["circuit"] == "closed"
        client.transport.resumeProducing()
        await within(client.closed, 5)
    finally:
        await big.stop()


@pytest_twisted.ensureDeferred
async def test_headers_rewritten(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    r = await post(gw.url + "/v1/chat/completions", chat_body(), headers={
        b"X-Request-ID": [b"req-123"],
        b"X-Forwarded-For": [b"203.0.113.9"],
        b"Authorization": [b"Bearer sk-test"],
        b"Connection": [b"keep-alive, X-Hop-Secret"],
        b"X-Hop-Secret": [b"must not cross"],
        b"Keep-Alive": [b"timeout=5"],
        b"Proxy-Authorization": [b"Basic eA=="],
        b"X-Custom": [b"kept"],
    })
    await r.content()
    seen = a.stats.last_headers
    assert seen["x-request-id"] == "req-123"
    # Not one of tenants.trusted_proxies: its X-Forwarded-For is not believed.
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-real-ip"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["authorization"] == "Bearer sk-test" and seen["x-custom"] == "kept"
    for hop in ("x-hop-secret", "keep-alive", "proxy-authorization"):
        assert hop not in seen, hop
    assert r.headers.getRawHeaders(b"x-request-id") == [b"req-123"]
    assert r.headers.getRawHeaders(b"x-backend") == [a.address.encode()]
    assert r.headers.getRawHeaders(b"x-backend-id") == [b"a"]
    # Raw bytes: an HTTP client library may add headers of its own.
    raw = await raw_connect(gw.port)
    raw.transport.write(raw_post(chat_body(), close=True))
    await within(raw.closed, 5)
    head = raw.received.partition(b"\r\n\r\n")[0].lower()
    assert b"content-encoding" not in head and b"keep-alive" not in head
    # Without one from the client, a fresh id is made and returned.
    r = await post(gw.url + "/v1/chat/completions", chat_body())
    await r.content()
    fresh = r.headers.getRawHeaders(b"x-request-id")[0].decode()
    assert len(fresh) == 32 and a.stats.last_headers["x-request-id"] == fresh
    assert a.stats.last_headers["x-forwarded-for"] == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_no_cookie_state_between_clients(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    r = await post(gw.url + "/v1/chat/completions", chat_body(),
                   headers={b"Cookie": [b"session=alice"]})
    await r.content()
    assert a.stats.last_headers["cookie"] == "session=alice"
    r = await post(gw.url + "/v1/chat/completions", chat_body())
    await r.content()
    assert "cookie" not in a.stats.last_headers


@pytest_twisted.ensureDeferred
async def test_models_merged_from_backends(gateway_factory):
    a, b, c = Mock("a", model="llama"), Mock("b", model="qwen"), Mock("c", model="llama")
    try:
        gw = await gateway_factory("--port", "0", "--backend", a.address,
                                   "--backend", b.address, "--backend", c.address)
        doc = await (await http_client().get(gw.url + "/v1/models")).json()
        assert sorted(m["id"] for m in doc["data"]) == ["llama", "qwen"]
    finally:
        for m in (a, b, c):
            await m.stop()


@pytest_twisted.ensureDeferred
async def test_slowloris_and_slow_body_cut_while_others_are_served(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "server.header_timeout_seconds=1.5",
                               "--set", "server.body_timeout_seconds=1.5")
    slow_head = await raw_connect(gw.port)
    slow_body = await raw_connect(gw.port)
    slow_head.transport.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
    body = chat_body()
    slow_body.transport.write(raw_post(body)[:-len(body)])
    start = reactor.seconds()
    served = 0
    sent = 0
    while not (slow_head.closed.called and slow_body.closed.called):
        assert reactor.seconds() - start < 6, "slow clients were not cut off"
        if not slow_head.closed.called:
            slow_head.transport.write(b"X-Trickle-%d: 1\r\n" % sent)
        if not slow_body.closed.called and sent < len(body):
            slow_body.transport.write(body[sent:sent + 1])
        sent += 1
        r = await post(gw.url + "/v1/chat/completions", chat_body("meanwhile"))
        assert r.code == 200
        await r.content()
        served += 1
        await sleep(0.25)
    elapsed = reactor.seconds() - start
    assert 1.4 <= elapsed < 4
    assert slow_head.status == 408 and b"server.header_timeout_seconds" in slow_head.body
    assert slow_body.status == 408 and b"server.body_timeout_seconds" in slow_body.body
    assert served >= 4


@pytest_twisted.ensureDeferred
async def test_invalid_framing_and_pipelining(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    bad = await raw_connect(gw.port)
    bad.transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 3\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\nabc")
    await within(bad.closed, 5)
    assert bad.status == 400 and json.loads(bad.body)["error"]["code"] == "bad_request"
    pipe = await raw_connect(gw.port)
    one, two = chat_body("first", max_tokens=2), chat_body("second", max_tokens=30)
    pipe.transport.write(raw_post(two) + raw_post(one)
                         + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await within(pipe.closed, 10)
    # Answered in the order asked, even though the first takes longest.
    out = pipe.received
    i2 = out.index(b'"completion_tokens":30')
    i1 = out.index(b'"completion_tokens":2,')
    ih = out.index(b'"status":"healthy"')
    assert i2 < i1 < ih


@pytest_twisted.ensureDeferred
async def test_chunked_request_body_accepted(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    c = await raw_connect(gw.port)
    body = chat_body("chunked")
    c.transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + b"%x\r\n%s\r\n" % (10, body[:10])
                      + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - 10, body[10:]))
    await within(c.closed, 5)
    assert c.status == 200 and b"chat.completion" in c.received
