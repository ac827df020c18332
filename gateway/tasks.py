"""Task routes: which key owns which task, from a bounded in-memory cache in front of the store."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from .store import Store, TaskRecord

#: Routes kept in memory: about 600 bytes each with a stored final answer, so ~30 MB when full.
DEFAULT_CACHE_SIZE = 50_000


class TaskDirectory:
    """Finds and records task routes; the store is the truth, the cache saves it the trips."""

    def __init__(self, store: Store, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.store = store
        self.cache_size = cache_size
        self._cache: OrderedDict[str, TaskRecord] = OrderedDict()

    async def add(self, task: TaskRecord) -> None:
        """Record a route durably before anyone is told of the task."""
        await self.store.add_task(task)
        self._remember(task)

    def cached(self, task_id: str) -> TaskRecord | None:
        """The route if it is in memory (None says nothing about the store)."""
        task = self._cache.get(task_id)
        if task is not None:
            self._cache.move_to_end(task_id)
        return task

    async def get(self, task_id: str) -> TaskRecord | None:
        task = self.cached(task_id)
        if task is not None:
            return task
        task = await self.store.get_task(task_id)
        if task is not None:
            self._remember(task)
        return task

    async def seen(self, task: TaskRecord, status: str, progress: int | None, now: float) -> TaskRecord:
        """Note the status a poll saw; the store is written only when the status changes."""
        if status == task.status and progress == task.progress:
            return task
        updated = replace(task, status=status, progress=progress, updated_at=now)
        if status != task.status:
            await self.store.update_task(task.task_id, status, progress, now)
        self._remember(updated)
        return updated

    async def delete(self, task_id: str) -> bool:
        """Forget a task's route, in the store and in the cache; True if there was one."""
        self._cache.pop(task_id, None)
        return await self.store.delete_task(task_id)

    async def finished(self, task: TaskRecord, status: str, body: bytes, now: float) -> TaskRecord:
        """Keep a completed or failed task's final answer, durably, to serve it from here on."""
        updated = replace(task, status=status, progress=None, updated_at=now, terminal_body=body)
        await self.store.set_terminal(task.task_id, status, body, now)
        self._remember(updated)
        return updated

    def forget_older_than(self, created_before: float) -> int:
        """Drop cached routes the store has pruned; returns how many."""
        old = [task_id for task_id, task in self._cache.items() if task.created_at < created_before]
        for task_id in old:
            del self._cache[task_id]
        return len(old)

    def _remember(self, task: TaskRecord) -> None:
        self._cache[task.task_id] = task
        self._cache.move_to_end(task.task_id)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
