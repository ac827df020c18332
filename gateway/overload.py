"""Admission to upstream: a bounded number of calls in flight and a bounded, time-limited queue.

Beyond the queue the gateway refuses at once (503 with Retry-After) rather than letting requests,
their bodies and their sockets pile up in memory.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import GatewayError

RETRY_AFTER_S = 1


class Overloaded(GatewayError):
    """No upstream slot now and no room to wait for one."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "overloaded", message, retry_after=RETRY_AFTER_S)


class Admission:
    """At most `limit` holders at once; at most `max_queued` waiting, each for at most `queue_timeout_s`."""

    def __init__(self, limit: int, max_queued: int, queue_timeout_s: float) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self.queue_timeout_s = queue_timeout_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def slot(self) -> _Slot:
        """`async with admission.slot():` holds one slot for its body; raises `Overloaded` when refused."""
        return _Slot(self)

    async def _acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queued:
            raise Overloaded(f"the gateway is at its limit of {self.limit} upstream calls and {self.max_queued} queued")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # handed a slot just as the time ran out: keep it
            raise Overloaded(f"no upstream slot came free within {self.queue_timeout_s:g} s") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over just as the wait ended: pass it on
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        # The slot was handed over by `_release`: `active` already counts it.

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.active -= 1


class _Slot:
    """One use of `Admission.slot()` (a class, not a generator: it is on every upstream call's path)."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    async def __aenter__(self) -> None:
        await self._admission._acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._admission._release()
