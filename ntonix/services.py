"""The long-lived parts of a running gateway, as Twisted services."""

from typing import Any, Callable, List, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ntonix.config import BackendConfig
from ntonix.gateway import Gateway
from ntonix.http.server import GatewayServer

log = Logger(namespace="ntonix.services")

# Twisted's default of 50 drops SYNs when hundreds of clients connect at once,
# which costs each of them a one-second retransmit (the kernel caps it at
# net.core.somaxconn).
LISTEN_BACKLOG = 1024


class ListenerService(Service):
    """Listens on one TCP port; a port that cannot be had stops the start-up
    with one line instead of a traceback."""

    def __init__(self, reactor: Any, port: int, interface: str, factory: Any,
                 label: str, listen: Optional[Callable[..., Any]] = None,
                 gateway: Optional[Gateway] = None) -> None:
        self.reactor = reactor
        self.gateway = gateway
        self.port_number = port
        self.interface = interface
        self.factory = factory
        self.label = label
        self._listen = listen or reactor.listenTCP
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        try:
            self.port = self._listen(self.port_number, self.factory, interface=self.interface,
                                     backlog=LISTEN_BACKLOG)
        except CannotListenError as e:
            raise SystemExit(f"ntonix: cannot listen for {self.label} on "
                             f"{self.interface}:{self.port_number}: {e.socketError}") from None
        site = self._site()
        if site is not None and IPushProducer.providedBy(self.port):
            # Paused by the site while at server.max_connections.
            site.add_listener(self.port)
        host = self.port.getHost()
        log.info("{label} listening on {host}:{port}", label=self.label, host=host.host,
                 port=host.port)
        if self.label == "http" and not self.gateway_has_backends():
            log.warn("no backends configured: requests will be answered 503 until some are "
                     "added (--backend HOST:PORT, NTONIX_BACKENDS, the config file and "
                     "SIGHUP, or --demo)")

    def gateway_has_backends(self) -> bool:
        return self.gateway is None or bool(self.gateway.backends)

    def _site(self) -> Optional[GatewayServer]:
        """The gateway's site behind this listener, under TLS or not."""
        factory = getattr(self.factory, "wrappedFactory", self.factory)
        return factory if isinstance(factory, GatewayServer) else None

    def stopService(self) -> Any:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        site = self._site()

        def stop(_: Any = None) -> Any:
            # Still paused and resumed by the site until it stops listening.
            d = defer.maybeDeferred(port.stopListening)

            def stopped(result: Any) -> Any:
                if site is not None:
                    site.remove_listener(port)
                return result

            return d.addBoth(stopped)

        if self.gateway is None:
            return stop()
        # The gateway's listeners keep accepting through the drain delay,
        # while readiness says 503.
        return self.gateway.begin_draining().addCallback(stop)


class DemoBackendsService(Service):
    """Two (or more) mock LLM backends in the gateway's own process, so that
    ``twistd -n ntonix --demo`` answers at once with nothing else running."""

    def __init__(self, reactor: Any, gateway: Gateway, ports: List[int]) -> None:
        self.reactor = reactor
        self.gateway = gateway
        self.ports = ports
        self.listening: List[Any] = []

    def startService(self) -> None:
        from ntonix_mock.server import Knobs, make_site

        super().startService()
        added = []
        for i, port in enumerate(self.ports):
            name = f"demo-{chr(ord('a') + i)}"
            # Paced like a small real model so that streaming is visible.
            site = make_site(name, Knobs(ttft_ms=80, itl_ms=15, tokens=24), self.reactor)
            try:
                p = self.reactor.listenTCP(port, site, interface="127.0.0.1",
                                           backlog=LISTEN_BACKLOG)
            except CannotListenError as e:
                raise SystemExit(f"ntonix: cannot start demo backend on 127.0.0.1:{port} "
                                 f"(demo.ports): {e.socketError}") from None
            self.listening.append(p)
            actual = p.getHost().port
            log.info("demo mock backend {name} listening on 127.0.0.1:{port}", name=name,
                     port=actual)
            added.append(BackendConfig("127.0.0.1", actual, 1))
        self.gateway.add_runtime_backends(added)

    def stopService(self) -> Any:
        super().stopService()
        ports, self.listening = self.listening, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


