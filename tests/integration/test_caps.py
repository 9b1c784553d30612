"""Trust boundaries of the client side (#23 items 4, 6, 7), over real sockets
against the real plugin: JSON nesting, transfer codings, and the caps on
connections and on buffered request bodies.

The caps are set through the environment (NTONIX_SERVER_*): a gateway that
does not know them only warns, so on a gateway without the caps these tests
fail on what it does, not on its configuration.
"""

import json
import re
import socket
from typing import Optional

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from harness import (JSON, RawClient, chat_body, http_client, raw_connect, raw_post, sleep,
                     until, within)

# Long enough to see that nothing comes, short of every deadline in play.
QUIET = 0.5


def nested(levels: int) -> bytes:
    """A deterministic (cacheable) chat body whose document nests ``levels``
    levels (the top object is one), the depth in a field the backend ignores."""
    inner = "[" * (levels - 1) + "]" * (levels - 1)
    return (b'{"model": "mock-llm", "temperature": 0, "messages": [{"role": "user", '
            b'"content": "hi"}], "x": ' + inner.encode() + b"}")


async def prometheus(gw) -> str:
    r = await within(http_client().get(gw.admin_url + "/metrics/prometheus"), 5)
    return (await within(r.content(), 5)).decode()


def sample(text: str, name: str, labels: str = "") -> Optional[float]:
    m = re.search(r"^%s%s (\S+)$" % (re.escape(name), re.escape(labels)), text, re.M)
    return float(m.group(1)) if m else None


def answer_of(c: RawClient, status: int):
    """(head, error) of the one answer ``c`` got, which must be ``status``."""
    assert c.status == status, c.received[:300]
    head, _, body = c.received.partition(b"\r\n\r\n")
    return head, json.loads(body)["error"]


async def closed(c: RawClient, seconds: float = 5.0) -> None:
    """Wait for the gateway to close ``c``; fail with what it sent if not."""
    try:
        await within(c.closed, seconds)
    except defer.TimeoutError:
        raise AssertionError(f"still open after {seconds}s; received {c.received[:400]!r}")


async def no_traceback(gw) -> None:
    out = gw.output.decode(errors="replace")
    assert "Traceback" not in out and "Unhandled" not in out, out[-3000:]


# -- JSON nesting (item 6)

