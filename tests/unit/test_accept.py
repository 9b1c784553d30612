"""The supervisor's choice of worker for each accepted connection, over fake
sockets and a memory reactor; and the worker's side over a real socket pair."""

import array
import errno
import socket
from typing import Any, List, Optional

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher

from ntonix.workers import accept
from ntonix.workers.accept import HTTP, HTTPS, Dispatcher, ExactBalance, Receiver


# -- the choice, alone

def test_the_fewest_open_connections_win():
    b = ExactBalance()
    assert b.choose({0: 3, 1: 1, 2: 2}) == 1
    assert b.choose({0: 3, 1: 4, 2: 2}) == 2
    assert b.choose({}) is None


def test_ties_go_round_robin():
    b = ExactBalance()
    assert [b.choose({0: 0, 1: 0, 2: 0}) for _ in range(5)] == [0, 1, 2, 0, 1]
    # Among the tied only, still in turn after the last chosen (1).
    assert b.choose({0: 1, 1: 5, 2: 1}) == 2
    assert b.choose({0: 1, 1: 5, 2: 1}) == 0


# -- fakes

class Conn:
    """An accepted connection: a descriptor number and whether it was closed."""

    numbers = iter(range(1000, 100000))

    def __init__(self) -> None:
        self.fd = next(Conn.numbers)
        self.closed = False

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.closed = True


class Listening:
    """A listening socket with connections (or errors) waiting."""

    family = socket.AF_INET

    def __init__(self) -> None:
        self.waiting: List[Any] = []
        self.closed = False

    def arrive(self, n: int) -> List[Conn]:
        conns = [Conn() for _ in range(n)]
        self.waiting += conns
        return conns

    def accept(self):
        if not self.waiting:
            raise BlockingIOError(errno.EAGAIN, "empty")
        item = self.waiting.pop(0)
        if isinstance(item, OSError):
            raise item
        return item, ("127.0.0.1", 40000)

    def fileno(self) -> int:
        return 3

    def close(self) -> None:
        self.closed = True


class End:
    """The supervisor's end of a worker's socket pair."""

    def __init__(self) -> None:
        self.mode = "ok"  # "full" (EAGAIN), "gone" (EPIPE)
        self.messages: List[Any] = []
        self.closed = False

    def sendmsg(self, buffers, ancdata, *rest):
        if self.mode == "full":
            raise BlockingIOError(errno.EAGAIN, "full")
        if self.mode == "gone":
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        fds = array.array("i")
        fds.frombytes(bytes(ancdata[0][2]))
        self.messages.append((b"".join(buffers), list(fds)))
        return len(b"".join(buffers))

    def recvmsg(self, *args):
        raise BlockingIOError(errno.EAGAIN, "nothing")

    def setblocking(self, flag):
        pass

    def fileno(self) -> int:
        return 7

    def close(self) -> None:
        self.closed = True

    @property
    def fds(self) -> List[int]:
        return [fd for _, fds in self.messages for fd in fds]

    @property
    def tags(self) -> bytes:
        return b"".join(tags for tags, _ in self.messages)


class Setup:
    def __init__(self, workers: int = 2, https: bool = False) -> None:
        self.reactor = MemoryReactorClock()
        self.http = Listening()
        self.https = Listening()
        self.ends: List[End] = []
        listening = {"http": self.http, **({"https": self.https} if https else {})}
        self.dispatcher = Dispatcher(self.reactor, listening, socketpair=self.pair)
        self.targets = [self.dispatcher.add_worker(i) for i in range(workers)]

    def pair(self):
        mine = End()
        self.ends.append(mine)
        return mine, End()

    def ready(self, *indexes: int) -> None:
        for i in indexes:
            self.dispatcher.report(self.targets[i], 0, 0)

    def wake(self, listening: Optional[Listening] = None) -> None:
        """The reactor finds a listening socket readable."""
        listening = listening or self.http
        for reader in list(self.reactor.readers):
            if getattr(reader, "sock", None) is listening:
                reader.doRead()
                return
        raise AssertionError("not reading that listening socket")

    def reading(self) -> bool:
        return any(getattr(r, "sock", None) is self.http for r in self.reactor.readers)


# -- the dispatcher

def test_nothing_is_accepted_until_a_worker_reports_ready():
    s = Setup()
    s.http.arrive(3)
    assert not s.reading()  # the clients wait in the backlog
    s.ready(1)
    assert s.reading()
    s.wake()
    assert len(s.ends[1].fds) == 3 and s.ends[0].fds == []


