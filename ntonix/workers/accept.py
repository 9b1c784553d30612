"""Balanced accepting for ``server.workers`` > 1.

The supervisor alone accepts on the listening sockets and hands each new
connection to the live worker with the fewest open connections (ties in
turn), as Envoy's ``exact_balance`` connection balancer does. When every
worker accepts on one shared socket, whichever wakes first takes a whole
burst; SO_REUSEPORT hashes the address pair (even on average, not for a
burst) and EPOLLEXCLUSIVE depends on who happens to be waiting.

A connection travels to its worker over that worker's own AF_UNIX
SOCK_SEQPACKET socket pair as SCM_RIGHTS data: one message per batch, one
tag byte per descriptor (``h`` plain HTTP, ``s`` HTTPS). SEQPACKET keeps
each message whole, so tags and descriptors always pair up.

What each side knows:

- A worker reports over the channel (op ``connections``) how many
  connections it has open and how many descriptors it has taken in all, at
  most every ``REPORT_SECONDS`` and only when either changed; its first
  report says it is ready. The supervisor counts a worker's load as
  ``open + (sent - taken) + queued``: what it handed out since the report
  counts at once, so a burst is split exactly even with no report between.
- A worker stops taking connections (its drain) by shutting its end for
  reading: a send to it then fails (EPIPE) and what was queued for it goes
  to another worker. What was already in its socket it takes, then it
  closes its end and says so in a last report (``taking`` false).
- A worker that dies reads nothing more, but its socket lives on: the
  supervisor keeps a copy of the worker's end. Once the process has ended,
  the supervisor reads back what the worker never took and gives it to the
  others, so a killed worker loses only the connections it had adopted.

What the supervisor does when something fails:

- The worker's socket is full (EAGAIN): the connections wait in that
  worker's queue and leave when it is writable. They count in its load
  meanwhile, so new ones go elsewhere. Accepting pauses while
  ``MAX_QUEUED`` wait in all: clients then wait in the kernel's backlog.
- No worker is ready (start-up, every worker restarting): accepting pauses
  the same way, rather than accepting connections only to close them.
- Out of file descriptors on accept (EMFILE, ENFILE): logged once, accepting
  pauses for ``ACCEPT_BACKOFF_SECONDS`` and tries again.
- On stop, the listening sockets stay open while some worker still takes
  connections (through ``server.drain_delay_seconds``, as one gateway keeps
  accepting then) and close when the last one stops: new connections are
  refused from then on.
"""

import array
import errno
import os
import socket
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set, Tuple

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from ntonix.sockets import adopt_direct, supported

log = Logger(namespace="ntonix.workers.accept")

HTTP = b"h"
HTTPS = b"s"
TAGS = {"http": HTTP, "https": HTTPS}

# Accepts per wake-up of one listening socket: a flood on one cannot keep
# the supervisor from its other work (channels, the other socket).
ACCEPTS_PER_WAKE = 64
# Descriptors per message; the worker reads this many at once (the kernel
# allows 253).
FDS_PER_MESSAGE = 32
# Accepted connections waiting for full worker sockets, in all.
MAX_QUEUED = 1024
ACCEPT_BACKOFF_SECONDS = 0.1
SEND_RETRY_SECONDS = 0.01
# How often a worker reports its connection count at most.
REPORT_SECONDS = 0.02
# Messages a worker reads per wake-up.
MESSAGES_PER_WAKE = 16

# Out of memory or of in-flight descriptors: the worker is fine, try soon.
_SEND_LATER = {errno.ENOBUFS, errno.ENOMEM, errno.ETOOMANYREFS}
_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# The client went away between its handshake and our accept.
_CLIENT_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}


@attrs.define
class ExactBalance:
    """The choice of worker: the fewest open connections; among equals, the
    next after the one chosen last (round-robin, by worker index)."""

    last: int = -1

    def choose(self, loads: Mapping[int, int]) -> Optional[int]:
        if not loads:
            return None
        least = min(loads.values())
        tied = sorted(i for i, n in loads.items() if n == least)
        chosen = next((i for i in tied if i > self.last), tied[0])
        self.last = chosen
        return chosen


