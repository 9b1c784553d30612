"""A worker process: the whole gateway, serving the connections its
supervisor accepted and passed down, and talking to it over stdin/stdout.

    python -m ntonix.workers.child --index 1 --accept-fd 3 --family 2 \
        --http-address HOST:PORT [--https-address HOST:PORT] -- <ntonix options>

The supervisor alone listens; it sends each connection it accepts, with a
tag saying HTTP or HTTPS, to the worker with the fewest open connections,
over the socket pair whose end this worker has as ``--accept-fd``
(``accept.py``). The worker adopts each one into its reactor, reports how
many it has open, and on stop closes its end: the connections it no longer
takes go to the other workers.

Worker 0 also runs the health checks, the metrics scrapes and the SSH
console; the supervisor copies its view of the backends to the others, so
the fleet is probed once per machine. Logs go to stderr, which the
supervisor relays.
"""

import argparse
import json
import socket
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import attrs
from twisted.internet import stdio
from twisted.logger import Logger, globalLogBeginner

from ntonix.http.routes import backends_json
from ntonix.workers.accept import Receiver
from ntonix.workers.admin import SupervisorView
from ntonix.workers.channel import Channel
from ntonix.workers.slots import SlotClient

log = Logger(namespace="ntonix.workers.child")


@attrs.define
class WorkerContext:
    """What build_service needs to know to run as a worker."""

    index: int
    accept_fd: int  # its end of the socket pair the connections come through
    family: int = socket.AF_INET
    # label -> the supervisor's listening address (host, port), for the logs.
    addresses: Dict[str, Tuple[str, int]] = attrs.Factory(dict)
    channel: Any = None  # to the supervisor, once open
    receiver: Optional[Receiver] = None
    # What the supervisor may ask this worker beyond the built-in ops:
    # op -> handler(message) -> reply (the fleet's modules add theirs).
    handlers: Dict[str, Any] = attrs.Factory(dict)

    def reload_all(self) -> bool:
        """The console's reload(): every worker, through the supervisor."""
        if self.channel is None:
            return False
        self.channel.tell("reload_all")
        return True

    def admin_view(self, clock: Any) -> SupervisorView:
        """The public port's admin routes: the supervisor's gateway-wide
        answer (this worker's own figures are only a part of it)."""
        return SupervisorView(self, clock)

    def tell(self, op: str, **args: Any) -> None:
        if self.channel is not None:
            self.channel.tell(op, **args)

    def take(self, reactor: Any, label: str, site: Any) -> Callable[..., Any]:
        """``ListenerService``'s listen function for ``label`` ("http" or
        "https"): connections from the supervisor instead of a socket of
        its own. ``site`` counts this worker's open connections."""
        if self.receiver is None:
            self.receiver = Receiver(reactor, self.accept_fd, self.family, site, self.tell,
                                     self.addresses)
        return self.receiver.listener(label)


def parse_address(text: str) -> Tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def for_worker(config: Any, index: int) -> Any:
    """A worker's configuration: no admin listener of its own (the
    supervisor has it), the console in worker 0 only."""
    admin = attrs.evolve(config.admin, http_port=-1,
                         enabled=config.admin.enabled and index == 0)
    # Logs go to stderr, relayed by the supervisor into its own log: one
    # writer per file, one rotation.
    logging = attrs.evolve(config.logging, file="", enable_console=True, enable_colors=False)
    return attrs.evolve(config, admin=admin, logging=logging)


def fleet_of(gateway: Any) -> List[Dict[str, Any]]:
    """Worker 0's view of the backends, for the others."""
    out = []
    for b in gateway.backends:
        load = b.load
        out.append({
            "name": b.name, "circuit": b.breaker.state, "reason": b.breaker.reason,
            "loading": b.loading, "probe_path": b.probe_path, "reported": b.reported,
            "draining": b.draining and not b.removed,
            "load": None if load is None else {
                "age": gateway.reactor.seconds() - load.at, "waiting": load.waiting,
                "running": load.running, "kv_usage": load.kv_usage,
                "loras_loaded": sorted(load.loras_loaded),
                "loras_waiting": sorted(load.loras_waiting), "max_loras": load.max_loras,
                # Counted when scraped: the others apply it later, when their
                # own in-flight count no longer matches the page's.
                "others": b.scraped_others}})
    return out


_last_seen: Dict[str, str] = {}


