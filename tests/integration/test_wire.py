"""The wire, byte for byte: raw sockets against the real plugin.

Each test asserts the status, what became of the connection (closed, or kept
alive and still serving), and how long the answer took on the reactor's clock,
measured from the moment the last byte was handed to the socket. The gateways
run with the default server.header_timeout_seconds (10 s): an answer that only
came at a deadline would fail the timing assertion.

Fake backends here are raw Twisted protocols listening in the test's reactor,
so a backend can answer anything at all, and the test sees when the gateway
closes its connection.
"""

import json
import random
import re
import ssl
from typing import Any, Callable, List, Optional, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from harness import chat_body, raw_post, sleep, until, within

# The answers below are all immediate: the deadlines they must beat are the
# 10 s head deadline (client side) and the 120 s response timeout (upstream).
FAST = 1.0
# A proxied answer goes through a backend too.
PROXIED = 2.0
# Bounded waits: long enough to see a deadline-based answer for what it is,
# short of the 10 s head deadline.
WAIT = 5.0

RESPONSE_HEAD = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


# -- a raw client that keeps time --------------------------------------------

class Wire(protocol.Protocol):
    """Sends what it is told; keeps what it gets, when it got it, and when
    the connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.sent_at = 0.0
        self.first_byte_at: Optional[float] = None
        self.closed_at: Optional[float] = None
        self.closed: defer.Deferred = defer.Deferred()
        self.consumed = 0  # bytes of `received` already taken as responses

    def dataReceived(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = reactor.seconds()
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.closed_at = reactor.seconds()
        self.closed.callback(None)

    def send(self, data: bytes) -> None:
        """Write ``data`` whole; the clock starts now (its last byte is out
        with this write)."""
        self.first_byte_at = None
        self.transport.write(data)
        self.sent_at = reactor.seconds()

    async def response(self, timeout: float = WAIT) -> "Response":
        """The next whole response on this connection (bounded wait)."""
        found: List[Response] = []

        def whole() -> bool:
            r = parse_response(self.received[self.consumed:], self.closed.called)
            if r is not None:
                found.append(r)
                return True
            if self.closed.called:
                raise AssertionError("connection closed before a whole response: %r"
                                     % self.received[self.consumed:][:300])
            return False

        try:
            await until(whole, timeout=timeout, step=0.005)
        except AssertionError as e:
            raise AssertionError(f"{e}; got so far: {self.received[self.consumed:][:300]!r}")
        r = found[0]
        self.consumed += r.size
        r.at = reactor.seconds()
        return r

    async def eof(self, timeout: float = WAIT) -> float:
        """Wait for the gateway to close; the seconds from the last send."""
        try:
            await within(self.closed, timeout)
        except defer.TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s; got "
                                 f"{self.received[:300]!r}") from None
        return self.closed_at - self.sent_at

    def still_open(self) -> bool:
        return not self.closed.called


async def connect(port: int) -> Wire:
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    return await within(connectProtocol(ep, Wire()), 5)


class Response:
    def __init__(self, status: int, headers: List[Tuple[bytes, bytes]], body: bytes,
                 size: int) -> None:
        self.status, self.headers, self.body, self.size = status, headers, body, size
        self.at = 0.0

    def header(self, name: bytes) -> List[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def names(self) -> List[bytes]:
        return [n.lower() for n, _ in self.headers]

    def error(self) -> dict:
        """The OpenAI-shaped error this response carries."""
        assert self.header(b"content-type") == [b"application/json"], self.headers
        doc = json.loads(self.body)
        assert set(doc) == {"error"}, doc
        assert set(doc["error"]) == {"message", "type", "code"}, doc
        return doc["error"]


def parse_response(buf: bytes, closed: bool) -> Optional[Response]:
    """One whole response at the start of ``buf``, or None yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    m = RESPONSE_HEAD.match(lines[0] + b" ")
    assert m, buf[:200]
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name, value.strip()))
    lower = {n.lower(): v for n, v in headers}
    rest = buf[end + 4:]
    if b"chunked" in lower.get(b"transfer-encoding", b"").lower():
        body, pos = b"", 0
        while True:
            nl = rest.find(b"\r\n", pos)
            if nl < 0:
                return None
            size = int(rest[pos:nl].split(b";")[0], 16)
            if size == 0:
                if rest[nl + 2:nl + 4] != b"\r\n":
                    return None
                return Response(int(m.group(1)), headers, body, end + 4 + nl + 4)
            if len(rest) < nl + 2 + size + 2:
                return None
            body += rest[nl + 2:nl + 2 + size]
            pos = nl + 2 + size + 2
    if b"content-length" in lower:
        n = int(lower[b"content-length"])
        if len(rest) < n:
            return None
        return Response(int(m.group(1)), headers, rest[:n], end + 4 + n)
    if closed:
        return Response(int(m.group(1)), headers, rest, len(buf))
    return None


