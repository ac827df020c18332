"""`agnes-gateway migrate`: one gateway's SQLite file into a PostgreSQL database that several share."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.store import KeyMark, KeyState, SQLiteStore, TaskRecord, open_store

from .conftest import KEY_A, KEY_B, Running, Upstream, gateway_config

ROOT = Path(__file__).parent.parent
MakeGateway = Callable[..., Awaitable[Running]]
on_postgresql = pytest.mark.parametrize("database", ["postgresql"], indirect=True)

TASKS = (
    TaskRecord("t-running", "a", "team-a", 1772424000.25, "in_progress", 40, 1772424010.5),
    TaskRecord(
        "t-done",
        "b",
        "team-b",
        1772424001.75,
        "completed",
        None,
        1772424060.0,
        b'{"status": "completed", "progress": 100}\x00\xff',
        "idem-1",
        '{"prompt": "猫"}',
    ),
    TaskRecord("t-new", "a", "unknown", 1772424002.0),
)
MARKS = {
    "a": KeyMark(KeyState.COOLING, "rate limited by upstream for 30 s", 1772424030.5),
    "b": KeyMark(KeyState.DISABLED, "upstream refused the key (HTTP 401)", None, "0123456789abcdef"),
}


async def migrate(source: Path | str, target: str) -> subprocess.CompletedProcess[str]:
    """Run the real command, as an operator would."""
    args = [sys.executable, "-m", "gateway", "migrate", "--from", str(source), "--to", target]
    return await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=30, cwd=ROOT)


async def sqlite_file(path: Path) -> Path:
    """A gateway's SQLite file with some of everything in it."""
    store = SQLiteStore(str(path))
    await store.open()
    for _ in range(3):
        await store.reserve("a", "2026-03-02", None)
    await store.reserve("b", "2026-03-02", None)
    await store.reserve("a", "2026-03-01", None)
    await store.reserve_client("team-a", "2026-03-02", None)
    for name, mark in MARKS.items():
        await store.set_key_mark(name, mark)
    for task in TASKS:
        await store.add_task(task)
    await store.close()
    return path


@on_postgresql
async def test_migrate_copies_counts_marks_and_every_task_column(database: str, tmp_path: Path) -> None:
    source = await sqlite_file(tmp_path / "gateway.db")
    result = await migrate(source, database)
    assert result.returncode == 0, result.stderr
    assert "copied 3 task route(s), 3 key count(s), 2 key mark(s), 1 client count(s)" in result.stdout

    store = open_store(database)
    await store.open()
    try:
        assert await store.usage("2026-03-02") == {"a": 3, "b": 1}
        assert await store.usage("2026-03-01") == {"a": 1}
        assert await store.client_usage("2026-03-02") == {"team-a": 1}
        assert await store.key_marks() == MARKS
        for task in TASKS:
            assert await store.get_task(task.task_id) == task
        assert await store.find_idempotent("team-b", "idem-1") == TASKS[1]
        # Counting goes on from the copied counts.
        assert await store.reserve("a", "2026-03-02", 4) == 4
        assert await store.reserve("a", "2026-03-02", 4) is None
    finally:
        await store.close()

    # A second run finds the database in use and changes nothing.
    again = await migrate(source, database)
    assert again.returncode == 2
    assert "already holds gateway state" in again.stderr


@on_postgresql
async def test_tasks_made_before_the_move_poll_on_their_keys_after_it(
    make_gateway: MakeGateway, upstream: Upstream, database: str, tmp_path: Path
) -> None:
    keys = [{"name": "a", "key": KEY_A, "daily_limit": 5}, {"name": "b", "key": KEY_B, "daily_limit": 5}]
    single = await make_gateway(gateway_config(upstream.url, tmp_path / "single.db", keys=keys))
    ids = [(await (await single.create()).json())["task_id"] for _ in range(6)]
    await single.client.close()

    result = await migrate(tmp_path / "single.db", database)
    assert result.returncode == 0, result.stderr
    shared = await make_gateway(gateway_config(upstream.url, database, keys=keys))
    for task_id in ids:
        assert (await shared.poll(task_id)).status == 200
    assert sum(upstream.state.polls.values()) == len(ids)  # each straight on its own key
    # Today's 6 of 10 units came along: 4 more creates fit.
    codes = [(await shared.create()).status for _ in range(5)]
    assert codes == [200, 200, 200, 200, 429]


async def test_migrate_refuses_what_it_cannot_copy(tmp_path: Path) -> None:
    missing = await migrate(tmp_path / "missing.db", "postgresql://u:secret-pw-1@127.0.0.1:1/db")
    assert missing.returncode == 2
    assert "is not a SQLite file" in missing.stderr
    source = await sqlite_file(tmp_path / "gateway.db")
    not_postgres = await migrate(source, str(tmp_path / "other.db"))
    assert (not_postgres.returncode, "is not a postgresql:// URL" in not_postgres.stderr) == (2, True)
    # Nothing listens on port 1: the error names the database, never its password.
    unreachable = await migrate(source, "postgresql://u:secret-pw-1@127.0.0.1:1/db")
    assert unreachable.returncode == 2
    assert "postgresql://u:***@127.0.0.1:1/db" in unreachable.stderr
    assert "secret-pw-1" not in unreachable.stderr + unreachable.stdout
