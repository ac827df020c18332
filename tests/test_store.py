"""The `Store` contract, checked against each backend: a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing

import pytest

from gateway.store import KeyMark, KeyState, Store, TaskRecord, is_postgres, open_store

from .conftest import both_backends

pytestmark = both_backends


@pytest.fixture
async def store(database: str) -> AsyncIterator[Store]:
    s = open_store(database)
    await s.open()
    yield s
    await s.close()


async def test_reserve_is_atomic_under_concurrency(store: Store) -> None:
    results = await asyncio.gather(*(store.reserve("a", "2026-03-02", 10) for _ in range(40)))
    assert sorted(r for r in results if r is not None) == list(range(1, 11))
    assert results.count(None) == 30
    assert await store.usage("2026-03-02") == {"a": 10}
    assert await store.usage("2026-03-03") == {}


async def test_release_gives_back_and_never_goes_negative(store: Store) -> None:
    assert await store.reserve("a", "d", None) == 1
    assert await store.reserve("a", "d", None) == 2
    assert await store.release("a", "d") == 1
    assert await store.release("a", "d") == 0
    assert await store.release("a", "d") == 0
    assert await store.reserve("a", "d", 0) is None


async def test_reset_usage_zeroes_one_key_on_one_day(store: Store) -> None:
    for _ in range(3):
        await store.reserve("a", "d", 3)
    await store.reserve("b", "d", None)
    await store.reserve("a", "e", None)
    await store.reset_usage("a", "d")
    assert await store.usage("d") == {"b": 1}
    assert await store.usage("e") == {"a": 1}
    assert await store.reserve("a", "d", 3) == 1


async def test_client_counts_are_separate_from_key_counts(store: Store) -> None:
    assert await store.reserve_client("team-a", "d", 2) == 1
    assert await store.reserve_client("team-a", "d", 2) == 2
    assert await store.reserve_client("team-a", "d", 2) is None
    assert await store.release_client("team-a", "d") == 1
    assert await store.client_usage("d") == {"team-a": 1}
    assert await store.usage("d") == {}


async def test_key_marks_round_trip(store: Store) -> None:
    await store.set_key_mark("a", KeyMark(KeyState.SPENT, "quota", 123.5))
    await store.set_key_mark("b", KeyMark(KeyState.DISABLED, "401", None, "abcd"))
    await store.set_key_mark("a", KeyMark(KeyState.COOLING, "429", 99.0))
    assert await store.key_marks() == {
        "a": KeyMark(KeyState.COOLING, "429", 99.0),
        "b": KeyMark(KeyState.DISABLED, "401", None, "abcd"),
    }
    await store.set_key_mark("a", None)
    assert set(await store.key_marks()) == {"b"}


async def test_tasks_round_trip(store: Store) -> None:
    task = TaskRecord("t1", "a", "team-a", 100.0, idempotency_key="idem-1", request_meta='{"prompt": "p"}')
    await store.add_task(task)
    assert await store.get_task("t1") == task
    assert await store.get_task("nope") is None
    await store.update_task("t1", "in_progress", 40, 101.0)
    got = await store.get_task("t1")
    assert got is not None and (got.status, got.progress, got.updated_at) == ("in_progress", 40, 101.0)
    await store.set_terminal("t1", "completed", b'{"status": "completed"}', 102.0)
    got = await store.get_task("t1")
    assert got is not None and got.terminal and got.terminal_body == b'{"status": "completed"}'
    assert await store.find_idempotent("team-a", "idem-1") == got
    assert await store.find_idempotent("team-b", "idem-1") is None
    assert await store.task_counts() == {"completed": 1}


async def test_list_delete_and_prune(store: Store) -> None:
    for i in range(5):
        await store.add_task(TaskRecord(f"t{i}", "a", "team-a" if i % 2 == 0 else "team-b", 100.0 + i))
    newest = await store.list_tasks(None, 2)
    assert [t.task_id for t in newest] == ["t4", "t3"]
    page = await store.list_tasks(None, 10, before=(newest[-1].created_at, newest[-1].task_id))
    assert [t.task_id for t in page] == ["t2", "t1", "t0"]
    assert [t.task_id for t in await store.list_tasks("team-a", 10)] == ["t4", "t2", "t0"]
    assert await store.delete_task("t4") is True
    assert await store.delete_task("t4") is False
    assert await store.prune_tasks(older_than=102.0, batch=1) == 1
    assert await store.prune_tasks(older_than=102.0, batch=10) == 1
    assert sorted(t.task_id for t in await store.list_tasks(None, 10)) == ["t2", "t3"]
    assert await store.task_counts() == {"unknown": 2}


async def test_counts_survive_reopening(database: str) -> None:
    first = open_store(database)
    await first.open()
    await first.reserve("a", "d", 5)
    await first.add_task(TaskRecord("t", "a", "c", 1.0))
    await first.close()
    second = open_store(database)
    await second.open()
    assert await second.usage("d") == {"a": 1}
    assert await second.get_task("t") is not None
    await second.close()


async def test_stores_sharing_a_database_never_overshoot_together(database: str) -> None:
    # Three gateways on one database, opened together (each creates or checks the schema at once).
    replicas = [open_store(database) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in replicas))
    try:
        results = await asyncio.gather(*(replicas[i % 3].reserve("a", "d", 20) for i in range(60)))
        assert sorted(r for r in results if r is not None) == list(range(1, 21))
        await replicas[0].set_key_mark("a", KeyMark(KeyState.DISABLED, "401", None, "f"))
        await replicas[1].add_task(TaskRecord("t", "a", "c", 1.0))
        for other in replicas:
            assert await other.usage("d") == {"a": 20}
            assert await other.key_marks() == {"a": KeyMark(KeyState.DISABLED, "401", None, "f")}
            assert await other.get_task("t") is not None
    finally:
        for s in replicas:
            await s.close()


async def test_values_round_trip_exactly(store: Store) -> None:
    body = bytes(range(256)) + "完成".encode()
    task = TaskRecord(
        "t-exact", "a", "c", 1772424000.123456789, "completed", None, 1772424061.5, body, None, '{"prompt": "猫"}'
    )
    await store.add_task(task)
    assert await store.get_task("t-exact") == task
    await store.set_key_mark("a", KeyMark(KeyState.COOLING, "429 太多", 1772424000.987654321))
    assert (await store.key_marks())["a"].until == 1772424000.987654321


async def test_adding_a_task_again_replaces_it(store: Store) -> None:
    await store.add_task(TaskRecord("t", "a", "c", 1.0, status="queued"))
    await store.add_task(TaskRecord("t", "b", "c", 2.0))
    assert await store.get_task("t") == TaskRecord("t", "b", "c", 2.0)
    assert await store.task_counts() == {"unknown": 1}


async def test_a_taken_idempotency_key_stays_with_the_first_task_and_both_routes_stay(store: Store) -> None:
    first = TaskRecord("t1", "a", "team-a", 1.0, idempotency_key="idem")
    await store.add_task(first)
    # A second create with the same key, made at the same moment through another gateway.
    await store.add_task(TaskRecord("t2", "b", "team-a", 2.0, idempotency_key="idem"))
    assert await store.find_idempotent("team-a", "idem") == first
    assert await store.get_task("t2") == TaskRecord("t2", "b", "team-a", 2.0)
    await store.add_task(TaskRecord("t3", "b", "team-b", 3.0, idempotency_key="idem"))  # another client's key
    assert (await store.find_idempotent("team-b", "idem") or first).task_id == "t3"


async def test_closed_store_fails_its_ping_and_reopens(store: Store) -> None:
    await store.close()
    with pytest.raises(Exception, match="not open"):
        await store.ping()
    await store.open()
    await store.ping()


async def test_a_schema_newer_than_the_gateway_is_refused(store: Store, database: str) -> None:
    await store.close()
    await raw_execute(database, "UPDATE schema_version SET version = 999")
    newer = open_store(database)
    with pytest.raises(RuntimeError, match="schema version 999, newer than this gateway"):
        await newer.open()


async def raw_execute(database: str, sql: str) -> None:
    """Run one statement on the database behind the store's back."""
    if is_postgres(database):
        import asyncpg

        conn = await asyncpg.connect(database)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    else:
        with closing(sqlite3.connect(database)) as db, db:
            db.execute(sql)
