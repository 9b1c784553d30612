"""The slot broker: backend concurrency limits and the admission queue, exact
across the workers of one gateway.

With ``server.workers`` > 1 each worker sees only its own requests, so a
backend with ``max_concurrency: 4`` would get 4 from each. When some backend
has a limit (or ``balancer.backend_queue_limit`` is set), a worker asks the
supervisor for a slot before it sends a request (``slot_acquire``, with its
candidates in its balancer's order of preference, the tenant, the priority
class and the tenant's weight), and gives it back when the attempt ends
(``slot_release``). The broker holds the fleet-wide count per backend and
runs the same admission queue a single gateway runs (``routing/admission.py``:
classes first, weighted fair order within a class, shedding and eviction,
timeouts, Retry-After from the drain rate), over every worker's waiting
requests at once: a slot freed on any worker goes to the gateway's next
waiter, and a flood on one worker is compared with a small tenant on
another.

What is exact: the count of requests in flight per backend (never above its
limit), and the order in which waiters are admitted. When a worker dies, its
slots come back at once (the kernel closed its upstream connections with it)
and its waiting requests leave the queue. When a worker gives up a wait (its
client left), its ``slot_cancel`` takes the request out; a grant that crosses
a cancel is given back by the worker.
"""

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from twisted.logger import Logger

from ntonix.routing.admission import Admission, Waiter
from ntonix.routing.fleet import Settings

log = Logger(namespace="ntonix.workers.broker")

# How often the broker looks for waits that ran out, while some request waits.
EXPIRY_TICK = 0.05
# Bounds on what one worker's message may ask (anything larger is refused).
MAX_PREFS = 1024
MAX_TEXT = 256


class Ask:
    """One worker's request waiting for a slot: what Admission asks of an
    exchange."""

    __slots__ = ("broker", "worker", "id", "tenant", "priority", "weight", "prefs", "model",
                 "tried", "same_backend_ok", "waiter", "deadline_at", "info", "queued_at",
                 "answered")

    def __init__(self, broker: "SlotBroker", worker: int, ask_id: int, tenant: str,
                 priority: str, weight: float, prefs: List[str], now: float) -> None:
        self.broker = broker
        self.worker = worker
        self.id = ask_id
        self.tenant = tenant
        self.priority = priority
        self.weight = weight
        self.prefs = prefs
        # Admission remembers room per "model" within one pick: asks with the
        # same candidates in the same order have the same room.
        self.model = tuple(prefs)
        self.tried: Tuple[()] = ()
        self.same_backend_ok = False
        self.waiter: Optional[Waiter] = None
        self.deadline_at: Optional[float] = None
        self.info = None
        self.queued_at = now
        self.answered = False

    # -- Admission's answers
    def send(self, room: List[str]) -> None:
        self.broker.grant(self, room[0])

    def no_backend(self) -> None:
        self.broker.answer(self, {"op": "slot_none"})

    def refused(self, why: str, reason: str, retry_after: int) -> None:
        self.broker.answer(self, {"op": "slot_refused", "why": why, "reason": reason,
                                  "retry_after": retry_after})


