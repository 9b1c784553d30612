"""Loopback fixtures: the real ``twistd ntonix`` in a subprocess, mock backends
in the test's reactor, raw TCP clients. Every wait is bounded."""

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.web.client import Agent, HTTPConnectionPool

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ntonix_mock.server import Knobs, QuietSite, make_site
from ntonix_mock.simulator import SimParams, SimulatorResource

LISTENING = re.compile(rb"http listening on ([0-9.]+):(\d+)")
TWISTD = Path(sys.executable).with_name("twistd")


def within(d: defer.Deferred, seconds: float) -> defer.Deferred:
    """``d``, failing with TimeoutError after ``seconds``."""
    return d.addTimeout(seconds, reactor)


def sleep(seconds: float) -> defer.Deferred:
    """Let the reactor run (for a bounded observation window, never as a
    substitute for waiting on an event)."""
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def until(predicate, timeout: float = 5.0, step: float = 0.01) -> None:
    """Poll ``predicate`` on the reactor until it holds, at most ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached within %.1fs" % timeout)
        await sleep(step)


class Mock:
    """A mock LLM backend listening on 127.0.0.1 in this process."""

    def __init__(self, backend_id: str, **knobs: Any) -> None:
        self.site = make_site(backend_id, Knobs(**knobs), reactor)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.number = self.port.getHost().port
        self.id = backend_id

    @property
    def address(self) -> str:
        port = self.port.getHost().port if self.port is not None else self.number
        return f"127.0.0.1:{port}"

    @property
    def mock(self):
        return self.site.resource

    @property
    def stats(self):
        return self.site.resource.stats

    @property
    def knobs(self):
        return self.site.resource.knobs

    def stop(self) -> defer.Deferred:
        if self.port is None:
            return defer.succeed(None)
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening)

    async def kill(self) -> None:
        """Stop listening and cut every connection: a crashed backend."""
        self.number = self.port.getHost().port
        await self.stop()
        self.site.drop_connections()

    def restart(self) -> None:
        """Listen again on the same port, with fresh counters."""
        self.site.resource.stats = type(self.site.resource.stats)()
        self.port = reactor.listenTCP(self.number, self.site, interface="127.0.0.1")

    def count(self, path: str = "/v1/chat/completions") -> int:
        return self.site.resource.stats.by_path.get(path, 0)


class MetricsFault(Resource):
    """A simulator whose /metrics misbehaves: ``mode`` is "hang" (never
    answers), "garbage" (200 with bytes that are no Prometheus page) or
    None (the simulator's own page); with ``ollama``, its health routes are
    Ollama's."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner
        self.mode: Optional[str] = None
        self.hung: List[Any] = []
        # True: no /health (404) but "Ollama is running" at /, as Ollama.
        self.ollama = False
        # Generation requests: how many at once (and the most ever), and
        # (arrived, x-tenant, ended) for each, in order of arrival.
        self.active = 0
        self.peak = 0
        self.log: List[List[Any]] = []

    def render(self, request: Any) -> Any:
        if request.method == b"POST" and request.path.startswith(b"/v1/"):
            self.active += 1
            self.peak = max(self.peak, self.active)
            entry = [reactor.seconds(), request.getHeader(b"x-tenant"), None]
            self.log.append(entry)

            def ended(_: Any) -> None:
                self.active -= 1
                entry[2] = reactor.seconds()
            request.notifyFinish().addBoth(ended)
        if self.ollama and request.path == b"/health":
            request.setResponseCode(404)
            return b"404 page not found"
        if self.ollama and request.path == b"/":
            return b"Ollama is running"
        if request.path == b"/metrics" and self.mode == "hang":
            self.hung.append(request)
            return NOT_DONE_YET
        if request.path == b"/metrics" and self.mode == "garbage":
            return b"\x00\xff<html>this is not a metrics page {{{\n" * 50
        return self.inner.render(request)


class Sim(Mock):
    """An inference simulator (the mock's vLLM-like mode) on 127.0.0.1."""

    def __init__(self, backend_id: str, **params: Any) -> None:
        resource = SimulatorResource(backend_id, SimParams(**params), reactor)
        self.fault = MetricsFault(resource)
        self.site = QuietSite(self.fault)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.number = self.port.getHost().port
        self.id = backend_id
        self.engine = resource.engine

    def count(self, path: str = "/v1/chat/completions") -> int:
        return self.engine.stats.requests


class GatewayProcess(protocol.ProcessProtocol):
    """``twistd -n ntonix`` as a child process; its output is kept for asserts."""

    def __init__(self) -> None:
        self.output = b""
        self.listening: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self.port: Optional[int] = None
        self.admin_port: Optional[int] = None
        self.exit_code: Optional[int] = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        m = LISTENING.search(self.output)
        if m and self.port is None:
            self.port = int(m.group(2))
            self.listening.callback(self.port)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exit_code = reason.value.exitCode
        self.end_reason = reason.value
        if not self.listening.called:
            self.listening.errback(RuntimeError(
                "gateway exited before listening:\n" + self.output.decode(errors="replace")))
        self.ended.callback(self.exit_code)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """The admin listener (/metrics, /backends, /cache/stats)."""
        return f"http://127.0.0.1:{self.admin_port}"

    def terminate(self, sig: str = "TERM") -> None:
        try:
            self.transport.signalProcess(sig)
        except Exception:
            pass


def twistd_argv(args: List[str]) -> List[str]:
    exe = str(TWISTD) if TWISTD.exists() else None
    prefix = [exe] if exe else [sys.executable, "-c",
                                "from twisted.scripts.twistd import run; run()"]
    return prefix + ["-n", "--pidfile=", "ntonix", *args]


def gateway_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTONIX_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def free_port() -> int:
    """A port that was free a moment ago (for gateways whose log does not go
    to stdout, where their listening line cannot be read)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _accepting(port: int, proc: GatewayProcess, timeout: float) -> None:
    deadline = reactor.seconds() + timeout
    while True:
        if proc.ended.called:
            raise RuntimeError("gateway exited:\n" + proc.output.decode(errors="replace"))
        try:
            c = await raw_connect(port)
            c.transport.loseConnection()
            return
        except Exception:
            if reactor.seconds() > deadline:
                raise
            await sleep(0.05)


async def start_gateway(args: List[str], env: Optional[Dict[str, str]] = None,
                        timeout: float = 20.0, cwd: Optional[str] = None,
                        port: Optional[int] = None) -> GatewayProcess:
    """Start ``twistd ntonix``; with ``port``, wait for it to accept there
    instead of reading its listening line."""
    proc = GatewayProcess()
    if port is not None:
        args = [*args, "--port", str(port)]
    if not any("admin.http_port" in a for a in args):
        # Its own admin port: gateways of one test run side by side.
        proc.admin_port = free_port()
        args = [*args, "--set", f"admin.http_port={proc.admin_port}"]
    argv = twistd_argv(args)
    reactor.spawnProcess(proc, argv[0], argv, env=gateway_env(env), path=cwd)
    try:
        if port is None:
            await within(proc.listening, timeout)
        else:
            proc.listening.addErrback(lambda _: None)
            await _accepting(port, proc, timeout)
            proc.port = port
    except Exception:
        proc.terminate("KILL")
        raise
    return proc


async def stop_gateway(proc: GatewayProcess, timeout: float = 20.0) -> int:
    if proc.ended.called:
        return proc.exit_code
    proc.terminate("TERM")
    try:
        return await within(proc.ended, timeout)
    except defer.TimeoutError:
        proc.terminate("KILL")
        raise


async def run_to_exit(args: List[str], env: Optional[Dict[str, str]] = None,
                      timeout: float = 20.0) -> GatewayProcess:
    """Run a twistd that is expected to exit by itself (bad configuration)."""
    proc = GatewayProcess()
    proc.listening.addErrback(lambda _: None)
    argv = twistd_argv(args)
    reactor.spawnProcess(proc, argv[0], argv, env=gateway_env(env))
    try:
        await within(proc.ended, timeout)
    except defer.TimeoutError:
        proc.terminate("KILL")
        raise
    return proc


def http_client(persistent: bool = False) -> treq.client.HTTPClient:
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    return treq.client.HTTPClient(Agent(reactor, pool=pool))


def chat_body(text: str = "hello", stream: bool = False, **extra: Any) -> bytes:
    return json.dumps({"model": "mock-llm", "stream": stream,
                       "messages": [{"role": "user", "content": text}], **extra}).encode()


JSON = {b"Content-Type": [b"application/json"]}


def raw_post(body: bytes, path: bytes = b"/v1/chat/completions", close: bool = False,
             extra: bytes = b"") -> bytes:
    """One whole HTTP/1.1 JSON POST as bytes, for raw-socket clients."""
    return (b"POST %s HTTP/1.1\r\nHost: x\r\n%s%sContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (path, b"Connection: close\r\n" if close else b"", extra, len(body), body))


class RawClient(protocol.Protocol):
    """A TCP client that sends exactly what it is told and keeps what it gets."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()
        self.got_data: Optional[defer.Deferred] = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.got_data is not None and not self.got_data.called:
            d, self.got_data = self.got_data, None
            d.callback(data)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)

    def wait_data(self, timeout: float) -> defer.Deferred:
        self.got_data = defer.Deferred()
        return within(self.got_data, timeout)

    @property
    def status(self) -> int:
        return int(self.received.split(b" ", 2)[1])

    @property
    def body(self) -> bytes:
        return self.received.partition(b"\r\n\r\n")[2]


async def raw_connect(port: int) -> RawClient:
    ep = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    return await within(connectProtocol(ep, RawClient()), 5)