@pytest_twisted.ensureDeferred
async def test_json_nested_past_the_limit_is_a_400_naming_the_setting(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    client = http_client()
    # 500 levels: the cache key's recursive normalising failed there (a 500
    # and a traceback), well before the parser's own limit.
    for levels in (500, 65, 5000):
        r = await within(client.post(gw.url + "/v1/chat/completions", data=nested(levels),
                                     headers=JSON), 5)
        err = (await within(r.json(), 5))["error"]
        assert r.code == 400 and err["code"] == "json_too_deep", (levels, err)
        assert "server.max_json_depth" in err["message"] and "64" in err["message"]
    assert a.count() == 0
    r = await within(client.post(gw.url + "/v1/chat/completions", data=nested(64),
                                 headers=JSON), 5)
    assert r.code == 200, await r.text()
    await no_traceback(gw)


@pytest_twisted.ensureDeferred
async def test_the_depth_limit_is_the_setting(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "server.max_json_depth=8")
    client = http_client()
    r = await within(client.post(gw.url + "/v1/chat/completions", data=nested(9),
                                 headers=JSON), 5)
    err = (await within(r.json(), 5))["error"]
    assert r.code == 400 and err["code"] == "json_too_deep" and "8" in err["message"], err
    r = await within(client.post(gw.url + "/v1/chat/completions", data=nested(8),
                                 headers=JSON), 5)
    assert r.code == 200, await r.text()


# -- transfer codings (item 7)

@pytest.mark.parametrize("coding", [b"gzip, chunked", b"identity, chunked", b"identity",
                                    b"deflate"])
@pytest_twisted.ensureDeferred
async def test_transfer_codings_other_than_chunked_501_and_closed(coding, mocks,
                                                                 gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    body = chat_body("te")
    c = await raw_connect(gw.port)
    c.transport.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: %s\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (coding, len(body), body)
        # Pipelined after it: must not be served.
        + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await closed(c)
    head, err = answer_of(c, 501)
    assert err["code"] == "transfer_coding_not_implemented"
    assert b"Connection: close" in head
    assert c.received.count(b"HTTP/1.1 ") == 1, c.received
    assert a.count() == 0
    await no_traceback(gw)


# -- connection caps (item 4)

async def served(c: RawClient, path: bytes = b"/health") -> int:
    """Send one keep-alive GET on ``c``; its status."""
    c.received = b""
    c.transport.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    await until(lambda: b"\r\n\r\n" in c.received and c.received.endswith(b"}\n"), 5)
    return c.status


def own_address() -> Optional[str]:
    """This machine's address on a network interface (not loopback, which
    the per-client cap spares), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))  # a route is chosen; no packet is sent
        except OSError:
            return None
        host = s.getsockname()[0]
    return None if host.startswith("127.") or host == "0.0.0.0" else host


async def connect_from(host: str, port: int) -> RawClient:
    ep = TCP4ClientEndpoint(reactor, host, port, timeout=5)
    return await within(connectProtocol(ep, RawClient()), 5)


@pytest_twisted.ensureDeferred
async def test_connections_past_the_per_client_cap_are_closed_at_once(mocks, gateway_factory):
    host = own_address()
    if host is None:
        pytest.skip("no address but loopback, which the per-client cap spares")
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               env={"NTONIX_SERVER_MAX_CONNECTIONS_PER_CLIENT": "2"})
    first, second = await connect_from(host, gw.port), await connect_from(host, gw.port)
    assert await served(first) == 200 and await served(second) == 200
    # Loopback is spared.
    local = [await raw_connect(gw.port) for _ in range(3)]
    assert [await served(c) for c in local] == [200] * 3
    third = await connect_from(host, gw.port)
    third.transport.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await closed(third)
    assert third.received == b""
    # One fewer: room again.
    first.transport.loseConnection()
    await within(first.closed, 5)
    await sleep(0.1)  # the gateway sees the close
    fourth = await connect_from(host, gw.port)
    assert await served(fourth) == 200
    text = await prometheus(gw)
    assert sample(text, "ntonix_connections_refused_total",
                  '{reason="max_connections_per_client"}') == 1
    for c in (second, fourth, *local):
        c.transport.loseConnection()
    await no_traceback(gw)


@pytest_twisted.ensureDeferred
async def test_at_max_connections_the_idle_one_goes_first_then_accepting_pauses(
        mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               env={"NTONIX_SERVER_MAX_CONNECTIONS": "2"})
    # Two connections idle between requests; the first idle longest.
    first, second = await raw_connect(gw.port), await raw_connect(gw.port)
    assert await served(first) == 200
    assert await served(second) == 200
    third = await raw_connect(gw.port)
    assert await served(third) == 200
    await closed(first)  # closed to make room
    assert not second.closed.called
    # Both busy now (a request head begun): nothing to close, so the
    # listener stops accepting and the next client waits in the backlog.
    second.transport.write(b"GET /health HTTP/1.1\r\n")
    third.transport.write(b"GET /health HTTP/1.1\r\n")
    await sleep(0.1)
    waiting = await raw_connect(gw.port)  # the kernel completes the handshake
    waiting.transport.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await sleep(QUIET)
    assert waiting.received == b"" and not waiting.closed.called
    # One ends: the waiting one is taken and answered.
    second.transport.loseConnection()
    await until(lambda: b"\r\n\r\n" in waiting.received, 5)
    assert waiting.status == 200
    text = await prometheus(gw)
    assert sample(text, "ntonix_connections_evicted_total") == 1
    assert sample(text, "ntonix_accept_pauses_total") >= 1
    for c in (third, waiting):
        c.transport.loseConnection()
    await no_traceback(gw)


# -- buffered request bodies (item 4)

def padded(size: int) -> bytes:
    """A valid chat body of exactly ``size`` bytes."""
    head = chat_body("pad")[:-1] + b', "pad": "'
    return head + b"p" * (size - len(head) - 2) + b'"}'


@pytest_twisted.ensureDeferred
async def test_bodies_past_the_buffered_total_503_with_retry_after(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "server.max_body_bytes=150000",
                               env={"NTONIX_SERVER_MAX_BUFFERED_BODY_BYTES": "200000"})
    # One client holds 100,000 bytes of a 150,000-byte body.
    big = padded(150000)
    holder = await raw_connect(gw.port)
    holder.transport.write(raw_post(big, close=True)[:-50000])
    await sleep(0.2)
    # Another's 120,000 would take the total past 200,000: refused, unread.
    refused = await raw_connect(gw.port)
    refused.transport.write(raw_post(padded(120000), close=True))
    await closed(refused)
    head, err = answer_of(refused, 503)
    assert err["code"] == "server_busy" and "server.max_buffered_body_bytes" in err["message"]
    assert b"\r\nRetry-After: 1\r\n" in head
    # The holder's request completes; its bytes are let go once answered.
    holder.transport.write(big[-50000:])
    await within(holder.closed, 10)
    assert holder.status == 200, holder.received[:300]
    again = await raw_connect(gw.port)
    again.transport.write(raw_post(padded(120000), close=True))
    await within(again.closed, 10)
    assert again.status == 200, again.received[:300]
    text = await prometheus(gw)
    assert sample(text, "ntonix_requests_rejected_total", '{reason="server_busy"}') == 1
    assert sample(text, "ntonix_request_body_buffered_bytes") == 0
    await no_traceback(gw)


@pytest_twisted.ensureDeferred
async def test_many_clients_at_once_within_the_caps_are_all_served(mocks, gateway_factory):
    """The caps cost nothing below them: 40 keep-alive clients, 3 requests each."""
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               env={"NTONIX_SERVER_MAX_CONNECTIONS": "64"})
    clients = [await raw_connect(gw.port) for _ in range(40)]
    for _ in range(3):
        statuses = await within(defer.gatherResults(
            [defer.ensureDeferred(served(c)) for c in clients]), 10)
        assert statuses == [200] * 40
    text = await prometheus(gw)
    assert sample(text, "ntonix_connections_evicted_total") == 0
    assert sample(text, "ntonix_accept_pauses_total") == 0
    for c in clients:
        c.transport.loseConnection()
