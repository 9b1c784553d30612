"""The supervising parent of ``server.workers`` > 1.

It binds the HTTP (and HTTPS) listening sockets, starts N worker processes,
and is the only one to accept on those sockets: each new connection goes to
the worker with the fewest open connections, over a socket pair of its own
(``accept.py``). It owns the admin listener, where ``/metrics`` sums the
workers' figures, and it keeps the workers in step:

- a worker that dies is started again, after 0.5 s doubling to 30 s while it
  keeps dying (reset once one has lived a minute), and logged;
- worker 0 runs the health checks and metrics scrapes; every half health
  interval its view of the backends (circuits, loading, models, load) is
  copied to the others, so the fleet is probed once per machine and every
  worker sees a circuit change within one check interval;
- SIGHUP is passed on as a reload to every worker, each answering whether it
  took the new configuration;
- on stop (SIGTERM) every worker drains as a single gateway does, within
  ``server.shutdown_timeout_seconds``; the listening sockets close when the
  last worker stops taking connections (after ``server.drain_delay_seconds``).

Parent and workers talk in netstrings over the workers' stdin and stdout
(``channel.py``); the workers' logs come through their stderr.
"""

import os
import re
import signal
import socket
import sys
from typing import Any, Callable, Dict, List, Optional

import attrs
from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ntonix.workers.accept import Dispatcher, Target
from ntonix.workers.broker import SlotBroker
from ntonix.workers.channel import Channel
from ntonix.workers.merge import merge_expositions

log = Logger(namespace="ntonix.workers")

LISTEN_BACKLOG = 1024


def worker_count(value: str) -> int:
    if value == "auto":
        try:
            cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use
        except AttributeError:
            cpus = os.cpu_count() or 1
        return max(1, min(256, cpus))
    return int(value)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    s.listen(LISTEN_BACKLOG)
    s.setblocking(False)
    return s


class _PipeTransport:
    """The channel's transport: the worker's stdin."""

    def __init__(self, process: Any) -> None:
        self.process = process

    def write(self, data: bytes) -> None:
        self.process.writeToChild(0, data)

    def writeSequence(self, seq: List[bytes]) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        self.process.closeStdin()

    def getPeer(self) -> None:
        return None

    getHost = getPeer


_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z\s+")
_relay = Logger(namespace="ntonix.workers.relay")


def relay_line(index: int, line: str) -> None:
    """A worker's log line, re-emitted by the supervisor at its level."""
    if not line.strip():
        return
    text = _STAMP.sub("", line)
    emit = _relay.info
    if text.startswith(("WARN", "WARNING")):
        emit = _relay.warn
    elif text.startswith(("ERROR", "CRITICAL")):
        emit = _relay.error
    emit("worker {index}: {line}", index=index, line=text)


class WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.channel = Channel(lambda msg: supervisor.from_worker(self, msg))
        self.started_at = supervisor.reactor.seconds()
        self.pid: Optional[int] = None
        self.ended: defer.Deferred = defer.Deferred()
        self.alive = True
        self.target: Optional[Target] = None  # where its connections go
        self._log_tail = b""

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.channel.makeConnection(_PipeTransport(self.transport))

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.channel.dataReceived(data)
        elif fd == 2:
            # Whole lines, through this process's own log (its file, its
            # console, or twistd's log when daemonized).
            data = self._log_tail + data
            cut = data.rfind(b"\n") + 1
            self._log_tail = data[cut:]
            for line in data[:cut].decode("utf-8", "replace").splitlines():
                relay_line(self.index, line)

    def processEnded(self, reason: Any) -> None:
        self.alive = False
        self.channel.connectionLost(reason)
        self.supervisor.ended(self, reason.value)
        self.ended.callback(None)


