"""The client-side HTTP/1.1 protocol: deadlines, limits, framing and errors,
driven by a Clock over a StringTransport (no sockets, no sleeping)."""

import json

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from ntonix.http.server import GatewayServer, Limits

LIMITS = Limits(max_body_bytes=100, max_headers=5, max_header_bytes=512,
                header_timeout=10.0, body_timeout=30.0, idle_timeout=75.0)


class Echo:
    """Answers ``got:<body>`` at once, or keeps the request when told to."""

    def __init__(self, hold=False):
        self.hold = hold
        self.held = []

    def handle(self, request):
        if self.hold:
            self.held.append(request)
            return
        body = b"got:" + request.body
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()


def connect(limits=LIMITS, router=None):
    clock = Clock()
    server = GatewayServer(router or Echo(), limits, clock)
    channel = server.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return clock, server, channel, transport


def status_and_error(transport):
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"] if body.startswith(b"{") else body


def test_request_served_normally():
    clock, server, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    out = t.value()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nDate: " in out and b"\r\nServer: ntonix/" in out
    assert out.endswith(b"\r\n\r\ngot:hi")
    assert not t.disconnecting
    # Only the idle keep-alive deadline is left.
    assert channel.phase == "idle" and channel.deadline_at == 75.0


def test_slowloris_head_cut_at_total_deadline_despite_trickle():
    clock, server, channel, t = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    # One header line a second: an idle timer alone would never fire.
    for i in range(9):
        clock.advance(1)
        channel.dataReceived(b"X-Slow-%d: y\r\n" % i if i < 4 else b"")
    assert not t.disconnecting
    clock.advance(1.01)
    status, err = status_and_error(t)
    assert status == 408 and err["code"] == "request_timeout"
    assert "server.header_timeout_seconds" in err["message"]
    assert t.disconnecting


def test_silent_connection_dropped_at_head_deadline_without_answer():
    clock, server, channel, t = connect()
    clock.advance(10.01)
    assert t.value() == b""
    assert t.disconnecting or t.disconnected


def test_partial_first_line_is_also_bounded():
    clock, server, channel, t = connect()
    channel.dataReceived(b"GE")
    clock.advance(10.01)
    assert status_and_error(t)[0] == 408


def test_slow_body_cut_at_body_deadline():
    clock, server, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
    for _ in range(29):
        clock.advance(1)
        channel.dataReceived(b"a")
    assert not t.disconnecting
    clock.advance(1.01)
    status, err = status_and_error(t)
    assert status == 408 and "server.body_timeout_seconds" in err["message"]


def test_body_over_limit_rejected_from_content_length_before_reading():
    clock, server, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    status, err = status_and_error(t)
    assert status == 413 and "server.max_body_bytes" in err["message"]
    assert t.disconnecting
    # Whatever else arrives is dropped, not buffered or processed.
    channel.dataReceived(b"a" * 101)
    assert b"got:" not in t.value()


def test_chunked_body_over_limit_rejected_while_arriving():
    clock, server, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert t.value() == b""
    channel.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
    assert status_and_error(t)[0] == 413


def test_chunked_body_within_limit_accepted():
    clock, server, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\nhi\r\n3\r\n!!!\r\n0\r\n\r\n")
    assert b"got:hi!!!" in t.value()


def test_too_many_headers_431():
    clock, server, channel, t = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(7))
                         + b"\r\n")
    status, err = status_and_error(t)
    assert status == 431 and "server.max_headers" in err["message"]


def test_oversized_head_431():
    clock, server, channel, t = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 600 + b"\r\n\r\n")
    status, err = status_and_error(t)
    assert status == 431 and "server.max_header_bytes" in err["message"]


def test_oversized_head_431_before_it_ends():
    """A head still arriving past the limit is refused at once, not when it
    ends or at the deadline."""
    clock, server, channel, t = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 600)
    status, err = status_and_error(t)
    assert status == 431 and t.disconnecting


