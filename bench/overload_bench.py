"""Overload benchmark: admission queue, priority classes and fair order under 1.5x load.

    flock /tmp/ntonix-cpu.lock .venv/bin/python bench/overload_bench.py          # about 50 s
    flock /tmp/ntonix-cpu.lock .venv/bin/python bench/overload_bench.py --quick  # about 20 s

(``flock``: runs never overlap another CPU-heavy run on this 2-core machine.)

The fleet: ``--backends`` (2) plain mocks (``python -m ntonix_mock --ttft-ms
SERVICE --itl-ms 0``), each answering a non-streamed chat request exactly
``--service-ms`` (250) after it arrives, whatever else it is doing, each
behind ``max_concurrency`` ``--max-concurrency`` (4) in the gateway (object
form of ``backends``, in a config file). The fleet's capacity is therefore
C = backends x max_concurrency / service time (2 x 4 / 0.25 s = 32
requests/s); the bench also measures it, through the gateway, with a closed
loop of more clients than slots (the queue never empty, so every freed slot is
refilled at once), and uses the measured figure.

Then an open loop: Poisson arrivals at ``--rate-factor`` (1.5) x C for
``--duration`` seconds, every request non-streamed (``max_tokens`` 16, a
distinct prompt, response cache off), its tenant named by ``X-Tenant``
(``tenants.header``) and drawn from ``--mix`` (default: ``big`` 80% and
``small`` 8%, both standard with weight 1, i.e. 10:1 traffic; ``batch`` 8%
sheddable; ``ops`` 4% critical). ``big`` alone asks 1.2 x C: it floods. The
queue: ``--queue-size`` (64), ``--queue-timeout`` (5 s),
``--sheddable-share`` (0.5).

Measured at the client, per request: status, the 429's reason
(``error.code``) and ``Retry-After``, the queue wait (``queue;dur`` of
``Server-Timing``; absent: it did not wait, counted as 0) and the end-to-end
latency (from the moment it was due, connecting included). Printed: a
markdown table per class and per tenant, the goodput against C, the
Retry-After values, when each class was first refused, and the gateway's own
counters (``GET /admission`` on the admin listener) beside the client's.

"Never more than max_concurrency at a backend" is checked two ways while the
load runs: each mock's ``/stats`` ``active`` (generation requests it holds
open) polled every ``--sample-ms`` (20 ms, a tenth of a service time, over a
kept-alive connection, so a breach would have to last less than one poll
interval to be missed), and the gateway's ``/admission`` ``in_flight`` per
backend every 100 ms. Nothing here is a pass/fail test. Every load goes to
127.0.0.1; every loop is bounded in count and time; children are killed on
the way out.
"""

import argparse
import json
import random
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_bench import get_json  # noqa: E402
from proxy_bench import (  # noqa: E402
    Child, Conn, bench_main, free_port, pct, spawn, start_twistd, stop_children,
    wait_accepting)

CLASSES = ("critical", "standard", "sheddable")
REASONS = ("queue_full", "queue_timeout", "shed")
QUEUE_DUR = re.compile(r"queue;dur=([0-9.]+)")
GATEWAY_DUR = re.compile(r"gateway;dur=([0-9.]+)")
AT_ONCE_MS = 5.0  # a 429 after less time than this in the gateway did not wait
DEFAULT_MIX = "big=standard:80,small=standard:8,batch=sheddable:8,ops=critical:4"
MAX_CONNECTIONS = 1024  # client connections open at once, at most
MAX_RESPONSE = 65536  # bytes of one response kept


# -- a client that keeps the response ------------------------------------------------------

class RecConn(Conn):
    """proxy_bench's keep-alive client, also keeping the raw response (its
    head and body) of the request in progress."""

    def request(self, raw: bytes, timeout: float = 60.0) -> defer.Deferred:
        self.raw = b""
        return super().request(raw, timeout)

    def dataReceived(self, data: bytes) -> None:
        if len(self.raw) < MAX_RESPONSE:
            self.raw += data
        super().dataReceived(data)


def split_response(raw: bytes) -> Tuple[Dict[str, str], bytes]:
    """Headers (lower-case names; the last of repeated ones) and the body,
    de-chunked."""
    head, _, body = raw.partition(b"\r\n\r\n")
    headers: Dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out, rest = b"", body
        for _ in range(10000):  # bounded: a chunk per pass
            size_line, _, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                break
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return headers, body