def apply_fleet(gateway: Any, fleet: List[Dict[str, Any]]) -> None:
    """Take worker 0's view of the backends: loading, models, load, and the
    circuit changes it saw (only changes: a circuit this worker opened on its
    own requests' failures stays open until worker 0's checks change)."""
    from ntonix.routing.backend import ScrapedLoad
    from ntonix.routing.breaker import CLOSED, OPEN
    by_name = {b.name: b for b in gateway.backends}
    changed_models = False
    for item in fleet:
        b = by_name.get(item["name"])
        if b is None:
            continue
        br = b.breaker
        seen = _last_seen.get(b.name)
        _last_seen[b.name] = item["circuit"]
        if seen != item["circuit"]:
            if item["circuit"] == OPEN and br.state != OPEN:
                br.force_open(item["reason"] or "open in the health checks")
            elif item["circuit"] == CLOSED and seen is not None and br.state != CLOSED:
                br.reset()
        b.loading = item["loading"]
        b.probe_path = item["probe_path"]
        if not b.removed:
            # A backend drained from the console (which runs in worker 0).
            b.draining = item.get("draining", False)
        if item["reported"] != b.reported:
            b.reported = item["reported"]
            changed_models = True
        load = item["load"]
        if load is not None:
            b.set_load(ScrapedLoad(at=gateway.reactor.seconds() - load["age"],
                                   waiting=load["waiting"], running=load["running"],
                                   kv_usage=load["kv_usage"],
                                   loras_loaded=frozenset(load["loras_loaded"]),
                                   loras_waiting=frozenset(load["loras_waiting"]),
                                   max_loras=load["max_loras"], others=load.get("others")))
    if changed_models:
        gateway.models_changed()


def main(argv: Optional[List[str]] = None) -> None:
    from twisted.internet import reactor

    from ntonix import tap

    p = argparse.ArgumentParser(prog="ntonix-worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--accept-fd", type=int, required=True)
    p.add_argument("--family", type=int, default=int(socket.AF_INET))
    p.add_argument("--http-address", type=parse_address, required=True)
    p.add_argument("--https-address", type=parse_address, default=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:cut])
    rest = argv[cut + 1:]
    options = tap.Options()
    options.parseOptions(rest)
    config = for_worker(tap.load_config(options), args.index)
    addresses = {"http": args.http_address}
    if args.https_address is not None:
        addresses["https"] = args.https_address
    ctx = WorkerContext(args.index, args.accept_fd, args.family, addresses)
    top = tap.build_service(config, reactor,
                            lambda: for_worker(tap.read_config(options), args.index),
                            log_stream=sys.stderr, worker=ctx)
    globalLogBeginner.beginLoggingTo([top.observer], redirectStandardIO=False)
    gateway = top.gateway
    reload_service = top.reload_service

    def handle(msg: Dict[str, Any]) -> Any:
        op = msg.get("op")
        if op == "metrics":
            return {"text": gateway.metrics.prometheus(b"text/plain")[0].decode()}
        if op == "status":
            return {"metrics": gateway.metrics.as_json(gateway),
                    "backends_available": sum(1 for b in gateway.backends if b.available),
                    "cache": gateway.cache.as_json(), "admission": gateway.admission.as_json(),
                    "draining": gateway.draining}
        if op == "fleet":
            return {"fleet": fleet_of(gateway), "uptime": gateway.uptime()}
        if op == "backends":
            # As a single gateway's Router writes it, so both ports show the same.
            return {"body": json.dumps(backends_json(gateway), separators=(",", ":")) + "\n"}
        if op == "apply_fleet":
            apply_fleet(gateway, msg["fleet"])
            return None
        if op == "reload":
            ok = reload_service.reload() if reload_service is not None else False
            return {"ok": bool(ok)}
        extra = ctx.handlers.get(op)
        if extra is not None:
            return extra(msg)
        raise ValueError(f"unknown op {op!r}")

    channel = Channel(handle)
    ctx.channel = channel
    # Backend limits and the queue are the supervisor's (workers/broker.py).
    slots = SlotClient(gateway.fleet, gateway.admission, lambda: gateway.balancer,
                       channel.tell, reactor)
    gateway.admission.remote = slots
    ctx.handlers.update(slots.handlers())

    def lost() -> None:
        slots.supervisor_gone()
        reactor.callLater(0, _parent_gone, reactor)
    channel.on_lost = lost
    stdio.StandardIO(channel, reactor=reactor)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.callWhenRunning(_stop_on_signals, reactor)
    log.info("worker {index} started", index=args.index)
    reactor.run()


def _stop_on_signals(reactor: Any) -> None:
    """SIGTERM or SIGINT, once or from several senders at once (the
    supervisor and a service manager signalling the whole group): stop once."""
    import signal

    def stop(*_: Any) -> None:
        reactor.callFromThread(_stop_once, reactor)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


_stopping = []


def _stop_once(reactor: Any) -> None:
    if not _stopping and reactor.running:
        _stopping.append(True)
        reactor.stop()


def _parent_gone(reactor: Any) -> None:
    # Without a supervisor nobody would restart or stop this worker.
    if reactor.running and not _stopping:
        log.warn("the supervisor is gone: stopping")
        _stop_once(reactor)


if __name__ == "__main__":
    main()
