"""The admin console: a Python manhole inside the running gateway, over SSH.

It is arbitrary code execution in the gateway process, so: off by default,
bound to 127.0.0.1 unless configured otherwise, public-key authentication
only (``admin.authorized_keys``; no passwords are offered), and it refuses to
start when enabled without a key to accept. The host key comes from
``admin.host_key``; without one an ephemeral key is made at start and its
fingerprint logged (clients will see it change on every restart).

The namespace holds the live ``gateway`` and documented helpers; the banner
lists them.
"""

import json
from typing import Any, Callable, Dict, List, Optional

from cryptography.hazmat.primitives.asymmetric import ec
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.logger import Logger

from ntonix.config import Config, ConfigError, shown

log = Logger(namespace="ntonix.console")


class Text(str):
    """A helper's answer: shown as text in the console, not as a quoted repr."""

    def __repr__(self) -> str:
        return str(self)


def _table(rows: List[List[str]]) -> Text:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return Text("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                          for r in rows))


class Helpers:
    """What the console offers besides ``gateway`` itself."""

    def __init__(self, gateway: Any, reload: Optional[Callable[[], bool]]) -> None:
        self.gateway = gateway
        self._reload = reload

    def _backend(self, name: str) -> Any:
        b = self.gateway.find(name)
        if b is None:
            names = ", ".join(x.name for x in self.gateway.backends) or "none"
            raise KeyError(f"no backend {name!r}; backends: {names}")
        return b

    def backends(self) -> Text:
        """Every backend: state, circuit, weight, in-flight, requests, errors, latency."""
        rows = [["backend", "state", "circuit", "weight", "in_flight", "requests", "errors",
                 "avg_ms", "last change"]]
        for b in self.gateway.backends:
            rows.append([b.name, b.state, b.breaker.state, str(b.weight), str(b.in_flight),
                         str(b.requests), str(b.errors), f"{b.latency_avg_ms:.1f}",
                         b.breaker.reason])
        return _table(rows)

    def drain(self, name: str) -> Text:
        """Send no new requests to backend NAME ("host:port"); in-flight ones finish."""
        b = self._backend(name)
        b.draining = True
        log.info("backend {backend} drained from the console", backend=b.name)
        return Text(f"{b.name} draining ({b.in_flight} in flight)")

    def undrain(self, name: str) -> Text:
        """Let backend NAME take new requests again."""
        b = self._backend(name)
        b.draining = False
        log.info("backend {backend} undrained from the console", backend=b.name)
        return Text(f"{b.name} {b.state}")

    def open_circuit(self, name: str) -> Text:
        """Open backend NAME's circuit now; it is retried after health.recovery_seconds."""
        b = self._backend(name)
        b.breaker.force_open("opened from the console")
        return Text(f"{b.name} circuit open until {b.breaker.retry_at:.0f}")

    def reset_circuit(self, name: str) -> Text:
        """Close backend NAME's circuit and forget its failures."""
        b = self._backend(name)
        b.breaker.reset()
        return Text(f"{b.name} circuit closed")

    def queue(self) -> Text:
        """The admission queue: who waits, for how long, who was refused."""
        return Text(json.dumps(self.gateway.admission.as_json(), indent=2))

    def cache_stats(self) -> Text:
        """The response cache's counters, as GET /cache/stats shows them."""
        return Text(json.dumps(self.gateway.cache.as_json(), indent=2))

    def flush_cache(self) -> Text:
        """Drop every cached answer (answers being generated are not affected)."""
        n = self.gateway.cache.store.clear()
        log.info("cache flushed from the console: {n} entries", n=n)
        return Text(f"{n} entries dropped")

    def config(self) -> Text:
        """The configuration in force, with where each non-default setting came from."""
        # Shown masked: a console session's screen is not where secrets go.
        return Text(json.dumps(shown(self.gateway.config), indent=2, default=str))

    def reload(self) -> Text:
        """Re-read the configuration file and environment, as SIGHUP does."""
        if self._reload is None:
            return Text("reload is not available in this process")
        return Text("reloaded" if self._reload() else "refused: see the log")

    def namespace(self) -> Dict[str, Any]:
        ns: Dict[str, Any] = {"gateway": self.gateway}
        for name in HELPERS:
            ns[name] = getattr(self, name)
        ns["help"] = lambda: Text(banner())
        return ns


HELPERS = ("backends", "drain", "undrain", "open_circuit", "reset_circuit", "queue", "cache_stats",
           "flush_cache", "config", "reload")


def banner() -> str:
    lines = ["NTONIX admin console: a Python prompt inside the running gateway.",
             "  gateway              the live Gateway object"]
    for name in HELPERS:
        doc = (getattr(Helpers, name).__doc__ or "").strip().splitlines()[0]
        args = "(name)" if name in ("drain", "undrain", "open_circuit", "reset_circuit") else "()"
        lines.append(f"  {name + args:<20} {doc}")
    lines.append("  help()               this list.  Ctrl-D leaves.")
    return "\n".join(lines) + "\n"


class ConsoleManhole(manhole.ColoredManhole):
    def initializeScreen(self) -> None:
        self.terminal.reset()
        self.terminal.write(banner().replace("\n", "\r\n").encode())
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()


def read_authorized_keys(path: str, source: str) -> List[keys.Key]:
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError as e:
        raise ConfigError([f'admin.authorized_keys = "{path}" ({source}): cannot be read: '
                           f"{e.strerror or e}"]) from None
    found = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            found.append(keys.Key.fromString(line))
        except (keys.BadKeyError, ValueError, IndexError):
            raise ConfigError([f'admin.authorized_keys = "{path}" ({source}): line {n} is '
                               "not an SSH public key"]) from None
    if not found:
        raise ConfigError([f'admin.authorized_keys = "{path}" ({source}): no keys in it'])
    return found


def host_key(config: Config) -> keys.Key:
    path = config.admin.host_key
    if not path:
        key = keys.Key(ec.generate_private_key(ec.SECP256R1()))
        log.warn("admin.host_key not set: using an ephemeral host key, fingerprint {fp}",
                 fp=key.fingerprint())
        return key
    try:
        return keys.Key.fromFile(path)
    except (OSError, keys.BadKeyError, ValueError) as e:
        raise ConfigError([f'admin.host_key = "{path}" ({config.source_of("admin.host_key")}): '
                           f"not a readable private key: {e}"]) from None


def make_console_factory(gateway: Any, config: Config,
                         reload: Optional[Callable[[], bool]] = None) -> manhole_ssh.ConchFactory:
    """The SSH factory of the console; ConfigError when it must not start."""
    admin = config.admin
    if not admin.authorized_keys:
        raise ConfigError([f"admin.enabled = true ({config.source_of('admin.enabled')}): "
                           "needs admin.authorized_keys (the console accepts keys only)"])
    accepted = read_authorized_keys(admin.authorized_keys,
                                    config.source_of("admin.authorized_keys"))
    key = host_key(config)
    namespace = Helpers(gateway, reload).namespace()

    def terminal() -> insults.ServerProtocol:
        return insults.ServerProtocol(ConsoleManhole, namespace)

    realm = manhole_ssh.TerminalRealm()
    realm.chainedProtocolFactory = terminal
    checker = SSHPublicKeyChecker(InMemorySSHKeyDB({admin.user.encode(): accepted}))
    factory = manhole_ssh.ConchFactory(portal.Portal(realm, [checker]))
    # Per instance: the class attributes are dicts shared by every factory.
    factory.publicKeys = {key.sshType(): key.public()}
    factory.privateKeys = {key.sshType(): key}
    factory.noisy = False
    return factory
