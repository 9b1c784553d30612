"""The Redis tier through two real gateway processes sharing a real
redis-server: a prompt answered through one is a hit through the other;
identical requests spread over both reach the backend once, streamed
followers a few ms behind the leader; Redis killed mid-run fails no client,
/health says degraded, and shared hits resume when it is back."""

import json
import shutil
import subprocess
import tempfile

import pytest
import pytest_twisted
import treq
from twisted.internet import defer, reactor

from harness import (JSON, free_port, http_client, raw_connect, raw_post, sleep, start_gateway,
                     stop_gateway, within)

REDIS = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS is None, reason="Debian's redis-server is not installed here (.ci/install-services "
                          "installs it where it can: as root or with sudo)")


class Redis:
    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ntonix-redis-")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready(self):
        for _ in range(100):
            try:
                c = await raw_connect(self.port)
                c.transport.write(b"PING\r\n")
                await c.wait_data(1)
                c.transport.loseConnection()
                return
            except Exception:
                await sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"


@pytest_twisted.async_yield_fixture
async def redis():
    r = Redis()
    r.start()
    await r.ready()
    yield r
    r.stop()
    shutil.rmtree(r.dir, ignore_errors=True)


async def two_gateways(redis, mock):
    # Gateways sharing a Redis share the secret that keys the cache scope.
    args = ["--port", "0", "--backend", mock.address, "--set", f"cache.redis_url={redis.url}"]
    env = {"NTONIX_SERVER_SECRET": "shared by both gateways"}
    a = await start_gateway(args, env=env)
    try:
        b = await start_gateway(args, env=env)
    except BaseException:
        await stop_gateway(a)
        raise
    return a, b


async def ask(gw, text, stream=False):
    doc = {"model": "mock-llm", "temperature": 0, "max_tokens": 8, "stream": stream,
           "messages": [{"role": "user", "content": text}]}
    r = await within(http_client().post(gw.url + "/v1/chat/completions",
                                        data=json.dumps(doc).encode(), headers=JSON), 20)
    return r, await within(treq.content(r), 20)


async def stored(redis, n):
    """Until Redis holds ``n`` entries (bounded): a leader's store reaches
    Redis a moment after its own client has the answer."""
    from ntonix.cache.redis_client import RedisClient
    client = RedisClient(reactor, "127.0.0.1", redis.port)
    try:
        for _ in range(200):
            keys = await within(client.execute(b"KEYS", b"ntonix:v1:e:*"), 5)
            if len(keys) >= n:
                return
            await sleep(0.01)
        raise AssertionError(f"redis holds {len(keys)} entries, not {n}")
    finally:
        await client.close()


def cache_label(r):
    return (r.headers.getRawHeaders(b"x-cache") or [b""])[0]


@pytest_twisted.ensureDeferred
async def test_answer_through_one_gateway_is_a_hit_through_the_other(redis, mocks):
    m, _ = mocks
    a, b = await two_gateways(redis, m)
    try:
        for n, stream in enumerate((False, True), 1):
            r1, body1 = await ask(a, f"shared {stream}", stream)
            await stored(redis, n)
            r2, body2 = await ask(b, f"shared {stream}", stream)
            assert (cache_label(r1), cache_label(r2)) == (b"MISS", b"HIT")
            assert body1 == body2
        assert m.count() == 2
        r = await within(http_client().get(b.admin_url + "/cache/stats"), 5)
        assert (await treq.json_content(r))["shared"]["hits"] == 2
    finally:
        await stop_gateway(a)
        await stop_gateway(b)


