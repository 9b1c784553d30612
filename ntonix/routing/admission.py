"""Admission: who may go to a backend now, who waits, who is refused.

A backend has room while it has fewer requests in flight than its
``max_concurrency`` (and, with ``balancer.backend_queue_limit``, while its
metrics report no longer a queue than that). A request for which no eligible
backend has room waits here, before anything is sent upstream, for at most
``balancer.queue_timeout_seconds``; a full queue or a wait that runs out is a
429 with a Retry-After computed from how fast the fleet has been finishing
requests lately.

Order: higher priority classes first (``critical``, ``standard``,
``sheddable``); within a class, tenants in weighted fair order, so a
tenant that floods the gateway waits behind its own requests, not in front of
everyone else's. A request is admitted the moment a slot frees, one per slot:
the freed slot is taken before anything else runs, so there is no herd.
Sheddable requests are refused without waiting once the queue is
``balancer.sheddable_queue_share`` full, and a full queue makes room for a
higher class by refusing its newest lowest-class request (``shed``), and
within a class for a tenant under its share by refusing the newest request
of the tenant furthest over it (``queue_full``).

A tenant is named by a trusted proxy's tenant header, by the credential map,
or is the keyed hash of the credential (never the credential itself), or
``anonymous`` (``identity.py``).
"""

import math
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple

import attrs
from twisted.logger import Logger

from ntonix.config import PRIORITIES
from ntonix.identity import ANONYMOUS

if TYPE_CHECKING:
    from ntonix.routing.fleet import Fleet

log = Logger(namespace="ntonix.routing.admission")

OTHER = "other"
# Finished requests remembered for the drain rate (the last 10 s, bounded).
RATE_WINDOW = 10.0
RATE_SAMPLES = 4096
# The refusal reasons, as the error code and the metric's label say them.
QUEUE_FULL, QUEUE_TIMEOUT, SHED = "queue_full", "queue_timeout", "shed"
# Requests of one tenant looked at for one that can go now.
SCAN_DEPTH = 32


@attrs.define(eq=False)
class Waiter:
    exchange: Any
    tenant: str
    priority: str
    queued_at: float
    done: bool = False
    tag: float = 0.0  # its place in fair order within its class


class ClassQueue:
    """One priority class: per-tenant FIFO queues, served in weighted fair
    order (virtual finish times, as in weighted fair queueing): each request is tagged, when it
    arrives, with its tenant's virtual finish time, ``max(now, the
    tenant's last tag) + 1 / weight``, and the smallest tag among the
    tenants' first requests goes next. A tenant with a backlog therefore
    gets its weight's share, and a tenant that was idle starts at "now",
    with no credit saved up."""

    def __init__(self) -> None:
        self.tenants: Dict[str, Deque[Waiter]] = {}
        self.last_tag: Dict[str, float] = {}
        self.vtime = 0.0
        self.count = 0

    def push(self, w: Waiter, weight: float) -> None:
        q = self.tenants.get(w.tenant)
        if q is None:
            q = self.tenants[w.tenant] = deque()
        w.tag = max(self.vtime, self.last_tag.get(w.tenant, 0.0)) + 1.0 / weight
        self.last_tag[w.tenant] = w.tag
        q.append(w)
        self.count += 1

    def remove(self, w: Waiter) -> None:
        q = self.tenants.get(w.tenant)
        if q is None:
            return
        try:
            q.remove(w)
        except ValueError:
            return
        self.count -= 1
        if not q:
            self._drop(w.tenant)

    def _drop(self, tenant: str) -> None:
        del self.tenants[tenant]
        if self.last_tag.get(tenant, 0.0) <= self.vtime:
            self.last_tag.pop(tenant, None)

    def newest(self) -> Optional[Waiter]:
        best = None
        for q in self.tenants.values():
            if q and (best is None or q[-1].queued_at >= best.queued_at):
                best = q[-1]
        return best

    def pop(self, can_admit: Any) -> Optional[Waiter]:
        """The next request in fair order among those whose model has room
        somewhere, or None. Within a tenant, the first of its requests that
        can go (one for a model with no room does not hold back one for a
        model with room); a bounded look at each tenant's queue."""
        best: Optional[Waiter] = None
        for q in self.tenants.values():
            for i, w in enumerate(q):
                if i >= SCAN_DEPTH or (best is not None and w.tag >= best.tag):
                    break
                if can_admit(w):
                    best = w
                    break
        if best is None:
            return None
        q = self.tenants[best.tenant]
        if q[0] is best:
            q.popleft()
        else:
            q.remove(best)
        self.count -= 1
        self.vtime = best.tag
        if not q:
            self._drop(best.tenant)
        if len(self.last_tag) > 2 * len(self.tenants) + 64:
            # Tenants gone from the queue keep a tag only while it is ahead
            # of the clock; drop the rest (bounded memory for any number).
            vt = self.vtime
            for t in [t for t, tag in self.last_tag.items()
                      if tag <= vt and t not in self.tenants]:
                del self.last_tag[t]
        return best


