"""``twistd ntonix``: command-line options and the service tree."""

import gc
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional

from twisted.application.service import MultiService
from twisted.logger import ILogObserver, Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.components import Componentized

from ntonix import config as cfgmod
from ntonix._version import __version__
from ntonix.config import ConfigError, Raw
from ntonix.cache.manager import CacheSweeper
from ntonix.console import make_console_factory
from ntonix.gateway import Gateway
from ntonix.http.routes import Router
from ntonix.http.server import GatewayServer, Limits, fd_headroom_warning
from ntonix.identity import settle_secret
from ntonix.observe.logs import make_observer
from ntonix.routing.health import HealthChecker
from ntonix.routing.scrape import MetricsScraper
from ntonix.services import DemoBackendsService, DrainService, ListenerService, ReloadService
from ntonix.share import share_gateway, share_supervisor
from ntonix.sockets import listen_direct
from ntonix.tls import ServerTLS, tls_wanted
from ntonix.upstream.client import TrustError

log = Logger(namespace="ntonix.config")


def _settings_reference() -> str:
    lines = ["Every setting, with its default and environment variable",
             "(set any of them with --set section.key=value):", ""]
    for key, f in cfgmod.all_settings():
        default = cfgmod.default_of(f)
        lines.append(f"  {key} = {json.dumps(default)}  [{cfgmod.env_name(key)}]")
        lines.append(f"      {f.metadata['help']}")
    lines += ["", "Backends: --backend HOST:PORT[:WEIGHT] (repeat), or",
              "NTONIX_BACKENDS=host:port[:weight],... Config file: --config or NTONIX_CONFIG.",
              "Precedence: command line > environment > config file > defaults."]
    return "\n".join(lines)


def _flag_help(key: str) -> str:
    f = dict(cfgmod.all_settings())[key]
    return f"{f.metadata['help']} ({key}) [default: {json.dumps(cfgmod.default_of(f))}]"


