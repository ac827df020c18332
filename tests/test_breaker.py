"""The per-key circuit breaker on a manual clock."""

from __future__ import annotations

from gateway.breaker import Breakers, BreakerState, Permit
from gateway.clock import ManualClock


def test_opens_after_the_threshold_of_failures_in_a_row() -> None:
    breakers = Breakers(ManualClock(), failures=3, open_s=10)
    assert breakers.failure("a") is False
    assert breakers.failure("a") is False
    breakers.success("a")  # a success in between starts the count again
    assert [breakers.failure("a") for _ in range(3)] == [False, False, True]
    assert breakers.state("a") is BreakerState.OPEN
    assert breakers.allow("a") is Permit.DENY
    assert breakers.allow("b") is Permit.PASS


def test_one_probe_after_the_rest_then_closed_or_open_again() -> None:
    clock = ManualClock()
    breakers = Breakers(clock, failures=1, open_s=10)
    breakers.failure("a")
    clock.advance(9.5)
    assert breakers.allow("a") is Permit.DENY
    assert breakers.retry_after("a") == 1
    clock.advance(0.5)
    assert breakers.state("a") is BreakerState.HALF_OPEN
    assert breakers.allow("a") is Permit.PROBE
    assert breakers.allow("a") is Permit.DENY  # only one probe at a time
    assert breakers.failure("a") is True  # the probe failed: a full rest again
    assert breakers.state("a") is BreakerState.OPEN
    assert breakers.retry_after("a") == 10
    clock.advance(10)
    assert breakers.allow("a") is Permit.PROBE
    assert breakers.success("a") is True
    assert breakers.state("a") is BreakerState.CLOSED
    assert breakers.allow("a") is Permit.PASS


def test_an_abandoned_probe_lets_the_next_caller_probe() -> None:
    clock = ManualClock()
    breakers = Breakers(clock, failures=1, open_s=5)
    breakers.failure("a")
    clock.advance(5)
    assert breakers.allow("a") is Permit.PROBE
    breakers.abandon("a")
    assert breakers.allow("a") is Permit.PROBE


def test_threshold_zero_never_opens() -> None:
    breakers = Breakers(ManualClock(), failures=0, open_s=5)
    assert not any(breakers.failure("a") for _ in range(100))
    assert breakers.allow("a") is Permit.PASS