class Supervisor(Service):
    def __init__(self, config: Any, reactor: Any, ntonix_args: List[str], count: int,
                 tls: bool, reloader: Optional[Callable[[], Any]] = None) -> None:
        self.config = config
        # Reads the configuration again on SIGHUP: the broker's queue and the
        # admin listener's token follow it, as the workers do.
        self.reloader = reloader
        self.reactor = reactor
        self.args = ntonix_args
        self.count = count
        self.tls = tls
        self.workers: Dict[int, WorkerProcess] = {}
        self.restarts: Dict[int, int] = {}
        self.failures: Dict[int, int] = {}
        self.sockets: Dict[str, socket.socket] = {}
        self.dispatcher: Optional[Dispatcher] = None
        self.stopping = False
        self.sync_loop: Optional[LoopingCall] = None
        self._previous_hup: Any = None
        self._stop_requested = False
        # What workers may ask: op -> handler(worker, message) -> reply
        # (the fleet's modules add theirs), and who hears of a worker's end.
        self.handlers: Dict[str, Callable[[WorkerProcess, Dict[str, Any]], Any]] = {
            "reload_all": self._reload_all}
        self.on_worker_ended: List[Callable[[WorkerProcess], None]] = []
        # Backend limits and the admission queue, exact across the workers.
        self.broker = SlotBroker(lambda: self.config, reactor, self.tell_worker)
        self.handlers.update({
            "slot_acquire": lambda proc, msg: self.broker.acquire(proc.index, msg),
            "slot_release": lambda proc, msg: self.broker.release(proc.index, msg),
            "slot_cancel": lambda proc, msg: self.broker.cancel(proc.index, msg)})
        self.on_worker_ended.append(lambda proc: self.broker.worker_ended(proc.index))
        # Each worker's count of open connections, for the choice of worker.
        self.handlers["connections"] = self._connections
        self.on_worker_ended.append(
            lambda proc: self.dispatcher.remove(proc.target)
            if self.dispatcher is not None and proc.target is not None else None)
        # The latest metrics page of each worker, and those of replaced ones.
        self.last_metrics: Dict[int, str] = {}
        self.retired_metrics: List[str] = []

    # -- start
    def startService(self) -> None:
        super().startService()
        s = self.config.server
        try:
            self.sockets["http"] = bind_socket(s.bind_address, s.port)
            if self.tls:
                self.sockets["https"] = bind_socket(s.bind_address, s.ssl_port)
        except OSError as e:
            raise SystemExit(f"ntonix: cannot listen on {s.bind_address}: {e}") from None
        for label, sock in self.sockets.items():
            host, port = sock.getsockname()[:2]
            log.info("{label} listening on {host}:{port} ({n} workers)", label=label,
                     host=host, port=port, n=self.count)
        self.dispatcher = Dispatcher(self.reactor, self.sockets)
        for i in range(self.count):
            self.spawn(i)
        interval = max(0.05, self.config.health.interval_seconds / 2)
        self.sync_loop = LoopingCall(self.sync_fleet)
        self.sync_loop.clock = self.reactor
        self.sync_loop.start(interval, now=False).addErrback(
            lambda f: log.failure("syncing the workers' view of the backends", f))
        try:
            self._previous_hup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        except ValueError:
            pass  # not the main thread (an embedding test)
        self.reactor.callWhenRunning(self._stop_on_signals)

    def _stop_on_signals(self) -> None:
        """A service manager may signal the whole process group: the parent
        then gets SIGTERM twice (its own and the group's). Stop once."""
        def stop(*_: Any) -> None:
            self.reactor.callFromThread(self._stop_once)
        try:
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
        except ValueError:
            pass

    def _stop_once(self) -> None:
        if not self._stop_requested and self.reactor.running:
            self._stop_requested = True
            log.info("stopping: draining every worker")
            self.reactor.stop()

    def spawn(self, index: int) -> None:
        assert self.dispatcher is not None
        http = self.sockets["http"]
        # fd 3: the worker's end of its socket pair, where its connections come.
        argv = [sys.executable, "-m", "ntonix.workers.child", "--index", str(index),
                "--accept-fd", "3", "--family", str(int(http.family))]
        for label, sock in self.sockets.items():
            host, port = sock.getsockname()[:2]
            argv += [f"--{label}-address", f"{host}:{port}"]
        argv += ["--", *self.args]
        proc = WorkerProcess(self, index)
        proc.target = self.dispatcher.add_worker(index)
        fds = {0: "w", 1: "r", 2: "r", 3: proc.target.worker_fileno()}
        self.workers[index] = proc
        try:
            self.reactor.spawnProcess(proc, sys.executable, argv, env=dict(os.environ),
                                      childFDs=fds)
        except Exception:
            self.dispatcher.remove(proc.target)
            raise
        log.info("worker {index} started (pid {pid})", index=index, pid=proc.pid)

    def _connections(self, proc: WorkerProcess, msg: Dict[str, Any]) -> None:
        if self.dispatcher is not None and proc.target is not None:
            self.dispatcher.report(proc.target, int(msg["open"]), int(msg["taken"]),
                                   bool(msg.get("taking", True)))

    def ended(self, proc: WorkerProcess, why: Any) -> None:
        for listener in list(self.on_worker_ended):
            try:
                listener(proc)
            except Exception:
                log.failure("after worker {index} ended", index=proc.index)
        last = self.last_metrics.pop(proc.index, None)
        if last is not None:
            self.retired_metrics.append(last)
            if len(self.retired_metrics) > 16:
                # Fold old ones together: the page count stays bounded.
                self.retired_metrics = [merge_expositions([], self.retired_metrics)]
        if self.stopping or self.workers.get(proc.index) is not proc:
            return
        lived = self.reactor.seconds() - proc.started_at
        failures = 0 if lived > 60 else self.failures.get(proc.index, 0) + 1
        self.failures[proc.index] = failures
        delay = min(30.0, 0.5 * 2 ** (failures - 1)) if failures else 0.5
        self.restarts[proc.index] = self.restarts.get(proc.index, 0) + 1
        log.warn("worker {index} (pid {pid}) exited ({why}) after {lived:.1f}s; starting it "
                 "again in {delay:g}s", index=proc.index, pid=proc.pid,
                 why=getattr(why, "exitCode", None) is not None and
                 f"exit code {why.exitCode}" or f"signal {getattr(why, 'signal', '?')}",
                 lived=lived, delay=delay)
        self.reactor.callLater(delay, self._respawn, proc.index)

    def _respawn(self, index: int) -> None:
        if not self.stopping:
            self.spawn(index)

    # -- keeping them in step
    def sync_fleet(self) -> "defer.Deferred[None]":
        first = self.workers.get(0)
        if first is None or not first.alive or self.count < 2:
            return defer.succeed(None)
        d = first.channel.call("fleet", 2.0, self.reactor)

        def spread(reply: Dict[str, Any]) -> None:
            if reply.get("uptime", 0) < self.config.health.interval_seconds:
                return  # a new worker 0 has not checked anything yet
            self.broker.set_queue_over(queue_over(reply["fleet"], self.config.balancer))
            for i, proc in self.workers.items():
                if i != 0 and proc.alive:
                    proc.channel.tell("apply_fleet", fleet=reply["fleet"])

        d.addCallback(spread)
        d.addErrback(lambda f: log.debug("fleet sync: {why}", why=f.getErrorMessage()))
        return d

    def from_worker(self, proc: WorkerProcess, msg: Dict[str, Any]) -> Any:
        """A worker's message, to the handler registered for its op."""
        handler = self.handlers.get(msg.get("op"))  # type: ignore[arg-type]
        if handler is None:
            raise ValueError(f"unknown op {msg.get('op')!r}")
        return handler(proc, msg)

    def _reload_all(self, proc: WorkerProcess, msg: Dict[str, Any]) -> None:
        """The console (in worker 0) reloads every worker."""
        self.reload()

    def tell_worker(self, index: int, msg: Dict[str, Any]) -> None:
        proc = self.workers.get(index)
        if proc is not None and proc.alive:
            proc.channel.send(msg)

    def live_workers(self) -> List[WorkerProcess]:
        return [p for _, p in sorted(self.workers.items()) if p.alive]

    def reload(self) -> "defer.Deferred[Any]":
        log.info("SIGHUP: reloading every worker")
        if self.reloader is not None:
            try:
                new = self.reloader()
            except Exception as e:  # a bad file: keep what runs (the workers say why)
                log.warn("supervisor kept its configuration: {why}",
                         why=getattr(e, "lines", None) or e)
            else:
                # Listeners and processes are built once: their settings stay.
                self.config = attrs.evolve(new, server=self.config.server)
        calls = []
        for i, proc in sorted(self.workers.items()):
            d = proc.channel.call("reload", 10.0, self.reactor)
            d.addCallbacks(
                lambda r, i=i: log.info("worker {index} reloaded", index=i) if r.get("ok")
                else log.warn("worker {index} kept its configuration: the new one was "
                              "refused (its log says why)", index=i),
                lambda f, i=i: log.warn("worker {index} did not reload: {why}", index=i,
                                        why=f.getErrorMessage()))
            calls.append(d)
        return defer.DeferredList(calls)

    def ask_all(self, op: str, timeout: float = 5.0) -> "defer.Deferred[List[Any]]":
        """Every live worker's answer to ``op``, in worker order (None for a
        worker that did not answer)."""
        procs = [p for _, p in sorted(self.workers.items()) if p.alive]
        ds = [p.channel.call(op, timeout, self.reactor).addErrback(lambda f: None)
              for p in procs]
        return defer.gatherResults(ds)

    # -- stop
    def stopService(self) -> "defer.Deferred[None]":
        super().stopService()
        self.stopping = True
        if self.sync_loop is not None and self.sync_loop.running:
            self.sync_loop.stop()
        try:
            # A SIGHUP during the drain must not kill the supervisor.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        except ValueError:
            pass
        procs = [p for p in self.workers.values() if p.alive]
        # Accepting goes on while some worker still takes connections (its
        # drain delay); once none does, new connections are refused, as by
        # one draining gateway.
        dispatcher = self.dispatcher
        if dispatcher is not None:
            dispatcher.stop_after_workers()
        for p in procs:
            try:
                p.transport.signalProcess("TERM")  # each drains, as one gateway does
            except Exception:
                pass
        s = self.config.server
        grace = s.shutdown_timeout_seconds + s.drain_delay_seconds + 5.0
        waited = defer.DeferredList([p.ended for p in procs], consumeErrors=True)
        waited.addTimeout(grace, self.reactor)

        def kill(_: Any) -> Any:
            late = [p for p in procs if p.alive]
            for p in late:
                log.warn("worker {index} did not stop within {s:g}s: killed", index=p.index,
                         s=grace)
                try:
                    p.transport.signalProcess("KILL")
                except Exception:
                    pass
            # Bounded: a killed process ends at once.
            return defer.DeferredList([p.ended for p in late], consumeErrors=True) \
                .addTimeout(5.0, self.reactor).addErrback(lambda _: None)

        def closed(_: Any) -> None:
            # Only now: requests still waiting in the broker while workers
            # drain must still time out there.
            self.broker.close()
            if dispatcher is not None:
                dispatcher.close()

        return waited.addBoth(kill).addBoth(closed)

    def as_json(self) -> List[Dict[str, Any]]:
        now = self.reactor.seconds()
        loads = self.dispatcher.loads() if self.dispatcher is not None else {}
        # accepting: the worker is given new connections (from its first
        # report until it stops taking them); connections_open: what the
        # choice of worker counts (its last report, plus what it was handed
        # since).
        return [{"index": i, "pid": p.pid, "alive": p.alive,
                 "uptime_seconds": round(now - p.started_at, 3),
                 "restarts": self.restarts.get(i, 0), "accepting": i in loads,
                 "connections_open": loads.get(i, 0)} for i, p in sorted(self.workers.items())]


def queue_over(fleet: List[Dict[str, Any]], balancer: Any) -> List[str]:
    """The backends whose fresh metrics report a queue over
    ``balancer.backend_queue_limit`` (none when it is 0)."""
    limit = balancer.backend_queue_limit
    if not limit:
        return []
    fresh = 3 * balancer.scrape_interval_seconds
    return [b["name"] for b in fleet
            if b.get("load") and b["load"]["age"] <= fresh and b["load"]["waiting"] > limit]
