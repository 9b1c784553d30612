"""The response cache end to end, counted by the mock backends' own stats."""

import json

import pytest_twisted
from twisted.internet import defer, reactor

from harness import JSON, chat_body, http_client, raw_connect, raw_post, until, within

DET = {"temperature": 0}  # deterministic: cacheable


async def ask(gw, text="cache me", stream=False, headers=None, **kw):
    h = dict(JSON)
    h.update(headers or {})
    body = chat_body(text, stream=stream, **{**DET, **kw})
    r = await http_client().post(gw.url + "/v1/chat/completions", data=body, headers=h)
    return r, await within(r.content(), 20)


def header(r, name):
    v = r.headers.getRawHeaders(name)
    return v[0] if v else None


async def stats(gw):
    return await (await http_client().get(gw.admin_url + "/cache/stats")).json()


@pytest_twisted.ensureDeferred
async def test_repeated_prompt_reaches_backend_once(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    r1, b1 = await ask(gw)
    assert header(r1, b"x-cache") == b"MISS" and header(r1, b"x-backend")
    for _ in range(4):
        r, b = await ask(gw)
        assert b == b1 and header(r, b"x-cache") == b"HIT"
        assert header(r, b"age") == b"0" and header(r, b"x-backend") is None
        assert header(r, b"x-request-id") != header(r1, b"x-request-id")
    assert a.count() == 1
    s = await stats(gw)
    assert (s["hits"], s["misses"], s["entries"], s["hit_rate"]) == (4, 1, 1, 0.8)
    # Other prompts and other parameters are other questions; the streamed
    # form is the same question, served from the same entry.
    await ask(gw, text="another")
    await ask(gw, max_tokens=3)
    r, _ = await ask(gw, stream=True)
    assert header(r, b"x-cache") == b"HIT"
    assert a.count() == 3


@pytest_twisted.ensureDeferred
async def test_streamed_hit_replays_same_events(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.itl_ms = 20
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    r1, first = await ask(gw, stream=True, max_tokens=10)
    assert first.endswith(b"data: [DONE]\n\n")
    start = reactor.seconds()
    r2, second = await ask(gw, stream=True, max_tokens=10)
    assert second == first and header(r2, b"x-cache") == b"HIT"
    assert header(r2, b"content-type") == b"text/event-stream"
    assert reactor.seconds() - start < 0.15  # instant replay by default
    assert a.count() == 1
    # The non-streamed form of the same question is answered from the same
    # entry, as JSON, never as SSE.
    r3, body = await ask(gw, max_tokens=10)
    assert header(r3, b"x-cache") == b"HIT" and json.loads(body)["object"] == "chat.completion"
    assert header(r3, b"content-type") == b"application/json"
    assert a.count() == 1


@pytest_twisted.ensureDeferred
async def test_paced_replay_keeps_the_cadence(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.itl_ms = 40
    gw = await gateway_factory("--port", "0", "--backend", a.address, "--set", "cache.replay=paced")
    start = reactor.seconds()
    _, first = await ask(gw, stream=True, max_tokens=8)
    live = reactor.seconds() - start
    start = reactor.seconds()
    r, second = await ask(gw, stream=True, max_tokens=8)
    replayed = reactor.seconds() - start
    assert second == first and header(r, b"x-cache") == b"HIT"
    assert replayed >= 0.25 and replayed >= 0.6 * live


async def burst(gw, n, **kw):
    return await defer.gatherResults(
        [defer.Deferred.fromCoroutine(ask(gw, **kw)) for _ in range(n)])


@pytest_twisted.ensureDeferred
async def test_20_concurrent_identical_requests_reach_backend_once(mocks, gateway_factory):
    a, b = mocks
    for m in mocks:
        m.knobs.ttft_ms = 300
        m.knobs.itl_ms = 10
    gw = await gateway_factory("--port", "0", "--backend", a.address, "--backend", b.address)
    for stream in (False, True):
        results = await burst(gw, 20, text=f"twins {stream}", stream=stream, max_tokens=12)
        bodies = {body for _, body in results}
        assert len(bodies) == 1 and all(r.code == 200 for r, _ in results)
        body = bodies.pop()
        if stream:
            assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == 15
        else:
            assert len(json.loads(body)["choices"][0]["message"]["content"].split()) == 12
        labels = sorted(header(r, b"x-cache") for r, _ in results)
        assert labels == [b"HIT"] * 19 + [b"MISS"]
        for r, _ in results:  # X-Backend only on the one that went upstream
            assert (header(r, b"x-backend") is None) == (header(r, b"x-cache") == b"HIT")
    assert a.count() + b.count() == 2
    assert (await stats(gw))["coalesced"] == 38


@pytest_twisted.ensureDeferred
async def test_sampled_requests_bypass_and_are_not_coalesced(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.ttft_ms = 100
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    results = await burst(gw, 5, temperature=0.8)
    assert [header(r, b"x-cache") for r, _ in results] == [b"BYPASS"] * 5
    assert a.count() == 5
    gw2 = await gateway_factory("--port", "0", "--backend", a.address, "--set", "cache.sampled=true")
    await ask(gw2, temperature=0.8)
    r, _ = await ask(gw2, temperature=0.8)
    assert header(r, b"x-cache") == b"HIT" and a.count() == 6


@pytest_twisted.ensureDeferred
async def test_no_cache_and_no_store(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    r, _ = await ask(gw, headers={b"Cache-Control": [b"no-store"]})
    assert header(r, b"x-cache") == b"BYPASS"
    r, _ = await ask(gw)
    assert header(r, b"x-cache") == b"MISS"  # no-store kept nothing
    r, _ = await ask(gw, headers={b"Cache-Control": [b"no-cache"]})
    assert header(r, b"x-cache") == b"BYPASS"  # skipped the lookup...
    assert a.count() == 3
    r, _ = await ask(gw)
    assert header(r, b"x-cache") == b"HIT" and a.count() == 3  # ...but stored the answer
    r, _ = await ask(gw, headers={b"Cache-Control": [b"max-age=0, no-store"]})
    assert header(r, b"x-cache") == b"BYPASS" and a.count() == 4


@pytest_twisted.ensureDeferred
async def test_credentials_do_not_share_entries_by_default(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    alice = {b"Authorization": [b"Bearer alice"]}
    bob = {b"Authorization": [b"Bearer bob"]}
    await ask(gw, headers=alice)
    r, _ = await ask(gw, headers=bob)
    assert header(r, b"x-cache") == b"MISS" and a.count() == 2
    r, _ = await ask(gw, headers=alice)
    assert header(r, b"x-cache") == b"HIT"
    gw2 = await gateway_factory("--port", "0", "--backend", a.address,
                                "--set", "cache.scope=global")
    await ask(gw2, headers=alice)
    r, _ = await ask(gw2, headers=bob)
    assert header(r, b"x-cache") == b"HIT"


@pytest_twisted.ensureDeferred
async def test_cache_disabled(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "cache.enabled=false")
    for _ in range(3):
        r, _ = await ask(gw)
        assert header(r, b"x-cache") is None
    assert a.count() == 3 and (await stats(gw))["enabled"] is False


def raw_stream_request(text):
    return raw_post(chat_body(text, stream=True, **DET), close=True)


@pytest_twisted.ensureDeferred
async def test_slow_joiner_does_not_slow_others_and_still_gets_everything(
        mocks, gateway_factory):
    a, _ = mocks
    a.knobs.tokens = 20_000  # about 4 MB of SSE, generated as fast as it is read
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "cache.max_entry_mb=64")
    slow = await raw_connect(gw.port)
    slow.transport.write(raw_stream_request("shared"))
    await slow.wait_data(5)
    slow.transport.pauseProducing()  # this one stops reading
    start = reactor.seconds()
    r, fast_body = await ask(gw, text="shared", stream=True)
    assert fast_body.endswith(b"data: [DONE]\n\n") and header(r, b"x-cache") == b"HIT"
    assert reactor.seconds() - start < 15
    assert a.stats.streams_completed == 1 and a.count() == 1
    slow.transport.resumeProducing()
    await within(slow.closed, 30)
    assert slow.body.replace(b"\r\n", b"").endswith(b"data: [DONE]\n\n0")
    assert len(slow.body) > len(fast_body)  # the same events, in chunked framing


@pytest_twisted.ensureDeferred
async def test_leader_leaving_does_not_cut_others_last_leaving_cancels(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.itl_ms = 30
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    leader = await raw_connect(gw.port)
    leader.transport.write(raw_stream_request("group"))
    await leader.wait_data(5)
    follower = defer.Deferred.fromCoroutine(ask(gw, text="group", stream=True))
    deadline = reactor.seconds() + 5
    while (await stats(gw))["coalesced"] < 1:  # the follower has joined the flight
        assert reactor.seconds() < deadline
    leader.transport.abortConnection()
    r, body = await within(follower, 10)
    assert header(r, b"x-cache") == b"HIT"  # it joined the leader's flight
    assert body.endswith(b"data: [DONE]\n\n") and a.stats.disconnects == 0
    assert a.count() == 1

    lone = await raw_connect(gw.port)
    lone.transport.write(raw_stream_request("abandoned"))
    await lone.wait_data(5)
    lone.transport.abortConnection()
    await until(lambda: a.stats.disconnects == 1, timeout=1)


@pytest_twisted.ensureDeferred
async def test_failing_leader_gives_joiners_the_same_answer(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.ttft_ms = 200
    a.knobs.fail_rate = 1.0
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "health.interval_seconds=600")
    results = await burst(gw, 5, text="doomed")
    assert {r.code for r, _ in results} == {500}
    assert len({body for _, body in results}) == 1
    assert a.stats.faults_500 == 1
    r, _ = await ask(gw, text="doomed")
    assert header(r, b"x-cache") == b"MISS"  # the error was not stored


@pytest_twisted.ensureDeferred
async def test_answer_larger_than_the_entry_cap_is_relayed_but_not_kept(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.tokens = 3000  # about 600 KB of SSE
    a.knobs.itl_ms = 0.2
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "cache.max_entry_mb=0.05")
    first = defer.Deferred.fromCoroutine(ask(gw, text="huge", stream=True))
    await until(lambda: a.stats.bytes_sent > 200_000, timeout=10)
    # Past the cap the flight takes no joiners: this one goes upstream itself.
    r2, body2 = await ask(gw, text="huge", stream=True)
    r1, body1 = await within(first, 30)
    assert body1 == body2 and body1.endswith(b"data: [DONE]\n\n") and len(body1) > 400_000
    assert a.count() == 2
    r3, _ = await ask(gw, text="huge", stream=True)
    assert header(r3, b"x-cache") == b"MISS" and a.count() == 3  # nothing was stored
    assert (await stats(gw))["entries"] == 0