class DrainService(Service):
    """On shutdown, lets in-flight requests finish for up to the configured
    time while the listeners stop accepting, then closes what is left."""

    POLL_SECONDS = 0.05

    def __init__(self, reactor: Any, gateway: Gateway, sites: List[GatewayServer]) -> None:
        self.reactor = reactor
        self.gateway = gateway
        self.sites = sites

    def _channels(self) -> List[Any]:
        return [c for s in self.sites for c in list(s.channels)]

    def stopService(self) -> Any:
        super().stopService()
        # In-flight requests are drained once the listeners have closed.
        return self.gateway.begin_draining().addCallback(lambda _: self._drain())

    def _drain(self) -> Any:
        timeout = self.gateway.config.server.shutdown_timeout_seconds
        deadline = self.reactor.seconds() + timeout
        busy_at_start = sum(1 for c in self._channels() if c.busy)
        if busy_at_start:
            log.info("draining {n} in-flight request(s) for up to {t:g}s", n=busy_at_start,
                     t=timeout)
        done: defer.Deferred = defer.Deferred()

        def tick() -> None:
            try:
                channels = self._channels()
                for c in channels:
                    if not c.busy:
                        c.transport.loseConnection()
                busy = [c for c in channels if c.busy]
                if not busy or self.reactor.seconds() >= deadline:
                    if busy:
                        log.warn("shutdown: closing {n} request(s) still in flight", n=len(busy))
                        for c in busy:
                            c.transport.abortConnection()
                    loop.stop()
            except Exception:
                log.failure("while draining")
                loop.stop()

        loop = LoopingCall(tick)
        loop.clock = self.reactor
        d = loop.start(self.POLL_SECONDS, now=True)
        d.addBoth(lambda _: self.gateway.close())
        d.addBoth(lambda _: done.callback(None))
        return done



class ReloadService(Service):
    """SIGHUP: re-read the configuration file and environment and apply them.

    A bad configuration is reported and the running one stays.
    """

    def __init__(self, reactor: Any, gateway: Gateway, loader: Callable[[], Any],
                 extra: Optional[List[Callable[[], None]]] = None) -> None:
        self.reactor = reactor
        self.gateway = gateway
        self.loader = loader
        self.extra = extra or []  # other things SIGHUP reloads (TLS certificates)
        self._previous: Any = None
        self.reloads = 0

    def startService(self) -> None:
        super().startService()
        import signal

        try:
            self._previous = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        except ValueError:
            # Not the main thread (an embedding test): no signal, reload() still works.
            self._previous = None

    def stopService(self) -> Any:
        super().stopService()
        import signal

        if self._previous is not None:
            try:
                signal.signal(signal.SIGHUP, self._previous)
            except ValueError:
                pass
        return None

    def reload(self) -> bool:
        from ntonix.config import ConfigError

        self.reloads += 1
        log.info("SIGHUP: reloading the configuration")
        try:
            new = self.loader()
        except ConfigError as e:
            for line in e.lines:
                log.error("reload refused, keeping the running configuration: {problem}",
                          problem=line)
            return False
        except Exception:
            log.failure("reload failed, keeping the running configuration")
            return False
        restart = self.gateway.apply_config(new)
        for key in restart:
            log.warn("{key} changed; it takes effect after a restart", key=key)
        for reload_more in self.extra:
            try:
                reload_more()
            except Exception:
                log.failure("while reloading")
        log.info("configuration reloaded: {n} backend(s)", n=len(self.gateway.backends))
        return True
