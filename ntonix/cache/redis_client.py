"""A small Twisted-native Redis client (RESP2) for the shared cache tier.

Redis is an optimisation here, never a dependency: every call is bounded by
a timeout and fails with ``RedisUnavailable`` so the caller can fall back.
A dead Redis costs nothing per request: after a failure, the command
connection is tried again at most once per ``RETRY_INTERVAL`` (start to
start) and calls in between fail at once; while such a probe connection is
being made, calls fail at once too rather than wait on it. No background
loop: the next call after the interval makes the attempt.

Two kinds of connection:

- one shared *command* connection for ``execute()``: commands are written as
  they come and replies matched in order (pipelining). Since replies are in
  order, the oldest command's deadline is always the earliest, so one timer
  per connection (re-armed lazily when it fires) bounds every command: no
  timer is created or cancelled per command.
- a small pool of *blocking* connections for ``blocking()`` (XREAD BLOCK,
  BLPOP), one command at a time each: ``pool_size`` idle ones are kept, up to
  ``4 * pool_size`` are open at once, and callers beyond that queue (FIFO)
  within their own timeout. A blocking connection that times out or is
  cancelled is closed, never reused: its reply may still come.

Every new connection sends AUTH and SELECT when configured, else PING, and
is usable only once those replies are in: a Redis that accepts TCP (the
kernel does, even for a stopped process) but does not answer is not taken
for alive.

The ``execute()`` connection must not carry commands that change the
connection's state or block it (SUBSCRIBE, MONITOR, MULTI, BLPOP, SELECT):
its replies are shared by every caller in order.

``rediss://`` speaks TLS (1.2 at least) with the server's certificate checked
against the system's trust store or a given CA file, and its name or IP
address against the URL's host. A URL's password never appears in an error
or a log line (``mask_redis_url``).
"""

from collections import deque
from typing import Any, Callable, Deque, List, Optional, Set, Tuple, Union

import attrs
from cryptography import x509
from OpenSSL import crypto
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint,
                                        TCP6ClientEndpoint, connectProtocol, wrapClientTLS)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import (Certificate, TLSVersion, optionsForClientTLS,
                                  trustRootFromCertificates)
from twisted.logger import Logger
from twisted.python.failure import Failure

# The URL's parsing lives apart (the configuration imports it, and none of
# the networking); its names are importable from here, as they always were.
from ntonix.cache.redis_url import (RedisAddress, mask_redis_url, parse_redis_address,
                                    parse_redis_url)

__all__ = ["RedisClient", "RedisError", "RedisUnavailable", "RedisStats", "Resp2Parser",
           "RedisAddress", "encode_command", "mask_redis_url", "parse_redis_address",
           "parse_redis_url", "redis_tls_options"]

log = Logger(namespace="ntonix.cache.redis")

# At most one connection attempt per this many seconds after a failure.
RETRY_INTERVAL = 0.5
# Blocking connections open at once, as a multiple of pool_size.
BLOCKING_BURST = 4
# A status/integer/length line longer than this is not Redis talking.
MAX_LINE = 64 * 1024
# Redis's own proto-max-bulk-len default.
MAX_BULK = 512 * 1024 * 1024
# Bulk replies at least this long are copied out through a memoryview (one
# copy instead of two).
_BIG = 64 * 1024
# Timers fire at or after their time; this absorbs float rounding.
_EPSILON = 1e-4

Arg = Union[bytes, str, int, float]


class RedisError(Exception):
    """An error reply from Redis; the message is its text (``ERR ...``,
    ``WRONGTYPE ...``, ``NOAUTH ...``)."""


class RedisUnavailable(Exception):
    """No answer from Redis: cannot connect, connection lost, timed out, or
    the client is closed. The caller falls back."""


class _ProtocolError(Exception):
    pass