# -- fake backends -------------------------------------------------------------

CLOSE = object()  # a reply that closes the connection without a word


class FakeConnection(protocol.Protocol):
    def connectionMade(self) -> None:
        self.buf = b""
        self.lost_at: Optional[float] = None
        self.lost: defer.Deferred = defer.Deferred()
        self.closed_by_us = False
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end + 4]
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            self.factory.requests.append(head)
            reply = self.factory.reply(head)
            if reply is CLOSE:
                self.closed_by_us = True
                self.transport.loseConnection()
                return
            if reply:
                self.transport.write(reply)

    def connectionLost(self, reason: Any) -> None:
        self.lost_at = reactor.seconds()
        self.lost.callback(None)


class FakeBackend(protocol.Factory):
    """A backend that answers every request with ``reply(head)`` (bytes, or
    CLOSE), and otherwise never closes a connection itself."""

    protocol = FakeConnection
    noisy = False

    def __init__(self, reply: Callable[[bytes], Any]) -> None:
        self.reply = reply
        self.connections: List[FakeConnection] = []
        self.requests: List[bytes] = []
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port.getHost().port}"

    async def stop(self) -> None:
        await self.port.stopListening()
        for c in self.connections:
            if c.transport is not None and c.lost_at is None:
                c.transport.abortConnection()


@pytest_twisted.async_yield_fixture
async def fake_backends():
    made: List[FakeBackend] = []

    def make(reply: Callable[[bytes], Any]) -> FakeBackend:
        b = FakeBackend(reply)
        made.append(b)
        return b

    yield make
    for b in made:
        await b.stop()


def ok_json(extra: bytes = b"") -> bytes:
    body = b'{"id":"fake","object":"chat.completion","choices":[]}'
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n"
            b"\r\n%s" % (extra, len(body), body))


def health(close: bool = True) -> bytes:
    return (b"GET /health HTTP/1.1\r\nHost: x\r\n%s\r\n"
            % (b"Connection: close\r\n" if close else b""))


def assert_clean(output: bytes) -> None:
    out = output.decode(errors="replace")
    assert "Traceback" not in out and "CRITICAL" not in out and "Unhandled" not in out, out


# Settings for gateways in front of a fake backend: one attempt, no probes
# (a raw backend need not answer them), no cache between requests.
FAKE_SETTINGS = ("--set", "proxy.retries=0", "--set", "health.interval_seconds=3600",
                 "--set", "cache.enabled=false")


# -- 1. Host rules (RFC 9112 section 3.2) ---------------------------------------------

def post_head(version: bytes, hosts: List[bytes], body: bytes,
              target: bytes = b"/v1/chat/completions", extra: bytes = b"") -> bytes:
    return (b"POST %s %s\r\n%s%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (target, version, b"".join(b"Host: %s\r\n" % h for h in hosts), extra,
               len(body), body))


@pytest.mark.parametrize("hosts", [[], [b"x", b"y"], [b"x", b"x"]],
                         ids=["no-host", "two-hosts", "same-host-twice"])
