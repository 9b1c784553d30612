"""Routing benchmark: the three balancer algorithms on one multi-turn chat
workload, in front of four inference simulators, in one run.

    flock /tmp/ntonix-cpu.lock .venv/bin/python bench/routing_bench.py          # about 3 minutes
    flock /tmp/ntonix-cpu.lock .venv/bin/python bench/routing_bench.py --quick  # about 1 minute
    ... bench/routing_bench.py --algorithms inference --weights '{"prefix": 5}'  # explore

    ... bench/routing_bench.py --scaling         # inference: 1 worker, 2 workers, 2 gateways
    ... bench/routing_bench.py --workers 2 --algorithms inference
    ... bench/routing_bench.py --gateways 2 --algorithms inference   # sharing a redis-server

(``flock``: runs never overlap another CPU-heavy run on this 2-core machine.)

Four ``python -m ntonix_mock --inference`` simulators (mock/simulator.py: FIFO
queue, one prefill at a time costing its uncached prompt tokens, an LRU prefix
cache of ``--kv-blocks`` blocks of 16 tokens x 4 bytes, LoRA slots with a load
delay) serve the base model ``sim-llm`` and two adapters (sql-lora,
chat-lora). Each simulator's cache holds only part of the workload's shared
prefixes: the fleet holds them all only if conversations are routed with
affinity.

For each algorithm (weighted_round_robin, least_outstanding, inference), the
simulators are reset (``POST /control {"reset": true}``: statistics, prefix
cache and loaded adapters), a fresh ``twistd -n ntonix`` is started in front
of them (response cache off, so that no repeated prompt is answered by the
gateway), the same seeded workload is run through it, and the gateway is
stopped. The workload: ``--users`` conversations arriving as a Poisson
process over ``--duration`` seconds, each of 3 to 8 turns on one of a few
long shared system prompts (about 3,000 tokens each); each turn appends the
answer the gateway streamed back and a new user message, after an
exponential think time; a share of the users ask a LoRA adapter. Every
request is streamed with ``stream_options.include_usage``.

Measured at the client, per request: time to first content token (TTFT),
end to end, output tokens; and from the simulators' /stats: the prefix-cache
hit rate they really had, their adapter loads and how busy their prefill lanes
were. The defaults make prefill matter: 3,000-token system prompts at 0.15 ms
per uncached token (a miss costs 450 ms of a simulator's one prefill lane),
768 blocks of prefix cache per simulator (the five base-model system prompts
alone need 1.2x that), at most one adapter loaded (150 ms a load). The "perfect router"
row is computed offline from the prompts actually sent (see BOUND below).
Targets are printed beside the figures, never asserted. Every load goes to
127.0.0.1; every wait is bounded; a hung gateway is killed.

Shapes: ``--workers N`` runs each gateway with ``server.workers`` N;
``--gateways 2`` runs two gateways sharing a ``redis-server`` started for the
run (``cluster.redis_url``), as replicas behind an L4 balancer. ``--scaling``
runs the inference scorer in three shapes, one gateway of one worker, one
gateway of ``--workers`` (default 2) workers, two gateways of one worker
sharing Redis, and prints TTFT p90 and the prefix hit rate of each against
the first. ``--connections``: ``keepalive`` (a conversation keeps its
connection, so its turns stay on one worker of one gateway: the default,
except with ``--scaling``) or ``per-turn`` (each turn on a new connection,
the gateways taken in turn as a round-robin L4 balancer would: the turns of
one conversation reach every worker and gateway; the default with
``--scaling``).
"""

import argparse
import datetime
import itertools
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cache_bench import get_json  # noqa: E402
from proxy_bench import (  # noqa: E402
    Child, Conn, bench_main, control, free_port, pct, spawn, start_twistd, stop_children,
    wait_accepting)

from ntonix_mock.simulator import (  # noqa: E402
    PrefixCache, block_hashes, chain_seed, prompt_token_count, render_prompt)

ALGORITHMS = ("weighted_round_robin", "least_outstanding", "inference")
SHORT = {"weighted_round_robin": "round-robin", "least_outstanding": "least-outstanding",
         "inference": "inference"}
BASE_MODEL = "sim-llm"
LORAS = ("sql-lora", "chat-lora")
BACKEND_ID = re.compile(rb"(?i)\r\nx-backend-id: *([^\r]*)")
# A gateway process's request ids share a prefix: which process answered.
REQUEST_ID = re.compile(rb"(?i)\r\nx-request-id: *([^\r]*)[0-9a-f]{16}\r")
BLOCK_TOKENS = 16
BYTES_PER_TOKEN = 4
N_SIMS = 4