def redis_tls_options(host: str, ca_file: Optional[str] = None) -> Any:
    """The client TLS options for a Redis at ``host``: its certificate must
    chain to ``ca_file``'s certificates (PEM), or to the system's trust store
    when None, and name ``host`` (a DNS name, or an IP address in its
    subjectAltName). OSError or ValueError when ``ca_file`` does not load."""
    trust = None
    if ca_file:
        with open(ca_file, "rb") as fh:
            pem = fh.read()
        try:
            found = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise ValueError(f"{ca_file}: no PEM certificate") from None
        trust = trustRootFromCertificates(
            [Certificate(crypto.X509.from_cryptography(c)) for c in found])
    return optionsForClientTLS(host, trustRoot=trust,
                               extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2})


def encode_command(args: Tuple[Arg, ...]) -> bytes:
    """The RESP array of bulk strings for ``args``: str as UTF-8, int and
    float as their decimal text (repr for floats: the shortest text that
    reads back as the same number)."""
    out: List[bytes] = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            pass
        elif isinstance(a, str):
            a = a.encode("utf-8")
        elif isinstance(a, bool):
            # A bool is an int; b"1"/b"0" or b"True" would both surprise.
            raise TypeError("a Redis argument cannot be a bool")
        elif isinstance(a, int):
            a = b"%d" % a
        elif isinstance(a, float):
            a = repr(a).encode("ascii")
        elif isinstance(a, (bytearray, memoryview)):
            a = bytes(a)
        else:
            raise TypeError(f"a Redis argument must be bytes, str, int or float, "
                            f"not {type(a).__name__}")
        out.append(b"$%d\r\n" % len(a))
        out.append(a)
        out.append(b"\r\n")
    return b"".join(out)