class Admission:
    """The queue in front of the fleet.

    ``fleet`` answers which backends have room for a request (``room``),
    whether requests may wait at all (``may_wait``), the settings in force
    and tenants' weights: the gateway's own ``Fleet``, or the slot broker's
    view of the whole gateway when it runs as several workers. ``remote``,
    when set, takes every request that may wait: the workers' shared queue.
    """

    def __init__(self, fleet: "Fleet", clock: Any) -> None:
        self.fleet = fleet
        self.clock = clock
        self.remote: Any = None
        # Told how long each admitted request waited (the metrics).
        self.on_wait: Callable[[str, float], None] = lambda priority, seconds: None
        self.queues: Dict[str, ClassQueue] = {p: ClassQueue() for p in PRIORITIES}
        self.finished: Deque[float] = deque(maxlen=RATE_SAMPLES)
        self.tracked: Dict[str, None] = {}
        # Counters: (priority, tenant label) -> n; refusals also by reason.
        self.queued: Dict[Tuple[str, str], int] = {}
        self.admitted: Dict[str, int] = {p: 0 for p in PRIORITIES}
        self.refused: Dict[Tuple[str, str, str], int] = {}
        self.waiting = 0
        self._memo: Dict[Any, bool] = {}
        self._pump_call: Any = None

    # -- configuration-derived facts
    @property
    def total(self) -> int:
        """Requests waiting, all classes (kept as a count: read per request)."""
        return self.waiting

    def tenant_of(self, claim: Optional[Tuple[Optional[bytes], Optional[bytes]]]) -> str:
        """The tenant of a request that claims (tenant header value from a
        trusted proxy, credential)."""
        if claim is None:
            return ANONYMOUS
        return self.fleet.identity.tenant(*claim)

    def priority_of(self, claim: Optional[Tuple[Optional[bytes], Optional[bytes]]]) -> str:
        t = self.fleet.tenant_settings
        if not t.classes:
            return t.default_priority  # no tenant named: no hash to compute
        cls = t.classes.get(self.tenant_of(claim))
        return cls.get("priority", t.default_priority) if cls else t.default_priority

    def weight_of(self, tenant: str) -> float:
        return self.fleet.weight_of(tenant)

    def label(self, tenant: str) -> str:
        """A bounded metrics label: the first ``tenants.max_tracked``
        tenants seen have their own, the rest share ``other``."""
        if tenant in self.tracked:
            return tenant
        if len(self.tracked) < self.fleet.tenant_settings.max_tracked:
            self.tracked[tenant] = None
            return tenant
        return OTHER

    # -- room
    def room(self, exchange: Any) -> List[Any]:
        """Candidates for ``exchange`` with room; raises LookupError when it
        has no candidate at all (every backend down or not serving it)."""
        return self.fleet.room(exchange)

    # -- the request's side
    def admit(self, exchange: Any) -> None:
        """Send ``exchange`` now, or queue it, or refuse it."""
        if self.remote is not None and self.fleet.may_wait:
            self.remote.acquire(exchange)
            return
        try:
            room = self.room(exchange)
        except LookupError:
            exchange.no_backend()
            return
        if room and not self.waiting:
            self.admitted[exchange.priority] += 1
            exchange.send(room)
            return
        # With room for it, it waits only for its turn (the pump sends it in
        # this same call unless a request before it can use that room): no
        # full-queue or shed refusal for a request a backend can take now.
        self._enqueue(exchange, refuse=not room)
        self.pump()

    def _enqueue(self, exchange: Any, refuse: bool = True) -> None:
        bal = self.fleet.balancer_settings
        now = self.clock.seconds()
        priority = exchange.priority
        tenant = exchange.tenant
        total = self.total if refuse else 0
        if priority == "sheddable" and total >= bal.sheddable_queue_share * bal.queue_size:
            self._refuse(exchange, tenant, priority, SHED)
            return
        if refuse and total >= bal.queue_size:
            victim, reason = self._lowest_below(priority), SHED
            if victim is None:
                # Same class: the tenant furthest over its share gives up
                # its newest place, so a flood cannot keep others out.
                victim, reason = self._hog(priority, tenant), QUEUE_FULL
            if victim is None:
                self._refuse(exchange, tenant, priority, QUEUE_FULL)
                return
            self.queues[victim.priority].remove(victim)
            self.waiting -= 1
            victim.done = True
            self._refuse(victim.exchange, victim.tenant, victim.priority, reason)
        w = Waiter(exchange, tenant, priority, now)
        exchange.waiter = w
        exchange.deadline_at = now + bal.queue_timeout_seconds
        self.queues[priority].push(w, self.weight_of(tenant))
        self.waiting += 1
        key = (priority, self.label(tenant))
        self.queued[key] = self.queued.get(key, 0) + 1
        self._arm()

    def _lowest_below(self, priority: str) -> Optional[Waiter]:
        rank = PRIORITIES.index(priority)
        for p in reversed(PRIORITIES[rank + 1:]):
            w = self.queues[p].newest()
            if w is not None:
                return w
        return None

    def _hog(self, priority: str, tenant: str) -> Optional[Waiter]:
        """The newest request of the tenant with the most places per unit of
        weight in ``priority``, if it holds more than ``tenant`` would with
        one more."""
        q = self.queues[priority]
        mine = (len(q.tenants.get(tenant, ())) + 1) / self.weight_of(tenant)
        worst, worst_share = None, mine
        for t, waiting in q.tenants.items():
            share = len(waiting) / self.weight_of(t)
            if t != tenant and share > worst_share:
                worst, worst_share = waiting[-1], share
        return worst

    def leave(self, w: Any) -> None:
        """The client went away, or the wait ran out: out of the queue now."""
        if not isinstance(w, Waiter):
            self.remote.leave(w)  # waiting in the workers' shared queue
            return
        if not w.done:
            w.done = True
            self.queues[w.priority].remove(w)
            self.waiting -= 1

    def timed_out(self, exchange: Any) -> None:
        w = exchange.waiter
        if not isinstance(w, Waiter):
            self.remote.timed_out(exchange)
            return
        self.leave(w)
        self._refuse(exchange, w.tenant, w.priority, QUEUE_TIMEOUT)

    def _refuse(self, exchange: Any, tenant: str, priority: str, reason: str) -> None:
        key = (priority, self.label(tenant), reason)
        self.refused[key] = self.refused.get(key, 0) + 1
        bal = self.fleet.balancer_settings
        if reason == QUEUE_TIMEOUT:
            why = (f"the fleet is saturated: no backend had room within "
                   f"{bal.queue_timeout_seconds:g}s (balancer.queue_timeout_seconds)")
        elif reason == SHED:
            why = "the fleet is saturated: sheddable requests are refused while it is"
        else:
            why = (f"the fleet is saturated: {bal.queue_size} requests are already waiting "
                   "(balancer.queue_size)")
        exchange.refused(why, reason, self.retry_after())

    # -- the fleet's side
    def released(self) -> None:
        """A request to some backend ended: a slot may be free."""
        if self.fleet.limited:
            # The drain rate matters only where requests can wait.
            self.finished.append(self.clock.seconds())
        if self.waiting:
            self.pump()

    def pump(self) -> None:
        """Admit waiting requests while some backend has room for them."""
        while self.total:
            w = None
            self._memo: Dict[Any, bool] = {}  # room per model, for this one pick
            for p in PRIORITIES:
                q = self.queues[p]
                if q.count:
                    w = q.pop(self._can_admit)
                    if w is not None:
                        break
            if w is None:
                return
            self.waiting -= 1
            w.done = True
            ex = w.exchange
            ex.waiter = None
            ex.deadline_at = None
            waited = self.clock.seconds() - w.queued_at
            if ex.info is not None:
                ex.info.queue_seconds = waited
            self.on_wait(w.priority, waited)
            self.admitted[w.priority] += 1
            try:
                ex.send(self.room(ex))
            except LookupError:
                ex.no_backend()

    def _can_admit(self, w: Waiter) -> bool:
        ex = w.exchange
        memo = self._memo
        key = ex.model if not ex.tried else None
        if key is not None and key in memo:
            return memo[key]
        try:
            ok = bool(self.room(ex))
        except LookupError:
            ok = True  # let it through to its 503 rather than wait for nothing
        if key is not None:
            memo[key] = ok
        return ok

    def _arm(self) -> None:
        """While requests wait, look again now and then: a backend that
        recovers or whose queue drains frees room without any release."""
        if self._pump_call is None or not self._pump_call.active():
            self._pump_call = self.clock.callLater(0.1, self._tick)

    def _tick(self) -> None:
        self._pump_call = None
        try:
            self.pump()
        except Exception:
            log.failure("admitting waiting requests")
        if self.total:
            self._arm()

    def drain_rate(self) -> Optional[float]:
        """Requests the fleet finished per second, lately."""
        now = self.clock.seconds()
        while self.finished and self.finished[0] < now - RATE_WINDOW:
            self.finished.popleft()
        if len(self.finished) < 2:
            return None
        span = max(now - self.finished[0], 0.5)
        return len(self.finished) / span

    def retry_after(self) -> int:
        """Seconds until the queue ahead has probably drained: from the
        recent drain rate, between 1 and 60."""
        rate = self.drain_rate()
        if rate is None:
            return max(1, min(60, math.ceil(self.fleet.balancer_settings.queue_timeout_seconds)))
        return max(1, min(60, math.ceil((self.total + 1) / rate)))

    def close(self) -> None:
        if self._pump_call is not None and self._pump_call.active():
            self._pump_call.cancel()

    def as_json(self) -> Dict[str, Any]:
        now = self.clock.seconds()
        bal = self.fleet.balancer_settings
        tenants = []
        for p in PRIORITIES:
            for tenant, q in self.queues[p].tenants.items():
                tenants.append({"tenant": tenant, "priority": p, "waiting": len(q),
                                "weight": self.weight_of(tenant),
                                "oldest_wait_seconds": round(now - q[0].queued_at, 3)})
        rate = self.drain_rate()
        return {
            "waiting": self.total,
            "by_priority": {p: self.queues[p].count for p in PRIORITIES},
            "tenants": tenants,
            "queue_size": bal.queue_size, "queue_timeout_seconds": bal.queue_timeout_seconds,
            "drain_rate_per_second": None if rate is None else round(rate, 3),
            "retry_after_seconds": self.retry_after(),
            "admitted": dict(self.admitted),
            "refused": [{"priority": p, "tenant": t, "reason": r, "count": n}
                        for (p, t, r), n in sorted(self.refused.items())],
            "backends": self.fleet.slots_json(),
        }