@attrs.define(eq=False)
class _Fd:
    """A connection taken back from a dead worker's socket: a bare descriptor."""

    fd: int

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


@implementer(IWriteDescriptor)
@attrs.define(eq=False)
class Target:
    """One worker as the dispatcher sees it."""

    index: int
    sock: socket.socket  # the supervisor's end
    dispatcher: "Dispatcher" = attrs.field(repr=False)
    # A copy of the worker's end, kept until its process ended: what it
    # never read can be taken back from there.
    worker_end: Optional[socket.socket] = None
    ready: bool = False  # the worker reported: it takes connections
    closed: bool = False
    writing: bool = False
    reported_open: int = 0
    taken: int = 0  # descriptors the worker had taken, as it reported
    sent: int = 0
    queue: Deque[Tuple[bytes, Any]] = attrs.Factory(deque)  # (tag, socket or _Fd)
    retry: Any = None  # a DelayedCall while a send waits for memory

    @property
    def load(self) -> int:
        return self.reported_open + (self.sent - self.taken) + len(self.queue)

    def worker_fileno(self) -> int:
        assert self.worker_end is not None
        return self.worker_end.fileno()

    # IWriteDescriptor: the reactor says when a full socket has room again.
    def fileno(self) -> int:
        return self.sock.fileno()

    def doWrite(self) -> None:
        self.dispatcher._writable(self)

    def connectionLost(self, reason: Any) -> None:
        self.dispatcher._drop(self, "its socket failed")

    def logPrefix(self) -> str:
        return f"worker {self.index} connections"


