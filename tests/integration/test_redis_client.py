"""The Redis client against a real redis-server on a free port: replies of
every type (a 5 MB binary value among them), pipelining, leases (SET NX PX),
capped streams read with XREAD BLOCK on the blocking pool, timeouts that
close what they time out, a Redis killed, hung and restarted, AUTH with a
password from the URL.

redis-server is Debian's package, which `.ci/install-services` installs;
where it cannot, the tests that need it are skipped and say so (the URL
parsing tests need no server and always run)."""

import os
import signal
import shutil
import tempfile

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from harness import free_port, sleep, until, within
from ntonix.cache.redis_client import (RETRY_INTERVAL, RedisClient, RedisError, RedisUnavailable,
                                       Resp2Parser, parse_redis_url)

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS is None, reason="Debian's redis-server is not installed: .ci/install-services "
                          "installs it where it can")


class _Output(protocol.ProcessProtocol):
    def __init__(self):
        self.text = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.text += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(None)


class _Probe(protocol.Protocol):
    def __init__(self):
        self.answered = defer.Deferred()

    def dataReceived(self, data):
        if not self.answered.called:
            self.answered.callback(data)


class RedisServer:
    """redis-server on 127.0.0.1:``port``, no persistence, in a temp dir."""

    def __init__(self, *extra):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="ntonix-redis-")
        self.extra = list(extra)
        self.proc = None
        self.paused = False

    async def start(self):
        self.proc = _Output()
        argv = [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", *self.extra]
        self.transport = reactor.spawnProcess(self.proc, REDIS, argv, env={})
        for _ in range(100):  # answering within 5 s
            try:
                p = await within(connectProtocol(
                    TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=1), _Probe()), 1)
                p.transport.write(b"PING\r\n")
                await within(p.answered, 1)  # +PONG, or -NOAUTH: either is an answer
                p.transport.loseConnection()
                return
            except Exception:
                assert not self.proc.ended.called, self.proc.text.decode(errors="replace")
                await sleep(0.05)
        raise AssertionError("redis-server did not answer PING: " + self.proc.text.decode())

    def signal(self, name):
        self.transport.signalProcess(name)

    def pause(self):
        """A hung Redis: the kernel still accepts connections, nothing answers."""
        self.signal("STOP")
        self.paused = True

    def resume(self):
        self.signal(signal.SIGCONT)
        self.paused = False

    async def stop(self):
        if self.proc is None or self.proc.ended.called:
            return
        if self.paused:
            self.resume()
        self.signal("KILL")
        await within(self.proc.ended, 5)


