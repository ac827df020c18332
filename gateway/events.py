"""What the gateway reports as it works; metrics subclass this, the default does nothing."""

from __future__ import annotations


class Events:
    """Hooks called on the hot path: keep implementations cheap and non-blocking."""

    def upstream_call(self, key: str, operation: str, outcome: str, seconds: float) -> None:
        """An upstream call ended: `outcome` is an `Outcome` value or timeout/unreachable/broken."""

    def failover(self, reason: str) -> None:
        """A create moved on to the next key: quota, rate_limit, auth or error."""

    def exhausted(self) -> None:
        """A create was refused because no key could take it."""

    def task_created(self, key: str, client: str) -> None:
        """Upstream accepted a task and its route is recorded."""

    def circuit(self, key: str, state: str) -> None:
        """A key's circuit breaker opened or closed again: `open` or `closed`."""

    def overloaded(self) -> None:
        """A request was refused with 503 because the upstream slots and the queue were full."""