@implementer(IReadDescriptor)
@attrs.define(eq=False)
class _Listening:
    tag: bytes
    sock: socket.socket
    dispatcher: "Dispatcher" = attrs.field(repr=False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.dispatcher._accept(self)

    def connectionLost(self, reason: Any) -> None:
        log.error("listening socket failed: {why}", why=reason)

    def logPrefix(self) -> str:
        return "accept"


class Dispatcher:
    """The supervisor's side: accepts, chooses the worker, sends."""

    def __init__(self, reactor: Any, listening: Mapping[str, socket.socket],
                 balance: Optional[ExactBalance] = None,
                 socketpair: Callable[[], Tuple[socket.socket, socket.socket]] = (
                     lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))) -> None:
        self.reactor = reactor
        self.listening = [_Listening(TAGS[label], sock, self) for label, sock in listening.items()]
        self.balance = balance or ExactBalance()
        self.socketpair = socketpair
        self.targets: Dict[int, Target] = {}
        self.reading = False
        self.backoff: Any = None  # a DelayedCall while out of descriptors
        self.short_logged = False
        self.stopping = False
        self.dropped = 0  # connections closed for want of a worker

    # -- the supervisor's calls
    def add_worker(self, index: int) -> Target:
        """A new worker's socket pair; pass ``worker_fileno()`` to the
        process, and ``remove`` the target when the process ends."""
        old = self.targets.get(index)
        if old is not None:
            self.remove(old)
        mine, theirs = self.socketpair()
        mine.setblocking(False)
        target = Target(index, mine, self, worker_end=theirs)
        self.targets[index] = target
        return target

    def report(self, target: Target, open_connections: int, taken: int,
               taking: bool = True) -> None:
        """A worker's report: its open connections, the descriptors it took,
        and whether it still takes new ones."""
        if target.closed:
            return
        target.reported_open = open_connections
        target.taken = taken
        if not taking:
            self._drop(target, "it stopped taking connections")
        elif not target.ready:
            target.ready = True
            log.debug("worker {index} takes connections", index=target.index)
            self._update_reading()

    def remove(self, target: Target) -> None:
        """The worker process ended: what it never read goes to the others."""
        self._drop(target, "its process ended")
        self._take_back(target, redistribute=True)

    def stop_after_workers(self) -> None:
        """Stopping: keep accepting while some worker takes connections,
        then close the listening sockets."""
        self.stopping = True
        self._close_listening_when_done()

    def close(self) -> None:
        """Everything, now: the listening sockets, every worker's end, and
        the connections still queued."""
        self._close_listening()
        for target in list(self.targets.values()):
            self._drop(target, "the supervisor stopped", redistribute=False)
            self._take_back(target, redistribute=False)

    def loads(self) -> Dict[int, int]:
        """Each ready worker's load, as the choice sees it."""
        return {t.index: t.load for t in self.targets.values() if t.ready and not t.closed}

    # -- accepting
    def _accept(self, listening: _Listening) -> None:
        if not self.reading:
            return  # paused earlier in this reactor turn
        room = MAX_QUEUED - self._queued()
        touched: Dict[int, Target] = {}
        for _ in range(min(ACCEPTS_PER_WAKE, room)):
            try:
                conn, _ = listening.sock.accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _CLIENT_GONE:
                    continue
                self._accept_failed(e)
                break
            self.short_logged = False
            target = self._choose()
            if target is None:
                conn.close()
                self.dropped += 1
                continue
            target.queue.append((listening.tag, conn))
            touched[target.index] = target
        for target in touched.values():
            self._flush(target)
        self._update_reading()

    def _accept_failed(self, e: OSError) -> None:
        # Out of descriptors (or another error that would repeat at once):
        # the connection stays in the backlog; try again shortly, and say
        # so once rather than at every try.
        if not self.short_logged:
            self.short_logged = True
            why = "out of file descriptors" if e.errno in _OUT_OF_FDS else "accept failed"
            log.warn("{why} ({error}): accepting paused, tried again every {s:g}s until it "
                     "passes", why=why, error=e.strerror or e, s=ACCEPT_BACKOFF_SECONDS)
        if self.backoff is None:
            self.backoff = self.reactor.callLater(ACCEPT_BACKOFF_SECONDS, self._backoff_over)
        self._update_reading()

    def _backoff_over(self) -> None:
        self.backoff = None
        self._update_reading()

    def _choose(self) -> Optional[Target]:
        index = self.balance.choose(self.loads())
        return None if index is None else self.targets[index]

    def _queued(self) -> int:
        return sum(len(t.queue) for t in self.targets.values())

    def _update_reading(self) -> None:
        want = (bool(self.listening) and self.backoff is None
                and any(t.ready and not t.closed for t in self.targets.values())
                and self._queued() < MAX_QUEUED)
        if want and not self.reading:
            for listening in self.listening:
                self.reactor.addReader(listening)
        elif self.reading and not want:
            for listening in self.listening:
                self.reactor.removeReader(listening)
        self.reading = want

    # -- sending
    def _flush(self, target: Target) -> None:
        while target.queue and not target.closed:
            batch = [target.queue[i] for i in range(min(len(target.queue), FDS_PER_MESSAGE))]
            try:
                socket.send_fds(target.sock, [b"".join(tag for tag, _ in batch)],
                                [conn.fileno() for _, conn in batch])
            except BlockingIOError:
                self._want_write(target, True)
                return
            except OSError as e:
                if e.errno in _SEND_LATER:
                    if target.retry is None:
                        target.retry = self.reactor.callLater(SEND_RETRY_SECONDS,
                                                              self._retry, target)
                    return
                # EPIPE: the worker shut its end (its drain).
                self._drop(target, e.strerror or str(e))
                return
            for _ in batch:
                # The message holds its own reference now.
                target.queue.popleft()[1].close()
            target.sent += len(batch)
        self._want_write(target, False)

    def _retry(self, target: Target) -> None:
        target.retry = None
        self._flush(target)
        self._update_reading()

    def _want_write(self, target: Target, want: bool) -> None:
        if want and not target.writing:
            self.reactor.addWriter(target)
        elif target.writing and not want:
            self.reactor.removeWriter(target)
        target.writing = want

    def _writable(self, target: Target) -> None:
        self._flush(target)
        self._update_reading()

    # -- a worker that stopped
    def _drop(self, target: Target, why: str, redistribute: bool = True) -> None:
        if target.closed:
            return
        target.closed = True
        self._want_write(target, False)
        if target.retry is not None:
            target.retry.cancel()
            target.retry = None
        target.sock.close()
        if self.targets.get(target.index) is target:
            del self.targets[target.index]
        log.debug("worker {index} takes no more connections ({why})", index=target.index,
                  why=why)
        orphans = list(target.queue)
        target.queue.clear()
        self._rehome(target, orphans, redistribute)

    def _take_back(self, target: Target, redistribute: bool) -> None:
        """The messages a dead worker never read, from our copy of its end."""
        end, target.worker_end = target.worker_end, None
        if end is None:
            return
        orphans: List[Tuple[bytes, Any]] = []
        while True:
            try:
                data, fds, _ = recv_fds(end, FDS_PER_MESSAGE, socket.MSG_DONTWAIT)
            except OSError:
                break
            if not data and not fds:
                break
            orphans += [(bytes((tag,)), _Fd(fd)) for tag, fd in zip(data, fds)]
            for fd in fds[len(data):]:
                os.close(fd)
        end.close()
        if orphans:
            log.info("{n} connection(s) worker {index} never took: given to the others",
                     n=len(orphans), index=target.index)
            self._rehome(target, orphans, redistribute)

    def _rehome(self, target: Target, orphans: List[Tuple[bytes, Any]],
                redistribute: bool) -> None:
        closed = 0
        touched: Dict[int, Target] = {}
        for tag, conn in orphans:
            other = self._choose() if redistribute else None
            if other is None:
                conn.close()
                closed += 1
            else:
                other.queue.append((tag, conn))
                touched[other.index] = other
        self.dropped += closed
        if closed and redistribute:
            log.warn("{n} connection(s) waiting for worker {index} closed: no other worker "
                     "takes connections", n=closed, index=target.index)
        for other in touched.values():
            self._flush(other)
        self._update_reading()
        self._close_listening_when_done()

    def _close_listening_when_done(self) -> None:
        if self.stopping and not any(not t.closed for t in self.targets.values()):
            self._close_listening()

    def _close_listening(self) -> None:
        if self.reading:
            for listening in self.listening:
                self.reactor.removeReader(listening)
            self.reading = False
        if self.backoff is not None:
            self.backoff.cancel()
            self.backoff = None
        for listening in self.listening:
            listening.sock.close()
        self.listening = []


