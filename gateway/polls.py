"""Poll coalescing: polls of one task share one upstream call, and a fresh answer is reused for a moment."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .clock import Clock

T = TypeVar("T")


class PollCoalescer(Generic[T]):
    """Single-flight per task id, plus a short freshness window over the last good answer.

    Polls that arrive while one is in flight wait for it instead of calling upstream themselves; an
    answer that `keep` accepts is then served to repeated polls for `freshness_s` seconds (0: never).
    """

    def __init__(
        self,
        clock: Clock,
        freshness_s: float,
        keep: Callable[[T], bool] = lambda _: True,
        max_entries: int = 100_000,
    ) -> None:
        self.clock = clock
        self.freshness_s = freshness_s
        self.keep = keep
        self.max_entries = max_entries
        self._inflight: dict[str, asyncio.Future[T]] = {}
        # Answers by task id with the monotonic time they go stale, oldest first.
        self._fresh: OrderedDict[str, tuple[float, T]] = OrderedDict()

    async def share(self, task_id: str, fetch: Callable[[], Awaitable[T]]) -> T:
        """`fetch()`'s result for `task_id`, from a fresh answer or a call already in flight when there is one."""
        if (hit := self.fresh(task_id)) is not None:
            return hit
        while (pending := self._inflight.get(task_id)) is not None:
            try:
                # Shielded: a waiting poll that goes away must not cancel the call the others wait for.
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not pending.cancelled() or (current is not None and current.cancelling()):
                    raise
                # The poll that made the call went away (and took the call with it): make a new one.
        # The first poll makes the call itself (no extra task on the hot path) and hands the result on.
        shared: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._inflight[task_id] = shared
        asked_at = self.clock.monotonic()  # an answer is as old as the question that got it
        try:
            value = await fetch()
        except asyncio.CancelledError:
            shared.cancel()
            raise
        except BaseException as exc:
            shared.set_exception(exc)
            shared.exception()  # seen, even when nobody else was waiting
            raise
        finally:
            del self._inflight[task_id]
        shared.set_result(value)
        if self.freshness_s > 0 and self.keep(value):
            self._remember(task_id, value, asked_at + self.freshness_s)
        return value

    def fresh(self, task_id: str) -> T | None:
        """The answer kept for `task_id` while it is fresh, else None."""
        if self._fresh:
            hit = self._fresh.get(task_id)
            if hit is not None and hit[0] > self.clock.monotonic():
                return hit[1]
        return None

    def _remember(self, task_id: str, value: T, until: float) -> None:
        now = self.clock.monotonic()
        fresh = self._fresh
        fresh.pop(task_id, None)
        fresh[task_id] = (until, value)
        # Entries go stale about in the order they were added: drop the stale ones from the front.
        while fresh:
            _, (stale_at, _) = next(iter(fresh.items()))
            if stale_at > now and len(fresh) <= self.max_entries:
                break
            fresh.popitem(last=False)

    def __len__(self) -> int:
        """Answers held for the freshness window (stale ones included until the next poll sweeps them)."""
        return len(self._fresh)
