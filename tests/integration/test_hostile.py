"""Hostile input: seeded malformed requests of many shapes against the real
plugin. None may crash the reactor, hang a connection past its deadline, or
leave a trace in another client's answer."""

import json
import random

import pytest_twisted
from twisted.internet import defer

from harness import JSON, chat_body, http_client, raw_connect, raw_post, within

SHAPES = [
    lambda r: bytes(r.getrandbits(8) for _ in range(r.randint(1, 400))),
    lambda r: b"GET /" + bytes(r.choice(b"abc/%\x00\xff?&=") for _ in range(9000)) + b" HTTP/1.1\r\n\r\n",
    lambda r: b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: " + str(r.randint(-5, 99)).encode()
    + b"\r\nTransfer-Encoding: chunked, identity\r\n\r\n" + b"z" * r.randint(0, 50),
    lambda r: b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    + r.choice([b"ffffffffffffffffff\r\n", b"-1\r\n", b"5\r\nabc\r\n", b"0x10\r\n", b"\r\n\r\n"]),
    lambda r: b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(
        b"X-%d: %s\r\n" % (i, b"v" * r.randint(0, 300)) for i in range(r.randint(1, 150))) + b"\r\n",
    lambda r: raw_post(r.choice([b"{", b"[]", b"null", b'{"messages": 5}', b'{"messages": [[]]}',
                                 b'{"messages": [{"role": 7}]}', b"\xc3\x28", b"1e999999",
                                 b'"' + b"\\ud800" * 50 + b'"', b"{" * 5000 + b"}" * 5000,
                                 b'{"messages": [{"role": "user"}], "stream": 1}']), close=True),
    lambda r: raw_post(b'{"messages":[{"role":"user","content":"x"}]}', close=True,
                       extra=b"Content-Type: text/plain\r\nContent-Type: application/json\r\n"),
    lambda r: b"GARBAGE / HTTP/9.9\r\n\r\n" + bytes(r.getrandbits(8) for _ in range(50)),
    lambda r: b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
    b"Content-Length: 11\r\n\r\n0123456789",
    lambda r: b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-ID: \x01bad\r\n\r\n",
    lambda r: b"POST /v1/embeddings HTTP/1.0\r\nContent-Type: application/json\r\n"
    b"Content-Length: 30\r\n\r\n" + b'{"input": "' + b"\xff" * 10,
]


@pytest_twisted.ensureDeferred
async def test_malformed_requests_never_hurt_the_gateway(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "server.header_timeout_seconds=1",
                               "--set", "server.body_timeout_seconds=1",
                               "--set", "server.max_body_bytes=100000")
    rng = random.Random(20261123)
    clients = []
    for i in range(300):
        c = await raw_connect(gw.port)
        c.transport.write(rng.choice(SHAPES)(rng))
        clients.append(c)
        if len(clients) == 50:  # bounded concurrency, every connection must end
            try:
                await within(defer.gatherResults([c.closed for c in clients]), 10)
            except Exception:
                open_ = [c for c in clients if not c.closed.called]
                raise AssertionError(f"{len(open_)} connections still open, e.g. "
                                     f"{open_[0].received[:200]!r}")
            for c in clients:
                if c.received:
                    status = int(c.received.split(b" ", 2)[1])
                    assert status < 500, c.received[:300]
                    head, _, body = c.received.partition(b"\r\n\r\n")
                    if status >= 400:  # every error is OpenAI-shaped JSON
                        assert set(json.loads(body)) == {"error"}, c.received[:300]
            clients = []
    # Still serving, and serving correctly.
    r = await http_client().post(gw.url + "/v1/chat/completions", data=chat_body("after"),
                                 headers=JSON)
    doc = await r.json()
    assert r.code == 200 and doc["object"] == "chat.completion"
    health = await http_client().get(gw.url + "/health")
    assert (await health.json())["status"] == "healthy"
    out = gw.output.decode(errors="replace")
    assert "Traceback" not in out and "Unhandled" not in out and "CRITICAL" not in out
