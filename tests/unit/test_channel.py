"""The guarded channel: deadlines, size limits and framing errors, driven by a
Clock over a StringTransport (no sockets, no sleeping)."""

import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import server
from twisted.web.resource import Resource

from ntonix.http.channel import GatewaySite, Limits

LIMITS = Limits(max_body_bytes=100, max_headers=5, max_header_bytes=512,
                header_timeout=10.0, body_timeout=30.0, idle_timeout=75.0)


class Echo(Resource):
    isLeaf = True

    def render(self, request):
        return b"got:" + request.content.read()


def connect(limits=LIMITS):
    clock = Clock()
    site = GatewaySite(Echo(), limits, clock)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return clock, site, channel, transport


def status_and_error(transport):
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"] if body.startswith(b"{") else body


def test_request_served_normally():
    clock, site, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert b"got:hi" in t.value()
    assert not t.disconnecting
    assert not clock.getDelayedCalls() or all(
        c.getTime() >= 75 for c in clock.getDelayedCalls())


def test_slowloris_head_cut_at_total_deadline_despite_trickle():
    clock, site, channel, t = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    # One header line a second: Twisted's idle timer alone would never fire.
    for i in range(9):
        clock.advance(1)
        channel.dataReceived(b"X-Slow-%d: y\r\n" % i if i < 4 else b"")
    assert not t.disconnecting
    clock.advance(1.01)
    status, err = status_and_error(t)
    assert status == 408 and err["code"] == "request_timeout"
    assert "server.header_timeout_seconds" in err["message"]
    assert t.disconnecting


def test_partial_first_line_is_also_bounded():
    clock, site, channel, t = connect()
    channel.dataReceived(b"GE")
    clock.advance(10.01)
    assert status_and_error(t)[0] == 408


def test_slow_body_cut_at_body_deadline():
    clock, site, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
    for _ in range(29):
        clock.advance(1)
        channel.dataReceived(b"a")
    assert not t.disconnecting
    clock.advance(1.01)
    status, err = status_and_error(t)
    assert status == 408 and "server.body_timeout_seconds" in err["message"]


def test_body_over_limit_rejected_from_content_length_before_reading():
    clock, site, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    status, err = status_and_error(t)
    assert status == 413 and "server.max_body_bytes" in err["message"]
    assert t.disconnecting
    # Whatever else arrives is dropped, not buffered or processed.
    channel.dataReceived(b"a" * 101)
    assert b"got:" not in t.value()


def test_chunked_body_over_limit_rejected_while_arriving():
    clock, site, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert t.value() == b""
    channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert status_and_error(t)[0] == 413


def test_chunked_body_within_limit_accepted():
    clock, site, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\nhi\r\n3\r\n!!!\r\n0\r\n\r\n")
    assert b"got:hi!!!" in t.value()


def test_too_many_headers_431():
    clock, site, channel, t = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(7))
                         + b"\r\n")
    status, err = status_and_error(t)
    assert status == 431 and "server.max_headers" in err["message"]


def test_oversized_head_431():
    clock, site, channel, t = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nX-Big: " + b"y" * 600 + b"\r\n\r\n")
    status, err = status_and_error(t)
    assert status == 431 and "server.max_header_bytes" in err["message"]


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    b"GARBAGE\r\n\r\n",
])
def test_invalid_framing_400_and_closed(raw):
    clock, site, channel, t = connect()
    channel.dataReceived(raw)
    status, err = status_and_error(t)
    assert status == 400 and err["type"] == "invalid_request_error"
    assert t.disconnecting


def test_pipelined_requests_answered_in_order():
    clock, site, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nA"
                         b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nB")
    out = t.value()
    assert out.index(b"got:A") < out.index(b"got:B")


def test_idle_keepalive_not_cut_by_head_deadline():
    clock, site, channel, t = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    t.clear()
    clock.advance(30)
    assert not t.disconnecting
    clock.advance(50)  # past idle_timeout
    assert t.disconnecting


def test_request_handled_after_deadline_window_is_not_cut():
    """A request being answered is not subject to the head or body deadline."""

    class Slow(Resource):
        isLeaf = True
        pending = []

        def render(self, request):
            self.pending.append(request)
            return server.NOT_DONE_YET

    clock = Clock()
    site = GatewaySite(Slow(), LIMITS, clock)
    channel = site.buildProtocol(None)
    t = StringTransport()
    channel.makeConnection(t)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(100)
    assert not t.disconnecting
    Slow.pending[0].write(b"late")
    Slow.pending[0].finish()
    assert b"late" in t.value()
