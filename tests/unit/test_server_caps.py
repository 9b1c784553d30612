"""The client side's caps and framing refusals, over a Clock and
StringTransports: transfer codings (501), buffered body bytes (503), the
connection caps (per client, per process, idle connections closed first,
listeners paused)."""

import json

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from ntonix.http.server import GatewayServer, HTTPServerProtocol, Limits, chunked_alone
from ntonix.observe.metrics import client_caps

LIMITS = Limits(max_body_bytes=100, max_headers=10, max_header_bytes=1024,
                header_timeout=10.0, body_timeout=30.0, idle_timeout=75.0,
                max_connections=3, max_connections_per_client=2, max_buffered_body_bytes=150)


class Echo:
    """Answers ``got:<body>`` at once, or keeps the request when told to."""

    def __init__(self, hold=False):
        self.hold = hold
        self.held = []

    def handle(self, request):
        if self.hold:
            self.held.append(request)
            return
        answer(request)


def answer(request):
    body = b"got:" + request.body
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


class Port:
    """A listening port as the site sees it: paused and resumed."""

    def __init__(self):
        self.paused = False
        self.calls = []

    def pauseProducing(self):
        self.paused = True
        self.calls.append("pause")

    def resumeProducing(self):
        self.paused = False
        self.calls.append("resume")


def make_server(limits=LIMITS, router=None, exempt=None):
    return GatewayServer(router or Echo(), limits, Clock(), exempt=exempt)


def connect(server, host="10.0.0.1"):
    """A connection from ``host``: (protocol, transport)."""
    address = IPv4Address("TCP", host, 40000)
    protocol = server.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def status_and_error(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, json.loads(body)["error"]


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


# -- transfer codings

@pytest.mark.parametrize("value,alone", [
    (b"chunked", True), (b"Chunked", True), (b"chunked ", True), (b",chunked", True),
    (b" chunked ,", True), (b"gzip, chunked", False), (b"identity, chunked", False),
    (b"chunked,chunked", False), (b"identity", False), (b"", False), (b"gzip", False),
])
def test_chunked_alone(value, alone):
    assert chunked_alone(value) is alone


@pytest.mark.parametrize("codings", [
    [b"gzip, chunked"], [b"identity, chunked"], [b"deflate,chunked"], [b"identity"],
    [b"gzip"], [b"gzip", b"chunked"],
])
def test_other_transfer_codings_501_and_closed(codings):
    server = make_server()
    channel, t = connect(server)
    te = b"".join(b"Transfer-Encoding: %s\r\n" % c for c in codings)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\n" + te + b"\r\n"
                         b"5\r\nhello\r\n0\r\n\r\n" + GET)
    status, head, err = status_and_error(t.value())
    assert status == 501 and err["code"] == "transfer_coding_not_implemented"
    assert err["type"] == "invalid_request_error"
    assert b"Connection: close" in head and t.disconnecting
    # The pipelined request after it is never answered.
    assert t.value().count(b"HTTP/1.1 ") == 1
    assert server.rejected == {"transfer_coding_not_implemented": 1}


@pytest.mark.parametrize("codings", [
    [b"chunked, gzip"], [b"chunked, chunked"], [b"chunked", b"chunked"], [b"chunked,"],
])
def test_codings_after_chunked_are_malformed_framing_400_and_closed(codings):
    """llhttp refuses these itself, as RFC 9112 section 6.3 asks when chunked
    is not the last coding (and a second chunked is never valid)."""
    server = make_server()
    channel, t = connect(server)
    te = b"".join(b"Transfer-Encoding: %s\r\n" % c for c in codings)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\n" + te + b"\r\n"
                         b"5\r\nhello\r\n0\r\n\r\n" + GET)
    status, head, err = status_and_error(t.value())
    assert status == 400 and err["code"] == "bad_request" and t.disconnecting
    assert t.value().count(b"HTTP/1.1 ") == 1


def test_chunked_alone_is_decoded_and_the_next_request_served():
    server = make_server()
    channel, t = connect(server)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n0\r\n\r\n" + GET)
    out = t.value()
    assert out.count(b"HTTP/1.1 200 ") == 2 and b"got:hello" in out
    assert not t.disconnecting


# -- buffered body bytes

