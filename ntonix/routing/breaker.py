"""The circuit breaker of one backend: a pure state machine over a clock.

closed: traffic flows; ``failure_threshold`` consecutive failures open it.
open: nothing is sent until ``retry_at``; then it is half-open.
half-open: exactly one trial (a request or a health check) goes through; its
success closes the circuit, its failure opens it again with the wait doubled,
up to ``max_wait``.
"""

from typing import Callable, Optional

import attrs

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


@attrs.define
class CircuitBreaker:
    failure_threshold: int
    recovery_seconds: float
    now: Callable[[], float]
    max_wait: float = 300.0
    on_change: Optional[Callable[[str, str, str], None]] = None
    state: str = CLOSED
    failures: int = 0
    wait: float = attrs.field(default=0.0)
    opened_at: Optional[float] = None
    retry_at: Optional[float] = None
    trial_taken: bool = False
    reason: str = "started"
    changed_at: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.wait = self.recovery_seconds
        self.changed_at = self.now()

    def _move(self, state: str, reason: str) -> None:
        old, self.state = self.state, state
        self.reason = reason
        self.changed_at = self.now()
        if self.on_change is not None and old != state:
            self.on_change(old, state, reason)

    def _due(self) -> bool:
        return self.state == OPEN and self.retry_at is not None and self.now() >= self.retry_at

    def available(self) -> bool:
        """Whether a request could be sent now (without taking a trial slot)."""
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN:
            return not self.trial_taken
        return self._due()

    def acquire(self) -> bool:
        """Take the right to send one request; False when the circuit says no."""
        if self.state == CLOSED:
            return True
        if self._due():
            self._move(HALF_OPEN, f"trial after {self.wait:g}s open")
        if self.state == HALF_OPEN and not self.trial_taken:
            self.trial_taken = True
            return True
        return False

    def release(self) -> None:
        """The request ended with no verdict (its client left): free the trial."""
        if self.state == HALF_OPEN:
            self.trial_taken = False

    def succeeded(self) -> None:
        self.failures = 0
        if self.state != CLOSED:
            self.trial_taken = False
            self.wait = self.recovery_seconds
            self.opened_at = self.retry_at = None
            self._move(CLOSED, "trial succeeded")

    def failed(self, reason: str) -> None:
        if self.state == HALF_OPEN:
            self.trial_taken = False
            self.wait = min(self.wait * 2, self.max_wait)
            self._open(f"trial failed: {reason}")
            return
        if self.state == OPEN:
            return  # a request that started before it opened
        self.failures += 1
        if self.failures >= self.failure_threshold:
            self._open(f"{self.failures} consecutive failures, last: {reason}")

    def force_open(self, reason: str) -> None:
        self._open(reason)

    def reset(self) -> None:
        self.failures = 0
        self.trial_taken = False
        self.wait = self.recovery_seconds
        self.opened_at = self.retry_at = None
        self._move(CLOSED, "reset by operator")

    def _open(self, reason: str) -> None:
        self.opened_at = self.now()
        self.retry_at = self.opened_at + self.wait
        self._move(OPEN, reason)
