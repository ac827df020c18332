"""Retention: routes of old tasks are pruned in the background, a batch at a time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .clock import Clock
from .config import RetentionConfig
from .store import Store
from .tasks import TaskDirectory

log = logging.getLogger("agnes_gateway.retention")

DAY_S = 86_400.0


class Retention:
    """Deletes task routes created more than `days` ago, so the database does not grow without bound."""

    def __init__(
        self,
        settings: Callable[[], RetentionConfig],
        store: Store,
        tasks: TaskDirectory,
        clock: Clock,
        pause_s: float = 0.01,
    ) -> None:
        #: The running config's `retention:` section, read at each pass so a reload takes effect.
        self.settings = settings
        self.store = store
        self.tasks = tasks
        self.clock = clock
        #: Rest between two batches, so queries of requests get the database in between.
        self.pause_s = pause_s
        #: Set after each pass; tests and operators can wait on it.
        self.passed = asyncio.Event()
        self.pruned_total = 0

    @property
    def enabled(self) -> bool:
        return self.settings().days > 0

    async def prune_once(self) -> int:
        """One pass: every route older than the retention age goes, `batch` rows per statement."""
        config = self.settings()
        if config.days <= 0:
            self.passed.set()
            return 0
        cutoff = self.clock.now().timestamp() - config.days * DAY_S
        pruned = 0
        while True:
            deleted = await self.store.prune_tasks(cutoff, config.batch)
            pruned += deleted
            if deleted < config.batch:
                break
            await asyncio.sleep(self.pause_s)
        self.tasks.forget_older_than(cutoff)
        self.pruned_total += pruned
        if pruned:
            log.info("pruned %d task route(s) older than %g days", pruned, config.days)
        self.passed.set()
        return pruned

    async def run(self) -> None:
        """Prune now and then every `interval_s` seconds, until cancelled; a failed pass is retried next time.

        With `days: 0` a pass does nothing, so a reload can turn pruning on or off.
        """
        while True:
            try:
                await self.prune_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("pruning old task routes failed; retrying in %g s", self.settings().interval_s)
            await asyncio.sleep(self.settings().interval_s)