@pytest_twisted.ensureDeferred
async def test_http11_needs_exactly_one_host(hosts, mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    c = await connect(gw.port)
    c.send(post_head(b"HTTP/1.1", hosts, chat_body("host?")))
    r = await c.response()
    took = await c.eof()
    assert r.status == 400, r.body
    e = r.error()
    assert e["code"] == "bad_request" and "Host" in e["message"], e
    assert r.header(b"connection") == [b"close"]
    assert took < FAST, took
    assert a.stats.requests == 0
    assert_clean(gw.output)


@pytest_twisted.ensureDeferred
async def test_http10_without_host_is_served(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    # Kept alive when it asks to be (and the answer has a length)...
    c = await connect(gw.port)
    c.send(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = await c.response()
    assert r.status == 200 and json.loads(r.body)["status"] == "healthy", r.body
    assert r.at - c.sent_at < FAST
    assert r.header(b"connection") == [b"keep-alive"] and c.still_open()
    # ...and closed after the answer when it does not.
    c.send(post_head(b"HTTP/1.0", [], chat_body("and again")))
    r = await c.response()
    took = await c.eof()
    assert r.status == 200, r.body
    assert json.loads(r.body)["object"] == "chat.completion"
    assert took < PROXIED, took
    assert r.header(b"connection") == [b"close"]
    assert a.count("/v1/chat/completions") == 1
    assert_clean(gw.output)


@pytest_twisted.ensureDeferred
async def test_absolute_form_target_is_forwarded(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    c = await connect(gw.port)
    c.send(post_head(b"HTTP/1.1", [b"anything"], chat_body("absolute"),
                     target=b"http://anything/v1/chat/completions"))
    r = await c.response()
    assert r.status == 200, r.body
    assert json.loads(r.body)["object"] == "chat.completion"
    assert r.at - c.sent_at < PROXIED
    assert a.stats.by_path == {"/v1/chat/completions": 1}
    # Kept alive: the same socket serves another request, then closes.
    c.send(health())
    r = await c.response()
    took = await c.eof()
    assert r.status == 200 and json.loads(r.body)["status"] == "healthy"
    assert took < FAST, took
    assert_clean(gw.output)


# -- 2. answered at once, never at the head deadline ------------------------------

def tls_client_hello() -> bytes:
    """The first flight of a real TLS client."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="gateway.example")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16" and hello[5:6] == b"\x01"  # handshake record, ClientHello
    return hello


def garbage() -> bytes:
    rng = random.Random(9112)
    return bytes(rng.randrange(0x80, 0x100) for _ in range(300))


BAD_WIRE = {
    "request-line-bare-lf": b"GET /health HTTP/1.1\nHost: x\r\n\r\n",
    "header-line-bare-lf": b"GET /health HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n",
    "chunk-size-20-hex-digits": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"f" * 20 + b"\r\n",
    "obs-fold-space": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
    "obs-fold-tab": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\tfolded\r\n\r\n",
    "tls-client-hello": tls_client_hello,
    "binary-garbage": garbage,
}


@pytest.mark.parametrize("name", list(BAD_WIRE))
@pytest_twisted.ensureDeferred
async def test_bad_wire_answered_at_once(name, mocks, gateway_factory):
    a, _ = mocks
    # Default server.header_timeout_seconds (10 s): nothing here may wait for it.
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    data = BAD_WIRE[name]
    if callable(data):
        data = data()
    c = await connect(gw.port)
    c.send(data)
    r = await c.response()
    took = await c.eof()
    allowed = (400, 413) if name.startswith("chunk") else (400,)
    assert r.status in allowed, (r.status, r.body)
    assert r.error()["code"] in ("bad_request", "request_too_large")
    assert r.header(b"connection") == [b"close"]
    assert r.at - c.sent_at < FAST and took < FAST, (r.at - c.sent_at, took)
    assert a.stats.requests == 0
    # Still serving others.
    ok = await connect(gw.port)
    ok.send(health())
    assert (await ok.response()).status == 200
    await ok.eof()
    assert_clean(gw.output)


# -- 3. upstream limits and non-HTTP backends ---------------------------------------

def head_too_large_many_lines() -> bytes:
    # 10 complete header lines of ~300 bytes: past 2048 bytes in total.
    extra = b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 300) for i in range(10))
    return ok_json(extra)


def head_too_large_one_line() -> bytes:
    return ok_json(b"X-Huge: " + b"v" * 20000 + b"\r\n")


def too_many_header_lines() -> bytes:
    return ok_json(b"".join(b"X-H-%d: 1\r\n" % i for i in range(30)))


UPSTREAM_LIMITS = {
    "head-bytes-many-lines": (head_too_large_many_lines, "server.max_upstream_head_bytes"),
    "head-bytes-one-line": (head_too_large_one_line, "server.max_upstream_head_bytes"),
    "header-count": (too_many_header_lines, "server.max_upstream_headers"),
}


@pytest.mark.parametrize("name", list(UPSTREAM_LIMITS))
@pytest_twisted.ensureDeferred
async def test_upstream_head_limits_502(name, fake_backends, gateway_factory):
    make, setting = UPSTREAM_LIMITS[name]
    reply = make()
    backend = fake_backends(lambda head: reply)
    gw = await gateway_factory("--port", "0", "--backend", backend.address, *FAKE_SETTINGS,
                               "--set", "server.max_upstream_head_bytes=2048",
                               "--set", "server.max_upstream_headers=20")
    c = await connect(gw.port)
    c.send(raw_post(chat_body("limits")))
    r = await c.response()
    assert r.status == 502, r.body
    e = r.error()
    assert e["code"] == "upstream_unreachable", e
    assert setting in e["message"] and backend.address in e["message"], e
    assert r.at - c.sent_at < FAST, r.at - c.sent_at
    # The gateway closed the backend's connection (the backend never does).
    [conn] = backend.connections
    await within(conn.lost, WAIT)
    assert not conn.closed_by_us and conn.lost_at - c.sent_at < FAST
    # The client's connection is kept alive and serves the next request.
    assert c.still_open()
    c.send(health())
    r = await c.response()
    took = await c.eof()
    assert r.status == 200 and took < FAST
    assert len(backend.requests) == 1
    assert_clean(gw.output)


def ssh_banner(head: bytes) -> bytes:
    return b"SSH-2.0-OpenSSH_9.6\r\n"


def random_bytes(head: bytes) -> bytes:
    rng = random.Random(502)
    return bytes(rng.randrange(0x80, 0x100) for _ in range(200))


def log_lines(output: bytes) -> List[str]:
    return output.decode(errors="replace").splitlines()


@pytest.mark.parametrize("reply", [ssh_banner, random_bytes], ids=["ssh-banner", "random-bytes"])
@pytest_twisted.ensureDeferred
async def test_non_http_backend_502(reply, fake_backends, gateway_factory):
    backend = fake_backends(reply)
    gw = await gateway_factory("--port", "0", "--backend", backend.address, *FAKE_SETTINGS)
    c = await connect(gw.port)
    c.send(raw_post(chat_body("not http")))
    r = await c.response()
    assert r.status == 502, r.body
    e = r.error()
    assert e["code"] == "upstream_unreachable" and backend.address in e["message"], e
    assert r.at - c.sent_at < FAST, r.at - c.sent_at
    [conn] = backend.connections
    await within(conn.lost, WAIT)
    assert not conn.closed_by_us
    assert c.still_open()
    c.send(health())
    assert (await c.response()).status == 200
    assert await c.eof() < FAST

    def warns() -> List[str]:
        return [line for line in log_lines(gw.output) if " WARN " in line]

    await until(lambda: warns(), timeout=WAIT)
    await sleep(0.3)  # a bounded window for any second line
    [warn] = warns()
    assert backend.address in warn, warn
    assert_clean(gw.output)


# -- 4. response hop-by-hop headers ----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_response_hop_by_hop_headers_dropped(fake_backends, gateway_factory):
    reply = ok_json(b"Connection: X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                    b"X-Other: ok\r\n")
    backend = fake_backends(lambda head: reply)
    gw = await gateway_factory("--port", "0", "--backend", backend.address, *FAKE_SETTINGS)
    c = await connect(gw.port)
    for i in range(2):  # kept alive: the same socket serves a second one
        c.send(raw_post(chat_body(f"hop {i}")))
        r = await c.response()
        assert r.status == 200, r.body
        assert r.at - c.sent_at < PROXIED
        assert r.header(b"x-other") == [b"ok"], r.headers
        names = r.names()
        assert b"x-secret-hop" not in names and b"keep-alive" not in names, r.headers
        assert not any(b"secret" in v.lower() for v in r.header(b"connection")), r.headers
        assert r.body == reply.partition(b"\r\n\r\n")[2]
        assert c.still_open()
    c.send(health())
    assert (await c.response()).status == 200
    assert await c.eof() < FAST
    assert len(backend.requests) == 2
    assert_clean(gw.output)


# -- 5. request ids in the log are text ---------------------------------------------------

@pytest.mark.parametrize("reply", [lambda head: CLOSE, ssh_banner],
                         ids=["closes-without-answer", "ssh-banner"])
@pytest_twisted.ensureDeferred
async def test_request_ids_logged_as_text(reply, fake_backends, gateway_factory):
    backend = fake_backends(reply)
    # Default retries (the retry's log line names the request too); the
    # circuit stays closed through the four failed attempts.
    gw = await gateway_factory("--port", "0", "--backend", backend.address,
                               "--set", "health.interval_seconds=3600",
                               "--set", "health.failure_threshold=10",
                               "--set", "cache.enabled=false")
    c = await connect(gw.port)
    c.send(raw_post(chat_body("ids"), extra=b"X-Request-ID: wire-test-1234\r\n"))
    r = await c.response()
    assert r.status == 502 and r.header(b"x-request-id") == [b"wire-test-1234"], r.headers
    r.error()
    assert r.at - c.sent_at < FAST
    # And one whose id the gateway makes (32 hex digits).
    c.send(raw_post(chat_body("ids again"), close=True))
    r = await c.response()
    took = await c.eof()
    assert r.status == 502 and took < FAST
    [fresh] = r.header(b"x-request-id")
    assert re.fullmatch(rb"[0-9a-f]{32}", fresh), fresh
    fresh_id = fresh.decode()

    for rid in ("wire-test-1234", fresh_id):
        await until(lambda: f"request_id={rid}" in gw.output.decode(errors="replace"),
                    timeout=WAIT)
    await sleep(0.2)  # any other line about them
    for rid in ("wire-test-1234", fresh_id):
        lines = [line for line in log_lines(gw.output) if rid in line]
        assert any(f"request_id={rid}" in line for line in lines), lines
        for line in lines:
            assert "b'" not in line and 'b"' not in line, line
    assert_clean(gw.output)
