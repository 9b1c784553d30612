"""The cache workload through NTONIX and through nginx's proxy_cache.

    apt-get install nginx-light     # once; the bench says so when it is missing
    .venv/bin/python bench/compare_nginx.py [--quick]

Each gateway fronts its own fresh mock backend (counted by the mock itself)
and gets the same seeded Zipf-like workload as bench/cache_bench.py: half of
the requests streamed, all deterministic, 32 concurrent clients. nginx is
configured in good faith for LLM traffic: POST caching keyed on the URI and
the request body, proxy_cache_lock so that concurrent duplicates wait for one
upstream request, upstream Cache-Control ignored so that streams are cached.

Printed: backend requests saved, time to first token of the streamed
requests, and two semantic checks on the side: sampled requests (temperature
above 0 asks for a fresh draw) answered from a cache, and requests with two
different credentials served one answer.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

from twisted.internet import defer

sys.path.insert(0, str(Path(__file__).parent))
from cache_bench import get_json, zipf_workload  # noqa: E402
from proxy_bench import (  # noqa: E402
    Child, bench_main, connect, free_port, pct, start_children, stop_children, wait_accepting)

NGINX_CONF = """
worker_processes 1;
daemon off;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    proxy_cache_path {tmp}/cache levels=1:2 keys_zone=llm:32m max_size=512m inactive=60m
                     use_temp_path=off;
    upstream backend {{ server 127.0.0.1:{mock}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        client_body_buffer_size 1m;
        client_max_body_size 10m;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache llm;
            proxy_cache_methods POST;
            proxy_cache_key "$request_uri|$request_body";
            proxy_cache_valid 200 60m;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 60s;
            proxy_cache_lock_age 60s;
            add_header X-Cache $upstream_cache_status;
        }}
    }}
}}
"""


def request_bytes(prompt: int, stream: bool, temperature: float = 0,
                  auth: bytes = b"Bearer team-a") -> bytes:
    body = json.dumps({"model": "mock-llm", "stream": stream, "temperature": temperature,
                       "max_tokens": 16,
                       "messages": [{"role": "user", "content": f"question {prompt}"}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (auth, len(body), body))


async def replay(reactor: Any, port: int, work: List[Tuple[int, bool]],
                 clients: int) -> Tuple[float, List[float]]:
    conns = [await connect(reactor, port) for _ in range(clients)]
    queue = list(reversed(work))
    ttfts: List[float] = []
    deadline = reactor.seconds() + 300

    async def worker(c: Any) -> None:
        while queue and reactor.seconds() < deadline:
            prompt, stream = queue.pop()
            status, _, ttft, _ = await c.request(request_bytes(prompt, stream))
            assert status == 200, status
            if stream:
                ttfts.append(ttft)

    start = reactor.seconds()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker(c)) for c in conns])
    for c in conns:
        c.transport.loseConnection()
    return reactor.seconds() - start, ttfts


async def sequential(reactor: Any, port: int, requests: List[bytes]) -> None:
    c = await connect(reactor, port)
    for raw in requests:
        status, *_ = await c.request(raw)
        assert status == 200, status
    c.transport.loseConnection()


async def backend_count(reactor: Any, mock_port: int) -> int:
    return (await get_json(reactor, mock_port, "/stats"))["by_path"].get(
        "/v1/chat/completions", 0)


async def measure(reactor: Any, name: str, port: int, mock_port: int,
                  work: List[Tuple[int, bool]]) -> Dict[str, Any]:
    elapsed, ttfts = await replay(reactor, port, work, 32)
    backend = await backend_count(reactor, mock_port)
    # Sampled: the same prompt 5 times at temperature 0.8 should reach the
    # backend 5 times (each is a fresh draw).
    await sequential(reactor, port, [request_bytes(10_000, False, 0.8)] * 5)
    sampled_served = 5 - (await backend_count(reactor, mock_port) - backend)
    # Credentials: a fresh prompt as team-a, then as team-b.
    before = await backend_count(reactor, mock_port)
    await sequential(reactor, port, [request_bytes(10_001, False),
                                     request_bytes(10_001, False, auth=b"Bearer team-b")])
    shared = 2 - (await backend_count(reactor, mock_port) - before)
    return {"name": name, "elapsed": elapsed, "backend": backend, "ttfts": ttfts,
            "sampled_from_cache": sampled_served, "shared_across_credentials": shared == 1}


async def start_nginx(reactor: Any, mock_port: int, tmp: Path) -> Tuple[Child, int]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, mock=mock_port, port=port))
    nginx = Child(rb"(?!)")
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    reactor.spawnProcess(nginx, binary, [binary, "-c", str(conf), "-p", str(tmp)], env={})
    await wait_accepting(reactor, nginx, port, "nginx", seconds=15)
    return nginx, port


async def run(reactor: Any, args: argparse.Namespace) -> None:
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        print("nginx is not installed: apt-get install nginx-light")
        return
    n = 1000 if args.quick else 4000
    work = zipf_workload(n, pool=300, s=1.1, seed=7)
    distinct = len(set(work))
    results = []
    mock, mock_port, gw, gw_port = await start_children(reactor, ["--ttft-ms", "30",
                                                                  "--itl-ms", "5"])
    try:
        results.append(await measure(reactor, "NTONIX", gw_port, mock_port, work))
    finally:
        await stop_children(reactor, gw, mock)
    mock2, mock2_port, gw2, _ = await start_children(reactor, ["--ttft-ms", "30",
                                                               "--itl-ms", "5"])
    await stop_children(reactor, gw2)  # only its mock is needed
    with tempfile.TemporaryDirectory() as tmp:
        nginx, nginx_port = await start_nginx(reactor, mock2_port, Path(tmp))
        try:
            results.append(await measure(reactor, "nginx proxy_cache", nginx_port,
                                         mock2_port, work))
        finally:
            await stop_children(reactor, nginx, mock2)

    print(f"workload: {n} requests, {distinct} distinct questions, half streamed, 32 clients; "
          f"best possible saving {100.0 * (n - distinct) / n:.1f}%")
    for r in results:
        saved = 100.0 * (n - r["backend"]) / n
        t = r["ttfts"]
        print(f"  {r['name']:<18} backend requests saved {saved:5.1f}%  "
              f"streamed TTFT p50 {1000 * pct(t, 50):6.1f} ms p99 {1000 * pct(t, 99):6.1f} ms  "
              f"replayed in {r['elapsed']:.1f}s")
        print(f"  {'':<18} sampled requests answered from a cache: {r['sampled_from_cache']}/5 "
              f"(should be 0); one answer shared by two credentials: "
              f"{'yes' if r['shared_across_credentials'] else 'no'} (should be no)")


if __name__ == "__main__":
    bench_main(__doc__, run)
