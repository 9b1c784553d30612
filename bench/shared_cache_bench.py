"""Shared cache benchmark: two gateways sharing a Redis against two on their own.

    flock /tmp/ntonix-cpu.lock .venv/bin/python bench/shared_cache_bench.py          # ~10 s
    flock /tmp/ntonix-cpu.lock .venv/bin/python bench/shared_cache_bench.py --quick  # ~6 s

Replays cache_bench's workload (chat prompts drawn Zipf-like from a pool of
300, half streamed, all deterministic; 4,000 requests, seed 7 by default)
with 32 clients, client i on gateway i % 2, against one mock backend (30 ms
to the first token, 5 ms between tokens), three ways, each on fresh
processes (Redis, mock, gateways):

1. two gateways, each with its own cache only;
2. the same two gateways sharing one Redis (``cache.redis_url``): an answer
   fetched through one is a hit through the other, and identical requests in
   flight over both at once reach the backend once (one gateway leads, the
   other follows its answer live through a Redis Stream);
3. for reference, one gateway alone with all 32 clients.

For each: requests that reached the backend (counted by the mock), the share
saved, the best any cache could do (one backend request per distinct prompt:
one entry serves both framings), the replay's wall time and latencies, and
for (2) each gateway's ``shared`` counters from ``GET /cache/stats``. Every
answer is checked: a 200, in the framing asked for (``Content-Type:
text/event-stream`` for a streamed request, not for a plain one); what is
not is counted, its first ten printed, and the run reported as not clean.

Then what Redis adds to a miss: unique (never repeated) non-streamed
requests, one client, sent in turn straight to the mock, through a gateway
without Redis and through one with it, all in front of a mock answering at
once (so that the
gateway's own cost is not hidden by the backend's); beside them the same
prompts through a third gateway on the same Redis (a local miss answered by
Redis) and again through the second (a local hit).

redis-server (``--redis-server``, default the one on PATH) is started on a
free port of 127.0.0.1, without persistence, in a temporary directory, and
stopped at the end. Everything runs on 127.0.0.1 and every loop is bounded
in count and time.
"""

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet import defer, task

sys.path.insert(0, str(Path(__file__).parent))
from cache_bench import get_json, request_bytes, zipf_workload  # noqa: E402
from proxy_bench import (  # noqa: E402
    Child, bench_main, connect, free_port, pct, spawn, start_children, start_gateway,
    stop_children, wait_accepting)

MOCK_ARGS = ["--ttft-ms", "30", "--itl-ms", "5"]
CLIENTS = 32
REPLAY_LIMIT_S = 100.0  # a replay that takes longer is broken: it stops and says so
POOL = 300
ZIPF_S = 1.1
UNIQUE_BASE = 10_000_000  # prompt numbers far above the workload's pool
WARM_BASE = 20_000_000


# -- redis-server

class Redis:
    """A redis-server of our own: free port, no persistence, temporary directory."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self.dir: Optional[tempfile.TemporaryDirectory] = None
        self.child: Optional[Child] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, reactor: Any) -> "Redis":
        self.dir = tempfile.TemporaryDirectory(prefix="ntonix-bench-redis-")
        self.port = free_port()
        self.child = Child(rb"(?!)")
        spawn(reactor, self.child, [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                    "--save", "", "--appendonly", "no", "--dir", self.dir.name],
              env={})
        try:
            await wait_accepting(reactor, self.child, self.port, "redis-server")
            # Accepting is not answering: PING until PONG, bounded.
            for _ in range(40):
                if await self.command(reactor, "PING") == "PONG":
                    return self
                await task.deferLater(reactor, 0.05, lambda: None)
            raise RuntimeError("redis-server accepts but does not answer PING")
        except BaseException:
            await self.stop(reactor)
            raise

    async def command(self, reactor: Any, *args: Any) -> Any:
        """One command through the gateway's own Redis client; None on failure."""
        from ntonix.cache.redis_client import RedisClient

        client = RedisClient(reactor, "127.0.0.1", self.port, command_timeout=2.0)
        try:
            return await client.execute(*args)
        except Exception:  # noqa: BLE001: not up yet, or gone
            return None
        finally:
            await client.close()

    async def footprint(self, reactor: Any) -> str:
        """Keys by kind (entries, leases, streams) and memory in use."""
        kinds: Dict[str, int] = {}
        cursor = b"0"
        for _ in range(1000):  # bounded: a few hundred keys here
            reply = await self.command(reactor, "SCAN", cursor, "COUNT", 1000)
            if not reply:
                break
            cursor, keys = reply
            for k in keys:
                parts = k.decode(errors="replace").split(":")  # <prefix>e:<hex>
                kind = parts[-2] if len(parts) > 1 else "other"
                kinds[kind] = kinds.get(kind, 0) + 1
            if cursor == b"0":
                break
        info = await self.command(reactor, "INFO", "memory") or b""
        used = next((line.split(b":")[1].decode() for line in info.splitlines()
                     if line.startswith(b"used_memory_human:")), "?")
        names = {"e": "entries", "l": "leases", "s": "streams"}
        return ", ".join(f"{n} {names.get(k, k)}" for k, n in sorted(kinds.items())) + \
            f"; used_memory {used}"

    async def stop(self, reactor: Any) -> None:
        if self.child is not None:
            await stop_children(reactor, self.child)
        if self.dir is not None:
            self.dir.cleanup()