class BrokerFleet(Settings):
    """Admission's view of the gateway's backends, as the broker knows them:
    slots held per backend name, and the limits the workers sent."""

    limited = True
    may_wait = True

    def __init__(self, config: Callable[[], Any]) -> None:
        super().__init__(config)
        self.held: Dict[str, int] = {}
        self.caps: Dict[str, int] = {}
        # Backends whose own metrics report a queue over the limit (from
        # worker 0's view, copied at each fleet sync).
        self.queue_over: frozenset = frozenset()
        self.weights: Dict[str, float] = {}

    def weight_of(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def room(self, ask: Ask) -> List[str]:
        if not ask.prefs:
            raise LookupError
        held, caps, over = self.held, self.caps, self.queue_over
        return [n for n in ask.prefs
                if (not caps.get(n) or held.get(n, 0) < caps[n]) and n not in over]

    def slots_json(self) -> List[Dict[str, Any]]:
        names = sorted(set(self.held) | set(self.caps))
        return [{"name": n, "in_flight": self.held.get(n, 0),
                 "max_concurrency": self.caps.get(n) or None} for n in names]


class SlotBroker:
    """Lives in the supervisor; ``send(worker, message)`` reaches a worker."""

    def __init__(self, config: Callable[[], Any], clock: Any,
                 send: Callable[[int, Dict[str, Any]], None]) -> None:
        self.clock = clock
        self.send = send
        self.fleet = BrokerFleet(config)
        self.admission = Admission(self.fleet, clock)  # type: ignore[arg-type]
        self.admission.on_wait = self._waited
        self.by_worker: Dict[int, Dict[str, int]] = {}
        self.asks: Dict[Tuple[int, int], Ask] = {}
        # Waiting asks in arrival order: a wait's deadline is its arrival
        # plus the one queue timeout, so the oldest runs out first.
        self.arrivals: Deque[Ask] = deque()
        self._expiry: Any = None
        self.grants = 0

    # -- a worker's messages
    def acquire(self, worker: int, msg: Dict[str, Any]) -> None:
        try:
            ask_id = int(msg["id"])
            prefs = [str(n)[:MAX_TEXT] for n in msg["prefs"]][:MAX_PREFS]
            caps = [max(0, int(c)) for c in msg["caps"]][:MAX_PREFS]
            tenant = str(msg["tenant"])[:MAX_TEXT]
            priority = str(msg["priority"])
            weight = float(msg.get("weight", 1.0))
        except (KeyError, TypeError, ValueError):
            log.warn("worker {worker}: a slot request that does not parse, ignored",
                     worker=worker)
            return
        if priority not in self.admission.queues or not weight > 0:
            priority, weight = "standard", 1.0
        for name, cap in zip(prefs, caps):
            self.fleet.caps[name] = cap
        # Only weights other than 1 are kept: those of configured classes,
        # a bounded set (any client can make a new tenant).
        if weight != 1.0:
            self.fleet.weights[tenant] = weight
        else:
            self.fleet.weights.pop(tenant, None)
        ask = Ask(self, worker, ask_id, tenant, priority, weight, prefs, self.clock.seconds())
        self.asks[(worker, ask_id)] = ask
        self.admission.admit(ask)
        if ask.waiter is not None and not ask.answered:
            self.arrivals.append(ask)
            self._arm()

    def release(self, worker: int, msg: Dict[str, Any]) -> None:
        mine = self.by_worker.get(worker, {})
        for name, n in (msg.get("backends") or {}).items():
            try:
                n = min(int(n), mine.get(name, 0))  # never more than it holds
            except (TypeError, ValueError):
                continue
            if n <= 0:
                continue
            mine[name] -= n
            self.fleet.held[name] = max(0, self.fleet.held.get(name, 0) - n)
            for _ in range(n):
                self.admission.released()

    def cancel(self, worker: int, msg: Dict[str, Any]) -> None:
        for ask_id in msg.get("ids") or ():
            ask = self.asks.pop((worker, ask_id), None) if isinstance(ask_id, int) else None
            if ask is not None and ask.waiter is not None:
                ask.answered = True
                self.admission.leave(ask.waiter)
                ask.waiter = None

    def worker_ended(self, worker: int) -> None:
        """Its slots come back and its waits end (nobody is left to answer)."""
        for key in [k for k in self.asks if k[0] == worker]:
            ask = self.asks.pop(key)
            ask.answered = True
            if ask.waiter is not None:
                self.admission.leave(ask.waiter)
        held = self.by_worker.pop(worker, {})
        freed = 0
        for name, n in held.items():
            if n > 0:
                self.fleet.held[name] = max(0, self.fleet.held.get(name, 0) - n)
                freed += n
        if freed:
            log.info("worker {worker} ended holding {n} slot(s): given back", worker=worker,
                     n=freed)
        if self.admission.waiting:
            self.admission.pump()

    # -- Admission's decisions, to the workers
    def grant(self, ask: Ask, name: str) -> None:
        self.asks.pop((ask.worker, ask.id), None)
        ask.answered = True
        self.fleet.held[name] = self.fleet.held.get(name, 0) + 1
        mine = self.by_worker.setdefault(ask.worker, {})
        mine[name] = mine.get(name, 0) + 1
        self.grants += 1
        self.send(ask.worker, {"op": "slot_grant", "id": ask.id, "backend": name,
                               "waited": round(self.clock.seconds() - ask.queued_at, 6)})

    def answer(self, ask: Ask, msg: Dict[str, Any]) -> None:
        self.asks.pop((ask.worker, ask.id), None)
        ask.answered = True
        self.send(ask.worker, {**msg, "id": ask.id})

    def _waited(self, priority: str, seconds: float) -> None:
        pass  # each worker observes its own requests' waits (in the grant)

    # -- waits that run out
    def _arm(self) -> None:
        if self._expiry is None or not self._expiry.active():
            self._expiry = self.clock.callLater(EXPIRY_TICK, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        timeout = self.fleet.balancer_settings.queue_timeout_seconds
        now = self.clock.seconds()
        arrivals = self.arrivals
        while arrivals and (arrivals[0].answered or arrivals[0].waiter is None
                            or arrivals[0].waiter.done):
            arrivals.popleft()
        while arrivals and arrivals[0].queued_at + timeout <= now:
            ask = arrivals.popleft()
            if not ask.answered and ask.waiter is not None and not ask.waiter.done:
                self.admission.timed_out(ask)
        if arrivals:
            self._arm()

    def set_queue_over(self, names: List[str]) -> None:
        """Worker 0's view: these backends report a queue over the limit."""
        before = self.fleet.queue_over
        self.fleet.queue_over = frozenset(names)
        if before - self.fleet.queue_over and self.admission.waiting:
            self.admission.pump()

    def close(self) -> None:
        self.admission.close()
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()

    def exposition(self) -> str:
        """The queue's length per class, as the workers' pages name it (the
        supervisor's merge sums it with theirs, which are 0 while the
        broker holds the queue)."""
        lines = ["# HELP ntonix_queue_length Requests waiting for a free backend",
                 "# TYPE ntonix_queue_length gauge"]
        lines += [f'ntonix_queue_length{{priority="{p}"}} {q.count}.0'
                  for p, q in self.admission.queues.items()]
        return "\n".join(lines) + "\n"

    def as_json(self) -> Dict[str, Any]:
        doc = self.admission.as_json()
        doc["scope"] = "gateway (every worker)"
        doc["granted"] = self.grants
        return doc