@pytest.mark.parametrize("raw", [
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -3\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    b"GARBAGE\r\n\r\n",
    # Answered when the offending bytes arrive, not at the head deadline:
    b"GET / HTTP/1.1\nHost: x\n\n",  # bare LF
    b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",  # obs-fold
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"ffffffffffffffffffff\r\n",  # a chunk size that fits nothing
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # two Hosts
])
def test_malformed_400_at_once_and_closed(raw):
    clock, server, channel, t = connect()
    channel.dataReceived(raw)
    status, err = status_and_error(t)
    assert status in (400, 413) and err["type"] == "invalid_request_error"
    assert t.disconnecting
    assert clock.seconds() == 0


def test_http10_without_host_is_fine_and_gets_a_close_delimited_answer():
    class Streamer:
        def handle(self, request):
            request.write(b"part1 ")
            request.write(b"part2")
            request.finish()

    clock, server, channel, t = connect(router=Streamer())
    channel.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
    out = t.value()
    assert b"Transfer-Encoding" not in out and b"Connection: close" in out
    assert out.endswith(b"\r\n\r\npart1 part2")
    assert t.disconnecting


def test_chunked_answer_to_http11_client():
    class Streamer:
        def handle(self, request):
            request.write(b"hello")
            request.finish()

    clock, server, channel, t = connect(router=Streamer())
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    out = t.value()
    assert b"Transfer-Encoding: chunked\r\n" in out
    assert out.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert not t.disconnecting


def test_head_request_gets_no_body():
    clock, server, channel, t = connect()
    channel.dataReceived(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    out = t.value()
    assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"\r\n\r\n")
    assert b"Content-Length: 4" in out


def test_expect_100_continue_answered_before_the_body():
    clock, server, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                         b"Expect: 100-continue\r\n\r\n")
    assert t.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(b"hi")
    assert t.value().endswith(b"got:hi")


def test_expect_100_continue_with_too_big_a_body_gets_413_instead():
    clock, server, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n"
                         b"Expect: 100-continue\r\n\r\n")
    assert status_and_error(t)[0] == 413


def test_absolute_form_target_uses_its_path():
    seen = []

    class Paths(Echo):
        def handle(self, request):
            seen.append((request.path, request.uri))
            super().handle(request)

    clock, server, channel, t = connect(router=Paths())
    channel.dataReceived(b"POST http://gw.example/v1/x?a=1 HTTP/1.1\r\nHost: gw.example\r\n"
                         b"Content-Length: 1\r\n\r\nA")
    assert seen == [(b"/v1/x", b"/v1/x?a=1")]
    assert b"got:A" in t.value()


def test_upgrade_without_body_is_answered_then_closed():
    clock, server, channel, t = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                         b"Upgrade: h2c\r\n\r\n")
    assert t.value().startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" in t.value() and t.disconnecting


def test_upgrade_with_body_refused():
    clock, server, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                         b"Upgrade: h2c\r\nContent-Length: 2\r\n\r\nhi")
    status, err = status_and_error(t)
    assert status == 400 and err["code"] == "upgrade_not_supported"


def test_pipelined_requests_answered_in_order():
    clock, server, channel, t = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nA"
                         b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nB")
    out = t.value()
    assert out.index(b"got:A") < out.index(b"got:B")


def test_pipelined_request_waits_for_a_slow_first_answer():
    router = Echo(hold=True)
    clock, server, channel, t = connect(router=router)
    channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(router.held) == 1
    first = router.held[0]
    first.write(b"one")
    assert len(router.held) == 1
    first.finish()
    assert [r.path for r in router.held] == [b"/1", b"/2"]
    router.held[1].write(b"two")
    router.held[1].finish()
    out = t.value()
    assert out.index(b"one") < out.index(b"two")


def test_deep_pipelining_stops_reading_until_answers_drain():
    router = Echo(hold=True)
    clock, server, channel, t = connect(router=router)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 8)
    assert t.producerState == "paused"
    for _ in range(8):
        router.held[-1].finish()
    assert len(router.held) == 8 and t.producerState == "producing"