# -- the workload over several gateways

async def replay_over(reactor: Any, ports: Sequence[int], work: List[Tuple[int, bool]],
                      clients: int, limit_s: float) -> Dict[str, Any]:
    """cache_bench's replay, client i on ports[i % len(ports)], one shared
    queue: the wall time, request latencies, what failed and what was left."""
    conns = [await connect(reactor, ports[i % len(ports)]) for i in range(clients)]
    queue = list(reversed(work))
    deadline = reactor.seconds() + limit_s
    latencies: List[float] = []
    failed: List[Tuple[str, str]] = []

    async def worker(c: Any, k: int) -> None:
        gw = "AB"[k % len(ports)] if len(ports) <= 2 else str(k % len(ports))
        while queue and reactor.seconds() < deadline:
            prompt, stream = queue.pop()
            what = f"question {prompt} {'streamed' if stream else 'plain'} via {gw}"
            try:
                status, _, _, total = await c.request(request_bytes(prompt, stream), timeout=30)
            except Exception as e:  # noqa: BLE001: this connection is gone
                failed.append(("socket", f"{what}: {type(e).__name__}: {e}"))
                return
            head, _, body = c.head.partition(b"\r\n\r\n")
            if status != 200:
                failed.append(("status", f"{what}: HTTP {status} "
                                          f"{body[:200].decode(errors='replace')}"))
            elif (b"text/event-stream" in head.lower()) != stream:
                # A 200 in the other framing than asked: as wrong as an error.
                ctype = re.search(rb"(?i)\r\ncontent-type: *([^\r]*)", head)
                got = ctype.group(1).decode() if ctype else "none"
                failed.append(("framing", f"{what}: HTTP 200 in the wrong framing "
                                           f"(Content-Type {got}, body {body[:40]!r}...)"))
            latencies.append(total)

    start = reactor.seconds()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker(c, k))
                               for k, c in enumerate(conns)])
    elapsed = reactor.seconds() - start
    for c in conns:
        c.transport.loseConnection()
    return {"elapsed": elapsed, "latencies": latencies, "failed": failed, "left": len(queue)}


async def setup_run(reactor: Any, args: argparse.Namespace, name: str, gateways: int,
                    shared: bool, work: List[Tuple[int, bool]]) -> Dict[str, Any]:
    """One way of serving the workload, on fresh processes."""
    redis = await Redis(args.redis_server).start(reactor) if shared else None
    # Gateways sharing a Redis share the secret that keys the cache scope.
    extra = ["--set", f"cache.redis_url={redis.url}",
             "--set", "server.secret=shared-cache-bench"] if redis else []
    children: List[Child] = []
    try:
        mock, mock_port, gw, port = await start_children(reactor, MOCK_ARGS, extra)
        children += [mock, gw]
        ports = [port]
        for _ in range(gateways - 1):
            gw, port = await start_gateway(reactor, mock_port, ["--log-level", "warn", *extra])
            children.append(gw)
            ports.append(port)
        r = await replay_over(reactor, ports, work, CLIENTS, REPLAY_LIMIT_S)
        stats = await get_json(reactor, mock_port, "/stats")
        r["backend"] = stats["by_path"].get("/v1/chat/completions", 0)
        r["caches"] = [await get_json(reactor, p, "/cache/stats") for p in ports]
        r["redis"] = await redis.footprint(reactor) if redis else None
        r["logs"] = [child.out[-3000:].decode(errors="replace") for child in children[1:]]
    finally:
        await stop_children(reactor, *reversed(children))
        if redis:
            await redis.stop(reactor)
    r["name"] = name
    lat = r["latencies"]
    print(f"{name}: replayed in {r['elapsed']:.1f}s, {r['backend']} backend requests, "
          f"p50 {1000 * pct(lat, 50):.1f} ms, p99 {1000 * pct(lat, 99):.1f} ms"
          + (f"; {len(r['failed'])} FAILED" if r["failed"] else "")
          + (f"; INCOMPLETE: {r['left']} requests not sent within {REPLAY_LIMIT_S:g}s"
             if r["left"] else ""), flush=True)
    for i, c in enumerate(r["caches"]):
        line = (f"  gateway {'AB'[i]}: {c['hits']} hits ({c['converted']} converted), "
                f"{c['coalesced']} joined in flight, {c['misses']} misses, {c['entries']} entries")
        if "shared" in c:
            s = c["shared"]
            line += (f"; shared: {s['hits']} hits, {s['led']} led, {s['followed']} followed, "
                     f"{s['takeovers']} takeovers, {s['errors']} errors, state {s['state']}")
        print(line, flush=True)
    if r["redis"]:
        text = str(r["redis"])
        print(f"  redis after the replay: {text[:300]}{' ...' if len(text) > 300 else ''}",
              flush=True)
    for kind, f in r["failed"][:10]:
        print(f"  FAILED: {f}", flush=True)
    if r["failed"]:
        for i, log in enumerate(r["logs"]):
            if log.strip():
                print(f"  gateway {'AB'[i]} log (warn), its end:\n{log}", flush=True)
    return r