class Poller:
    """GET one path over one kept-alive connection, again and again; a new
    connection when the last one went away."""

    def __init__(self, reactor: Any, port: int, path: str) -> None:
        self.reactor, self.port = reactor, port
        self.raw = (b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % path.encode())
        self.conn: Optional[RecConn] = None

    async def get(self) -> Any:
        if self.conn is None or self.conn.closed.called:
            self.conn = await connect_rec(self.reactor, self.port)
        status, *_ = await self.conn.request(self.raw, timeout=2)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        return json.loads(split_response(self.conn.raw)[1])

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed.called:
            self.conn.transport.loseConnection()


async def connect_rec(reactor: Any, port: int) -> RecConn:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    return await connectProtocol(ep, RecConn(reactor))


def sleep(reactor: Any, seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


# -- the workload ---------------------------------------------------------------------------

def parse_mix(text: str) -> List[Dict[str, Any]]:
    """``name=priority:share[:weight],...`` -> tenants."""
    out = []
    for item in text.split(","):
        name, _, spec = item.strip().partition("=")
        parts = spec.split(":")
        if not name or len(parts) not in (2, 3) or parts[0] not in CLASSES:
            raise SystemExit(f"--mix: {item!r} is not "
                             "name=critical|standard|sheddable:share[:weight]")
        out.append({"tenant": name, "priority": parts[0], "share": float(parts[1]),
                    "weight": float(parts[2]) if len(parts) == 3 else 1.0})
    total = sum(t["share"] for t in out)
    for t in out:
        t["share"] /= total
    return out


def schedule(mix: List[Dict[str, Any]], rate: float, duration: float,
             seed: int) -> List[Tuple[float, str]]:
    """Poisson arrivals over ``duration`` at ``rate``, each with a tenant
    drawn by share: (offset in seconds, tenant)."""
    rng = random.Random(seed)
    names = [t["tenant"] for t in mix]
    shares = [t["share"] for t in mix]
    out: List[Tuple[float, str]] = []
    t = rng.expovariate(rate)
    while t < duration and len(out) < int(rate * duration * 3) + 100:
        out.append((t, rng.choices(names, shares)[0]))
        t += rng.expovariate(rate)
    return out


def chat(tenant: str, i: int) -> bytes:
    body = json.dumps({"model": "mock-llm", "stream": False, "max_tokens": 16,
                       "messages": [{"role": "user",
                                     "content": f"{tenant} question {i}"}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nX-Tenant: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (tenant.encode(), len(body), body))


class Client:
    """Open-loop sender: each request on an idle kept-alive connection, or
    a new one (at most MAX_CONNECTIONS open)."""

    def __init__(self, reactor: Any, port: int, timeout: float) -> None:
        self.reactor, self.port, self.timeout = reactor, port, timeout
        self.idle: List[RecConn] = []
        self.open = 0
        self.skipped = 0

    async def send(self, raw: bytes) -> Dict[str, Any]:
        """One request: its outcome (status 0: a client-side failure)."""
        start = self.reactor.seconds()
        conn = None
        while self.idle and conn is None:
            c = self.idle.pop()
            if not c.closed.called:
                conn = c
        if conn is None:
            if self.open >= MAX_CONNECTIONS:
                self.skipped += 1
                return {"status": 0, "error": "client connection limit", "start": start,
                        "end": start}
            self.open += 1
            try:
                conn = await connect_rec(self.reactor, self.port)
            except Exception as e:  # noqa: BLE001: reported in the row
                self.open -= 1
                return {"status": 0, "error": repr(e), "start": start,
                        "end": self.reactor.seconds()}
            conn.closed.addCallback(self._gone)
        try:
            status, *_ = await conn.request(raw, timeout=self.timeout)
        except Exception as e:  # noqa: BLE001: reported in the row
            return {"status": 0, "error": repr(e)[:200], "start": start,
                    "end": self.reactor.seconds()}
        end = self.reactor.seconds()
        headers, body = split_response(conn.raw)
        out: Dict[str, Any] = {"status": status, "start": start, "end": end,
                               "backend": headers.get("x-backend-id")}
        m = QUEUE_DUR.search(headers.get("server-timing", ""))
        out["queue_ms"] = float(m.group(1)) if m else None
        m = GATEWAY_DUR.search(headers.get("server-timing", ""))
        out["gateway_ms"] = float(m.group(1)) if m else None
        if "retry-after" in headers:
            out["retry_after"] = int(headers["retry-after"])
        if status != 200:
            try:
                out["code"] = json.loads(body)["error"].get("code")
            except Exception:  # noqa: BLE001: not the gateway's JSON error
                out["code"] = None
        if headers.get("connection", "").lower() != "close" and not conn.closed.called:
            self.idle.append(conn)
        else:
            conn.transport.loseConnection()
        return out

    def _gone(self, _: Any) -> None:
        self.open -= 1

    def close(self) -> None:
        for c in self.idle:
            c.transport.loseConnection()
        self.idle = []


# -- the children ---------------------------------------------------------------------------

async def start_mocks(reactor: Any, args: argparse.Namespace) -> List[Tuple[Child, int]]:
    mocks = []
    for k in range(args.backends):
        child = Child(rb"listening on 127\.0\.0\.1:(\d+)")
        spawn(reactor, child, [sys.executable, "-m", "ntonix_mock", "--port", "0",
                               "--id", "abcdefgh"[k % 8] + ("" if k < 8 else str(k)),
                               "--ttft-ms", str(args.service_ms), "--itl-ms", "0",
                               "--tokens", "16"],
              env={"PYTHONUNBUFFERED": "1"})
        mocks.append(child)
    ports = []
    for child in mocks:
        ports.append(await child.up.addTimeout(20, reactor))
    return list(zip(mocks, ports))


async def start_gateway(reactor: Any, args: argparse.Namespace, mix: List[Dict[str, Any]],
                        ports: List[int], workdir: str) -> Tuple[Child, int, int]:
    """The gateway: the backends' object form in a config file, the rest as
    ``--set``; an admin listener on its own port. Output to a file (a 429
    may log)."""
    config = Path(workdir) / "ntonix.json"
    config.write_text(json.dumps({"backends": [
        {"host": "127.0.0.1", "port": p, "max_concurrency": args.max_concurrency}
        for p in ports]}))
    classes = {t["tenant"]: {"priority": t["priority"], "weight": t["weight"]} for t in mix}
    admin = free_port()
    gw, port = await start_twistd(reactor, "gateway", lambda port: [
        "ntonix", "--port", str(port), "--bind", "127.0.0.1", "--config", str(config),
        "--log-level", "warn",
        "--set", f"admin.http_port={admin}", "--set", "admin.http_bind=127.0.0.1",
        "--set", "cache.enabled=false",
        "--set", f"balancer.queue_size={args.queue_size}",
        "--set", f"balancer.queue_timeout_seconds={args.queue_timeout}",
        "--set", f"balancer.sheddable_queue_share={args.sheddable_share}",
        "--set", "tenants.header=X-Tenant", "--set", "tenants.trusted_proxies=127.0.0.1",
        "--set", f"tenants.classes={json.dumps(classes)}",
        "--set", "health.interval_seconds=1",
        "--set", "server.drain_delay_seconds=0", "--set", "server.shutdown_timeout_seconds=2",
        *[a for kv in args.gateway_set for a in ("--set", kv)]],
        output=str(Path(workdir) / "gateway.log"))
    await wait_accepting(reactor, gw, admin, "admin listener")
    return gw, port, admin


async def wait_ready(reactor: Any, admin: int, seconds: float = 20) -> None:
    deadline = reactor.seconds() + seconds
    while True:
        bs = (await get_json(reactor, admin, "/backends"))["backends"]
        if all(b["state"] == "healthy" for b in bs):
            return
        if reactor.seconds() > deadline:
            raise RuntimeError(f"gateway not ready after {seconds} s: {json.dumps(bs)[:2000]}")
        await sleep(reactor, 0.1)


# -- the phases -----------------------------------------------------------------------------

async def measure_capacity(reactor: Any, port: int, clients: int, seconds: float,
                           timeout: float) -> Tuple[float, int, List[int]]:
    """Closed loop of ``clients`` (more than the fleet's slots): requests
    finished per second after a 0.5 s warm-up, and the statuses seen."""
    client = Client(reactor, port, timeout)
    t0 = reactor.seconds()
    stop = t0 + 0.5 + seconds
    ends: List[float] = []
    statuses: List[int] = []

    async def loop(k: int) -> None:
        for i in range(100000):
            if reactor.seconds() >= stop:
                return
            r = await client.send(chat("probe", k * 100000 + i))
            statuses.append(r["status"])
            if r["status"] == 200:
                ends.append(r["end"])

    await defer.gatherResults([defer.Deferred.fromCoroutine(loop(k)) for k in range(clients)])
    client.close()
    done = [e for e in ends if t0 + 0.5 <= e < stop]
    return len(done) / seconds, len(ends), sorted(set(statuses))


class Samples:
    """Peaks seen by the pollers."""

    def __init__(self, n: int) -> None:
        self.mock_peak = [0] * n
        self.mock_polls = [0] * n
        self.mock_over = [0] * n
        self.gw_peak: Dict[str, int] = {}
        self.gw_over = 0
        self.gw_polls = 0
        self.queue_peak = 0
        self.queue_ge_shed = 0
        self.queue_full = 0
        self.errors = 0
        self.first_full: Optional[float] = None


async def poll_mocks(reactor: Any, ports: List[int], limit: int, interval: float,
                     s: Samples, until: List[float]) -> None:
    pollers = [Poller(reactor, p, "/stats") for p in ports]
    try:
        for _ in range(1000000):
            if reactor.seconds() >= until[0]:
                return
            for k, p in enumerate(pollers):
                try:
                    active = (await p.get())["active"]
                except Exception:  # noqa: BLE001: counted
                    s.errors += 1
                    continue
                s.mock_polls[k] += 1
                s.mock_peak[k] = max(s.mock_peak[k], active)
                s.mock_over[k] += active > limit
            await sleep(reactor, interval)
    finally:
        for p in pollers:
            p.close()


async def poll_gateway(reactor: Any, admin: int, args: argparse.Namespace, s: Samples,
                       until: List[float]) -> None:
    p = Poller(reactor, admin, "/admission")
    try:
        for _ in range(1000000):
            if reactor.seconds() >= until[0]:
                return
            try:
                doc = await p.get()
            except Exception:  # noqa: BLE001: counted
                s.errors += 1
                await sleep(reactor, 0.1)
                continue
            s.gw_polls += 1
            for b in doc["backends"]:
                s.gw_peak[b["name"]] = max(s.gw_peak.get(b["name"], 0), b["in_flight"])
                s.gw_over += bool(b["max_concurrency"]) and b["in_flight"] > b["max_concurrency"]
            w = doc["waiting"]
            s.queue_peak = max(s.queue_peak, w)
            s.queue_ge_shed += w >= args.sheddable_share * args.queue_size
            s.queue_full += w >= args.queue_size
            if w >= args.queue_size and s.first_full is None:
                s.first_full = reactor.seconds()
            await sleep(reactor, 0.1)
    finally:
        p.close()


async def overload(reactor: Any, port: int, admin: int, mock_ports: List[int],
                   args: argparse.Namespace, mix: List[Dict[str, Any]],
                   rate: float) -> Tuple[List[Dict[str, Any]], Samples, float, Client]:
    arrivals = schedule(mix, rate, args.duration, args.seed)
    client = Client(reactor, port, timeout=args.queue_timeout + args.service_ms / 1000 + 30)
    samples = Samples(len(mock_ports))
    records: List[Dict[str, Any]] = []
    until = [float("inf")]
    pollers = [defer.Deferred.fromCoroutine(poll_mocks(
        reactor, mock_ports, args.max_concurrency, args.sample_ms / 1000, samples, until)),
        defer.Deferred.fromCoroutine(poll_gateway(reactor, admin, args, samples, until))]
    t0 = reactor.seconds()
    pending: List[defer.Deferred] = []

    async def one(i: int, offset: float, tenant: str) -> None:
        r = await client.send(chat(tenant, i))
        r.update(i=i, tenant=tenant, due=offset)
        records.append(r)

    def fire(i: int, offset: float, tenant: str) -> None:
        pending.append(defer.Deferred.fromCoroutine(one(i, offset, tenant)))

    calls = [reactor.callLater(offset, fire, i, offset, tenant)
             for i, (offset, tenant) in enumerate(arrivals)]
    limit = args.duration + args.queue_timeout + args.service_ms / 1000 + 40
    for _ in range(100000):
        if len(records) >= len(arrivals) or reactor.seconds() - t0 > limit:
            break
        await sleep(reactor, 0.1)
    for c in calls:
        if c.active():
            c.cancel()
    until[0] = 0.0
    await defer.DeferredList(pollers)
    if len(records) < len(arrivals):
        print(f"  {len(arrivals) - len(records)} requests unanswered after {limit:.0f} s",
              flush=True)
    client.close()
    return records, samples, t0, client


# -- the report -----------------------------------------------------------------------------

def fmt_ms(v: float) -> str:
    return "-" if v != v else f"{v:.0f}"


def row(name: str, recs: List[Dict[str, Any]]) -> str:
    served = [r for r in recs if r["status"] == 200]
    refused = {why: sum(1 for r in recs if r["status"] == 429 and r.get("code") == why)
               for why in REASONS}
    other = len(recs) - len(served) - sum(refused.values())
    waits = [r["queue_ms"] or 0.0 for r in served]
    waited = sum(1 for r in served if r["queue_ms"] is not None)
    e2e = [1000 * (r["end"] - r["start"]) for r in served]
    served_cell = f"{len(served)} ({100 * len(served) / len(recs):.0f}%)" if recs else "0"
    waited_cell = f"{100 * waited / len(served):.0f}%" if served else "-"
    return (f"| {name} | {len(recs)} | {served_cell} | {refused['queue_full']} | "
            f"{refused['queue_timeout']} | {refused['shed']} | {other} | {waited_cell} | "
            f"{fmt_ms(pct(waits, 50))} | {fmt_ms(pct(waits, 99))} | "
            f"{fmt_ms(pct(e2e, 50))} | {fmt_ms(pct(e2e, 99))} |")


def report(records: List[Dict[str, Any]], samples: Samples, t0: float,
           args: argparse.Namespace, mix: List[Dict[str, Any]], cap_calc: float,
           cap_meas: float, rate: float, counters: Dict[str, Any], client: Client) -> None:
    cls_of = {t["tenant"]: t["priority"] for t in mix}
    print()
    print("| class / tenant | sent | served | refused queue_full | refused queue_timeout | "
          "refused shed | other | served that waited | wait p50 ms | wait p99 ms | "
          "e2e p50 ms | e2e p99 ms |")
    print("|---" * 12 + "|")
    for c in CLASSES:
        tenants = [t["tenant"] for t in mix if t["priority"] == c]
        if not tenants:
            continue
        print(row(f"**{c}**", [r for r in records if cls_of[r["tenant"]] == c]))
        if len(tenants) > 1:
            for t in tenants:
                print(row(f"&nbsp;&nbsp;{t}", [r for r in records if r["tenant"] == t]))
    print(row("**all**", records))
    print()

    served = [r for r in records if r["status"] == 200]
    in_window = [r for r in served if r["end"] - t0 <= args.duration]
    last = max((r["end"] for r in served), default=t0)
    print(f"- goodput: {len(in_window) / args.duration:.1f} served/s during the "
          f"{args.duration:g} s of arrivals "
          f"({len(served) / max(last - t0, 1e-9):.1f}/s to the last "
          f"answer), against C = {cap_meas:.1f}/s measured ({cap_calc:.1f}/s computed): "
          f"{100 * len(in_window) / args.duration / cap_meas:.0f}% of measured capacity; "
          f"offered {rate:.1f}/s ({len(records)} requests)")
    ras = sorted(r["retry_after"] for r in records if r["status"] == 429 and "retry_after" in r)
    no_ra = sum(1 for r in records if r["status"] == 429 and "retry_after" not in r)
    if ras:
        by_reason = []
        for why in REASONS:
            v = sorted(r["retry_after"] for r in records
                       if r.get("code") == why and "retry_after" in r)
            if v:
                by_reason.append(f"{why} {v[0]}/{pct(v, 50):g}/{v[-1]}")
        print(f"- Retry-After (s) over {len(ras)} 429s: min {ras[0]}, median {pct(ras, 50):g}, "
              f"max {ras[-1]} (min/median/max by reason: {', '.join(by_reason)})"
              + (f"; {no_ra} 429s without it" if no_ra else ""))
    else:
        print("- no 429 seen")
    firsts = []
    for c in CLASSES:
        t = sorted((r["end"] - t0, r["due"]) for r in records
                   if cls_of[r["tenant"]] == c and r["status"] == 429)
        firsts.append(f"{c} at {t[0][0]:.2f} s (it arrived at {t[0][1]:.2f} s)" if t
                      else f"{c} never")
    full = "never" if samples.first_full is None else f"{samples.first_full - t0:.1f} s"
    print(f"- first 429 per class, after the start: {', '.join(firsts)}; "
          f"the queue was first seen full at {full}")
    late: Dict[str, List[float]] = {}
    for r in records:
        if r["status"] == 429 and (r.get("gateway_ms") or 0.0) >= AT_ONCE_MS:
            late.setdefault(f"{r['tenant']} {r.get('code')}", []).append(r["gateway_ms"])
    print("- 429s after waiting in the queue (gateway;dur of the 429 >= "
          f"{AT_ONCE_MS:g} ms; the rest were refused on arrival): "
          + (", ".join(f"{k} {len(v)} (waited p50 {pct(v, 50):.0f} ms)"
                       for k, v in sorted(late.items())) or "none"))
    st = [r for r in records if cls_of[r["tenant"]] == "standard" and r["status"] == 200]
    if st:
        per = {t["tenant"]: sum(1 for r in st if r["tenant"] == t["tenant"])
               for t in mix if t["priority"] == "standard"}
        print("- standard slots taken: " + ", ".join(
            f"{t} {n} ({100 * n / len(st):.0f}%)" for t, n in per.items()))
    errors = [r for r in records if r["status"] not in (200, 429)]
    if errors:
        kinds: Dict[str, int] = {}
        for r in errors:
            k = f"HTTP {r['status']}" if r["status"] else r.get("error", "?")[:80]
            kinds[k] = kinds.get(k, 0) + 1
        print(f"- other outcomes: {kinds}")
    if client.skipped:
        print(f"- {client.skipped} arrivals not sent: client connection limit")

    lim = args.max_concurrency
    ok = all(p <= lim for p in samples.mock_peak) and not samples.gw_over and \
        all(p <= lim for p in samples.gw_peak.values())
    per_mock = ", ".join(f"{'abcdefgh'[k % 8]}: peak {samples.mock_peak[k]} over "
                         f"{samples.mock_polls[k]} polls"
                         for k in range(len(samples.mock_peak)))
    per_gw = ", ".join(f"{name} peak {p}" for name, p in samples.gw_peak.items())
    print(f"- max_concurrency {lim}: backends' own count of requests in progress (mock /stats "
          f"`active`, every {args.sample_ms:g} ms): {per_mock}; gateway /admission "
          f"`in_flight` (every 100 ms, {samples.gw_polls} polls): {per_gw} -> "
          + ("never above the limit" if ok else "**ABOVE THE LIMIT**")
          + (f" ({samples.errors} polls failed)" if samples.errors else ""))
    print(f"- queue (gateway /admission, every 100 ms): peak {samples.queue_peak} waiting of "
          f"{args.queue_size}; at or above the sheddable threshold "
          f"({args.sheddable_share * args.queue_size:g}) in "
          f"{100 * samples.queue_ge_shed / max(samples.gw_polls, 1):.0f}% of polls, full in "
          f"{100 * samples.queue_full / max(samples.gw_polls, 1):.0f}%")
    # The gateway's own counters beside the client's, for the overload phase.
    adm, ref = counters["admitted"], counters["refused"]
    client_ref: Dict[Tuple[str, str, str], int] = {}
    for r in records:
        if r["status"] == 429:
            k = (cls_of[r["tenant"]], r["tenant"], r.get("code") or "?")
            client_ref[k] = client_ref.get(k, 0) + 1
    client_adm = {c: sum(1 for r in records if cls_of[r["tenant"]] == c and r["status"] == 200)
                  for c in CLASSES}
    print(f"- gateway counters for this phase: admitted {adm} (client saw served {client_adm}); "
          f"refused {dict(sorted(ref.items()))}"
          + ("" if client_ref == ref else f" (client saw {dict(sorted(client_ref.items()))})"))
    sys.stdout.flush()


def counter_diff(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    adm = {p: after["admitted"].get(p, 0) - before["admitted"].get(p, 0) for p in CLASSES}

    def refused(doc: Dict[str, Any]) -> Dict[Tuple[str, str, str], int]:
        return {(x["priority"], x["tenant"], x["reason"]): x["count"] for x in doc["refused"]}

    b, a = refused(before), refused(after)
    ref = {k: n - b.get(k, 0) for k, n in a.items() if n - b.get(k, 0)}
    return {"admitted": adm, "refused": ref}


# -- main -----------------------------------------------------------------------------------

async def run(reactor: Any, args: argparse.Namespace) -> None:
    if args.quick:
        args.duration = min(args.duration, 10.0)
    mix = parse_mix(args.mix)
    start = reactor.seconds()
    workdir = tempfile.mkdtemp(prefix="ntonix-overload-")
    children: List[Child] = []
    try:
        mocks = await start_mocks(reactor, args)
        children += [c for c, _ in mocks]
        ports = [p for _, p in mocks]
        gw, port, admin = await start_gateway(reactor, args, mix, ports, workdir)
        children.insert(0, gw)
        await wait_ready(reactor, admin)
        slots = args.backends * args.max_concurrency
        cap_calc = slots * 1000.0 / args.service_ms
        probe_s = 2.0 if args.quick else 4.0
        cap_meas, probe_n, statuses = await measure_capacity(
            reactor, port, slots + 4, probe_s, timeout=args.queue_timeout + 30)
        rate = args.rate_factor * cap_meas
        print(f"fleet: {args.backends} plain mocks, each answering a non-streamed request "
              f"{args.service_ms:g} ms after it arrives (--ttft-ms {args.service_ms:g} --itl-ms 0,"
              f" max_tokens 16), max_concurrency {args.max_concurrency} each: {slots} slots",
              flush=True)
        print(f"capacity: computed {cap_calc:.1f} requests/s; measured {cap_meas:.1f}/s "
              f"({slots + 4} closed-loop clients through the gateway for {probe_s:g} s, "
              f"{probe_n} answers, statuses {statuses})", flush=True)
        print(f"overload: Poisson arrivals at {args.rate_factor:g} x {cap_meas:.1f} = "
              f"{rate:.1f} requests/s for {args.duration:g} s (seed {args.seed}), non-streamed, "
              f"queue_size {args.queue_size}, queue_timeout {args.queue_timeout:g} s, "
              f"sheddable_queue_share {args.sheddable_share:g}; mix:", flush=True)
        for t in mix:
            print(f"  {t['tenant']}: {t['priority']}, weight {t['weight']:g}, "
                  f"{100 * t['share']:.0f}% of arrivals = {t['share'] * rate:.1f}/s = "
                  f"{t['share'] * rate / cap_meas:.2f} x C", flush=True)
        before = await get_json(reactor, admin, "/admission")
        records, samples, t0, client = await overload(reactor, port, admin, ports, args, mix,
                                                      rate)
        after = await get_json(reactor, admin, "/admission")
        report(records, samples, t0, args, mix, cap_calc, cap_meas, rate,
               counter_diff(before, after), client)
    finally:
        await stop_children(reactor, *children)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nwall time {reactor.seconds() - start:.0f} s", flush=True)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=40.0,
                   help="seconds of arrivals (default 40; 10 with --quick)")
    p.add_argument("--rate-factor", type=float, default=1.5,
                   help="arrival rate over the measured capacity (default 1.5)")
    p.add_argument("--seed", type=int, default=1, help="arrival times and tenants (default 1)")
    p.add_argument("--mix", default=DEFAULT_MIX,
                   help="tenants: name=critical|standard|sheddable:share[:weight],... "
                        "(default %(default)s)")
    p.add_argument("--backends", type=int, default=2, help="mock backends (default 2)")
    p.add_argument("--max-concurrency", type=int, default=4,
                   help="max_concurrency of each backend (default 4)")
    p.add_argument("--service-ms", type=float, default=250.0,
                   help="each mock's time to answer a request (default 250)")
    p.add_argument("--queue-size", type=int, default=64, help="balancer.queue_size (default 64)")
    p.add_argument("--queue-timeout", type=float, default=5.0,
                   help="balancer.queue_timeout_seconds (default 5)")
    p.add_argument("--sheddable-share", type=float, default=0.5,
                   help="balancer.sheddable_queue_share (default 0.5)")
    p.add_argument("--sample-ms", type=float, default=20.0,
                   help="how often each mock's /stats is polled (default 20)")
    p.add_argument("--gateway-set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more --set for the gateway (repeatable)")


if __name__ == "__main__":
    bench_main(__doc__, run, add_args)