# The brief's targets, printed, never asserted.
TARGET_TTFT_VS_RR = 2.0
TARGET_TTFT_VS_LO = 1.5
TARGET_HIT_GAP_POINTS = 10.0
# Scaling out (--scaling): TTFT p90 at most this much above one worker's.
TARGET_WORKERS_TTFT = 0.10
TARGET_GATEWAYS_TTFT = 0.15

BOUND = ("perfect router (bound): the share of prompt tokens, over the requests sent in "
         "the run in their order of sending, whose leading 64-byte blocks (16 tokens x 4 "
         "bytes of the simulator's rendering, chained hashes, adapters keyed apart) an "
         "earlier request had sent, with the whole fleet as one LRU cache of 4 x "
         "kv_blocks blocks, counted as the simulator counts (min(blocks x 16, "
         "prompt_tokens - 1))")

WORDS = ("model request token cache prefix answer query table customer order invoice "
         "account report policy system service latency region record schema column index "
         "join filter window summary detail support ticket refund product shipping "
         "warehouse supplier contract payment balance ledger audit review release build "
         "deploy cluster node replica shard backup restore monitor alert metric trace log "
         "user session profile setting preference language translate explain compare list "
         "count average total daily weekly monthly yearly recent previous current next "
         "first last please always never carefully briefly politely exactly").split()


# -- the workload

class Conversation:
    """One user: a start time, a model, a system prompt and the turns."""

    def __init__(self, uid: int, start: float, model: str, system: int,
                 users: List[str], max_tokens: List[int], think: List[float]) -> None:
        self.uid, self.start, self.model, self.system = uid, start, model, system
        self.users, self.max_tokens, self.think = users, max_tokens, think


def text(rng: random.Random, n_bytes: int) -> str:
    out: List[str] = []
    size = 0
    while size < n_bytes:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))
        sentence = sentence[0].upper() + sentence[1:] + ". "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_bytes]