# -- what Redis adds to a miss

async def serial(reactor: Any, port: int, prompts: Sequence[int]) -> List[float]:
    c = await connect(reactor, port)
    out = []
    try:
        for p in prompts:
            status, _, _, total = await c.request(request_bytes(p, False), timeout=10)
            if status != 200:
                raise RuntimeError(f"answered HTTP {status}")
            out.append(total)
    finally:
        c.transport.loseConnection()
    return out


async def interleaved(reactor: Any, ports: Sequence[int], prompts: Sequence[int],
                      ) -> List[List[float]]:
    """The same prompts, one client per port, asked in turn (port 0, port 1,
    ..., then the next prompt): drift on the machine is shared alike."""
    conns = [await connect(reactor, p) for p in ports]
    out: List[List[float]] = [[] for _ in ports]
    try:
        for prompt in prompts:
            for k, c in enumerate(conns):
                status, _, _, total = await c.request(request_bytes(prompt, False), timeout=10)
                if status != 200:
                    raise RuntimeError(f"port {ports[k]} answered HTTP {status}")
                out[k].append(total)
    finally:
        for c in conns:
            c.transport.loseConnection()
    return out


async def miss_cost(reactor: Any, args: argparse.Namespace, n: int) -> Dict[str, Any]:
    redis = await Redis(args.redis_server).start(reactor)
    shared = ["--set", f"cache.redis_url={redis.url}"]
    children: List[Child] = []
    try:
        # A mock answering at once: what is measured is the gateways' cost.
        mock, mock_port, plain, plain_port = await start_children(reactor, [], [])
        children += [mock, plain]
        with_redis, redis_port = await start_gateway(reactor, mock_port,
                                                     ["--log-level", "warn", *shared])
        children.append(with_redis)
        other, other_port = await start_gateway(reactor, mock_port,
                                                ["--log-level", "warn", *shared])
        children.append(other)
        warm = [WARM_BASE + i for i in range(50)]
        await interleaved(reactor, [mock_port, plain_port, redis_port], warm)
        await serial(reactor, other_port, warm)  # its Redis connections, shared hits
        unique = [UNIQUE_BASE + i for i in range(n)]
        direct, miss_plain, miss_redis = await interleaved(
            reactor, [mock_port, plain_port, redis_port], unique)
        shared_hit = await serial(reactor, other_port, unique)
        local_hit = await serial(reactor, redis_port, unique)
        caches = {"plain": await get_json(reactor, plain_port, "/cache/stats"),
                  "redis": await get_json(reactor, redis_port, "/cache/stats"),
                  "other": await get_json(reactor, other_port, "/cache/stats")}
    finally:
        await stop_children(reactor, *reversed(children))
        await redis.stop(reactor)
    r = {"direct": direct, "miss_plain": miss_plain, "miss_redis": miss_redis,
         "shared_hit": shared_hit, "local_hit": local_hit, "caches": caches, "n": n}
    print(f"miss cost ({n} unique non-streamed prompts, 1 client): p50 direct "
          f"{1000 * pct(direct, 50):.2f} ms, without Redis {1000 * pct(miss_plain, 50):.2f} ms, "
          f"with Redis {1000 * pct(miss_redis, 50):.2f} ms; shared hit "
          f"{1000 * pct(shared_hit, 50):.2f} ms, local hit {1000 * pct(local_hit, 50):.2f} ms",
          flush=True)
    for k, c in caches.items():
        s = c.get("shared")
        print(f"  {k}: {c['hits']} hits, {c['misses']} misses"
              + (f"; shared: {s['hits']} hits, {s['led']} led, {s['followed']} followed, "
                 f"{s['errors']} errors" if s else ""), flush=True)
    return r


# -- the whole run

def ms(v: float) -> str:
    return f"{1000 * v:.1f} ms"


