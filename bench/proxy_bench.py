"""Proxy-path benchmark: the gateway against a direct connection to the backend.

    .venv/bin/python bench/proxy_bench.py            # about four minutes
    .venv/bin/python bench/proxy_bench.py --quick    # smaller counts

Starts a mock backend (its own process), the gateway (``twistd ntonix``, its
own process) and drives both from this process on 127.0.0.1, then prints each
figure for the direct connection and through the gateway, measured in the same
run. Streams are also run through a bare TCP relay (Twisted's portforward), to
show what any one-process relay adds on the same machine. Nothing here is a
pass/fail test; targets are printed beside the figures.
Every loop is bounded in count and time.
"""

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS

CONTENT = re.compile(rb'"content":"[^"]')
END_CHUNKED = b"\r\n0\r\n\r\n"


def pct(values: List[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Child(protocol.ProcessProtocol):
    """A child process whose output is scanned for its listening port."""

    def __init__(self, pattern: bytes) -> None:
        self.pattern = re.compile(pattern)
        self.out = b""
        self.port: Optional[int] = None
        self.up: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        # Enough to find the port and to show why a child did not start; a
        # gateway logging every request would otherwise grow this (and the
        # cost of appending to it) without bound.
        if len(self.out) < 65536:
            self.out += data
        if self.port is None:
            m = self.pattern.search(self.out)
            if m:
                self.port = int(m.group(1))
                self.up.callback(self.port)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.up.called:
            self.up.errback(RuntimeError(self.out.decode(errors="replace")))
        self.ended.callback(None)


class Conn(protocol.Protocol):
    """A minimal keep-alive HTTP/1.1 client: one request at a time, timing
    the first byte, the first content token and the end of the response."""

    def __init__(self, reactor: Any, read_rate: Optional[float] = None) -> None:
        self.reactor = reactor
        self.d: Optional[defer.Deferred] = None
        self.read_rate = read_rate  # bytes/s, for slow readers
        self.closed: defer.Deferred = defer.Deferred()
        self.total = 0

    def request(self, raw: bytes) -> defer.Deferred:
        self.head = b""
        self.in_body = False
        self.length: Optional[int] = None
        self.tail = b""
        self.body_bytes = 0
        self.t0 = self.reactor.seconds()
        self.first_byte: Optional[float] = None
        self.first_token: Optional[float] = None
        self.d = defer.Deferred()
        self.transport.write(raw)
        return self.d

    def dataReceived(self, data: bytes) -> None:
        now = self.reactor.seconds()
        self.total += len(data)
        if self.first_byte is None:
            self.first_byte = now
        if self.read_rate:
            self._throttle(len(data))
        if not self.in_body:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            self.in_body = True
            self.status = int(head.split(b" ", 2)[1])
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            self.length = int(m.group(1)) if m else None
        if self.first_token is None and CONTENT.search(data):
            self.first_token = now
        self.body_bytes += len(data)
        self.tail = (self.tail + data)[-16:]
        done = (self.body_bytes >= self.length) if self.length is not None \
            else self.tail.endswith(END_CHUNKED)
        if done and self.d is not None:
            d, self.d = self.d, None
            d.callback((self.status, self.first_byte - self.t0,
                        (self.first_token or now) - self.t0, now - self.t0))

    def _throttle(self, n: int) -> None:
        # Read no faster than read_rate on average: stop reading for as long
        # as the bytes just taken would need at that rate.
        self.transport.pauseProducing()
        self.reactor.callLater(n / self.read_rate, self._resume)

    def _resume(self) -> None:
        if self.transport is not None and self.transport.connected:
            self.transport.resumeProducing()

    def connectionLost(self, reason: Any) -> None:
        if self.d is not None:
            d, self.d = self.d, None
            d.errback(reason)
        self.closed.callback(None)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_children(reactor: Any, mock_args: List[str], extra_gateway_args: List[str] = (),
                         ) -> Tuple[Child, int, Child, int]:
    """A mock backend and a gateway in front of it (logging at warn: no
    per-request access lines), each its own process."""
    py = sys.executable
    mock = Child(rb"listening on 127\.0\.0\.1:(\d+)")
    reactor.spawnProcess(mock, py, [py, "-m", "ntonix_mock", "--port", "0", "--id", "bench",
                                    *mock_args], env={"PYTHONUNBUFFERED": "1"})
    mock_port = await mock.up.addTimeout(20, reactor)
    try:
        gw, gw_port = await start_gateway(reactor, mock_port, ["--log-level", "warn",
                                                               *extra_gateway_args])
    except BaseException:
        await stop_children(reactor, mock)
        raise
    return mock, mock_port, gw, gw_port


async def start_gateway(reactor: Any, mock_port: int, args: List[str]) -> Tuple[Child, int]:
    """``twistd ntonix`` in front of the mock."""
    return await start_twistd(reactor, "gateway", lambda port: [
        "ntonix", "--port", str(port), "--bind", "127.0.0.1",
        "--backend", f"127.0.0.1:{mock_port}", *args])


async def start_twistd(reactor: Any, what: str,
                       argv: Callable[[int], List[str]]) -> Tuple[Child, int]:
    """``twistd -n <argv(port)>`` on a free port, waited for by connecting:
    its log level may filter out its listening line."""
    py = sys.executable
    twistd = str(Path(py).with_name("twistd"))
    port = free_port()
    child = Child(rb"(?!)")
    reactor.spawnProcess(child, twistd, [twistd, "-n", "--pidfile=", *argv(port)],
                         env={"PYTHONUNBUFFERED": "1"})
    await wait_accepting(reactor, child, port, what)
    return child, port


def self_signed(directory: str) -> Tuple[str, str, Any]:
    """A certificate for ``localhost`` and its key, written to ``directory``,
    and client TLS options that trust it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet import ssl

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = Path(directory) / "bench.crt", Path(directory) / "bench.key"
    cert_path.write_bytes(pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    trust = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(pem))
    return str(cert_path), str(key_path), trust


async def start_bare_relay(reactor: Any, mock_port: int) -> Tuple[Child, int]:
    """Twisted's own TCP port forwarder in front of the mock, its own process.

    It parses nothing and keeps nothing: one upstream connection per client
    connection, bytes copied both ways. What it adds is what any one-process
    Python relay adds on this machine, before any HTTP work; the gateway's
    figures are printed beside it so that the two can be told apart.
    """
    return await start_twistd(reactor, "bare relay", lambda port: [
        "portforward", "-p", f"tcp:{port}:interface=127.0.0.1",
        "-h", "127.0.0.1", "-d", str(mock_port)])


async def wait_accepting(reactor: Any, child: Child, port: int, what: str,
                         seconds: float = 20) -> None:
    """Until ``child`` accepts on ``port`` (its log may not say so), bounded."""
    # Its exit is reported here, from its output; not again as an unhandled
    # error of ``up``.
    child.up.addErrback(lambda _: None)
    deadline = reactor.seconds() + seconds
    while True:
        try:
            c = await connect(reactor, port)
            c.transport.loseConnection()
            if not child.up.called:
                child.up.callback(port)
            return
        except Exception:
            if reactor.seconds() > deadline or child.ended.called:
                if not child.ended.called:
                    child.transport.signalProcess("KILL")
                raise RuntimeError(f"{what} did not start: " + child.out.decode(errors="replace"))
            await task.deferLater(reactor, 0.05, lambda: None)


async def stop_children(reactor: Any, *children: Child) -> None:
    for child in children:
        if not child.ended.called:
            child.transport.signalProcess("TERM")
    await defer.gatherResults([c.ended for c in children]).addTimeout(30, reactor)


async def connect(reactor: Any, port: int, read_rate: Optional[float] = None,
                  rcvbuf: Optional[int] = None, tls: Any = None) -> Conn:
    """A bench client; ``tls``: client TLS options, for an HTTPS port."""
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    if tls is not None:
        ep = wrapClientTLS(tls, ep)
    c = await connectProtocol(ep, Conn(reactor, read_rate))
    if rcvbuf:
        import socket

        c.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return c


def chat_request(prompt: str, stream: bool, max_tokens: int) -> bytes:
    body = json.dumps({"model": "mock-llm", "stream": stream, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


async def control(reactor: Any, mock_port: int, **knobs: Any) -> None:
    c = await connect(reactor, mock_port)
    body = json.dumps(knobs).encode()
    await c.request(b"POST /control HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    c.transport.loseConnection()


async def serial_latency(reactor: Any, port: int, n: int, tls: Any = None) -> List[float]:
    c = await connect(reactor, port, tls=tls)
    out = []
    for i in range(n):
        status, _, _, total = await c.request(chat_request(f"serial {i % 50}", False, 16))
        assert status == 200, status
        out.append(total)
    c.transport.loseConnection()
    return out


async def fresh_connections(reactor: Any, port: int, n: int, tls: Any) -> List[float]:
    """Connect, ask, close, ``n`` times: latencies including the handshake."""
    out = []
    for i in range(n):
        t0 = reactor.seconds()
        c = await connect(reactor, port, tls=tls)
        status, _, _, _ = await c.request(chat_request(f"fresh {i % 50}", False, 16))
        assert status == 200, status
        out.append(reactor.seconds() - t0)
        c.transport.loseConnection()
    return out


async def throughput(reactor: Any, port: int, clients: int, seconds: float,
                     make_request: Any = None, tls: Any = None) -> Tuple[float, List[float]]:
    """Requests/s and latencies of ``clients`` keep-alive clients asking
    back to back for ``seconds``; ``make_request(client, i)`` builds each."""
    make_request = make_request or (lambda k, i: chat_request(f"tp {k} {i % 20}", False, 16))
    conns = [await connect(reactor, port, tls=tls) for _ in range(clients)]
    deadline = reactor.seconds() + seconds
    latencies: List[float] = []

    async def worker(c: Conn, k: int) -> None:
        i = 0
        while reactor.seconds() < deadline:
            status, _, _, total = await c.request(make_request(k, i))
            assert status == 200, status
            latencies.append(total)
            i += 1

    start = reactor.seconds()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker(c, k))
                               for k, c in enumerate(conns)])
    elapsed = reactor.seconds() - start
    for c in conns:
        c.transport.loseConnection()
    return len(latencies) / elapsed, latencies


async def streams(reactor: Any, port: int, n: int, pid: Optional[int],
                  tokens: int) -> Tuple[List[float], int]:
    conns = [await connect(reactor, port) for _ in range(n)]
    peak = [0]

    def sample() -> None:
        if pid:
            peak[0] = max(peak[0], rss_kb(pid))

    sampler = task.LoopingCall(sample)
    sampler.clock = reactor
    sampler.start(0.05)
    results = await defer.gatherResults(
        [c.request(chat_request(f"stream {i}", True, tokens)) for i, c in enumerate(conns)])
    sampler.stop()
    for c in conns:
        c.transport.loseConnection()
    return [r[2] for r in results], peak[0]


async def steady_streams(reactor: Any, port: int, n: int, seconds: float, warmup: float,
                         tokens: int) -> List[float]:
    """TTFT of streams started while ``n`` others are in progress.

    Each of ``n`` clients starts a stream after a random pause, and a new one
    as soon as it ends, so about ``n`` streams are always in flight and new
    ones arrive spread out, as in production; TTFTs after the warm-up count.
    """
    import random

    rng = random.Random(1)
    conns = [await connect(reactor, port) for _ in range(n)]
    start = reactor.seconds()
    deadline = start + warmup + seconds
    out: List[float] = []

    async def client(c: Conn, k: int) -> None:
        await task.deferLater(reactor, rng.uniform(0, 0.5), lambda: None)
        i = 0
        while reactor.seconds() < deadline:
            begun = reactor.seconds()
            _, _, ttft, _ = await c.request(chat_request(f"steady {k} {i}", True, tokens))
            if begun > start + warmup:
                out.append(ttft)
            i += 1

    await defer.gatherResults([defer.Deferred.fromCoroutine(client(c, k))
                               for k, c in enumerate(conns)])
    for c in conns:
        c.transport.loseConnection()
    return out


async def slow_readers(reactor: Any, port: int, n: int, seconds: float, pid: int) -> Tuple[int, int]:
    """RSS growth of ``pid`` while ``n`` clients read fast streams at 1 KB/s."""
    conns = [await connect(reactor, port, read_rate=1024, rcvbuf=4096) for _ in range(n)]
    before = rss_kb(pid)
    pending = [c.request(chat_request(f"slow {i}", True, 50_000)) for i, c in enumerate(conns)]
    for p in pending:
        p.addErrback(lambda _: None)
    end = reactor.seconds() + seconds
    peak = before
    while reactor.seconds() < end:
        await task.deferLater(reactor, 0.25, lambda: None)
        peak = max(peak, rss_kb(pid))
    read = sum(c.total for c in conns)
    for c in conns:
        c.transport.abortConnection()
    return peak - before, read


async def run(reactor: Any, args: argparse.Namespace) -> None:
    mock, mock_port, gw, gw_port = await start_children(reactor, [])
    children = [gw, mock]
    try:
        relay, relay_port = await start_bare_relay(reactor, mock_port)
        children.insert(0, relay)
        await measure(reactor, args, mock, mock_port, gw, gw_port, relay_port)
    finally:
        await stop_children(reactor, *children)


async def measure(reactor: Any, args: argparse.Namespace, mock: Child, mock_port: int,
                  gw: Child, gw_port: int, relay_port: int) -> None:
    gw_pid = gw.transport.pid
    targets = {"direct": mock_port, "gateway": gw_port}
    rows: List[Tuple[str, str, str, str, str]] = []

    def row(name: str, direct: float, via: float, unit: str, target: str,
            added: bool = True) -> None:
        diff = f"{via - direct:+.2f} {unit}" if added else f"x{via / direct:.2f}"
        rows.append((name, f"{direct:.2f} {unit}", f"{via:.2f} {unit}", diff, target))
        print(f"  {name:<38} direct {direct:9.2f} {unit:<5} gateway {via:9.2f} {unit:<5} "
              f"({diff})  target: {target}", flush=True)

    q = args.quick
    print(f"mock pid {mock.transport.pid} :{mock_port}, gateway pid {gw_pid} :{gw_port}",
          flush=True)
    # Warm-up: pools, code paths.
    for port in targets.values():
        await serial_latency(reactor, port, 50)

    lat = {k: await serial_latency(reactor, p, 200 if q else 1000) for k, p in targets.items()}
    row("non-streamed p50, 1 client", 1000 * pct(lat["direct"], 50),
        1000 * pct(lat["gateway"], 50), "ms", "added < 1 ms")
    row("non-streamed p99, 1 client", 1000 * pct(lat["direct"], 99),
        1000 * pct(lat["gateway"], 99), "ms", "-")

    rps = {k: (await throughput(reactor, p, 64, 3 if q else 8))[0] for k, p in targets.items()}
    row("requests/s, 64 clients", rps["direct"], rps["gateway"], "rq/s", ">= 2000 via gateway",
        added=False)
    # The figures here are taken at log level warn; the default (info) writes
    # an access line per request, which costs CPU per request too.
    logging_gw, logging_port = await start_gateway(reactor, mock_port, ["--log-level", "info"])
    try:
        await serial_latency(reactor, logging_port, 50)
        logged, _ = await throughput(reactor, logging_port, 64, 3 if q else 8)
    finally:
        await stop_children(reactor, logging_gw)
    print(f"  {'  the same with an access line each':<38} gateway {logged:9.2f} rq/s "
          f"(x{logged / rps['direct']:.2f}), the default log level", flush=True)

    # HTTPS from the client to the gateway (the backend stays plain HTTP):
    # on kept-alive connections, and with a new TLS connection per request.
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, trust = self_signed(tmp)
        tls_port = free_port()
        tls_gw, _ = await start_gateway(reactor, mock_port, [
            "--log-level", "warn", "--cert", cert, "--key", key, "--ssl-port", str(tls_port)])
        try:
            await wait_accepting(reactor, tls_gw, tls_port, "HTTPS listener")
            await serial_latency(reactor, tls_port, 50, tls=trust)
            tls_lat = await serial_latency(reactor, tls_port, 200 if q else 1000, tls=trust)
            row("HTTPS non-streamed p50, 1 client", 1000 * pct(lat["direct"], 50),
                1000 * pct(tls_lat, 50), "ms", "-")
            tls_rps, _ = await throughput(reactor, tls_port, 64, 3 if q else 8, tls=trust)
            row("HTTPS requests/s, 64 clients", rps["direct"], tls_rps, "rq/s", "-",
                added=False)
            fresh = await fresh_connections(reactor, tls_port, 100 if q else 300, trust)
            print(f"  {'  new TLS connection per request':<38} p50 {1000 * pct(fresh, 50):.2f} ms, "
                  f"p99 {1000 * pct(fresh, 99):.2f} ms (handshake, request, answer)", flush=True)
        finally:
            await stop_children(reactor, tls_gw)

    def relay_row(direct: List[float], relayed: List[float]) -> None:
        print(f"  {'  the same through a bare TCP relay':<38} p50 {1000 * pct(relayed, 50):.2f} ms "
              f"({1000 * (pct(relayed, 50) - pct(direct, 50)):+.2f} ms), "
              f"p99 {1000 * pct(relayed, 99):.2f} ms "
              f"({1000 * (pct(relayed, 99) - pct(direct, 99)):+.2f} ms)", flush=True)

    await control(reactor, mock_port, ttft_ms=50.0, itl_ms=20.0)
    n_streams = 200 if q else 500
    ttft_direct, _ = await streams(reactor, mock_port, n_streams, None, 20)
    ttft_gw, peak = await streams(reactor, gw_port, n_streams, gw_pid, 20)
    ttft_relay, _ = await streams(reactor, relay_port, n_streams, None, 20)
    row(f"TTFT p50, {n_streams} streams at once", 1000 * pct(ttft_direct, 50),
        1000 * pct(ttft_gw, 50), "ms", "-")
    row(f"TTFT p99, {n_streams} streams at once", 1000 * pct(ttft_direct, 99),
        1000 * pct(ttft_gw, 99), "ms", "added < 10 ms")
    relay_row(ttft_direct, ttft_relay)
    print(f"  gateway peak RSS with {n_streams} streams: {peak / 1024:.1f} MB", flush=True)
    # Streams in progress, at rising counts: where the added TTFT leaves the
    # target is the gateway's streaming capacity on this machine.
    window = 4 if q else 8
    for n in ((100, 200) if q else (200, 300, 400, 500)):
        steady_direct = await steady_streams(reactor, mock_port, n, window, 2, 20)
        steady_gw = await steady_streams(reactor, gw_port, n, window, 2, 20)
        steady_relay = await steady_streams(reactor, relay_port, n, window, 2, 20)
        row(f"TTFT p50, {n} streams in progress", 1000 * pct(steady_direct, 50),
            1000 * pct(steady_gw, 50), "ms", "-")
        row(f"TTFT p99, {n} streams in progress", 1000 * pct(steady_direct, 99),
            1000 * pct(steady_gw, 99), "ms", "added < 10 ms")
        relay_row(steady_direct, steady_relay)
        print(f"    ({len(steady_gw)} streams measured through the gateway, "
              f"{len(steady_direct)} direct, {len(steady_relay)} through the bare relay)",
              flush=True)

    await control(reactor, mock_port, ttft_ms=0.0, itl_ms=0.0)
    n_slow = 50
    growth, read = await slow_readers(reactor, gw_port, n_slow, 8 if q else 20, gw_pid)
    print(f"  RSS growth, {n_slow} clients reading fast streams at 1 KB/s: "
          f"{growth} KB in all, {growth / n_slow:.1f} KB per stream "
          f"(target < 256 KB per stream; clients read {read / 1024:.0f} KB)", flush=True)
    print(f"  gateway RSS at end: {rss_kb(gw_pid) / 1024:.1f} MB", flush=True)


def bench_main(doc: str, run: Any) -> None:
    """Parse ``--quick`` and run the coroutine ``run(reactor, args)``."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller counts, shorter windows")
    args = p.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    bench_main(__doc__, run)