def test_a_burst_is_split_exactly_and_each_supervisor_copy_closed_after_sending():
    s = Setup(workers=2)
    s.ready(0, 1)
    conns = s.http.arrive(64)
    while s.http.waiting:
        s.wake()
    assert len(s.ends[0].fds) == 32 and len(s.ends[1].fds) == 32
    assert all(c.closed for c in conns)
    assert s.ends[0].tags == HTTP * 32
    # Batched: one message per wake-up and worker, not one per connection.
    assert len(s.ends[0].messages) < 32
    assert s.dispatcher.loads() == {0: 32, 1: 32}


def test_the_load_counts_the_last_report_and_what_was_handed_out_since():
    s = Setup(workers=2)
    s.ready(0, 1)
    s.http.arrive(4)
    s.wake()
    assert s.dispatcher.loads() == {0: 2, 1: 2}
    # Worker 0 took its two and one of them closed already; worker 1 has
    # not read its two yet.
    s.dispatcher.report(s.targets[0], 1, 2)
    assert s.dispatcher.loads() == {0: 1, 1: 2}
    s.http.arrive(1)
    s.wake()
    assert len(s.ends[0].fds) == 3


def test_https_connections_carry_their_tag():
    s = Setup(workers=1, https=True)
    s.ready(0)
    s.https.arrive(2)
    s.wake(s.https)
    s.http.arrive(1)
    s.wake(s.http)
    assert s.ends[0].tags == HTTPS * 2 + HTTP


def test_a_dead_worker_is_skipped_and_its_queued_connections_go_to_another():
    s = Setup(workers=3)
    s.ready(0, 1, 2)
    s.ends[1].mode = "full"
    s.http.arrive(3)
    s.wake()
    assert len(s.targets[1].queue) == 1  # waiting for room
    s.dispatcher.remove(s.targets[1])  # its process ended
    assert s.ends[1].closed and s.targets[1].queue == type(s.targets[1].queue)()
    assert len(s.ends[0].fds) + len(s.ends[2].fds) == 3
    s.http.arrive(4)
    s.wake()
    assert len(s.ends[0].fds) + len(s.ends[2].fds) == 7 and s.ends[1].fds == []
    assert 1 not in s.dispatcher.loads()


def test_a_send_to_a_worker_that_stopped_taking_goes_to_another():
    s = Setup(workers=2)
    s.ready(0, 1)
    s.ends[0].mode = "gone"  # it shut its end (EPIPE)
    conns = s.http.arrive(2)
    s.wake()
    assert s.ends[0].closed and len(s.ends[1].fds) == 2
    assert all(c.closed for c in conns)


def test_with_no_worker_left_queued_connections_are_closed():
    s = Setup(workers=1)
    s.ready(0)
    s.ends[0].mode = "full"
    conns = s.http.arrive(2)
    s.wake()
    s.dispatcher.remove(s.targets[0])
    assert all(c.closed for c in conns) and s.dispatcher.dropped == 2
    assert not s.reading()


def test_eagain_queues_for_that_worker_until_writable_and_new_ones_go_elsewhere():
    s = Setup(workers=2)
    s.ready(0, 1)
    s.ends[0].mode = "full"
    s.http.arrive(2)
    s.wake()
    t0 = s.targets[0]
    assert len(t0.queue) == 1 and t0 in s.reactor.writers
    assert len(s.ends[1].fds) == 1
    # Its queue counts in its load: the next two go to worker 1 first.
    s.http.arrive(2)
    s.wake()
    assert len(s.ends[1].fds) == 2 and len(t0.queue) == 2
    s.ends[0].mode = "ok"
    t0.doWrite()  # room again
    assert len(s.ends[0].fds) == 2 and not t0.queue and t0 not in s.reactor.writers
    assert s.dispatcher.loads() == {0: 2, 1: 2}


def test_accepting_pauses_while_too_many_wait_for_room(monkeypatch):
    monkeypatch.setattr(accept, "MAX_QUEUED", 3)
    s = Setup(workers=1)
    s.ready(0)
    s.ends[0].mode = "full"
    s.http.arrive(5)
    s.wake()
    assert len(s.targets[0].queue) == 3 and not s.reading()
    s.ends[0].mode = "ok"
    s.targets[0].doWrite()
    assert s.reading()


