"""Scheduler state shared by a gateway's workers and by gateways: one
inference scorer's view across processes (prefix index additions, loads per
backend, latency samples), a few ms stale at most.

- ``wire.py``: the batch a process sends, and the check of one received;
- ``state.py``: ``SchedulerShare``, one process's collecting, batching and
  applying (pure logic over a clock);
- ``hub.py``: the supervisor's relay between its workers;
- ``bus.py``: between gateways, through a capped Redis Stream.

Only with ``balancer.algorithm = inference``, and only when there is
someone to share with (``server.workers`` > 1, or a Redis:
``cluster.redis_url``, by default ``cache.redis_url``). Otherwise nothing
here is built and the request path pays nothing.
"""

from typing import Any, Optional

from twisted.application.service import Service
from twisted.logger import Logger

from ntonix.cache.redis_client import RedisClient
from ntonix.config import Config, cluster_redis_url
from ntonix.share.bus import RedisBus
from ntonix.share.hub import WorkerHub
from ntonix.share.state import SchedulerShare

log = Logger(namespace="ntonix.share")

# The single process's name for itself among a gateway's processes.
SINGLE = "0"


class ShareService(Service):
    """Starts and stops a share's timers and a bus's reader."""

    def __init__(self, share: Optional[SchedulerShare] = None,
                 bus: Optional[RedisBus] = None) -> None:
        self.share = share
        self.bus = bus

    def startService(self) -> None:
        super().startService()
        if self.share is not None:
            self.share.start()
        if self.bus is not None:
            self.bus.start()

    def stopService(self) -> Any:
        super().stopService()
        if self.share is not None:
            self.share.stop()
        if self.bus is not None:
            self.bus.stop()
            return self.bus.client.close()
        return None


def make_bus(config: Config, reactor: Any, deliver: Any, gone: Any) -> Optional[RedisBus]:
    url = cluster_redis_url(config)
    if not url:
        return None
    timeout = config.cache.redis_timeout_seconds
    try:
        # Its own connections: the cache tier's breaker and ours stay apart.
        # rediss:// as the cache tier speaks it (certificate checked).
        client = RedisClient.from_url(reactor, url, ca_file=config.cache.redis_ca_file or None,
                                      connect_timeout=max(0.2, timeout * 5),
                                      command_timeout=timeout, pool_size=1)
    except (ValueError, OSError) as e:
        # Share nothing, serve anyway. The reason without the URL, which
        # may hold a password.
        log.warn("scheduler share: not through Redis ({why}); each gateway routes on its own "
                 "view", why=str(e).replace(url, "<the Redis URL>"))
        return None
    return RedisBus(client, config.cache.redis_prefix, reactor, deliver, gone)


def share_gateway(top: Any, gateway: Any, config: Config, reactor: Any,
                  worker: Any = None) -> Optional[SchedulerShare]:
    """Share this gateway process's scheduler events: with its sibling
    workers through the supervisor (``worker``), or, a single process, with
    other gateways through Redis. None when there is nobody to share with."""
    if config.balancer.algorithm != "inference":
        return None
    if worker is None and not cluster_redis_url(config):
        return None
    share = SchedulerShare(reactor, lambda: gateway.backends,
                           lambda: getattr(gateway.balancer, "index", None), lambda b: None)
    bus = None
    if worker is not None:
        def send(batch: Any) -> None:
            if worker.channel is not None:
                worker.channel.tell("share", b=batch)

        def apply(msg: Any) -> None:
            share.apply(msg.get("src"), msg.get("b"))

        share.send = send
        worker.handlers["share"] = apply
        worker.handlers["share_gone"] = lambda msg: share.drop(msg.get("src"))
    else:
        bus = make_bus(config, reactor, share.apply, share.drop)
        assert bus is not None
        share.send = lambda batch: bus.publish(SINGLE, batch)
        share.bus = bus
    gateway.share = share
    ShareService(share, bus).setServiceParent(top)
    return share


def share_supervisor(top: Any, supervisor: Any, config: Config,
                     reactor: Any) -> Optional[WorkerHub]:
    """The supervisor relays its workers' batches to each other and, with a
    Redis, to and from the other gateways."""
    if config.balancer.algorithm != "inference":
        return None
    hub = WorkerHub(supervisor)
    hub.bus = make_bus(config, reactor, hub.from_gateway, hub.gone)
    if hub.bus is not None:
        ShareService(bus=hub.bus).setServiceParent(top)
    return hub


__all__ = ["SchedulerShare", "RedisBus", "WorkerHub", "share_gateway", "share_supervisor"]
