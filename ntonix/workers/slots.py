"""A worker's side of the slot broker (``broker.py``): requests that may
have to wait for room ask the supervisor for a slot, and give it back.

Only where some backend has a limit: without one, a request goes straight to
its backend as in a single gateway, and this costs nothing. With one, a
request costs one message out and one back before it is sent, and one
message when its attempt ends; the messages of one reactor turn leave in one
write.

The broker answers a wait that runs out itself (with the gateway's
Retry-After). A worker whose supervisor does not answer at all gives up
after the queue timeout and a grace (``BACKSTOP_SECONDS``) with a 429, and
fails every wait at once with a 503 when the supervisor is gone.
"""

from typing import Any, Callable, Dict, Optional

import attrs
from twisted.logger import Logger

from ntonix.routing.admission import QUEUE_TIMEOUT, Admission
from ntonix.routing.fleet import Fleet

log = Logger(namespace="ntonix.workers.slots")

BACKSTOP_SECONDS = 2.0


@attrs.define(eq=False)
class RemoteWait:
    """An exchange's place in the broker's queue (its ``waiter``)."""

    id: int
    queued_at: float
    priority: str


class SlotClient:
    def __init__(self, fleet: Fleet, admission: Admission, balancer: Callable[[], Any],
                 tell: Callable[..., None], clock: Any) -> None:
        self.fleet = fleet
        self.admission = admission
        self.balancer = balancer  # a getter: SIGHUP may replace the balancer
        self.tell = tell
        self.clock = clock
        self.waiting: Dict[int, Any] = {}  # ask id -> exchange
        self.next_id = 0
        # Releases and cancels of one reactor turn go together.
        self._releases: Dict[str, int] = {}
        self._cancels: list = []
        self._flush_call: Any = None
        self.lost = False

    # -- the exchange's side (through Admission)
    def acquire(self, exchange: Any) -> None:
        if self.lost:
            exchange.no_backend()
            return
        try:
            cands = self.fleet.eligible(exchange)
        except LookupError:
            exchange.no_backend()
            return
        prefs = self.balancer().rank(cands, exchange.route) if len(cands) > 1 else cands
        self.next_id += 1
        n = self.next_id
        now = self.clock.seconds()
        exchange.waiter = RemoteWait(n, now, exchange.priority)
        # The broker answers a timeout itself; this fires only if it cannot.
        exchange.deadline_at = now + \
            self.fleet.balancer_settings.queue_timeout_seconds + BACKSTOP_SECONDS
        self.waiting[n] = exchange
        tenant = exchange.tenant
        self.tell("slot_acquire", id=n, prefs=[b.name for b in prefs],
                  caps=[b.max_concurrency for b in prefs], tenant=tenant,
                  priority=exchange.priority, weight=self.admission.weight_of(tenant))

    def leave(self, wait: RemoteWait) -> None:
        """The client went away while it waited."""
        if self.waiting.pop(wait.id, None) is not None:
            self._cancels.append(wait.id)
            self._soon()

    def timed_out(self, exchange: Any) -> None:
        """The broker never answered (the supervisor is stuck)."""
        wait = exchange.waiter
        self.leave(wait)
        exchange.waiter = None
        log.warn("request {request_id}: no answer from the slot broker within the queue "
                 "timeout", request_id=exchange.request_id)
        exchange.refused("no backend slot could be had in time (the gateway's slot broker "
                         "did not answer)", QUEUE_TIMEOUT,
                         self.admission.retry_after())

    def release(self, backend: Any) -> None:
        """An attempt that held a slot ended."""
        if self.lost:
            return
        self._releases[backend.name] = self._releases.get(backend.name, 0) + 1
        self._soon()

    def _soon(self) -> None:
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        if self._releases:
            releases, self._releases = self._releases, {}
            self.tell("slot_release", backends=releases)
        if self._cancels:
            cancels, self._cancels = self._cancels, []
            self.tell("slot_cancel", ids=cancels)

    # -- the broker's answers
    def _take(self, msg: Dict[str, Any]) -> Optional[Any]:
        ex = self.waiting.pop(msg.get("id"), None)  # type: ignore[arg-type]
        if ex is None or ex.done or ex.waiter is None:
            return None
        return ex

    def granted(self, msg: Dict[str, Any]) -> None:
        name = msg.get("backend")
        ex = self._take(msg)
        if ex is None:
            # Crossed a cancel, or for an exchange that ended: give it back.
            self._releases[name] = self._releases.get(name, 0) + 1
            self._soon()
            return
        wait, ex.waiter, ex.deadline_at = ex.waiter, None, None
        backend = self.fleet.find(name) if isinstance(name, str) else None
        if backend is None or not backend.available:
            # It went away since the ask: back, and ask again.
            if isinstance(name, str):
                self._releases[name] = self._releases.get(name, 0) + 1
                self._soon()
            self.acquire(ex)
            return
        adm = self.admission
        adm.admitted[wait.priority] = adm.admitted.get(wait.priority, 0) + 1
        waited = float(msg.get("waited") or 0.0)
        if waited > 0:
            key = (wait.priority, adm.label(ex.tenant))
            adm.queued[key] = adm.queued.get(key, 0) + 1
            if ex.info is not None:
                ex.info.queue_seconds = waited
            adm.on_wait(wait.priority, waited)
        ex.remote_slot = True
        try:
            ex.send([backend])
        except Exception:
            # A bug of ours: never a slot held for nothing, never a client
            # left hanging (the exchange answers 500, as on one process).
            if ex.backend is not backend:
                ex.remote_slot = False
                self.release(backend)
            ex._bug()
            return
        if ex.backend is not backend:
            # Not sent after all (its circuit's one trial was taken).
            ex.remote_slot = False
            self.release(backend)

    def refused(self, msg: Dict[str, Any]) -> None:
        ex = self._take(msg)
        if ex is None:
            return
        reason = str(msg.get("reason") or QUEUE_TIMEOUT)
        adm = self.admission
        key = (ex.priority, adm.label(ex.tenant), reason)
        adm.refused[key] = adm.refused.get(key, 0) + 1
        ex.waiter = None
        ex.deadline_at = None
        ex.refused(str(msg.get("why") or "the fleet is saturated"), reason,
                   int(msg.get("retry_after") or 1))

    def none(self, msg: Dict[str, Any]) -> None:
        ex = self._take(msg)
        if ex is not None:
            ex.waiter = None
            ex.deadline_at = None
            ex.no_backend()

    def supervisor_gone(self) -> None:
        self.lost = True
        waiting, self.waiting = self.waiting, {}
        for ex in waiting.values():
            if not ex.done and ex.waiter is not None:
                ex.waiter = None
                ex.deadline_at = None
                ex.no_backend()

    def handlers(self) -> Dict[str, Callable[[Dict[str, Any]], None]]:
        """The channel ops this client answers."""
        return {"slot_grant": self.granted, "slot_refused": self.refused,
                "slot_none": self.none}