@pytest_twisted.async_yield_fixture
async def server():
    s = RedisServer()
    await s.start()
    yield s
    await s.stop()
    shutil.rmtree(s.dir, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def clients():
    made = []

    def make(port, **kw):
        c = RedisClient(reactor, "127.0.0.1", port, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        await within(c.close(), 5)


async def failure_of(d, seconds):
    """The exception ``d`` fails with, within ``seconds``."""
    try:
        result = await within(d, seconds)
    except Exception as e:
        return e
    raise AssertionError(f"expected a failure, got {result!r}")


async def client_count(c, command=None):
    """Connections Redis has from clients (besides the one asking), or
    those blocked in ``command``."""
    text = await within(c.execute("CLIENT", "LIST"), 2)
    lines = text.decode().strip().splitlines()
    if command:
        return sum(1 for line in lines if f" cmd={command} " in f" {line} ")
    return len(lines) - 1


@needs_redis
@pytest_twisted.ensureDeferred
async def test_binary_value_of_5_mb_nil_integers_and_status(server, clients):
    c = clients(server.port, command_timeout=2.0)
    value = (os.urandom(1024) + b"\r\n$5\r\n*1\r\n") * 5100
    assert len(value) > 5 * 1024 * 1024
    started = reactor.seconds()
    assert await within(c.execute("SET", "big", value), 5) == "OK"
    got = await within(c.execute(b"GET", b"big"), 5)
    print(f"SET and GET of {len(value)} bytes: {(reactor.seconds() - started) * 1000:.0f} ms")
    assert got == value
    assert await within(c.execute("STRLEN", "big"), 2) == len(value)
    assert await within(c.execute("GET", "missing"), 2) is None
    assert await within(c.execute("INCRBY", "n", 41), 2) == 41
    assert await within(c.execute("INCRBYFLOAT", "f", 1.5), 2) == b"1.5"
    assert await within(c.execute("SET", "é", "ünïcode"), 2) == "OK"
    assert await within(c.execute("GET", "é"), 2) == "ünïcode".encode()
    assert c.connected


@needs_redis
@pytest_twisted.ensureDeferred
async def test_arrays_from_xadd_and_xrange(server, clients):
    c = clients(server.port)
    ids = [await within(c.execute("XADD", "s", "*", "k", "t", "d", f"chunk {i}"), 2)
           for i in range(3)]
    assert all(isinstance(i, bytes) and b"-" in i for i in ids)
    got = await within(c.execute("XRANGE", "s", "-", "+"), 2)
    assert got == [[ids[i], [b"k", b"t", b"d", f"chunk {i}".encode()]] for i in range(3)]
    assert await within(c.execute("XRANGE", "nothing", "-", "+"), 2) == []
    # Nil inside an array.
    await within(c.execute("SET", "a", "1"), 2)
    assert await within(c.execute("MGET", "a", "b"), 2) == [b"1", None]


@needs_redis
@pytest_twisted.ensureDeferred
async def test_error_replies_are_redis_errors_and_keep_the_connection_in_step(server, clients):
    c = clients(server.port)
    e = await failure_of(c.execute("NOSUCHCOMMAND", "x"), 2)
    assert isinstance(e, RedisError) and str(e).startswith("ERR unknown command")
    await within(c.execute("SET", "str", "v"), 2)
    e = await failure_of(c.execute("LPUSH", "str", "x"), 2)
    assert isinstance(e, RedisError) and str(e).startswith("WRONGTYPE")
    # Pipelined with errors in between: every reply goes to its own caller.
    ds = [c.execute("INCR", "i"), c.execute("BAD"), c.execute("INCR", "i")]
    results = await within(defer.DeferredList(ds, consumeErrors=True), 2)
    assert results[0] == (True, 1) and results[2] == (True, 2)
    assert not results[1][0] and results[1][1].check(RedisError)
    assert c.stats.connect_attempts == 1


@needs_redis
@pytest_twisted.ensureDeferred
async def test_pipelining_100_concurrent_incrs_in_order(server, clients):
    c = clients(server.port)
    ds = [c.execute("INCR", "counter") for _ in range(100)]
    assert await within(defer.gatherResults(ds), 3) == list(range(1, 101))
    # All on the one command connection.
    assert c.stats.connect_attempts == 1
    assert await client_count(c) == 0


@needs_redis
@pytest_twisted.ensureDeferred
async def test_set_nx_px_is_a_lease(server, clients):
    c = clients(server.port)
    assert await within(c.execute("SET", "lease", "me", "NX", "PX", 300), 2) == "OK"
    assert await within(c.execute("SET", "lease", "other", "NX", "PX", 300), 2) is None
    assert 0 < await within(c.execute("PTTL", "lease"), 2) <= 300
    assert await within(c.execute("GET", "lease"), 2) == b"me"
    await sleep(0.35)
    assert await within(c.execute("GET", "lease"), 2) is None
    assert await within(c.execute("SET", "lease", "other", "NX", "PX", 300), 2) == "OK"


@needs_redis
@pytest_twisted.ensureDeferred
async def test_capped_stream_and_xread_block_woken_by_xadd(server, clients):
    c = clients(server.port)
    for i in range(1000):
        c.execute("XADD", "capped", "MAXLEN", "~", 100, "*", "i", i)
    length = await within(c.execute("XLEN", "capped"), 2)
    assert 100 <= length < 1000  # "~": trimmed by whole nodes, never below the cap
    last = (await within(c.execute("XREVRANGE", "capped", "+", "-", "COUNT", 1), 2))[0][0]

    reading = c.blocking("XREAD", "BLOCK", 2000, "STREAMS", "capped", last, timeout=3.0)
    await until(lambda: c.stats.connect_attempts == 2, 2)
    await sleep(0.05)
    assert not reading.called
    started = reactor.seconds()
    new_id = await within(c.execute("XADD", "capped", "MAXLEN", "~", 100, "*", "i", "new"), 2)
    got = await within(reading, 1)
    print(f"XREAD BLOCK woken {1000 * (reactor.seconds() - started):.1f} ms after XADD")
    assert got == [[b"capped", [[new_id, [b"i", b"new"]]]]]
    # Nothing new within BLOCK: a nil reply, not a failure.
    got = await within(c.blocking("XREAD", "BLOCK", 50, "STREAMS", "capped", new_id,
                                  timeout=1.0), 2)
    assert got is None
    # The connection went back to the pool and was reused.
    assert c.stats.connect_attempts == 2


@needs_redis
@pytest_twisted.ensureDeferred
async def test_blocking_timeout_closes_that_connection_and_the_next_one_works(server, clients):
    c = clients(server.port)
    await within(c.execute("PING"), 2)
    started = reactor.seconds()
    e = await failure_of(c.blocking("BLPOP", "never", 10, timeout=0.2), 1)
    assert isinstance(e, RedisUnavailable)
    assert 0.19 <= reactor.seconds() - started < 0.5
    # Redis sees that connection go; the command connection is untouched.
    for _ in range(50):
        if await client_count(c, "blpop") == 0:
            break
        await sleep(0.02)
    assert await client_count(c, "blpop") == 0
    assert c.connected

    waiting = c.blocking("BLPOP", "list", 2, timeout=3.0)
    await sleep(0.05)
    await within(c.execute("RPUSH", "list", "item"), 2)
    assert await within(waiting, 2) == [b"list", b"item"]

    # Cancelling closes its connection too.
    waiting = c.blocking("BLPOP", "list", 5, timeout=6.0)
    await until(lambda: c.stats.connect_attempts == 3, 2)
    await sleep(0.05)
    assert await client_count(c, "blpop") == 1
    waiting.cancel()
    e = await failure_of(waiting, 1)
    assert isinstance(e, defer.CancelledError)
    for _ in range(50):
        if await client_count(c, "blpop") == 0:
            break
        await sleep(0.02)
    assert await client_count(c, "blpop") == 0


@needs_redis
@pytest_twisted.ensureDeferred
async def test_blocking_pool_bursts_to_four_times_its_size_then_queues(server, clients):
    c = clients(server.port, pool_size=1)
    await within(c.execute("PING"), 2)
    reads = [c.blocking("BLPOP", "jobs", 3, timeout=4.0) for _ in range(6)]
    await until(lambda: c.stats.connect_attempts == 1 + 4, 2)
    await sleep(0.1)
    assert await client_count(c, "blpop") == 4  # two wait for a connection
    await within(c.execute("RPUSH", "jobs", *range(6)), 2)
    got = await within(defer.gatherResults(reads), 3)
    assert sorted(int(v) for _, v in got) == list(range(6))
    assert c.stats.connect_attempts == 5  # the queued two reused freed connections
    # Only pool_size stay open once idle.
    await sleep(0.1)
    assert await client_count(c) == 1


@needs_redis
@pytest_twisted.ensureDeferred
async def test_redis_killed_fails_fast_retries_twice_a_second_and_recovers(server, clients):
    c = clients(server.port)
    assert await within(c.execute("PING"), 2) == "PONG"
    await sleep(RETRY_INTERVAL)  # long after the first connection was made
    await server.stop()

    started = reactor.seconds()
    e = await failure_of(c.execute("GET", "k"), c.command_timeout + 0.2)
    assert isinstance(e, RedisUnavailable)
    assert reactor.seconds() - started < c.command_timeout + 0.2
    # The next call tries to connect again...
    assert isinstance(await failure_of(c.execute("GET", "k"), c.command_timeout + 0.2),
                      RedisUnavailable)
    attempts = c.stats.connect_attempts
    assert attempts == 2
    # ... and then none within the retry interval: every call has its
    # answer before it returns.
    window_end = reactor.seconds() + RETRY_INTERVAL - 0.15
    while reactor.seconds() < window_end:
        d = c.execute("GET", "k")
        assert d.called, "a call within the retry interval waited"
        assert isinstance(await failure_of(d, 0.1), RedisUnavailable)
        e = await failure_of(c.blocking("BLPOP", "l", 1, timeout=2), 0.1)
        assert isinstance(e, RedisUnavailable)
        await sleep(0.05)
    assert c.stats.connect_attempts == attempts
    assert not c.connected
    # Later, one attempt per interval at most, however many calls.
    await sleep(RETRY_INTERVAL)
    for _ in range(20):
        assert isinstance(await failure_of(c.execute("GET", "k"), c.command_timeout + 0.2),
                          RedisUnavailable)
    assert c.stats.connect_attempts == attempts + 1

    await server.start()  # the same port
    started = reactor.seconds()
    while True:
        try:
            assert await within(c.execute("PING"), 1) == "PONG"
            break
        except RedisUnavailable:
            assert reactor.seconds() - started < 3 * RETRY_INTERVAL
            await sleep(0.05)
    assert c.connected
    assert await within(c.execute("INCR", "after"), 2) == 1
    got = c.blocking("BLPOP", "l", 1, timeout=2)
    await within(c.execute("RPUSH", "l", "x"), 2)
    assert await within(got, 2) == [b"l", b"x"]


@needs_redis
@pytest_twisted.ensureDeferred
async def test_hung_redis_times_out_within_the_command_timeout(server, clients):
    c = clients(server.port, command_timeout=0.25, connect_timeout=0.5)
    assert await within(c.execute("PING"), 2) == "PONG"
    server.pause()
    try:
        started = reactor.seconds()
        ds = [c.execute("INCR", "n") for _ in range(10)]
        blocked = c.blocking("BLPOP", "l", 1, timeout=0.4)
        results = await within(defer.DeferredList(ds, consumeErrors=True), 1)
        elapsed = reactor.seconds() - started
        assert all(not ok and f.check(RedisUnavailable) for ok, f in results)
        assert 0.24 <= elapsed < 0.25 + 0.15, elapsed
        assert isinstance(await failure_of(blocked, 1), RedisUnavailable)
        assert c.stats.timeouts >= 1
        # Now found unavailable: calls fail at once, including while the
        # next attempt (the kernel accepts it; PING is not answered) is made.
        await sleep(RETRY_INTERVAL)
        for _ in range(5):
            d = c.execute("GET", "k")
            assert d.called
            assert isinstance(await failure_of(d, 0.1), RedisUnavailable)
    finally:
        server.resume()
    started = reactor.seconds()
    while True:
        try:
            assert await within(c.execute("PING"), 1) == "PONG"
            break
        except RedisUnavailable:
            assert reactor.seconds() - started < 3.0
            await sleep(0.05)
    assert c.connected


@needs_redis
@pytest_twisted.ensureDeferred
async def test_nothing_listening_fails_fast_without_hanging(clients):
    c = clients(free_port())
    started = reactor.seconds()
    assert isinstance(await failure_of(c.execute("PING"), 1), RedisUnavailable)
    assert isinstance(await failure_of(c.blocking("BLPOP", "l", 1, timeout=2), 1),
                      RedisUnavailable)
    assert reactor.seconds() - started < 0.2
    assert c.stats.connect_attempts == 1 and c.stats.connect_failures == 1


@needs_redis
@pytest_twisted.ensureDeferred
async def test_close_fails_what_is_pending(server, clients):
    c = clients(server.port)
    await within(c.execute("PING"), 2)
    blocked = c.blocking("BLPOP", "l", 5, timeout=6)
    pending = c.execute("PING")
    await within(c.close(), 2)
    assert isinstance(await failure_of(blocked, 1), RedisUnavailable)
    assert isinstance(await failure_of(pending, 1), RedisUnavailable)
    assert isinstance(await failure_of(c.execute("PING"), 1), RedisUnavailable)
    assert not c.connected


@needs_redis
@pytest_twisted.ensureDeferred
async def test_auth_and_db_from_the_url(clients):
    s = RedisServer("--requirepass", "s3cr:t@")
    await s.start()
    try:
        host, port, db, password = parse_redis_url(
            f"redis://:s3cr%3At%40@127.0.0.1:{s.port}/2")
        assert (host, port, db, password) == ("127.0.0.1", s.port, 2, "s3cr:t@")
        c = clients(port, db=db, password=password)
        assert await within(c.execute("SET", "k", "v"), 2) == "OK"
        assert b" db=2 " in await within(c.execute("CLIENT", "INFO"), 2)
        got = c.blocking("BLPOP", "l", 1, timeout=2)
        await within(c.execute("RPUSH", "l", "x"), 2)
        assert await within(got, 2) == [b"l", b"x"]  # the pool connection is on db 2 too

        wrong = clients(port, password="wrong")
        e = await failure_of(wrong.execute("GET", "k"), 1)
        assert isinstance(e, RedisUnavailable) and "WRONGPASS" in str(e)
        none = clients(port)
        e = await failure_of(none.execute("GET", "k"), 1)
        assert isinstance(e, RedisUnavailable) and "NOAUTH" in str(e)
    finally:
        await s.stop()
        shutil.rmtree(s.dir, ignore_errors=True)


@pytest.mark.parametrize("url, expected", [
    ("redis://localhost", ("localhost", 6379, 0, None)),
    ("redis://127.0.0.1:6380", ("127.0.0.1", 6380, 0, None)),
    ("redis://127.0.0.1:6380/", ("127.0.0.1", 6380, 0, None)),
    ("redis://redis.internal:6379/15", ("redis.internal", 6379, 15, None)),
    ("redis://:pw@h/1", ("h", 6379, 1, "pw")),
    ("redis://default:p%40ss%2Fw@h:7000/3", ("h", 7000, 3, "p@ss/w")),
    ("redis://[::1]:6379/0", ("::1", 6379, 0, None)),
])
def test_parse_redis_url(url, expected):
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize("url, reason", [
    ("", "redis://"),
    ("localhost:6379", "scheme"),
    ("http://h:6379", "scheme"),
    ("rediss://h:6379", "TLS"),
    ("unix:///run/redis.sock", "scheme"),
    ("redis://", "no host"),
    ("redis://:pw@:6379", "no host"),
    ("redis://h:notaport", "not a valid"),
    ("redis://h:70000", "not a valid"),
    ("redis://h:0", "port 0"),
    ("redis://h/db1", "must be a number"),
    ("redis://h/-1", "must be a number"),
    ("redis://h/1/2", "must be a number"),
    ("redis://h/1?timeout=2", "query"),
    ("redis://alice:pw@h", "ACL user"),
])
def test_parse_redis_url_refuses(url, reason):
    with pytest.raises(ValueError, match=reason):
        parse_redis_url(url)


def test_parser_resumes_at_any_byte():
    replies = (b"+OK\r\n:-42\r\n$-1\r\n*-1\r\n*0\r\n$0\r\n\r\n$4\r\na\r\nb\r\n"
               b"*2\r\n*2\r\n:1\r\n$1\r\nx\r\n-ERR in array\r\n-WRONGTYPE top\r\n")
    whole, split = [], []
    Resp2Parser(whole.append).feed(replies)
    parser = Resp2Parser(split.append)
    for i in range(len(replies)):
        parser.feed(replies[i:i + 1])
    assert whole[:7] == split[:7] == ["OK", -42, None, None, [], b"", b"a\r\nb"]
    assert whole[7][0] == split[7][0] == [1, b"x"]
    assert isinstance(split[7][1], RedisError) and str(split[7][1]) == "ERR in array"
    assert isinstance(split[8], RedisError) and str(split[8]) == "WRONGTYPE top"
    assert len(whole) == len(split) == 9


class _Garbage(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_a_server_that_is_not_redis_is_unavailable(clients):
    factory = protocol.Factory.forProtocol(_Garbage)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        c = clients(port.getHost().port)
        e = await failure_of(c.execute("PING"), 1)
        assert isinstance(e, RedisUnavailable) and "protocol error" in str(e)
        assert not c.connected
    finally:
        await port.stopListening()
