"""The backend connection and its pool, over a StringTransport and a Clock:
what a misbehaving backend can send, and what goes back to the pool."""

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ntonix.deadlines import DeadlineSweep
from ntonix.upstream.client import UpstreamClient, UpstreamRequest
from ntonix.upstream.connection import UpstreamConnection, UpstreamProtocolError


class Transport(StringTransport):
    aborted = False

    def setTcpNoDelay(self, enabled):
        pass

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True


class Receiver:
    """Takes one answer: its status, body and how it ended."""

    def __init__(self, discard=False):
        self.discard = discard
        self.codes, self.body, self.ended, self.failures = [], [], [], []

    def got_response(self, request, response):
        self.codes.append(response.code)
        if self.discard:
            response.discard()
            return
        receiver = self

        class Pipe:
            transport = None

            def connectionMade(self):
                pass

            def dataReceived(self, data):
                receiver.body.append(data)

            def body_ended(self, complete, why):
                receiver.ended.append((complete, why))

        response.deliverBody(Pipe())

    def failed(self, request, reason):
        self.failures.append(reason)


def connected(client=None, **kw):
    client = client or UpstreamClient(Clock(), 4, 30.0, 5.0, **kw)
    conn = UpstreamConnection(client, "b:1")
    transport = Transport()
    conn.makeConnection(transport)
    return client, conn, transport


def send(client, conn, receiver):
    request = UpstreamRequest(client, "127.0.0.1", 1, "b:1", b"POST / HTTP/1.1\r\n\r\n", receiver)
    conn.send(request)
    return request


def lose(conn, transport, reason):
    transport.disconnected = True
    conn.connectionLost(Failure(reason))


def test_an_answer_read_whole_puts_the_connection_back_once():
    client, conn, t = connected()
    r = Receiver()
    send(client, conn, r)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    assert r.codes == [200] and b"".join(r.body) == b"hi" and r.ended == [(True, None)]
    assert client.idle["b:1"] == [conn]
    client.release(conn)  # a second release is a no-op
    assert client.idle["b:1"] == [conn]


def test_bytes_after_an_answer_close_the_connection_and_reach_no_one():
    client, conn, t = connected()
    r = Receiver()
    send(client, conn, r)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
                      b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!")
    assert r.codes == [200] and r.ended == [(True, None)]
    assert t.aborted and not client.idle.get("b:1")


def test_a_connection_given_up_during_its_answer_is_not_pooled():
    # A 5xx retried elsewhere: the answer is discarded as its head arrives,
    # and its small body completes in the same read.
    client, conn, t = connected()
    send(client, conn, Receiver(discard=True))
    conn.dataReceived(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
    assert t.aborted and not client.idle.get("b:1")


def test_close_delimited_body_complete_on_a_clean_close_only():
    client, conn, t = connected()
    r = Receiver()
    send(client, conn, r)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\npart")
    lose(conn, t, ConnectionDone())
    assert r.ended == [(True, None)]

    client, conn, t = connected()
    r = Receiver()
    send(client, conn, r)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\npart")
    conn.stopProducing()  # our own abort (the stream went silent, the client left)
    lose(conn, t, ConnectionAborted())
    assert r.ended[0][0] is False


def test_a_big_body_is_not_mistaken_for_a_big_head():
    client, conn, t = connected(max_head_bytes=2048)
    r = Receiver()
    send(client, conn, r)
    body = b"x" * 50_000
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n" + body)
    assert r.ended == [(True, None)] and b"".join(r.body) == body


def test_a_head_over_the_limit_is_a_protocol_error():
    client, conn, t = connected(max_head_bytes=2048)
    r = Receiver()
    send(client, conn, r)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nX-Big: " + b"y" * 8000)
    assert t.aborted and isinstance(r.failures[0], UpstreamProtocolError)
    assert "server.max_upstream_head_bytes" in str(r.failures[0])


def test_an_unasked_upgrade_is_a_protocol_error_not_a_crash():
    client, conn, t = connected()
    r = Receiver()
    send(client, conn, r)
    conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\n")
    assert t.aborted and not client.idle.get("b:1")


def test_deadline_sweep_keeps_one_timer_when_a_check_adds_an_item():
    clock = Clock()
    sweep = DeadlineSweep(clock, 0.1)

    class Adder:
        def check(self, now):
            sweep.discard(self)
            sweep.add(Other())

    class Other:
        def check(self, now):
            pass

    sweep.add(Adder())
    clock.advance(0.1)
    assert len(clock.getDelayedCalls()) == 1