class Options(usage.Options):
    synopsis = "[options]"

    # Settings with their own flag (from the config tree's metadata).
    FLAG_SETTINGS = cfgmod.flag_settings()

    optParameters = [
        ["config", "c", None, "JSON configuration file (env NTONIX_CONFIG) [default: none]"],
    ] + [
        [flag, None, None, _flag_help(key)]
        for flag, key in FLAG_SETTINGS.items()
    ]

    optFlags = [
        ["demo", None, "start two mock LLM backends in-process and use them "
                       "(demo.enabled) [default: off]"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.backends: List[str] = []
        self.sets: List[str] = []

    def getUsage(self, width: Optional[int] = None) -> str:
        # Appended as is: Options would re-wrap a longdesc into one paragraph.
        return super().getUsage(width) + "\n" + _settings_reference() + "\n"

    def opt_version(self) -> None:
        """print NTONIX's version and exit"""
        sys.stdout.write(f"ntonix {__version__}\n")
        raise SystemExit(0)

    def opt_backend(self, spec: str) -> None:
        """a backend HOST:PORT[:WEIGHT]; repeat for several (env NTONIX_BACKENDS)
        [default: none]"""
        self.backends.append(spec)

    def opt_set(self, assignment: str) -> None:
        """any setting as section.key=value (repeatable); see the list below"""
        if "=" not in assignment:
            raise usage.UsageError(f"--set {assignment}: expected section.key=value")
        self.sets.append(assignment)

    def cli_layer(self) -> Dict[str, Raw]:
        """The command line's settings, each marked with the flag it came from.

        Values are checked later, with the other sources, so that a bad one
        gets the same one-line report wherever it came from.
        """
        layer: Dict[str, Raw] = {}
        known = {k for k, _ in cfgmod.all_settings()}
        for assignment in self.sets:
            key, value = assignment.split("=", 1)
            key = key.strip()
            if key not in known:
                raise ConfigError([f"--set {key}: unknown setting; see `twistd ntonix --help`"])
            layer[key] = Raw(value, f"--set {key}", True)
        for flag, key in self.FLAG_SETTINGS.items():
            if self[flag] is not None:
                layer[key] = Raw(self[flag], f"--{flag}", True)
        if self["demo"]:
            layer["demo.enabled"] = Raw(True, "--demo", False)
        if self.backends:
            layer["backends"] = Raw(",".join(self.backends), "--backend", True)
        return layer


def config_exit(error: ConfigError) -> SystemExit:
    """One line per problem on stderr, and a non-zero exit: no traceback."""
    return SystemExit("\n".join(f"ntonix: invalid configuration: {line}"
                                 for line in error.lines))


def read_config(options: Options) -> cfgmod.Config:
    """The configuration from all sources now; ConfigError when it is bad."""
    return cfgmod.load(options.cli_layer(), os.environ, options["config"])


def load_config(options: Options) -> cfgmod.Config:
    """The configuration in force, or SystemExit with one line per problem."""
    try:
        config = read_config(options)
    except ConfigError as e:
        raise config_exit(e) from None
    try:
        return settle_secret(config)
    except (OSError, ValueError) as e:
        raise config_exit(ConfigError([f"server.secret_file = {config.server.secret_file!r}: "
                                       f"{getattr(e, 'strerror', None) or e}"])) from None


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor

    config = load_config(options)
    from ntonix.workers.supervisor import worker_count
    count = worker_count(config.server.workers.strip().lower())
    if count > 1:
        return build_supervisor(config, reactor, count, ntonix_arguments(),
                                daemon_log=daemon_log_file(options),
                                reloader=lambda: settle_secret(read_config(options)))
    return build_service(config, reactor, lambda: read_config(options),
                         daemon_log=daemon_log_file(options))


def ntonix_arguments() -> List[str]:
    """This process's ``ntonix`` options (what follows ``ntonix`` in its
    command line), for its workers."""
    argv = sys.argv
    return argv[argv.index("ntonix") + 1:] if "ntonix" in argv else []


def build_supervisor(config: cfgmod.Config, reactor: Any, count: int, args: List[str],
                     daemon_log: Optional[str] = None,
                     reloader: Optional[Callable[[], cfgmod.Config]] = None) -> MultiService:
    """``server.workers`` > 1: this process binds the sockets, serves the
    admin listener and supervises ``count`` worker processes."""
    from ntonix.workers.admin import GatewayViews, SupervisorRouter
    from ntonix.workers.supervisor import Supervisor
    top = GatewayService(make_observer(config.logging, daemon_log=daemon_log, reactor=reactor))
    for line in config.warnings:
        log.warn("configuration warning: {warning}", warning=line)
    sup = Supervisor(config, reactor, args, count, tls_wanted(config), reloader)
    views = GatewayViews(sup)
    # The workers' public port serves the same admin answers (with admin.token).
    views.serve_workers()
    if config.admin.http_port >= 0:
        # Listening before the traffic sockets are announced, as one gateway does.
        admin_site = GatewayServer(SupervisorRouter(views), Limits.from_config(config.server),
                                   reactor)
        ListenerService(reactor, config.admin.http_port, config.admin.http_bind, admin_site,
                        "admin api").setServiceParent(top)
    sup.setServiceParent(top)
    share_supervisor(top, sup, config, reactor)
    top.supervisor = sup
    return top


def daemon_log_file(options: Options) -> Optional[str]:
    """Where a daemonized twistd logs: its ``--logfile`` (``twistd.log`` by
    default), since a daemon's stdout goes nowhere. None in the foreground."""
    twistd = getattr(options, "parent", None)
    if twistd is None or twistd.get("nodaemon"):
        return None
    path = twistd.get("logfile") or "twistd.log"
    return None if path == "-" else path


class GatewayService(MultiService):
    """The top of the service tree; it brings the gateway's log observers.

    twistd starts logging after ``makeService``, with the ``ILogObserver``
    component of the application it attaches this service to, when it has
    one: set it there, so that ``logging.*`` decides where logs go.
    """

    def __init__(self, observer: Any) -> None:
        super().__init__()
        self.observer = observer
        self.gateway: Any = None
        self.tls: Any = None
        self.reload_service: Any = None
        self.supervisor: Any = None

    def startService(self) -> None:
        # What the configuration ignored (an unknown NTONIX_* variable), one
        # line each, before the listeners' lines.
        for line in self.gateway.config.warnings if self.gateway is not None else ():
            log.warn("configuration warning: {warning}", warning=line)
        super().startService()
        # Tail latency is set by the cycle collector's pauses, which stall
        # the reactor. Everything built so far lives as long as the process:
        # freezing it keeps it out of every collection. A larger young
        # generation lets a stream's objects (Twisted's HTTP client keeps
        # some in cycles) die young instead of being promoted and left for a
        # full collection. Measured with bench/proxy_bench.py, 200 streams in
        # progress: added TTFT p99 +56 ms with the defaults, +10 ms with these.
        gc.collect()
        gc.freeze()
        gc.set_threshold(5000, 20, 10)

    def setServiceParent(self, parent: Any) -> Any:
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver) is None:
            parent.setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)