def test_body_past_the_buffered_total_refused_from_its_length_503():
    router = Echo(hold=True)
    server = make_server(router=router)
    a, ta = connect(server, "10.0.0.1")
    a.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
    assert server.body_bytes == 100
    b, tb = connect(server, "10.0.0.2")
    b.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 51\r\n\r\n")
    status, head, err = status_and_error(tb.value())
    assert status == 503 and err["code"] == "server_busy"
    assert "server.max_buffered_body_bytes" in err["message"]
    assert b"\r\nRetry-After: 1\r\n" in head and tb.disconnecting
    # Within the total: taken.
    c, tc = connect(server, "10.0.0.3")
    c.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n" + b"y" * 50)
    assert tc.value() == b"" and server.body_bytes == 150
    # Once answered, a body no longer counts.
    answer(router.held[0])
    assert server.body_bytes == 50
    answer(router.held[1])
    assert server.body_bytes == 0


def test_chunked_body_crossing_the_buffered_total_503():
    router = Echo(hold=True)
    server = make_server(router=router)
    a, _ = connect(server, "10.0.0.1")
    a.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100)
    b, tb = connect(server, "10.0.0.2")
    b.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"28\r\n" + b"z" * 40 + b"\r\n")
    assert tb.value() == b"" and server.body_bytes == 140
    b.dataReceived(b"b\r\n" + b"z" * 11 + b"\r\n")
    status, head, err = status_and_error(tb.value())
    assert status == 503 and err["code"] == "server_busy" and b"Retry-After: 1" in head
    # The refused body's bytes are let go at once, not when the socket closes.
    assert server.body_bytes == 100
    b.connectionLost(None)
    assert server.body_bytes == 100


def test_held_bytes_let_go_when_the_connection_is_lost_midway():
    router = Echo(hold=True)
    server = make_server(router=router)
    a, _ = connect(server)
    # One request being answered, one queued behind it, one half received.
    a.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n" + b"x" * 10
                   + b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b"y" * 20
                   + b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n" + b"z" * 5)
    assert server.body_bytes == 35
    a.connectionLost(None)
    assert server.body_bytes == 0


def test_refusal_after_a_pipelined_request_keeps_only_its_body_counted():
    router = Echo(hold=True)
    server = make_server(router=router)
    a, t = connect(server)
    a.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n" + b"x" * 10
                   + b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b"y" * 20
                   + b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
    # The 501 waits for the answer in progress; what was queued is dropped.
    assert t.value() == b"" and server.body_bytes == 10
    answer(router.held[0])
    assert server.body_bytes == 0
    assert b"HTTP/1.1 501 " in t.value() and t.value().count(b"HTTP/1.1 ") == 2


# -- connection caps

def test_per_client_cap_closes_the_next_connection_at_once():
    server = make_server()
    connect(server, "10.0.0.1")
    connect(server, "10.0.0.1")
    refused, t = connect(server, "10.0.0.1")
    assert not isinstance(refused, HTTPServerProtocol)
    assert t.disconnected and t.value() == b""
    assert server.refused["max_connections_per_client"] == 1
    # Another address is not affected.
    other, _ = connect(server, "10.0.0.2")
    assert isinstance(other, HTTPServerProtocol)


def test_per_client_cap_counts_down_when_connections_close():
    server = make_server()
    first, _ = connect(server, "10.0.0.1")
    connect(server, "10.0.0.1")
    first.connectionLost(None)
    again, _ = connect(server, "10.0.0.1")
    assert isinstance(again, HTTPServerProtocol)
    assert server.per_client == {"10.0.0.1": 2}


def test_trusted_proxies_are_exempt_from_the_per_client_cap():
    server = make_server(exempt=lambda ip: ip == "10.9.9.9")
    for _ in range(3):
        channel, _ = connect(server, "10.9.9.9")
        assert isinstance(channel, HTTPServerProtocol)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"])
def test_loopback_is_exempt_from_the_per_client_cap(host):
    server = make_server()
    for _ in range(3):
        assert isinstance(connect(server, host)[0], HTTPServerProtocol)


def test_no_per_client_cap_at_zero():
    limits = attrs.evolve(LIMITS, max_connections_per_client=0)
    server = make_server(limits)
    assert all(isinstance(connect(server)[0], HTTPServerProtocol) for _ in range(3))


