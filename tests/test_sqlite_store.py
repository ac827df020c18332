"""SQLite specifics: writes that arrive together share one commit, each keeping its own result."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from gateway.store import SQLiteStore, TaskRecord


async def test_writes_that_arrive_together_share_one_commit(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        await asyncio.gather(*(store.add_task(TaskRecord(f"t{i}", "a", "c", float(i))) for i in range(50)))
        assert store.group_commits <= 2  # not 50
        assert (await store.task_counts()) == {"unknown": 50}
        counts = await asyncio.gather(*(store.reserve("a", "d", 30) for _ in range(40)))
        assert sorted(c for c in counts if c is not None) == list(range(1, 31))  # still exact within a batch
    finally:
        await store.close()


async def test_a_failing_write_does_not_undo_the_others_committed_with_it(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        bad = TaskRecord("bad", None, "c", 1.0)  # type: ignore[arg-type]  # key_name is NOT NULL
        results = await asyncio.gather(
            store.add_task(TaskRecord("t1", "a", "c", 1.0)),
            store.add_task(bad),
            store.add_task(TaskRecord("t2", "a", "c", 2.0)),
            return_exceptions=True,
        )
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], sqlite3.IntegrityError)
        assert await store.get_task("t1") is not None and await store.get_task("t2") is not None
        assert await store.get_task("bad") is None
    finally:
        await store.close()