def test_out_of_descriptors_logs_once_and_backs_off():
    s = Setup(workers=1)
    s.ready(0)
    logged: List[Any] = []
    observer = logged.append
    globalLogPublisher.addObserver(observer)
    try:
        for _ in range(3):
            s.http.waiting.append(OSError(errno.EMFILE, "Too many open files"))
            s.wake()
            assert not s.reading()
            s.reactor.advance(accept.ACCEPT_BACKOFF_SECONDS)
            assert s.reading()
    finally:
        globalLogPublisher.removeObserver(observer)
    warnings = [e for e in logged if e.get("log_namespace") == "ntonix.workers.accept"
                and e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1 and warnings[0]["why"] == "out of file descriptors"
    s.http.arrive(1)
    s.wake()
    assert len(s.ends[0].fds) == 1


def test_on_stop_the_listening_sockets_close_when_the_last_worker_stops_taking():
    s = Setup(workers=2)
    s.ready(0, 1)
    s.dispatcher.stop_after_workers()
    assert not s.http.closed  # a worker's drain delay: still accepting
    s.dispatcher.report(s.targets[0], 3, 3, taking=False)  # worker 0 drained
    assert not s.http.closed and s.reading()
    s.http.arrive(1)
    s.wake()
    assert len(s.ends[1].fds) == 1
    s.dispatcher.remove(s.targets[1])
    assert s.http.closed and not s.reading()


def test_a_replaced_worker_gets_a_new_pair_and_the_old_one_closes():
    s = Setup(workers=2)
    s.ready(0, 1)
    old = s.targets[1]
    new = s.dispatcher.add_worker(1)
    assert old.closed and s.ends[1].closed and new is not old
    assert s.dispatcher.loads() == {0: 0}  # not before its first report
    s.dispatcher.report(old, 5, 5)  # a late report of the old process: ignored
    s.dispatcher.report(new, 0, 0)
    assert s.dispatcher.loads() == {0: 0, 1: 0}


def test_what_a_killed_worker_never_read_goes_to_another():
    """Real socket pairs: the supervisor's copy of the worker's end keeps
    the messages of a worker that died before reading them."""
    reactor = MemoryReactorClock()
    listening = Listening()
    dispatcher = Dispatcher(reactor, {"http": listening})
    t0, t1 = dispatcher.add_worker(0), dispatcher.add_worker(1)
    dispatcher.report(t0, 0, 0)
    dispatcher.report(t1, 5, 5)  # busier: worker 0 gets the next one
    client, served = socket.socketpair()
    listening.waiting.append(served)
    next(r for r in reactor.readers if getattr(r, "sock", None) is listening).doRead()
    assert t0.sent == 1 and served.fileno() == -1  # sent, the supervisor's copy closed
    # Worker 0 was killed before reading it; its process has ended.
    dispatcher.remove(t0)
    assert t1.sent == 1 and t0.worker_end is None
    data, fds, _ = accept.recv_fds(t1.worker_end, 4, socket.MSG_DONTWAIT)
    assert data == HTTP and len(fds) == 1
    with socket.socket(fileno=fds[0]) as adopted:
        adopted.sendall(b"still the same client")
        assert client.recv(64) == b"still the same client"
    client.close()
    dispatcher.close()
    assert t1.worker_end is None


# -- the worker's side, over a real socket pair

class Site:
    def __init__(self) -> None:
        self.channels: set = set()
        self.on_connections = None


def tcp_pair():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    server.close()
    return client, conn


def test_the_worker_adopts_each_connection_with_its_kind_and_reports_its_count():
    reactor = MemoryReactorClock()
    theirs, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    site = Site()
    told = []
    receiver = Receiver(reactor, mine.detach(), socket.AF_INET, site,
                        lambda op, **kw: told.append((op, kw)),
                        {"http": ("0.0.0.0", 8080), "https": ("0.0.0.0", 8443)})
    plain, tls = object(), object()
    http_port = receiver.listener("http")(8080, plain)
    https_port = receiver.listener("https")(8443, tls)
    assert http_port.getHost().port == 8080 and receiver in reactor.readers
    reactor.advance(0)
    assert told == [("connections", {"open": 0, "taken": 0})]  # ready

    clients, served = zip(*(tcp_pair() for _ in range(2)))
    socket.send_fds(theirs, [HTTP + HTTPS], [s.fileno() for s in served])
    for s in served:
        s.close()
    receiver.doRead()
    # A MemoryReactor runs no real transports: Twisted's adoptStreamConnection
    # stands for both kinds here.
    assert [(fam, f) for _, fam, f in reactor.adoptedStreamConnections] == [
        (socket.AF_INET, plain), (socket.AF_INET, tls)]
    site.channels.update({"a", "b"})
    reactor.advance(accept.REPORT_SECONDS)
    assert told[-1] == ("connections", {"open": 2, "taken": 2})
    reactor.advance(1)
    assert len(told) == 2  # nothing changed: no report

    # Stopping: what was sent before is still taken; later sends fail.
    c3, s3 = tcp_pair()
    socket.send_fds(theirs, [HTTP], [s3.fileno()])
    http_port.stopListening()
    assert receiver in reactor.readers  # https still takes
    https_port.stopListening()
    assert receiver not in reactor.readers and len(reactor.adoptedStreamConnections) == 3
    assert told[-1] == ("connections", {"open": 2, "taken": 3, "taking": False})
    with pytest.raises(OSError):
        socket.send_fds(theirs, [HTTP], [s3.fileno()])
    for s in (*clients, c3, s3, theirs):
        s.close()
