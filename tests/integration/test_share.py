"""One scheduler view across workers and gateways, through the real plugin:
the turns of a conversation stay on the backend that holds its prefix when
they arrive on different workers of one gateway, or alternate between two
gateways sharing a real redis-server; with Redis killed both gateways keep
serving, and they share again once it is back."""

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from harness import Sim, sleep, start_gateway, stop_gateway, within
from test_shared_cache import REDIS, Redis

INFERENCE = ["--port", "0", "--set", "balancer.algorithm=inference",
             "--set", "health.interval_seconds=0.2", "--set", "balancer.scrape_interval_seconds=0.1",
             "--set", "balancer.scrape_timeout_seconds=0.3", "--set", "cache.enabled=false"]
# A user's think time between turns: peers see a change within about 10 ms.
THINK = 0.05


def system_prompt(k):
    return f"You are assistant {k} and this is your very long system prompt. " * 120


class Lane:
    """A keep-alive connection to a gateway, and which process took it (the
    prefix of the request ids it hands out)."""

    def __init__(self, url):
        self.url = url
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 1
        self.client = treq.client.HTTPClient(Agent(reactor, pool=self.pool))
        self.process = None

    async def chat(self, messages):
        body = json.dumps({"model": "sim-llm", "messages": messages, "max_tokens": 4,
                           "temperature": 0}).encode()
        r = await within(self.client.post(self.url + "/v1/chat/completions", data=body,
                                          headers={b"Content-Type": [b"application/json"]}), 20)
        content = await within(treq.content(r), 20)
        assert r.code == 200, content
        self.process = r.headers.getRawHeaders(b"x-request-id")[0][:-16]
        answer = json.loads(content)["choices"][0]["message"]["content"]
        return r.headers.getRawHeaders(b"x-backend")[0].decode(), answer

    def close(self):
        return self.pool.closeCachedConnections()


async def lanes_on_every_worker(gw, workers=2, tries=30):
    """Keep-alive connections until one is on each worker (all kept open:
    however the gateway spreads connections, a new one lands elsewhere)."""
    lanes, by_process = [], {}
    for i in range(tries):
        lane = Lane(gw.url)
        lanes.append(lane)
        await lane.chat([{"role": "user", "content": f"hello {i}"}])
        by_process.setdefault(lane.process, lane)
        if len(by_process) == workers:
            return list(by_process.values()), lanes
    raise AssertionError(f"{tries} connections all reached {list(by_process)}")


async def conversation(lanes, k, turns=8):
    """Turn t on lanes[t % len(lanes)]; the backends that answered."""
    messages = [{"role": "system", "content": system_prompt(k)}]
    seen = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"question {t} of conversation {k}"})
        backend, answer = await lanes[t % len(lanes)].chat(messages)
        seen.append(backend)
        messages.append({"role": "assistant", "content": answer})
        await sleep(THINK)
    return seen


async def backends(gw):
    client = treq.client.HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, False)))
    r = await within(client.get(gw.admin_url + "/backends"), 5)
    return await within(treq.json_content(r), 5)


async def ready(gw, n):
    """Every backend scraped (the scorer has loads to compare)."""
    for _ in range(200):
        doc = await backends(gw)
        if len(doc["backends"]) == n and all(b["scraped"] for b in doc["backends"]):
            return
        await sleep(0.05)
    raise AssertionError(doc)


def backends_arg(sims):
    return [a for s in sims for a in ("--backend", s.address)]


@pytest_twisted.ensureDeferred
async def test_turns_on_both_workers_stay_on_one_backend():
    sims = [Sim(n) for n in "abc"]
    gw = await start_gateway(backends_arg(sims) + INFERENCE + ["--set", "server.workers=2"])
    opened = []
    try:
        await ready(gw, 3)
        lanes, opened = await lanes_on_every_worker(gw)
        for k in range(3):
            seen = await conversation(lanes, k)
            assert len(set(seen)) == 1, f"conversation {k} scattered: {seen}"
        out = gw.output.decode()
        assert "scheduler peer w0 joined" in out and "scheduler peer w1 joined" in out, out
    finally:
        for lane in opened:
            await lane.close()
        await stop_gateway(gw)
        for s in sims:
            await s.stop()


@pytest.mark.skipif(REDIS is None, reason="Debian's redis-server is not installed here")
@pytest_twisted.ensureDeferred
async def test_two_gateways_share_through_redis_and_survive_its_loss():
    sims = [Sim(n) for n in "abc"]
    redis = Redis()
    redis.start()
    await redis.ready()
    # One names its Redis in cluster.redis_url, the other through the cache
    # tier's setting (with the response cache on: it changes nothing here).
    a = await start_gateway(backends_arg(sims) + INFERENCE
                            + ["--set", f"cluster.redis_url={redis.url}"])
    b = None
    lanes = []
    try:
        b = await start_gateway(backends_arg(sims) + INFERENCE
                                + ["--set", f"cache.redis_url={redis.url}",
                                   "--set", "cache.enabled=true"])
        await ready(a, 3)
        await ready(b, 3)
        lanes = [Lane(a.url), Lane(b.url)]
        for k in range(3):
            seen = await conversation(lanes, k)
            assert len(set(seen)) == 1, f"conversation {k} scattered: {seen}"
        share = (await backends(a))["share"]
        assert len(share["peers"]) == 1 and share["peers"][0].endswith("/0"), share
        assert share["redis"]["redis"] == "ok" and share["batches_refused"] == 0, share

        redis.stop()
        for k in range(3, 5):  # every turn answered, on each gateway's own view
            await conversation(lanes, k, turns=4)
        for gw in (a, b):
            for _ in range(50):
                if b"Redis unavailable" in gw.output:
                    break
                await sleep(0.1)
            assert gw.output.count(b"scheduler share: Redis unavailable") == 1, gw.output

        redis.start()
        await redis.ready()
        for gw in (a, b):
            for _ in range(100):
                if b"scheduler share: Redis answers again" in gw.output:
                    break
                await sleep(0.1)
            else:
                raise AssertionError(gw.output.decode()[-3000:])
        await sleep(0.2)
        for k in range(5, 7):
            seen = await conversation(lanes, k)
            assert len(set(seen)) == 1, f"conversation {k} scattered after rejoining: {seen}"
    finally:
        for lane in lanes:
            await lane.close()
        await stop_gateway(a)
        if b is not None:
            await stop_gateway(b)
        redis.stop()
        for s in sims:
            await s.stop()