class Resp2Parser:
    """RESP2 replies from a byte stream, resumable at any byte.

    The unconsumed input is one bytearray read through an offset, and what
    was consumed is cut off once per ``feed`` (CPython drops a bytearray's
    head without moving the rest). A reply that arrives in many pieces is
    never rescanned: a pending bulk (several MB) only compares lengths until
    it is complete, and a pending array keeps the elements parsed so far on
    a stack.

    ``on_reply`` gets bytes (bulk), str (simple string), int, None (nil
    bulk or array), list (array, nested as it comes) or a RedisError
    instance (error reply; inside an array, as an element).
    """

    __slots__ = ("_buf", "_bulk", "_stack", "_on_reply")

    def __init__(self, on_reply: Callable[[Any], None]) -> None:
        self._buf = bytearray()
        self._bulk = -1  # length of the bulk being waited for, or -1
        self._stack: List[list] = []  # [items, elements still to come]
        self._on_reply = on_reply

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises _ProtocolError on bytes that are not RESP2."""
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        stack = self._stack
        try:
            while True:
                if self._bulk >= 0:
                    end = pos + self._bulk
                    if end + 2 > n:
                        break
                    if buf[end:end + 2] != b"\r\n":
                        raise _ProtocolError("bulk string not followed by CRLF")
                    if end - pos >= _BIG:
                        view = memoryview(buf)
                        try:
                            value: Any = view[pos:end].tobytes()
                        finally:
                            view.release()  # else the bytearray cannot resize
                    else:
                        value = bytes(buf[pos:end])
                    pos = end + 2
                    self._bulk = -1
                else:
                    if pos >= n:
                        break
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        if n - pos > MAX_LINE:
                            raise _ProtocolError("line too long")
                        break
                    kind = buf[pos]
                    line = bytes(buf[pos + 1:eol])
                    pos = eol + 2
                    if kind == 36:  # $ bulk string
                        length = _number(line)
                        if length < 0:
                            value = None
                        elif length > MAX_BULK:
                            raise _ProtocolError("bulk string too long")
                        else:
                            self._bulk = length
                            continue
                    elif kind == 58:  # : integer
                        value = _number(line)
                    elif kind == 43:  # + simple string
                        value = line.decode("utf-8", "replace")
                    elif kind == 42:  # * array
                        count = _number(line)
                        if count < 0:
                            value = None
                        elif count == 0:
                            value = []
                        else:
                            stack.append([[], count])
                            continue
                    elif kind == 45:  # - error
                        value = RedisError(line.decode("utf-8", "replace"))
                    else:
                        raise _ProtocolError(f"unexpected reply type byte {kind!r}")
                # A complete value: into the innermost open array, or out.
                while stack:
                    top = stack[-1]
                    top[0].append(value)
                    top[1] -= 1
                    if top[1]:
                        break
                    stack.pop()
                    value = top[0]
                else:
                    self._on_reply(value)
        finally:
            del buf[:pos]


def _number(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise _ProtocolError(f"not a number: {line[:40]!r}") from None


@attrs.define(eq=False)
class _Call:
    """A command waiting for its reply on one connection."""

    deferred: Deferred
    deadline: float
    data: Optional[bytes] = None  # while not yet written
    connection: Optional["_Connection"] = None
    timer: Any = None  # only for blocking calls queued for a connection


class _Connection(Protocol):
    """One connection to Redis: connect, handshake, then commands answered
    in order. ``client`` hears when it becomes ready and when it is gone."""

    def __init__(self, client: "RedisClient", blocking: bool) -> None:
        self.client = client
        self.clock = client.reactor
        self.blocking = blocking
        self.calls: Deque[_Call] = deque()
        self.ready = False
        self.gone = False
        self._parser = Resp2Parser(self._reply)
        self._handshake = client._handshake
        self._handshake_left = client._handshake_count
        self._timer: Any = None
        self._connecting: Optional[Deferred] = None
        self._connect_timer: Any = None
        self.closed: Deferred = Deferred()

    # -- connecting

    def start(self, endpoint: Any, connect_timeout: float) -> None:
        self._connecting = connectProtocol(endpoint, self)
        self._connecting.addErrback(self._connect_failed)
        if not self.gone:
            self._connect_timer = self.clock.callLater(connect_timeout, self._connect_timed_out)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        self._gone(f"cannot connect: {failure.getErrorMessage()}", fault=True)

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        if not self.ready:
            self.drop("connect timed out", fault=True)

    def connectionMade(self) -> None:
        self._connecting = None
        # The handshake and whatever was queued meanwhile, in one write.
        data = [self._handshake]
        for call in self.calls:
            data.append(call.data)
            call.data = None
        self.transport.write(b"".join(data))

    def _handshake_reply(self, value: Any) -> None:
        if isinstance(value, RedisError):
            self.drop(f"handshake refused: {value}", fault=True)
            return
        self._handshake_left -= 1
        if self._handshake_left == 0:
            self.ready = True
            if self._connect_timer is not None:
                self._connect_timer.cancel()
                self._connect_timer = None
            self.client._connection_ready(self)

    # -- commands

    def send(self, call: _Call, data: bytes) -> None:
        if self.gone:  # an attempt can fail before connect() returns
            _fail(call, f"Redis at {self.client.host}:{self.client.port} is unavailable")
            return
        call.connection = self
        if self.transport is not None and self._connecting is None:
            self.transport.write(data)
        else:
            call.data = data
        self.calls.append(call)
        if self._timer is None:
            self._arm(call.deadline)

    def _arm(self, deadline: float) -> None:
        self._timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()),
                                           self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        now = self.clock.seconds() + _EPSILON
        calls = self.calls
        late = []
        if self.transport is None or self._connecting is not None:
            # Nothing written yet: the late ones leave, the attempt goes on
            # (bounded by connect_timeout) for the calls that come next.
            while calls and calls[0].deadline <= now:
                late.append(calls.popleft())
        elif calls and calls[0].deadline <= now:
            # Replies would be out of step with the calls from now on. A
            # blocking read that outlives its timeout says little about
            # Redis (the BLOCK time may just be too long for it).
            self.drop("command timed out", fault=not self.blocking)
            return
        if calls:
            self._arm(calls[0].deadline)
        # Last: their callbacks may send again on this connection.
        for call in late:
            _fail(call, "timed out waiting for a connection to Redis")

    def dataReceived(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            self._parser.feed(data)
        except _ProtocolError as e:
            log.error("Redis at {host}:{port} sent bytes that are not RESP2 ({why}): "
                      "dropping the connection", host=self.client.host,
                      port=self.client.port, why=str(e))
            self.drop(f"protocol error: {e}", fault=True)

    def _reply(self, value: Any) -> None:
        if self.gone:
            return
        if self._handshake_left:
            self._handshake_reply(value)
            return
        if not self.calls:
            raise _ProtocolError("a reply that no command asked for")
        call = self.calls.popleft()
        if self.blocking:
            # Back to the pool first, so that a callback asking for the next
            # blocking read gets this very connection.
            self.client._release(self)
        d = call.deferred
        if d.called:  # cancelled by its caller: the reply only kept us in step
            return
        if isinstance(value, RedisError):
            d.errback(value)
        else:
            d.callback(value)

    # -- ending

    def drop(self, why: str, fault: bool = False) -> None:
        """Fail every call and close: on timeouts, protocol errors and
        cancellation, where the connection cannot be trusted any more.
        ``fault``: this says Redis is unwell (not our own choice)."""
        if self.gone:
            return
        self._gone(why, fault)
        if self._connecting is not None:
            self._connecting.cancel()  # errback: _connect_failed, then closed
        elif self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        # Lost by the peer with calls waiting (or before the handshake was
        # answered) is a fault; an idle connection closed by Redis (its
        # `timeout` setting) is not.
        self._gone(f"connection lost: {reason.getErrorMessage()}",
                   fault=bool(self.calls) or not self.ready)
        if not self.closed.called:
            self.closed.callback(None)

    def _gone(self, why: str, fault: bool) -> None:
        if self._connecting is None and self.transport is None and not self.closed.called:
            # Never connected: there will be no connectionLost.
            self.closed.callback(None)
        if self.gone:
            return
        self.gone = True
        was_ready, self.ready = self.ready, False
        for timer in (self._timer, self._connect_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._connect_timer = None
        calls, self.calls = self.calls, deque()
        # The client's state first: failing a call runs its callbacks, which
        # may call again at once and must see Redis as it now is.
        self.client._connection_gone(self, why, fault, was_ready)
        for call in calls:
            _fail(call, f"Redis unavailable: {why}")


def _fail(call: _Call, why: str) -> None:
    call.data = None
    if call.timer is not None and call.timer.active():
        call.timer.cancel()
    call.timer = None
    if not call.deferred.called:
        call.deferred.errback(RedisUnavailable(why))


@attrs.define
class RedisStats:
    """Counters for metrics and tests."""

    connect_attempts: int = 0
    connect_failures: int = 0
    # Calls failed at once because Redis was found unavailable just before.
    fast_failures: int = 0
    # Connections dropped because a command passed its timeout.
    timeouts: int = 0


class RedisClient:
    """See the module's docstring. The reactor (for connecting and for time)
    is passed in; nothing here blocks it."""

    def __init__(self, reactor: Any, host: str, port: int, db: int = 0,
                 password: Optional[str] = None, connect_timeout: float = 1.0,
                 command_timeout: float = 0.25, pool_size: int = 4,
                 tls: Any = None) -> None:
        """``tls``: an ``IOpenSSLClientConnectionCreator`` (such as
        ``redis_tls_options(host)``) to speak TLS to Redis; None: plain TCP.
        ``connect_timeout`` bounds the TLS handshake too."""
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.reactor = reactor
        self.host = host
        self.port = port
        self.db = db
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.pool_size = pool_size
        self.max_blocking = BLOCKING_BURST * pool_size
        self.stats = RedisStats()
        handshake = []
        if password is not None:
            handshake.append(encode_command(("AUTH", password)))
        if db:
            handshake.append(encode_command(("SELECT", db)))
        if not handshake:
            handshake.append(encode_command(("PING",)))
        self._handshake = b"".join(handshake)
        self._handshake_count = len(handshake)
        self._command: Optional[_Connection] = None
        self._idle: List[_Connection] = []
        self._blocking: Set[_Connection] = set()
        self._waiters: Deque[Tuple[_Call, bytes]] = deque()
        self._closed = False
        # False once an attempt failed or a connection died with calls on it;
        # while False, calls do not wait for a connection being made.
        self._healthy = True
        self._last_attempt = float("-inf")

    @classmethod
    def from_url(cls, reactor: Any, url: str, ca_file: Optional[str] = None,
                 **options: Any) -> "RedisClient":
        """A client for ``redis://`` or ``rediss://`` ``url`` (TLS checked
        against ``ca_file``, else the system's trust store); ``options`` as
        the constructor's. ValueError or OSError as ``parse_redis_address``
        and ``redis_tls_options``."""
        a = parse_redis_address(url)
        tls = redis_tls_options(a.host, ca_file) if a.tls else None
        return cls(reactor, a.host, a.port, a.db, a.password, tls=tls, **options)

    @property
    def connected(self) -> bool:
        """True when the command connection is up and answered its handshake."""
        c = self._command
        return c is not None and c.ready and not c.gone

    # -- execute

    def execute(self, *args: Arg) -> Deferred:
        """One command on the shared, pipelined command connection. Fires
        with bytes (bulk), int, str (simple string such as "OK"), None (nil)
        or list (array; an error inside an array is a RedisError element);
        errback RedisError for an error reply, RedisUnavailable when not
        connected or after ``command_timeout`` (the connection is then
        dropped with every command on it). Cancelling the Deferred only
        discards the reply."""
        try:
            data = encode_command(args)
        except TypeError:
            return fail()
        conn = self._command
        if conn is None or conn.gone:
            if self._closed:
                return fail(RedisUnavailable("the Redis client is closed"))
            if not self._may_attempt():
                return self._fail_fast()
            conn = self._command = self._open(blocking=False)
        if not conn.ready and not self._healthy:
            return self._fail_fast()
        call = _Call(Deferred(), self.reactor.seconds() + self.command_timeout)
        conn.send(call, data)
        return call.deferred

    # -- blocking

    def blocking(self, *args: Arg, timeout: float) -> Deferred:
        """A blocking command (XREAD BLOCK ms ..., BLPOP) on a pooled
        connection of its own. ``timeout`` (seconds, a little above the
        BLOCK time given to Redis) bounds the whole wait on our side:
        waiting for a connection, then for the reply. On timeout the
        connection is closed, not reused; cancelling the Deferred closes it
        too. Errbacks as ``execute``."""
        try:
            data = encode_command(args)
        except TypeError:
            return fail()
        if self._closed:
            return fail(RedisUnavailable("the Redis client is closed"))
        if not self._healthy:
            # The command connection is the probe: once it is up again (or
            # if it stayed up), blocking connections are worth opening.
            cmd = self._command
            if cmd is None or cmd.gone:
                if self._may_attempt():
                    self._command = self._open(blocking=False)
                return self._fail_fast()
            if not cmd.ready:
                return self._fail_fast()
        call = _Call(Deferred(lambda d: self._cancel_blocking(call)),
                     self.reactor.seconds() + timeout)
        conn = self._take_idle()
        if conn is None and len(self._blocking) < self.max_blocking:
            conn = self._open(blocking=True)
        if conn is not None:
            conn.send(call, data)
        else:
            call.timer = self.reactor.callLater(timeout, self._waiter_timed_out, call)
            self._waiters.append((call, data))
        return call.deferred

    def _take_idle(self) -> Optional[_Connection]:
        while self._idle:
            conn = self._idle.pop()  # most recently used: least likely stale
            if not conn.gone:
                return conn
        return None

    def _cancel_blocking(self, call: _Call) -> None:
        conn = call.connection
        if conn is not None:
            # Out of the connection's calls first: the Deferred fails with
            # CancelledError, as a cancelled Deferred does, not RedisUnavailable.
            conn.calls = deque(c for c in conn.calls if c is not call)
            conn.drop("blocking command cancelled")
        elif call.timer is not None:
            call.timer.cancel()
            call.timer = None
            self._waiters = deque(w for w in self._waiters if w[0] is not call)

    def _waiter_timed_out(self, call: _Call) -> None:
        call.timer = None
        self._waiters = deque(w for w in self._waiters if w[0] is not call)
        _fail(call, "timed out waiting for a blocking connection to Redis")

    def _release(self, conn: _Connection) -> None:
        """A blocking connection has its reply: to the next waiter, the idle
        list, or closed when enough are idle."""
        if conn.gone or conn not in self._blocking:
            return
        if self._waiters:
            call, data = self._waiters.popleft()
            call.timer.cancel()
            call.timer = None
            conn.send(call, data)
        elif len(self._idle) < self.pool_size:
            self._idle.append(conn)
        else:
            self._blocking.discard(conn)
            conn.drop("more idle connections than pool_size")  # not a fault

    # -- connections

    def _may_attempt(self) -> bool:
        return self.reactor.seconds() - self._last_attempt >= RETRY_INTERVAL

    def _fail_fast(self) -> Deferred:
        self.stats.fast_failures += 1
        return fail(RedisUnavailable(f"Redis at {self.host}:{self.port} is unavailable "
                                     f"(next attempt within {RETRY_INTERVAL} s)"))

    def _endpoint(self) -> Any:
        # IP literals skip name resolution (a thread hop per connection).
        if isIPAddress(self.host):
            tcp: Any = TCP4ClientEndpoint(self.reactor, self.host, self.port,
                                          timeout=self.connect_timeout)
        elif isIPv6Address(self.host):
            tcp = TCP6ClientEndpoint(self.reactor, self.host, self.port,
                                     timeout=self.connect_timeout)
        else:
            tcp = HostnameEndpoint(self.reactor, self.host, self.port,
                                   timeout=self.connect_timeout)
        if self.tls is None:
            return tcp
        # The handshake's bytes wait in the TLS layer until it is up; a
        # certificate refused loses the connection before the handshake's
        # reply, a fault as any failed connect.
        return wrapClientTLS(self.tls, tcp)

    def _open(self, blocking: bool) -> _Connection:
        if not blocking:
            # Only the command connection probes a Redis found unavailable:
            # opening pool connections while it answers must not hold it back.
            self._last_attempt = self.reactor.seconds()
        self.stats.connect_attempts += 1
        conn = _Connection(self, blocking)
        if blocking:
            self._blocking.add(conn)
        conn.start(self._endpoint(), self.connect_timeout)
        return conn

    def _connection_ready(self, conn: _Connection) -> None:
        if not self._healthy:
            self._healthy = True
            log.info("Redis at {host}:{port} answers again", host=self.host, port=self.port)
        if conn.blocking and not conn.calls:
            self._release(conn)

    def _connection_gone(self, conn: _Connection, why: str, fault: bool,
                         was_ready: bool) -> None:
        if conn is self._command:
            self._command = None
        if conn.blocking:
            self._blocking.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
        if self._closed:
            return
        if why == "command timed out":
            self.stats.timeouts += 1
        if fault and not was_ready:
            self.stats.connect_failures += 1
        if fault and self._healthy:
            self._healthy = False
            log.warn("Redis at {host}:{port} unavailable ({why}): calls fail at once, "
                     "one connection attempt per {interval} s at most",
                     host=self.host, port=self.port, why=why, interval=RETRY_INTERVAL)
        # Callers queued for a blocking connection: a fresh one now that
        # there is room, or at once their failure if Redis is not answering.
        while self._waiters and len(self._blocking) < self.max_blocking:
            call, data = self._waiters.popleft()
            if not self._healthy:
                _fail(call, f"Redis unavailable: {why}")
                continue
            call.timer.cancel()
            call.timer = None
            self._open(blocking=True).send(call, data)

    def close(self) -> Deferred:
        """Close every connection; pending commands errback RedisUnavailable.
        Fires once every connection has gone."""
        self._closed = True
        waiters, self._waiters = self._waiters, deque()
        for call, _ in waiters:
            _fail(call, "the Redis client is closed")
        conns = list(self._blocking)
        if self._command is not None:
            conns.append(self._command)
        self._command = None
        self._idle = []
        self._blocking = set()
        for conn in conns:
            conn.drop("the Redis client is closed")
        waits = [conn.closed for conn in conns if not conn.closed.called]
        if not waits:
            return succeed(None)
        return gatherResults(waits).addCallback(lambda _: None)
