"""Circuit breaker transitions, driven by a Clock."""

from twisted.internet.task import Clock

from ntonix.routing.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


def make(clock=None, **kw):
    clock = clock or Clock()
    changes = []
    b = CircuitBreaker(kw.pop("threshold", 3), kw.pop("recovery", 10.0), now=clock.seconds,
                       on_change=lambda old, new, why: changes.append((old, new)), **kw)
    return clock, b, changes


def test_opens_after_threshold_consecutive_failures_only():
    clock, b, changes = make()
    b.failed("x")
    b.failed("x")
    b.succeeded()  # not consecutive any more
    b.failed("x")
    b.failed("x")
    assert b.state == CLOSED and b.available()
    b.failed("boom")
    assert b.state == OPEN and not b.available() and not b.acquire()
    assert "3 consecutive failures, last: boom" in b.reason
    assert (b.opened_at, b.retry_at) == (0, 10)
    assert changes == [(CLOSED, OPEN)]


def test_half_open_admits_exactly_one_trial():
    clock, b, changes = make()
    for _ in range(3):
        b.failed("x")
    clock.advance(9.9)
    assert not b.acquire()
    clock.advance(0.1)
    assert b.available()
    assert b.acquire() and b.state == HALF_OPEN
    assert not b.available() and not b.acquire()  # the one trial is taken
    b.succeeded()
    assert b.state == CLOSED and b.acquire() and b.acquire()
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_failed_trial_reopens_with_doubled_wait_up_to_cap():
    clock, b, _ = make(max_wait=35.0)
    for _ in range(3):
        b.failed("x")
    waits = []
    for _ in range(4):
        clock.advance(b.retry_at - clock.seconds())
        assert b.acquire()
        b.failed("still down")
        waits.append(b.retry_at - clock.seconds())
    assert waits == [20, 35, 35, 35]
    clock.advance(35)
    assert b.acquire()
    b.succeeded()
    assert b.wait == 10  # success resets the wait
    for _ in range(3):
        b.failed("x")
    assert b.retry_at - clock.seconds() == 10


def test_trial_without_verdict_frees_the_slot():
    clock, b, _ = make()
    for _ in range(3):
        b.failed("x")
    clock.advance(10)
    assert b.acquire()
    b.release()  # the client left: no verdict
    assert b.state == HALF_OPEN and b.acquire()


def test_failure_of_a_request_started_before_opening_does_not_extend():
    clock, b, _ = make()
    for _ in range(3):
        b.failed("x")
    b.failed("late")
    assert b.retry_at == 10


def test_operator_reset_and_force_open():
    clock, b, _ = make()
    b.force_open("operator")
    assert b.state == OPEN and b.reason == "operator"
    b.reset()
    assert b.state == CLOSED and b.available()