def test_malformed_bytes_after_a_pipelined_request_wait_for_its_answer():
    router = Echo(hold=True)
    clock, server, channel, t = connect(router=router)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n")
    assert t.value() == b""  # never interleaved with the answer in progress
    router.held[0].write(b"first")
    router.held[0].finish()
    out = t.value()
    assert out.index(b"first") < out.index(b"HTTP/1.1 400 ")
    assert t.disconnecting


def test_idle_keepalive_not_cut_by_head_deadline():
    clock, server, channel, t = connect()
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    t.clear()
    clock.advance(30)
    assert not t.disconnecting
    clock.advance(50)  # past idle_timeout
    assert t.disconnecting


def test_request_handled_after_deadline_window_is_not_cut():
    """A request being answered is not subject to the head or body deadline."""
    router = Echo(hold=True)
    clock, server, channel, t = connect(router=router)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(100)
    assert not t.disconnecting
    router.held[0].write(b"late")
    router.held[0].finish()
    assert b"late" in t.value()


def test_producer_is_registered_on_the_transport_and_stopped_on_disconnect():
    router = Echo(hold=True)
    clock, server, channel, t = connect(router=router)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    request = router.held[0]

    class Producer:
        stopped = paused = False

        def pauseProducing(self):
            self.paused = True

        def resumeProducing(self):
            self.paused = False

        def stopProducing(self):
            self.stopped = True

    p = Producer()
    ends = []
    request.when_done(ends.append)
    request.registerProducer(p, True)
    # The channel is the transport's producer; the answer's producer hangs
    # off it and is paused with it.
    assert t.producer is channel and t.streaming
    channel.pauseProducing()
    assert p.paused
    channel.resumeProducing()
    assert not p.paused
    # Twisted stops the transport's producer when the connection is lost.
    channel.stopProducing()
    channel.connectionLost(Exception("gone"))
    assert p.stopped
    assert len(ends) == 1 and ends[0] is not None
    # Writing after the client left is a no-op, never an exception.
    request.write(b"x")
    request.finish()


def test_handler_bug_answers_500_json_not_a_traceback():
    class Broken:
        def handle(self, request):
            raise RuntimeError("boom")

    clock, server, channel, t = connect(router=Broken())
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, err = status_and_error(t)
    assert status == 500 and err["code"] == "internal_error"
    assert b"boom" not in t.value()


def test_a_client_that_does_not_read_gets_no_more_answers_until_it_does():
    clock, server, channel, t = connect()
    channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    # Its socket buffer is full: the transport pauses the channel.
    channel.pauseProducing()
    assert t.producerState == "paused"  # it stops reading too
    written = len(t.value())
    channel.dataReceived(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(t.value()) == written  # queued, not answered
    channel.resumeProducing()
    assert t.value().count(b"HTTP/1.1 200 ") == 2
    assert t.producerState == "producing"


def test_pipelined_head_over_the_limit_while_an_answer_is_in_progress():
    router = Echo(hold=True)
    clock, server, channel, t = connect(router=router)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /" + b"a" * 600)
    # Refused as soon as it passes the limit; the answer waits for the one
    # in progress, and nothing more is read.
    channel.dataReceived(b"a" * 100_000)
    assert t.value() == b""
    router.held[0].write(b"first")
    router.held[0].finish()
    out = t.value()
    assert out.index(b"first") < out.index(b"HTTP/1.1 431 ")
    assert t.disconnecting


def test_chunked_trailers_are_not_request_headers():
    seen = []

    class Headers(Echo):
        def handle(self, request):
            seen.append([n.lower() for n, _ in request.requestHeaders.raw])
            super().handle(request)

    clock, server, channel, t = connect(router=Headers())
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"2\r\nhi\r\n0\r\nAuthorization: Bearer smuggled\r\n\r\n")
    assert b"got:hi" in t.value()
    assert b"authorization" not in seen[0]


def test_pipelined_expect_100_continue_is_answered_after_the_answer_before():
    router = Echo(hold=True)
    clock, server, channel, t = connect(router=router)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                         b"Expect: 100-continue\r\n\r\n")
    assert b"100 Continue" not in t.value()
    router.held[0].write(b"first")
    router.held[0].finish()
    assert t.value().endswith(b"HTTP/1.1 100 Continue\r\n\r\n")
