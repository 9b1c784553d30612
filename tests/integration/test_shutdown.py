"""SIGTERM: stop accepting, let in-flight streams finish, then exit."""

import pytest_twisted
from twisted.internet import defer, error, protocol, reactor

from harness import JSON, chat_body, http_client, raw_connect, until, within


class Collect(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.reason = reason
        self.done.callback(None)


def assert_clean_exit(gw):
    # twistd shuts down cleanly, then re-raises the signal it got so that its
    # exit status says "terminated by SIGTERM", as Unix daemons do.
    assert gw.end_reason.signal == 15 or gw.exit_code == 0, gw.end_reason
    assert b"Server Shut Down." in gw.output
    assert b"Traceback" not in gw.output


async def start_stream(gw, tokens):
    r = await http_client().post(gw.url + "/v1/chat/completions",
                                 data=chat_body(stream=True, max_tokens=tokens), headers=JSON)
    c = Collect()
    r.deliverBody(c)
    await until(lambda: b'"content":"' in c.data, timeout=5)
    return c


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_streams_finish_and_refuses_new_connections(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.itl_ms = 50
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    idle = await raw_connect(gw.port)  # an idle keep-alive connection
    stream = await start_stream(gw, 20)  # about a second of tokens left
    gw.terminate("TERM")
    # New connections are refused at once...
    async def refused():
        try:
            c = await raw_connect(gw.port)
        except error.ConnectError:
            return True
        c.transport.loseConnection()
        return False
    deadline = reactor.seconds() + 2
    while not await refused():
        assert reactor.seconds() < deadline, "still accepting after SIGTERM"
    # ...idle ones are closed, and the stream in flight completes.
    await within(idle.closed, 5)
    await within(stream.done, 10)
    assert stream.data.endswith(b"data: [DONE]\n\n")
    await within(gw.ended, 10)
    assert_clean_exit(gw)
    assert b"draining 1 in-flight request" in gw.output


@pytest_twisted.ensureDeferred
async def test_shutdown_timeout_cuts_what_is_left(mocks, gateway_factory):
    a, _ = mocks
    a.knobs.itl_ms = 50
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--shutdown-timeout", "0.5")
    stream = await start_stream(gw, 1000)  # 50 s of tokens
    start = reactor.seconds()
    gw.terminate("TERM")
    await within(stream.done, 10)
    assert not stream.data.endswith(b"data: [DONE]\n\n")
    await within(gw.ended, 10)
    assert_clean_exit(gw)
    assert b"closing 1 request(s) still in flight" in gw.output
    assert reactor.seconds() - start < 5
    await until(lambda: a.stats.disconnects == 1, timeout=2)


@pytest_twisted.ensureDeferred
async def test_sigterm_turns_readiness_to_503_before_the_listener_closes(mocks, gateway_factory):
    """What an orchestrator sees: liveness and readiness 200; on SIGTERM
    readiness turns 503 while requests are still accepted for the drain
    delay; then the listener closes and the process exits."""
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "server.drain_delay_seconds=1.5")

    async def get(path):
        # A new connection each time, as a probe makes.
        r = await within(http_client().get(gw.url + path), 5)
        body = await within(r.json(), 5)
        return r.code, body

    assert await get("/livez") == (200, {"status": "alive", "uptime_seconds": pytest_approx()})
    assert (await get("/readyz"))[0] == 200
    gw.terminate("TERM")
    sent = reactor.seconds()
    deadline = sent + 1.0
    while (await get("/readyz"))[0] != 503:
        assert reactor.seconds() < deadline, "readiness still 200 after SIGTERM"
    # Still accepting (and serving) while the delay lasts; liveness holds.
    assert (await get("/livez"))[0] == 200
    r = await within(http_client().post(gw.url + "/v1/chat/completions", data=chat_body(),
                                        headers=JSON), 5)
    assert r.code == 200
    await r.content()
    # Then the listener closes, after the delay and not before.
    while True:
        try:
            c = await raw_connect(gw.port)
        except error.ConnectError:
            break
        c.transport.loseConnection()
        assert reactor.seconds() < sent + 6, "still accepting long after the drain delay"
    assert reactor.seconds() - sent >= 1.4
    await within(gw.ended, 10)
    assert_clean_exit(gw)
    assert b"readiness is 503" in gw.output


class pytest_approx:
    """Any number (an uptime)."""

    def __eq__(self, other):
        return isinstance(other, (int, float))