def test_at_the_cap_listeners_pause_until_a_connection_closes():
    server = make_server()
    port = Port()
    server.add_listener(port)
    channels = [connect(server, f"10.0.0.{i}")[0] for i in range(3)]
    assert port.paused and server.accept_pauses == 1
    # Accepted anyway in the same wake-up: closed at once.
    late, t = connect(server, "10.0.0.9")
    assert not isinstance(late, HTTPServerProtocol) and t.disconnected
    assert server.refused["max_connections"] == 1
    channels[0].connectionLost(None)
    assert not port.paused and port.calls == ["pause", "resume"]
    assert isinstance(connect(server, "10.0.0.9")[0], HTTPServerProtocol)


def test_at_the_cap_the_connection_idle_longest_is_closed_for_a_new_one():
    server = make_server()
    port = Port()
    server.add_listener(port)
    conns = [connect(server, f"10.0.0.{i}") for i in range(3)]
    assert port.paused  # none idle yet: all three just connected
    # Each answers a request, in this order: all idle, the first the longest.
    for channel, _ in (conns[1], conns[0], conns[2]):
        channel.dataReceived(GET)
    assert not port.paused  # an idle one can make room: accepting again
    # The second one is busy again: no longer a candidate.
    conns[2][0].dataReceived(b"GET / HTTP/1.1\r\n")
    new, _ = connect(server, "10.0.0.7")
    assert isinstance(new, HTTPServerProtocol)
    assert conns[1][1].disconnecting and not conns[0][1].disconnecting
    assert server.evicted == 1 and server.refused["max_connections"] == 0
    conns[1][0].connectionLost(None)
    new2, _ = connect(server, "10.0.0.8")
    assert conns[0][1].disconnecting and isinstance(new2, HTTPServerProtocol)
    assert server.evicted == 2


def test_a_busy_connection_is_never_closed_to_make_room():
    router = Echo(hold=True)
    server = make_server(router=router)
    for i in range(3):
        channel, _ = connect(server, f"10.0.0.{i}")
        channel.dataReceived(GET)  # held: being answered
    late, t = connect(server, "10.0.0.9")
    assert not isinstance(late, HTTPServerProtocol)
    assert server.evicted == 0 and len(server.channels) == 3


def test_a_listener_added_while_paused_is_paused():
    server = make_server()
    server.add_listener(Port())
    for i in range(3):
        connect(server, f"10.0.0.{i}")
    https = Port()
    server.add_listener(https)
    assert https.paused


def test_without_listeners_new_connections_past_the_cap_are_refused():
    """A worker's connections come from its supervisor: nothing to pause."""
    server = make_server()
    for i in range(3):
        connect(server, f"10.0.0.{i}")
    assert server.accept_pauses == 0 and not server.paused
    late, t = connect(server, "10.0.0.9")
    assert not isinstance(late, HTTPServerProtocol) and t.disconnected


def test_metrics_sum_the_caps_over_sites():
    a, b = make_server(), make_server()
    a.refused["max_connections"] = 2
    b.refused["max_connections_per_client"] = 3
    a.evicted, b.accept_pauses, a.body_bytes = 4, 5, 6
    a.rejected = {"server_busy": 1}
    b.rejected = {"server_busy": 2, "request_too_large": 1}
    families = {f.name: f for f in client_caps([a, b])}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("ntonix_connections_refused_total", (("reason", "max_connections"),))] == 2
    assert samples[("ntonix_connections_refused_total",
                    (("reason", "max_connections_per_client"),))] == 3
    assert samples[("ntonix_connections_evicted_total", ())] == 4
    assert samples[("ntonix_accept_pauses_total", ())] == 5
    assert samples[("ntonix_request_body_buffered_bytes", ())] == 6
    assert samples[("ntonix_requests_rejected_total", (("reason", "server_busy"),))] == 3


def test_the_last_idle_connection_turning_busy_at_the_cap_pauses_the_listeners():
    server = make_server()
    port = Port()
    server.add_listener(port)
    conns = [connect(server, f"10.0.0.{i}") for i in range(3)]
    for channel, _ in conns:
        channel.dataReceived(GET)
    assert not port.paused
    conns[0][0].dataReceived(b"GET / HTTP/1.1\r\n")
    conns[1][0].dataReceived(b"GET / HTTP/1.1\r\n")
    assert not port.paused  # one still idle: it can make room
    conns[2][0].dataReceived(b"GET / HTTP/1.1\r\n")
    assert port.paused
