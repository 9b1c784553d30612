"""Cache benchmark: how much backend work a repetitive workload saves.

    .venv/bin/python bench/cache_bench.py            # about a minute
    .venv/bin/python bench/cache_bench.py --quick

Replays a seeded workload of chat prompts drawn Zipf-like from a pool (so a
few are very popular and arrive concurrently), half of them streamed, all
deterministic (temperature 0), through the gateway in front of one mock
backend, and prints the share of client requests that never reached the
backend (counted by the mock itself) beside the best any cache could do on
this workload (one backend request per distinct question): first with one
entry per framing (``cache.cross_format=false``), then with one answer
serving streamed and plain requests alike (the default). Then it measures
cache hits alone: requests/s at 64 clients and p99 latency, against the mock
answering the same requests directly. Everything runs on 127.0.0.1 and every
loop is bounded.
"""

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, List, Tuple

from twisted.internet import defer

sys.path.insert(0, str(Path(__file__).parent))
from proxy_bench import (  # noqa: E402
    ADMIN_AUTH, bench_main, connect, pct, start_children, stop_children, throughput)


def zipf_workload(n: int, pool: int, s: float, seed: int) -> List[Tuple[int, bool]]:
    rng = random.Random(seed)
    weights = [1.0 / (rank ** s) for rank in range(1, pool + 1)]
    prompts = rng.choices(range(pool), weights, k=n)
    return [(p, rng.random() < 0.5) for p in prompts]


def request_bytes(prompt: int, stream: bool) -> bytes:
    body = json.dumps({"model": "mock-llm", "stream": stream, "temperature": 0,
                       "max_tokens": 16,
                       "messages": [{"role": "user", "content": f"question {prompt}"}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


async def get_json(reactor: Any, port: int, path: str) -> Any:
    c = await connect(reactor, port)
    c.captured = b""
    orig = c.dataReceived

    def keep(data: bytes) -> None:
        c.captured += data
        orig(data)

    c.dataReceived = keep
    await c.request(b"GET %s HTTP/1.1\r\nHost: b\r\n%s\r\n" % (path.encode(), ADMIN_AUTH))
    c.transport.loseConnection()
    body = c.captured.partition(b"\r\n\r\n")[2]
    if b"\r\n" in body.split(b"{", 1)[0]:  # chunked
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return json.loads(body)


async def replay(reactor: Any, port: int, work: List[Tuple[int, bool]], clients: int,
                 limit_s: float) -> float:
    conns = [await connect(reactor, port) for _ in range(clients)]
    queue = list(reversed(work))
    deadline = reactor.seconds() + limit_s

    async def worker(c: Any) -> None:
        while queue and reactor.seconds() < deadline:
            prompt, stream = queue.pop()
            status, *_ = await c.request(request_bytes(prompt, stream))
            assert status == 200, status

    start = reactor.seconds()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker(c)) for c in conns])
    for c in conns:
        c.transport.loseConnection()
    return reactor.seconds() - start


async def run(reactor: Any, args: argparse.Namespace) -> None:
    n = 1000 if args.quick else 4000
    work = zipf_workload(n, pool=300, s=1.1, seed=7)
    prompts = len({p for p, _ in work})
    pairs = len(set(work))
    print(f"workload: {n} requests, {prompts} distinct prompts, {pairs} distinct (prompt, "
          "framing) pairs (Zipf s=1.1 over 300 prompts, half streamed), 32 clients", flush=True)
    # The same workload with one entry per framing, then with one answer
    # serving both (the default), each on a fresh mock and gateway.
    for cross in (False, True):
        mock, mock_port, gw, gw_port = await start_children(
            reactor, ["--ttft-ms", "30", "--itl-ms", "5"],
            ["--set", f"cache.cross_format={'true' if cross else 'false'}"])
        try:
            await workload_saving(reactor, work, mock_port, gw_port, cross,
                                  prompts if cross else pairs)
            if cross:
                await hit_speed(reactor, args, work, mock_port, gw_port)
        finally:
            await stop_children(reactor, gw, mock)


async def workload_saving(reactor: Any, work: List[Tuple[int, bool]], mock_port: int,
                          gw_port: int, cross: bool, distinct: int) -> None:
    n = len(work)
    elapsed = await replay(reactor, gw_port, work, clients=32, limit_s=120)
    backend = (await get_json(reactor, mock_port, "/stats"))["by_path"]["/v1/chat/completions"]
    cache = await get_json(reactor, gw_port, "/cache/stats")
    saved = 100.0 * (n - backend) / n
    best = 100.0 * (n - distinct) / n
    print(f"cache.cross_format={'true' if cross else 'false'}"
          f" ({'one answer serves both framings' if cross else 'one entry per framing'}),"
          f" replayed in {elapsed:.1f}s", flush=True)
    print(f"  backend requests: {backend}  -> backend requests saved: {saved:.1f}% "
          f"(best possible with this setting: {best:.1f}%)", flush=True)
    print(f"  gateway cache: {cache['hits']} hits ({cache['converted']} served in the other "
          f"framing), {cache['coalesced']} coalesced into in-flight twins, {cache['misses']} "
          f"misses, {cache['entries']} entries, {cache['size_bytes'] / 1024:.0f} KB", flush=True)


async def hit_speed(reactor: Any, args: argparse.Namespace, work: List[Tuple[int, bool]],
                    mock_port: int, gw_port: int) -> None:

    hot = sorted({p for p, s in work if not s})[:50]
    secs = 3 if args.quick else 8
    def hot_request(k: int, i: int) -> bytes:
        return request_bytes(hot[(k + i) % len(hot)], False)

    hit_rps, hit_lat = await throughput(reactor, gw_port, 64, secs, hot_request)
    direct_rps, direct_lat = await throughput(reactor, mock_port, 64, secs, hot_request)
    print(f"  cache hits, 64 clients: {hit_rps:.0f} requests/s, p50 {1000 * pct(hit_lat, 50):.2f} ms,"
          f" p99 {1000 * pct(hit_lat, 99):.2f} ms", flush=True)
    print(f"  same requests direct to the mock backend: {direct_rps:.0f} requests/s, "
          f"p99 {1000 * pct(direct_lat, 99):.2f} ms (ratio x{hit_rps / direct_rps:.2f})",
          flush=True)


if __name__ == "__main__":
    bench_main(__doc__, run)