def system_prompts(seed: int, n: int, n_bytes: int) -> List[str]:
    rng = random.Random(seed * 7919 + 1)
    return [f"You are assistant number {k} of the ACME corporation. Rules and reference "
            f"material follow.\n" + text(rng, n_bytes + rng.randint(-n_bytes // 20, n_bytes // 20))
            for k in range(n)]


def make_workload(seed: int, users: int, duration: float, lora_share: float,
                  n_systems: int, think_mean: float) -> List[Conversation]:
    rng = random.Random(seed)
    # A Poisson process conditioned on ``users`` arrivals in [0, duration]:
    # uniform arrival times, sorted.
    starts = sorted(rng.uniform(0, duration) for _ in range(users))
    convs = []
    for uid, start in enumerate(starts):
        model = rng.choice(LORAS) if rng.random() < lora_share else BASE_MODEL
        system = rng.randrange(n_systems)
        turns = rng.randint(3, 8)
        msgs = [f"[user {uid}, turn {t}] " + text(rng, rng.randint(100, 400)) for t in range(turns)]
        convs.append(Conversation(uid, start, model, system, msgs,
                                  [rng.randint(16, 48) for _ in range(turns)],
                                  [rng.expovariate(1.0 / think_mean) for _ in range(turns)]))
    return convs


def sim_blocks(model: str, doc: Dict[str, Any]) -> Tuple[List[int], int]:
    """The block hashes the simulator computes for a chat body, and its prompt tokens."""
    prompt = render_prompt("chat", doc).encode("utf-8", "surrogatepass")
    adapter = None if model == BASE_MODEL else model
    return (block_hashes(prompt, BLOCK_TOKENS * BYTES_PER_TOKEN, chain_seed(adapter)),
            prompt_token_count(len(prompt), BYTES_PER_TOKEN))


def perfect_bound(sent: List[Tuple[str, Dict[str, Any]]], capacity: int) -> Tuple[float, int]:
    """BOUND over the bodies sent, in order; and the distinct blocks they name."""
    cache = PrefixCache(capacity)
    hits = queries = 0
    distinct = set()
    for model, doc in sent:
        hashes, tokens = sim_blocks(model, doc)
        distinct.update(hashes)
        n = cache.lookup(hashes)
        hits += min(n * BLOCK_TOKENS, tokens - 1)
        queries += tokens
        cache.insert(hashes)
    return (hits / queries if queries else float("nan")), len(distinct)


# -- the client

class ChatConn(Conn):
    """proxy_bench's keep-alive client, keeping the whole answer."""

    def request(self, raw: bytes, timeout: float = 60.0) -> defer.Deferred:
        self.raw = bytearray()
        return super().request(raw, timeout)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        super().dataReceived(data)


def dechunk(body: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(body):
        j = body.find(b"\r\n", i)
        if j < 0:
            break
        size = int(body[i:j].split(b";")[0], 16)
        if size == 0:
            break
        out += body[j + 2:j + 2 + size]
        i = j + 2 + size + 2
    return bytes(out)


def parse_stream(raw: bytes) -> Tuple[str, Optional[Dict[str, Any]]]:
    """The assistant text and the usage object of an SSE answer."""
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        body = dechunk(body)
    content: List[str] = []
    usage = None
    for line in body.split(b"\n"):
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"]
        for choice in ev.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                content.append(piece)
    return "".join(content), usage


def chat_request(doc: Dict[str, Any]) -> bytes:
    body = json.dumps(doc, separators=(",", ":")).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


async def run_workload(reactor: Any, ports: List[int], convs: List[Conversation],
                       systems: List[str], last_send: float, request_timeout: float,
                       per_turn: bool = False) -> Dict[str, Any]:
    """Every conversation through the gateways on ``ports``; turns not
    started ``last_send`` seconds after the start are skipped. A
    conversation keeps one connection (to ``ports[uid % n]``), or with
    ``per_turn`` opens one per turn, to the next port in turn."""
    t0 = reactor.seconds()
    next_port = itertools.count()
    records: List[Dict[str, Any]] = []
    sent: List[Tuple[str, Dict[str, Any]]] = []
    errors: Dict[str, int] = {}
    skipped = [0]

    def fail(what: str) -> None:
        errors[what] = errors.get(what, 0) + 1

    async def user(c: Conversation) -> None:
        await task.deferLater(reactor, max(0.0, t0 + c.start - reactor.seconds()), lambda: None)
        messages = [{"role": "system", "content": systems[c.system]}]
        conn: Optional[ChatConn] = None
        try:
            for t, msg in enumerate(c.users):
                if reactor.seconds() - t0 > last_send:
                    skipped[0] += len(c.users) - t
                    return
                if per_turn and conn is not None:
                    conn.transport.loseConnection()
                    conn = None
                if conn is None or not conn.transport.connected:
                    port = ports[next(next_port) % len(ports)] if per_turn \
                        else ports[c.uid % len(ports)]
                    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
                    conn = await connectProtocol(ep, ChatConn(reactor))
                messages.append({"role": "user", "content": msg})
                doc = {"model": c.model, "messages": list(messages), "stream": True,
                       "stream_options": {"include_usage": True},
                       "max_tokens": c.max_tokens[t], "temperature": 0}
                sent.append((c.model, doc))
                start = reactor.seconds()
                try:
                    status, _, ttft, e2e = await conn.request(chat_request(doc), request_timeout)
                except Exception as e:  # noqa: BLE001: a reset, a timeout: counted
                    fail(type(e).__name__)
                    skipped[0] += len(c.users) - t - 1
                    return
                if status != 200:
                    fail(f"HTTP {status}")
                    skipped[0] += len(c.users) - t - 1
                    return
                raw = bytes(conn.raw)
                answer, usage = parse_stream(raw)
                head = raw.partition(b"\r\n\r\n")[0]
                backend = BACKEND_ID.search(head)
                process = REQUEST_ID.search(head)
                records.append({"uid": c.uid, "turn": t, "model": c.model, "start": start - t0,
                                "system": c.system, "port": port,
                                "process": process.group(1).decode() if process else None,
                                "backend": backend.group(1).decode() if backend else None,
                                "ttft": ttft, "e2e": e2e,
                                "out": (usage or {}).get("completion_tokens", 0),
                                "cached": ((usage or {}).get("prompt_tokens_details") or {})
                                .get("cached_tokens", 0),
                                "prompt": (usage or {}).get("prompt_tokens", 0)})
                messages.append({"role": "assistant", "content": answer})
                await task.deferLater(reactor, c.think[t], lambda: None)
        except Exception as e:  # noqa: BLE001: a refused connection: counted
            fail(type(e).__name__)
        finally:
            if conn is not None and conn.transport is not None:
                conn.transport.loseConnection()

    runs = [defer.Deferred.fromCoroutine(user(c)) for c in convs]
    # Every conversation ends by itself (each request has its timeout, no
    # turn starts after last_send); this bound is for a client bug.
    hard = last_send + request_timeout + 10
    try:
        await defer.gatherResults(runs).addTimeout(hard, reactor)
    except defer.TimeoutError:
        fail("bench timeout")
        for d in runs:
            d.cancel()
    return {"records": records, "sent": sent, "errors": errors, "skipped": skipped[0],
            "elapsed": reactor.seconds() - t0}


# -- the children

async def start_sims(reactor: Any, args: argparse.Namespace) -> List[Tuple[Child, int]]:
    sims = []
    for k in range(N_SIMS):
        child = Child(rb"listening on 127\.0\.0\.1:(\d+)")
        spawn(reactor, child, [sys.executable, "-m", "ntonix_mock", "--inference", "--port", "0",
                               "--id", "abcd"[k], *sim_flags(args)],
              env={"PYTHONUNBUFFERED": "1"})
        sims.append(child)
    ports = []
    for child in sims:
        ports.append(await child.up.addTimeout(20, reactor))
    return list(zip(sims, ports))


def sim_flags(args: argparse.Namespace) -> List[str]:
    flags = ["--model", BASE_MODEL, "--kv-blocks", str(args.kv_blocks),
             "--max-running", str(args.max_running),
             "--prefill-ms-base", str(args.prefill_ms_base),
             "--prefill-ms-per-token", str(args.prefill_ms_per_token),
             "--decode-ms-base", str(args.decode_ms_base),
             "--decode-ms-per-running", str(args.decode_ms_per_running),
             "--max-loras", str(args.max_loras), "--lora-load-ms", str(args.lora_load_ms)]
    for name in LORAS:
        flags += ["--lora", name]
    return flags


async def reset_sims(reactor: Any, ports: List[int]) -> None:
    """Statistics, prefix cache and loaded adapters back to a fresh start,
    once nothing is running (the previous gateway's requests are cancelled
    when it goes away)."""
    deadline = reactor.seconds() + 15
    while True:
        stats = [await get_json(reactor, p, "/stats") for p in ports]
        if all(s["running"] == 0 and s["waiting"] == 0 for s in stats) \
                or reactor.seconds() > deadline:
            break
        await task.deferLater(reactor, 0.2, lambda: None)
    for p in ports:
        # No adapter listed unloads every idle one; then list them again.
        await control(reactor, p, reset=True, loras=[])
        await control(reactor, p, loras=list(LORAS))


class Shape(NamedTuple):
    """How many gateways (sharing a Redis when more than one), each of how
    many worker processes."""

    gateways: int
    workers: int

    @property
    def label(self) -> str:
        if self.gateways == 1:
            return f"1 gateway, {self.workers} worker{'s' if self.workers > 1 else ''}"
        return (f"{self.gateways} gateways + Redis, {self.workers} "
                f"worker{'s' if self.workers > 1 else ''} each")


async def start_redis(reactor: Any, directory: str) -> Tuple[Child, str]:
    """A throwaway redis-server on a free port, for gateways to share."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("two gateways share a Redis: redis-server is not installed "
                         "(.ci/install-services installs it)")
    port = free_port()
    child = Child(rb"(?!)")
    spawn(reactor, child, [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", directory])
    await wait_accepting(reactor, child, port, "redis-server")
    return child, f"redis://127.0.0.1:{port}/0"


async def start_gateway(reactor: Any, args: argparse.Namespace, algorithm: str,
                        ports: List[int], log: str, workers: int = 1,
                        redis_url: str = "") -> Tuple[Child, int]:
    extra: List[str] = []
    if workers > 1:
        extra += ["--set", f"server.workers={workers}"]
    if redis_url:
        extra += ["--set", f"cluster.redis_url={redis_url}"]
    if algorithm == "inference":
        # Sized as the README says an operator should: the backends' KV
        # cache in bytes of prompt (16 tokens of 4 bytes a block) over the
        # gateway's 256-byte blocks. --inference-set can override it.
        if not any(kv.startswith("balancer.prefix_capacity_blocks=")
                   for kv in args.inference_set):
            extra += ["--set", "balancer.prefix_capacity_blocks="
                      f"{max(1, args.kv_blocks * 16 * 4 // 256)}"]
        if args.weights:
            extra += ["--set", f"balancer.weights={args.weights}"]
        for kv in args.inference_set:
            extra += ["--set", kv]
    for kv in args.gateway_set:
        extra += ["--set", kv]
    backends = [a for p in ports for a in ("--backend", f"127.0.0.1:{p}")]
    return await start_twistd(reactor, "gateway", lambda port: [
        "ntonix", "--port", str(port), "--bind", "127.0.0.1", *backends,
        "--log-level", "warn",
        "--set", "admin.http_port=-1", "--set", "admin.token=bench",
        "--set", "cache.enabled=false", "--set", f"balancer.algorithm={algorithm}",
        "--set", "health.interval_seconds=1", "--set", "balancer.scrape_interval_seconds=0.25",
        "--set", "server.drain_delay_seconds=0", "--set", "server.shutdown_timeout_seconds=2",
        *extra], output=log)


async def wait_ready(reactor: Any, port: int, algorithm: str, seconds: float = 20) -> None:
    """Until every backend is healthy with its models known (and, for the
    inference scorer, its metrics scraped), bounded."""
    deadline = reactor.seconds() + seconds
    while True:
        doc = await get_json(reactor, port, "/backends")
        bs = doc["backends"]
        if all(b["state"] == "healthy" and b["models"] is not None
               and (algorithm != "inference" or b["scraped"] is not None) for b in bs):
            return
        if reactor.seconds() > deadline:
            raise RuntimeError(f"gateway not ready after {seconds} s: {json.dumps(bs)[:2000]}")
        await task.deferLater(reactor, 0.1, lambda: None)


# -- one algorithm

async def one_algorithm(reactor: Any, args: argparse.Namespace, algorithm: str, shape: Shape,
                        ports: List[int], convs: List[Conversation], systems: List[str],
                        tmp: str, redis_url: str) -> Dict[str, Any]:
    await reset_sims(reactor, ports)
    t_start = reactor.seconds()
    gws: List[Tuple[Child, int]] = []
    try:
        for g in range(shape.gateways):
            gws.append(await start_gateway(
                reactor, args, algorithm, ports,
                f"{tmp}/{algorithm}-{shape.gateways}x{shape.workers}-{g}.log", shape.workers,
                redis_url if shape.gateways > 1 else ""))
        gw_ports = [p for _, p in gws]
        for port in gw_ports:
            await wait_ready(reactor, port, algorithm)
        res = await run_workload(reactor, gw_ports, convs, systems,
                                 args.duration + args.drain, args.request_timeout,
                                 per_turn=args.connections == "per-turn")
        res["gateway"] = await get_json(reactor, gw_ports[0], "/backends")
    finally:
        await stop_children(reactor, *[c for c, _ in gws])
    res["sims"] = [await get_json(reactor, p, "/stats") for p in ports]
    res["wall"] = reactor.seconds() - t_start
    return res


def summarize(args: argparse.Namespace, algorithm: str, shape: Shape, label: str,
              res: Dict[str, Any]) -> Dict[str, Any]:
    recs = res["records"]
    ttft = [1000 * r["ttft"] for r in recs]
    e2e = [1000 * r["e2e"] for r in recs]
    out = sum(r["out"] for r in recs)
    span = (max(r["start"] + r["e2e"] for r in recs) - min(r["start"] for r in recs)) \
        if recs else float("nan")
    sims = res["sims"]
    q = sum(s["prefix_queries_tokens"] for s in sims)
    h = sum(s["prefix_hits_tokens"] for s in sims)
    bound, distinct = perfect_bound(res["sent"], N_SIMS * args.kv_blocks)
    lora = [1000 * r["ttft"] for r in recs if r["model"] != BASE_MODEL]
    # The share of the run each simulator's prefill lane was busy (the
    # simulator's cost model applied to the tokens it did not have cached).
    busy = [(s["requests"] * args.prefill_ms_base + args.prefill_ms_per_token
             * (s["prefix_queries_tokens"] - s["prefix_hits_tokens"])) / 1000 / span
            for s in sims] if recs else []
    # Turns that reached another gateway process than the conversation's
    # previous turn: what the shared scheduler state is for.
    last: Dict[int, Any] = {}
    moved = later = 0
    for r in sorted(recs, key=lambda r: (r["uid"], r["turn"])):
        where = (r["port"], r["process"])
        if r["uid"] in last:
            later += 1
            moved += where != last[r["uid"]]
        last[r["uid"]] = where
    return {"algorithm": algorithm, "shape": shape, "label": label, "n": len(recs),
            "moved": moved / later if later else float("nan"), "failed": sum(res["errors"].values()),
            "errors": res["errors"], "skipped": res["skipped"],
            "ttft50": pct(ttft, 50), "ttft90": pct(ttft, 90), "ttft99": pct(ttft, 99),
            "e2e50": pct(e2e, 50), "e2e99": pct(e2e, 99),
            "lora_ttft90": pct(lora, 90), "base_ttft90": pct(
                [1000 * r["ttft"] for r in recs if r["model"] == BASE_MODEL], 90),
            "tps": out / span if span else float("nan"),
            "hit": h / q if q else float("nan"), "lora_loads": sum(s["lora_loads"] for s in sims),
            "bound": bound, "distinct": distinct, "wall": res["wall"],
            "sims": sims, "gateway": res["gateway"], "busy": busy}


def f0(v: float) -> str:
    return "n/a" if v != v else f"{v:,.0f}"


def pc(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.1f}%"


def commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout
        return rev.strip() + (" + uncommitted changes" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report(args: argparse.Namespace, convs: List[Conversation], systems: List[str],
           rows: List[Dict[str, Any]]) -> None:
    capacity = N_SIMS * args.kv_blocks
    turns = sum(len(c.users) for c in convs)
    sys_blocks = [len(sim_blocks(BASE_MODEL, {"messages": [{"role": "system", "content": s}]})[0])
                  for s in systems]
    n_lora = {m: sum(c.model == m for c in convs) for m in LORAS}
    print()
    print(f"routing_bench, {datetime.datetime.now():%Y-%m-%d %H:%M}, commit {commit()}, "
          f"seed {args.seed}{', --quick' if args.quick else ''}")
    print(f"simulators: {N_SIMS} x python -m ntonix_mock --inference " + " ".join(sim_flags(args)))
    print(f"workload: {len(convs)} conversations, Poisson arrivals over {args.duration:g} s "
          f"({len(convs) / args.duration:.2f}/s), {turns} turns planned (3-8 each), think time "
          f"exp(mean {args.think:g} s); {len(systems)} system prompts of "
          f"{min(map(len, systems)) / 1024:.1f}-{max(map(len, systems)) / 1024:.1f} KB "
          f"({min(sys_blocks)}-{max(sys_blocks)} blocks, ~{min(sys_blocks) * BLOCK_TOKENS}-"
          f"{max(sys_blocks) * BLOCK_TOKENS} tokens); LoRA users: "
          + ", ".join(f"{m} {n}" for m, n in n_lora.items())
          + f"; max_tokens 16-48; streamed, include_usage; no turn starts after "
            f"{args.duration + args.drain:g} s; connections: {args.connections}")
    base_sys = sum(sys_blocks)
    distinct = max(r["distinct"] for r in rows)
    print(f"KV: {args.kv_blocks} blocks per simulator, {capacity} for the fleet; the base model's "
          f"system prompts alone are {base_sys} blocks ({base_sys / args.kv_blocks:.2f}x one "
          f"simulator); distinct blocks sent in a run: {distinct} "
          f"(one simulator holds {100 * args.kv_blocks / distinct:.0f}% of them)")
    if args.weights or args.inference_set or args.gateway_set:
        print(f"gateway settings: weights {args.weights or 'default'}; inference --set "
              f"{args.inference_set}; all --set {args.gateway_set}")
    print()
    print(f"| {'shape' if args.scaling else 'algorithm'} | TTFT p50 | TTFT p90 | TTFT p99 | e2e p50 | e2e p99 | output tokens/s "
          "| completed / failed | prefix hit rate | LoRA loads |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {f0(r['ttft50'])} ms | {f0(r['ttft90'])} ms | "
              f"{f0(r['ttft99'])} ms | {f0(r['e2e50'])} ms | {f0(r['e2e99'])} ms | "
              f"{r['tps']:.0f} | {r['n']} / {r['failed']} | {pc(r['hit'])} | {r['lora_loads']} |")
    bounds = [r["bound"] for r in rows]
    shown = pc(bounds[-1]) if max(bounds) - min(bounds) < 0.001 else \
        f"{pc(min(bounds))}-{pc(max(bounds))}"
    print(f"| perfect router (bound) | | | | | | | | {shown} | |")
    print()
    print(BOUND + "; computed on each algorithm's own run: "
          + ", ".join(f"{r['label']} {pc(r['bound'])}" for r in rows) + ".")
    print()
    print("per simulator (a/b/c/d): requests | prefix hit rate | TTFT p90 (simulator's) "
          "| LoRA loads | prefill lane busy (uncached tokens x cost / the run's span)")
    for r in rows:
        sims = r["sims"]
        scorer = r["gateway"].get("scorer")
        extra = (f"; scorer: {scorer['picks_with_prefix_match']}/{scorer['picks']} picks "
                 f"matched a prefix") if scorer else ""
        print(f"- {r['label']}: "
              + "/".join(str(s["completed"]) for s in sims) + " | "
              + "/".join(pc(s["prefix_hit_rate"]) for s in sims) + " | "
              + "/".join(f0(s["ttft_ms"]["p90"]) for s in sims) + " ms | "
              + "/".join(str(s["lora_loads"]) for s in sims) + " | "
              + "/".join(f"{100 * b:.0f}%" for b in r["busy"])
              + f"; TTFT p90 base {f0(r['base_ttft90'])} ms, LoRA {f0(r['lora_ttft90'])} ms"
              + f"; not sent {r['skipped']}; turns on another process than the "
                f"previous one {pc(r['moved'])}"
              + (f"; errors {r['errors']}" if r["errors"] else "")
              + f"; phase wall {r['wall']:.0f} s{extra}")
    if len({r["shape"] for r in rows}) > 1:
        scaling(rows)
        return
    by = {r["algorithm"]: r for r in rows}
    inf = by.get("inference")
    if inf is None:
        return
    print()
    for other, target in (("weighted_round_robin", TARGET_TTFT_VS_RR),
                          ("least_outstanding", TARGET_TTFT_VS_LO)):
        if other in by:
            ratio = by[other]["ttft90"] / inf["ttft90"]
            print(f"TTFT p90 {SHORT[other]} / inference: x{ratio:.2f} (target >= {target:g}: "
                  f"{'met' if ratio >= target else 'missed'})")
    gap = 100 * (inf["bound"] - inf["hit"])
    print(f"prefix hit rate, inference vs perfect router: {100 * inf['hit']:.1f}% vs "
          f"{100 * inf['bound']:.1f}%, {gap:.1f} points below (target <= "
          f"{TARGET_HIT_GAP_POINTS:g}: {'met' if gap <= TARGET_HIT_GAP_POINTS else 'missed'})")


def scaling(rows: List[Dict[str, Any]]) -> None:
    """Each shape against the first (one gateway of one worker)."""
    base = rows[0]
    print()
    for r in rows[1:]:
        if r["algorithm"] != base["algorithm"]:
            continue
        target = TARGET_GATEWAYS_TTFT if r["shape"].gateways > 1 else TARGET_WORKERS_TTFT
        over = r["ttft90"] / base["ttft90"] - 1
        print(f"TTFT p90, {r['label']} vs {base['label']}: {f0(r['ttft90'])} vs "
              f"{f0(base['ttft90'])} ms ({100 * over:+.1f}%; target at most "
              f"+{100 * target:.0f}%: {'met' if over <= target else 'missed'}); prefix hit "
              f"rate {pc(r['hit'])} vs {pc(base['hit'])}")


async def run(reactor: Any, args: argparse.Namespace) -> None:
    if args.quick:
        args.duration = args.duration if args.duration_given else 10.0
        args.users = args.users if args.users_given else 20
        args.drain = min(args.drain, 15.0)
    if args.algorithms:
        algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
        for a in algorithms:
            if a not in ALGORITHMS:
                raise SystemExit(f"unknown algorithm {a!r}: one of {', '.join(ALGORITHMS)}")
    else:
        algorithms = ["inference"] if args.scaling else list(ALGORITHMS)
    if args.scaling:
        shapes = [Shape(1, 1), Shape(1, max(2, args.workers)), Shape(2, 1)]
    else:
        shapes = [Shape(args.gateways, args.workers)]
    if args.connections is None:
        # Kept connections pin a conversation to one worker of one gateway:
        # the scaling runs send each turn on a new one, so turns go anywhere.
        args.connections = "per-turn" if args.scaling else "keepalive"
    if args.weights:
        json.loads(args.weights)  # a typo fails here, not in the gateway
    systems = system_prompts(args.seed, args.systems, args.system_bytes)
    convs = make_workload(args.seed, args.users, args.duration, args.lora_share, args.systems,
                          args.think)
    t0 = reactor.seconds()
    sims = await start_sims(reactor, args)
    ports = [p for _, p in sims]
    rows = []
    redis: Optional[Child] = None
    try:
        with tempfile.TemporaryDirectory(prefix="routing-bench-") as tmp:
            redis_url = ""
            if any(shape.gateways > 1 for shape in shapes):
                redis, redis_url = await start_redis(reactor, tmp)
            for shape in shapes:
                for algorithm in algorithms:
                    label = shape.label if args.scaling else SHORT[algorithm] if \
                        shape == Shape(1, 1) else f"{SHORT[algorithm]}, {shape.label}"
                    res = await one_algorithm(reactor, args, algorithm, shape, ports, convs,
                                              systems, tmp, redis_url)
                    row = summarize(args, algorithm, shape, label, res)
                    rows.append(row)
                    if args.dump:
                        with open(args.dump, "a") as fh:
                            for rec in res["records"]:
                                fh.write(json.dumps({"algorithm": algorithm, "shape": label,
                                                     **rec}) + "\n")
                    print(f"{label}: {row['n']} requests, TTFT p90 {f0(row['ttft90'])} ms, "
                          f"hit rate {pc(row['hit'])}, {row['wall']:.0f} s", flush=True)
    finally:
        await stop_children(reactor, *[c for c, _ in sims], *([redis] if redis else []))
    report(args, convs, systems, rows)
    print(f"\nwall time: {reactor.seconds() - t0:.0f} s", flush=True)


class _Given(argparse.Action):
    """Remember that an option was given (``--quick`` changes the defaults of the others)."""

    def __call__(self, parser: Any, ns: Any, values: Any, option_string: Any = None) -> None:
        setattr(ns, self.dest, values)
        setattr(ns, self.dest + "_given", True)


def routing_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(duration_given=False, users_given=False)
    p.add_argument("--duration", type=float, default=40.0, action=_Given,
                   help="seconds of conversation arrivals per algorithm (default 40; --quick 10)")
    p.add_argument("--users", type=int, default=80, action=_Given,
                   help="conversations per algorithm (default 80; --quick 20)")
    p.add_argument("--seed", type=int, default=1, help="the workload's seed (default 1)")
    p.add_argument("--algorithms", default="",
                   help="comma-separated, in this order (default: " + ",".join(ALGORITHMS) + ")")
    p.add_argument("--weights", default="", metavar="JSON",
                   help='the inference scorer\'s balancer.weights, e.g. \'{"prefix": 4}\' '
                        "(completes the defaults)")
    p.add_argument("--inference-set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more --set for the inference gateway only (repeatable), e.g. "
                        "balancer.prefix_capacity_blocks=200")
    p.add_argument("--gateway-set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more --set for every gateway (repeatable)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="server.workers of each gateway (default 1; with --scaling, the "
                        "workers of the second shape, at least 2)")
    p.add_argument("--gateways", type=int, default=1, choices=(1, 2),
                   help="gateways, sharing a redis-server started for the run when 2 "
                        "(default 1)")
    p.add_argument("--scaling", action="store_true",
                   help="the inference scorer as 1 gateway of 1 worker, 1 gateway of "
                        "--workers workers and 2 gateways sharing Redis")
    p.add_argument("--connections", choices=("keepalive", "per-turn"), default=None,
                   help="a conversation keeps its connection, or opens one per turn (to the "
                        "gateways in turn); default keepalive, per-turn with --scaling")
    p.add_argument("--dump", default="", metavar="FILE",
                   help="append every request's record (JSON lines) to FILE")
    g = p.add_argument_group("workload shape")
    g.add_argument("--systems", type=int, default=5, help="shared system prompts (default 5)")
    g.add_argument("--system-bytes", type=int, default=12000,
                   help="bytes per system prompt, about 4 per token (default 12000)")
    g.add_argument("--lora-share", type=float, default=0.2,
                   help="share of users asking a LoRA adapter (default 0.2)")
    g.add_argument("--think", type=float, default=0.75,
                   help="mean think time between a user's turns, s (default 0.75)")
    g.add_argument("--drain", type=float, default=30.0,
                   help="after the arrivals, seconds in which turns may still start "
                        "(default 30; --quick at most 15)")
    g.add_argument("--request-timeout", type=float, default=60.0,
                   help="a request unanswered this long fails (default 60)")
    s = p.add_argument_group("simulators")
    s.add_argument("--kv-blocks", type=int, default=768, help="prefix cache blocks (default 768)")
    s.add_argument("--max-running", type=int, default=16, help="default 16")
    s.add_argument("--prefill-ms-base", type=float, default=2.0, help="default 2")
    s.add_argument("--prefill-ms-per-token", type=float, default=0.15,
                   help="default 0.15: a 3,000-token miss costs 450 ms of the prefill lane")
    s.add_argument("--decode-ms-base", type=float, default=5.0, help="default 5")
    s.add_argument("--decode-ms-per-running", type=float, default=0.25, help="default 0.25")
    s.add_argument("--max-loras", type=int, default=1, help="default 1")
    s.add_argument("--lora-load-ms", type=float, default=150.0, help="default 150")


if __name__ == "__main__":
    bench_main(__doc__, run, routing_args)