# -- the worker's side

def recv_fds(sock: socket.socket, count: int, flags: int = 0) -> Tuple[bytes, List[int], bool]:
    """One message: its tags, its descriptors, and whether some were cut.

    ``socket.recv_fds`` would do, but it passes no flags to ``recvmsg`` (in
    the Pythons we support), and the descriptors should be close-on-exec.
    """
    fds = array.array("i")
    data, ancdata, msg_flags, _ = sock.recvmsg(
        count, socket.CMSG_SPACE(count * fds.itemsize), socket.MSG_CMSG_CLOEXEC | flags)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return data, list(fds), bool(msg_flags & socket.MSG_CTRUNC)


class _Taking:
    """What ``ListenerService`` keeps as its port: the worker takes one kind
    of connection from the supervisor until told to stop."""

    def __init__(self, receiver: "Receiver", label: str) -> None:
        self.receiver = receiver
        self.label = label

    def getHost(self) -> Any:
        host, port = self.receiver.addresses.get(self.label, ("", 0))
        return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)

    def stopListening(self) -> None:
        self.receiver.stop(self.label)


@implementer(IReadDescriptor)
class Receiver:
    """The worker's end of its socket pair: connections from the supervisor,
    adopted into this process's reactor; and the reports of how many are
    open."""

    def __init__(self, reactor: Any, fd: int, family: int, site: Any,
                 tell: Callable[..., None], addresses: Mapping[str, Tuple[str, int]]) -> None:
        self.reactor = reactor
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd)
        self.sock.setblocking(False)
        self.family = family  # of the connections: the listening sockets'
        self.site = site  # its ``channels`` are this worker's open connections
        self.tell = tell
        self.addresses = dict(addresses)  # label -> the supervisor's (host, port), for logs
        self.factories: Dict[bytes, Any] = {}
        self.labels: Set[str] = set()  # the listeners still taking
        self.reading = False
        self.closed = False
        self.taken = 0
        self.reported: Optional[Tuple[int, int]] = None
        self.reported_at = float("-inf")
        self.report_call: Any = None
        site.on_connections = self.changed

    def listener(self, label: str) -> Callable[..., _Taking]:
        """A ``listenTCP`` stand-in for ``ListenerService``: connections of
        this kind, from the supervisor, go to ``factory``."""
        def listen(port: int, factory: Any, interface: str = "", backlog: int = 0) -> _Taking:
            self.factories[TAGS[label]] = factory
            self.labels.add(label)
            if not self.reading and not self.closed:
                self.reactor.addReader(self)
                self.reading = True
                self.changed()  # the first report: ready
            return _Taking(self, label)
        return listen

    def stop(self, label: str) -> None:
        """One listener stops; when the last has, this worker takes no more."""
        self.labels.discard(label)
        if not self.labels:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            # From now on the supervisor's sends fail (EPIPE) and it gives
            # those connections to another worker...
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        # ...and what it sent before is this worker's to serve.
        while self._read_one():
            pass
        if self.reading:
            self.reactor.removeReader(self)
            self.reading = False
        self.sock.close()
        if self.report_call is not None and self.report_call.active():
            self.report_call.cancel()
        self.report_call = None
        # At once: the supervisor closes the listening sockets when no
        # worker takes connections any more.
        self.tell("connections", open=len(self.site.channels), taken=self.taken, taking=False)

    # IReadDescriptor
    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        for _ in range(MESSAGES_PER_WAKE):
            if not self._read_one():
                return

    def connectionLost(self, reason: Any) -> None:
        self.close()

    def logPrefix(self) -> str:
        return "connections from the supervisor"

    def _read_one(self) -> bool:
        """Take one message; False when there is none (or no more ever)."""
        try:
            data, fds, cut = recv_fds(self.sock, FDS_PER_MESSAGE)
        except BlockingIOError:
            return False
        except OSError as e:
            log.warn("the supervisor's socket failed: {why}", why=e.strerror or e)
            self._gone()
            return False
        if not data and not fds:
            # The supervisor is gone; the channel's loss stops this worker.
            self._gone()
            return False
        if cut or len(fds) != len(data):
            log.warn("{n} connection(s) from the supervisor lost in passing",
                     n=len(data) - len(fds))
        self.taken += len(data)
        for tag, fd in zip(data, fds):
            self._adopt(bytes((tag,)), fd)
        for fd in fds[len(data):]:
            os.close(fd)
        self.changed()
        return True

    def _gone(self) -> None:
        if self.reading:
            self.reactor.removeReader(self)
            self.reading = False

    def _adopt(self, tag: bytes, fd: int) -> None:
        # The socket object owns the descriptor from here: closing it (or
        # the transport built on it) closes it.
        skt = socket.socket(self.family, socket.SOCK_STREAM, 0, fileno=fd)
        factory = self.factories.get(tag)
        if factory is None:
            skt.close()
            return
        direct = tag == HTTP and supported(self.reactor)
        try:
            if direct:
                adopt_direct(self.reactor, skt, factory)
            else:
                # Twisted's own transport (HTTPS: the TLS layer's cost
                # dominates), on its own copy of the descriptor.
                self.reactor.adoptStreamConnection(skt.fileno(), self.family, factory)
        except OSError:
            # The client left before we got here (getpeername: ENOTCONN).
            skt.close()
            return
        except Exception:
            # As Twisted's own accept loop: logged; a transport, if one was
            # made, keeps the socket.
            log.failure("adopting a connection")
            if direct:
                return
        if not direct:
            skt.close()

    # -- reports
    def changed(self) -> None:
        """Something may have changed the count: report within
        REPORT_SECONDS, once for everything that changed meanwhile."""
        if self.closed or (self.report_call is not None and self.report_call.active()):
            return
        delay = max(0.0, self.reported_at + REPORT_SECONDS - self.reactor.seconds())
        self.report_call = self.reactor.callLater(delay, self._report)

    def _report(self) -> None:
        self.report_call = None
        now = (len(self.site.channels), self.taken)
        if now != self.reported:
            self.reported = now
            self.reported_at = self.reactor.seconds()
            self.tell("connections", open=now[0], taken=now[1])
