"""Deadlines checked by one periodic sweep instead of a timer each.

A request crosses several deadlines (its head, its body, the backend's first
byte, silence between chunks), each set and cleared within microseconds when
all goes well. A Twisted timer per deadline is a heap push, a cancel, and a
move each time a deadline is pushed back: on the hot path that costs more
than the deadline is worth. Here each object keeps its own deadline as a
plain number and a sweep a few times a second asks every live object to
check it; a deadline is noticed at most one interval late.
"""

from typing import Any, Iterable, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

log = Logger(namespace="ntonix.deadlines")


class DeadlineSweep:
    """Calls ``check(now)`` on every item of ``items`` every ``interval``
    seconds while there are any."""

    def __init__(self, clock: Any, interval: float, items: Optional[Iterable[Any]] = None
                 ) -> None:
        self.clock = clock
        self.interval = interval
        self.items: Any = items if items is not None else set()
        self.timer: Optional[IDelayedCall] = None

    def add(self, item: Any) -> None:
        self.items.add(item)
        if self.timer is None:
            self.timer = self.clock.callLater(self.interval, self._sweep)

    def discard(self, item: Any) -> None:
        self.items.discard(item)

    def _sweep(self) -> None:
        self.timer = None
        now = self.clock.seconds()
        for item in list(self.items):
            try:
                item.check(now)
            except Exception:
                log.failure("checking a deadline of {item!r}", item=item)
        # A check may have added an item, and armed the timer already.
        if self.items and self.timer is None:
            self.timer = self.clock.callLater(self.interval, self._sweep)

    def stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
