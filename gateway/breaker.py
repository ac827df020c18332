"""A circuit breaker per upstream key: stop calling a key that keeps failing, probe it again later.

Failures are the upstream's own trouble (no connection, reset, timeout, 5xx), not answers about the key
(quota, rate limit, refused key: the pool handles those) nor about the request (4xx).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import StrEnum

from .clock import Clock

log = logging.getLogger("agnes_gateway.breaker")


class BreakerState(StrEnum):
    CLOSED = "closed"  # calls go through
    OPEN = "open"  # calls are kept off the key until the rest period is over
    HALF_OPEN = "half_open"  # one probe call is under way; the others wait for its outcome


class Permit(StrEnum):
    PASS = "pass"
    PROBE = "probe"  # the one call that tests whether an open circuit can close
    DENY = "deny"


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class Breakers:
    """The breakers of all keys, on the injected clock's monotonic time."""

    def __init__(self, clock: Clock, failures: int, open_s: float) -> None:
        self.clock = clock
        self.threshold = failures
        self.open_s = open_s
        self._circuits: dict[str, _Circuit] = {}

    def state(self, key: str) -> BreakerState:
        circuit = self._circuits.get(key)
        if circuit is None or circuit.opened_at is None:
            return BreakerState.CLOSED
        if circuit.probing or self._rested(circuit):
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self, key: str) -> Permit:
        """Whether a call may go to `key` now; after the rest, the first caller becomes the probe."""
        circuit = self._circuits.get(key)
        if circuit is None or circuit.opened_at is None:
            return Permit.PASS
        if circuit.probing or not self._rested(circuit):
            return Permit.DENY
        circuit.probing = True
        log.info("key %s: circuit half open, probing upstream", key)
        return Permit.PROBE

    def retry_after(self, key: str) -> int:
        """Whole seconds until `key` may be probed again (at least 1)."""
        circuit = self._circuits.get(key)
        if circuit is None or circuit.opened_at is None:
            return 1
        left = circuit.opened_at + self.open_s - self.clock.monotonic()
        return max(1, math.ceil(left))

    def success(self, key: str) -> bool:
        """Upstream answered: the key's circuit closes; True when it was open."""
        circuit = self._circuits.pop(key, None)
        if circuit is None or circuit.opened_at is None:
            return False
        log.info("key %s: circuit closed, upstream answers again", key)
        return True

    def failure(self, key: str) -> bool:
        """Upstream failed on `key`; True when this opened (or re-opened) its circuit."""
        if self.threshold <= 0:
            return False
        circuit = self._circuits.setdefault(key, _Circuit())
        circuit.failures += 1
        if circuit.probing or (circuit.opened_at is None and circuit.failures >= self.threshold):
            circuit.opened_at = self.clock.monotonic()
            circuit.probing = False
            log.warning(
                "key %s: circuit open after %d failure(s) in a row; no calls for %g s",
                key,
                circuit.failures,
                self.open_s,
            )
            return True
        return False

    def abandon(self, key: str) -> None:
        """A probe ended without telling anything (e.g. cancelled): let the next caller probe."""
        circuit = self._circuits.get(key)
        if circuit is not None:
            circuit.probing = False

    def _rested(self, circuit: _Circuit) -> bool:
        return circuit.opened_at is not None and self.clock.monotonic() >= circuit.opened_at + self.open_s