async def run(reactor: Any, args: argparse.Namespace) -> None:
    if not args.redis_server:
        raise SystemExit("redis-server not found: pass --redis-server PATH")
    n = min(args.requests or (1000 if args.quick else 4000), 100_000)
    work = zipf_workload(n, pool=POOL, s=ZIPF_S, seed=args.seed)
    distinct = len({p for p, _ in work})
    began = reactor.seconds()
    print(f"workload: {n} requests, {distinct} distinct prompts, {len(set(work))} distinct "
          f"(prompt, framing) pairs (Zipf s={ZIPF_S} over {POOL} prompts, half streamed, seed "
          f"{args.seed}), {CLIENTS} clients", flush=True)
    setups = [("two gateways, own caches", 2, False),
              ("two gateways, shared Redis", 2, True),
              ("one gateway (reference)", 1, False)]
    results = [await setup_run(reactor, args, name, count, shared, work)
               for name, count, shared in setups]
    miss_n = min(args.miss_requests or (200 if args.quick else 500), 10_000)
    miss = await miss_cost(reactor, args, miss_n)

    best = 100.0 * (n - distinct) / n
    print(f"\nSummary ({'--quick' if args.quick else 'full run'}: {n} requests, seed "
          f"{args.seed}; measured in {reactor.seconds() - began:.0f} s)\n", flush=True)
    print("| setup | backend requests | saved | best possible | replay wall time | "
          "latency p50 / p99 | cache hits / joined in flight (all gateways) | "
          "shared, per gateway: hits / led / followed / takeovers / errors | "
          "failed: not 200 / 200 in the wrong framing / socket |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        caches = r["caches"]
        shared = " ; ".join(
            f"{'AB'[i]}: {s['hits']} / {s['led']} / {s['followed']} / {s['takeovers']} / "
            f"{s['errors']}" + ("" if s["state"] == "ok" else f" ({s['state']})")
            for i, s in enumerate(c.get("shared") for c in caches) if s) or "-"
        kinds = [k for k, _ in r["failed"]]
        failed = " / ".join(str(kinds.count(k)) for k in ("status", "framing", "socket"))
        flags = f" (INCOMPLETE, {r['left']} not sent)" if r["left"] else ""
        print(f"| {r['name']}{flags} | {r['backend']} | {100.0 * (n - r['backend']) / n:.1f}% | "
              f"{best:.1f}% ({distinct}) | {r['elapsed']:.1f} s | "
              f"{ms(pct(r['latencies'], 50))} / {ms(pct(r['latencies'], 99))} | "
              f"{sum(c['hits'] for c in caches)} / {sum(c['coalesced'] for c in caches)} | "
              f"{shared} | {failed} |")
    print()
    base50, base99 = pct(miss["miss_plain"], 50), pct(miss["miss_plain"], 99)
    print(f"| non-streamed, unique prompts, 1 client, {miss['n']} each, mock answering at "
          "once | p50 | p99 | against a miss without Redis (p50 / p99) |")
    print("|---|---|---|---|")
    for label, key in (("direct to the mock", "direct"),
                       ("miss, gateway without Redis", "miss_plain"),
                       ("miss, gateway with Redis (lookup, lease, stream, store)", "miss_redis"),
                       ("another gateway on the same Redis (local miss, Redis hit)",
                        "shared_hit"),
                       ("the gateway with Redis again (local hit)", "local_hit")):
        v = miss[key]
        rel = "" if key == "miss_plain" else \
            f"{1000 * (pct(v, 50) - base50):+.2f} / {1000 * (pct(v, 99) - base99):+.2f} ms"
        print(f"| {label} | {1000 * pct(v, 50):.2f} ms | {1000 * pct(v, 99):.2f} ms | {rel} |")
    print()
    two, shared_r, one = (r["backend"] for r in results)
    print(f"- sharing Redis: {two} -> {shared_r} backend requests over two gateways; one "
          f"gateway alone sends {one}; best possible {distinct}. Two gateways with Redis "
          + ("reach" if shared_r <= one else f"are {shared_r - one} above")
          + " the one-gateway figure.")
    for r in results:
        if r["failed"] or r["left"]:
            print(f"- NOT CLEAN: {r['name']}: {len(r['failed'])} of {n} requests failed or "
                  f"were answered in the wrong framing, {r['left']} not sent (details above).")
    sys.stdout.flush()


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=None,
                   help="workload size (default 4000; 1000 with --quick)")
    p.add_argument("--seed", type=int, default=7, help="workload seed (default 7)")
    p.add_argument("--miss-requests", type=int, default=None,
                   help="unique requests per path in the miss-cost rows (default 500; "
                        "200 with --quick)")
    p.add_argument("--redis-server", default=shutil.which("redis-server")
                   or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists()
                       else None),
                   help="the redis-server binary (default: %(default)s)")


if __name__ == "__main__":
    bench_main(__doc__, run, add_args)