@pytest_twisted.ensureDeferred
async def test_each_client_gets_its_own_framing_across_gateways(redis, mocks):
    m, _ = mocks
    m.knobs.ttft_ms = 200
    a, b = await two_gateways(redis, m)
    try:
        # Stored through one gateway in one framing, asked in the other.
        for n, (first, then) in enumerate(((True, False), (False, True)), 1):
            await ask(a, f"frame {first}", first)
            await stored(redis, n)
            r, body = await ask(b, f"frame {first}", then)
            ctype = r.headers.getRawHeaders(b"content-type")[0]
            assert cache_label(r) == b"HIT"
            assert (ctype == b"text/event-stream") == then, (then, ctype, body[:80])
            if not then:
                assert json.loads(body)["object"] == "chat.completion"
        # In flight on one gateway, joined from the other in both framings.
        calls = [defer.ensureDeferred(ask(a, "frame live", True))]
        await sleep(0.05)
        calls += [defer.ensureDeferred(ask(b, "frame live", stream)) for stream in
                  (False, True, False)]
        results = await defer.gatherResults(calls)
        for (r, body), stream in zip(results, (True, False, True, False)):
            assert r.code == 200, body
            ctype = r.headers.getRawHeaders(b"content-type")[0]
            assert (ctype == b"text/event-stream") == stream, (stream, ctype, body[:80])
        assert m.count() == 3
    finally:
        await stop_gateway(a)
        await stop_gateway(b)


class FirstToken:
    """A raw client that notes when the first content event arrives."""

    def __init__(self, client):
        self.client = client
        self.first_at = None
        orig = client.dataReceived

        def seen(data):
            orig(data)
            if self.first_at is None and b'"content":"' in client.received.replace(
                    b'"content":""', b""):
                self.first_at = reactor.seconds()
        client.dataReceived = seen


@pytest_twisted.ensureDeferred
async def test_identical_requests_over_both_gateways_reach_the_backend_once(redis, mocks):
    m, _ = mocks
    m.knobs.ttft_ms = 300
    m.knobs.itl_ms = 20
    a, b = await two_gateways(redis, m)
    try:
        # Streamed: 20 clients, 10 on each gateway.
        body = json.dumps({"model": "mock-llm", "temperature": 0, "max_tokens": 8,
                           "stream": True, "messages": [{"role": "user",
                                                         "content": "twenty"}]}).encode()
        clients = []
        for i in range(20):
            c = await raw_connect((a if i % 2 else b).port)
            clients.append(FirstToken(c))
            c.transport.write(raw_post(body, close=True))
        await defer.gatherResults([within(t.client.closed, 20) for t in clients])
        bodies = {t.client.body for t in clients}
        assert all(t.client.status == 200 for t in clients)
        assert m.count() == 1, f"{m.count()} backend requests for one question"
        # Every client got the whole stream, byte for byte the same, [DONE] last.
        assert len(bodies) == 1, bodies
        whole = bodies.pop()
        assert whole.count(b"data: ") == 11 and b"data: [DONE]\n\n" in whole
        firsts = sorted(t.first_at for t in clients)
        spread_ms = 1000 * (firsts[-1] - firsts[0])
        assert spread_ms < 20, f"followers' first token up to {spread_ms:.1f} ms after the leader's"

        # Not streamed: the same, through both.
        results = await defer.gatherResults([
            defer.ensureDeferred(ask(a if i % 2 else b, "twenty plain")) for i in range(20)])
        assert {body for _, body in results}.__len__() == 1
        assert m.count() == 2
    finally:
        await stop_gateway(a)
        await stop_gateway(b)


@pytest_twisted.ensureDeferred
async def test_redis_killed_mid_run_fails_no_client_and_comes_back(redis, mocks):
    m, _ = mocks
    a, b = await two_gateways(redis, m)
    try:
        r, _ = await ask(a, "before")
        assert r.code == 200
        redis.stop()
        for i in range(8):
            r, body = await ask(a if i % 2 else b, f"while redis is down {i}")
            assert r.code == 200, body
        r = await within(http_client().get(a.url + "/health"), 5)
        doc = await treq.json_content(r)
        assert r.code == 200 and doc["status"] == "degraded" and doc["cache_tier"] == "degraded"
        assert "redis unusable" in a.output.decode()
        redis.start()
        await redis.ready()
        # Within the tier's retry interval (5 s) and a little: shared hits again.
        for k in range(100):
            await ask(a, f"after {k}")
            r2, _ = await ask(b, f"after {k}")
            if cache_label(r2) == b"HIT":
                break
            await sleep(0.1)
        else:
            raise AssertionError("shared hits did not resume after redis came back")
        r = await within(http_client().get(a.url + "/health"), 5)
        assert (await treq.json_content(r))["status"] == "healthy"
    finally:
        await stop_gateway(a)
        await stop_gateway(b)