def build_service(config: cfgmod.Config, reactor: Any,
                  reloader: Optional[Callable[[], cfgmod.Config]] = None,
                  daemon_log: Optional[str] = None, log_stream: Any = None,
                  worker: Any = None) -> MultiService:
    """The whole gateway as a service tree, on ``reactor``.

    ``reloader`` reads the configuration again for SIGHUP; ``daemon_log`` is
    where the text log goes when daemonized and ``logging.file`` is empty.
    """
    tls = None
    if tls_wanted(config):
        try:
            tls = ServerTLS(config)
        except ConfigError as e:
            raise config_exit(e) from None
    top = GatewayService(make_observer(config.logging, stdout=log_stream or sys.stdout,
                                       daemon_log=daemon_log, reactor=reactor))
    try:
        gateway = Gateway(config, reactor)
    except TrustError as e:
        raise config_exit(ConfigError([str(e)])) from None
    top.gateway = gateway
    limits = Limits.from_config(config.server)
    # A worker's admin routes answer for the whole gateway, from its supervisor.
    admin_view = worker.admin_view(reactor) if worker is not None else None
    # A trusted proxy speaks for many clients: no per-client cap for it (read
    # at each use: SIGHUP may change the list).
    site = GatewayServer(Router(gateway, admin_view=admin_view), limits, reactor,
                         exempt=lambda ip: gateway.identity.trusts(ip))
    headroom = fd_headroom_warning(limits)
    if headroom is not None:
        log.warn("{warning}", warning=headroom)
    gateway.metrics.sites.append(site)
    if config.demo.enabled:
        if worker is None or worker.index == 0:
            DemoBackendsService(reactor, gateway, config.demo.ports).setServiceParent(top)
        else:
            # Worker 0 runs the demo's mocks; the others only send to them.
            gateway.add_runtime_backends(
                [cfgmod.BackendConfig("127.0.0.1", p, 1) for p in config.demo.ports])
    if worker is None or worker.index == 0:
        # Once per machine: the other workers get worker 0's view.
        HealthChecker(gateway, reactor).setServiceParent(top)
        MetricsScraper(gateway, reactor).setServiceParent(top)
    CacheSweeper(gateway.cache, reactor).setServiceParent(top)
    share_gateway(top, gateway, config, reactor, worker)
    reload_service = None
    if reloader is not None:
        reload_service = ReloadService(reactor, gateway, reloader,
                                       extra=[tls.reload] if tls else [])
        reload_service.setServiceParent(top)
    if config.admin.enabled:
        try:
            console = make_console_factory(
                gateway, config, worker.reload_all if worker is not None
                else reload_service.reload if reload_service else None)
        except ConfigError as e:
            raise config_exit(e) from None
        ListenerService(reactor, config.admin.port, config.admin.bind, console,
                        "admin console (ssh)").setServiceParent(top)
    DrainService(reactor, gateway, [site]).setServiceParent(top)
    if config.admin.http_port >= 0:
        # The internals, on their own listener (loopback by default).
        admin_site = GatewayServer(Router(gateway, admin=True), limits, reactor)
        ListenerService(reactor, config.admin.http_port, config.admin.http_bind, admin_site,
                        "admin api").setServiceParent(top)
    # A worker takes its connections from the supervisor (workers/accept.py).
    http_listen = listen_direct(reactor) if worker is None else worker.take(reactor, "http", site)
    ListenerService(reactor, config.server.port, config.server.bind_address, site,
                    "http", listen=http_listen, gateway=gateway).setServiceParent(top)
    if tls is not None:
        # The same site behind TLS: identical routes, limits and streaming.
        https_listen = None if worker is None else worker.take(reactor, "https", site)
        ListenerService(reactor, config.server.ssl_port, config.server.bind_address,
                        TLSMemoryBIOFactory(tls, False, site), "https", listen=https_listen,
                        gateway=gateway).setServiceParent(top)
    top.tls = tls
    top.reload_service = reload_service
    return top


__all__ = ["Options", "makeService", "build_service"]
