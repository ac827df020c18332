"""Retention: old task routes are pruned in the background, in batches, while requests go on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway.app import create_app
from gateway.appkeys import GATEWAY, RETENTION
from gateway.clock import ManualClock
from gateway.config import parse_config
from gateway.store import SQLiteStore, TaskRecord

from .conftest import Client, GatewayServer, Upstream, gateway_config

DAY = 86_400.0


class CountingStore(SQLiteStore):
    """The real SQLite store, counting the prune statements it runs."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.prune_calls = 0

    async def prune_tasks(self, older_than: float, batch: int) -> int:
        self.prune_calls += 1
        return await super().prune_tasks(older_than, batch)


async def fill(path: Path, now: float, old: int, recent: int) -> None:
    store = SQLiteStore(str(path))
    await store.open()
    for i in range(old):
        await store.add_task(TaskRecord(f"old-{i}", "a", "c", now - 31 * DAY))
    for i in range(recent):
        await store.add_task(TaskRecord(f"new-{i}", "a", "c", now - 29 * DAY))
    await store.close()


async def start(
    aiohttp_client: Any, upstream: Upstream, path: Path, clock: ManualClock, **retention: Any
) -> tuple[Client, CountingStore]:
    config = parse_config(gateway_config(upstream.url, path, retention={"interval_s": 3600, **retention}))
    store = CountingStore(str(path))
    client: Client = await aiohttp_client(GatewayServer(create_app(config, clock=clock, store=store)))
    return client, store


async def counts(store: SQLiteStore) -> int:
    return sum((await store.task_counts()).values())


async def test_old_routes_are_pruned_in_the_background_at_start(
    aiohttp_client: Any, upstream: Upstream, tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "g.db"
    await fill(path, clock.now().timestamp(), old=250, recent=5)
    client, store = await start(aiohttp_client, upstream, path, clock, batch=100)
    retention = client.app[RETENTION]
    await asyncio.wait_for(retention.passed.wait(), timeout=10)
    assert retention.pruned_total == 250
    assert store.prune_calls == 3  # 100 + 100 + 50: one batch per statement
    assert await counts(store) == 5
    assert await store.get_task("new-0") is not None and await store.get_task("old-0") is None


async def test_a_pass_also_forgets_cached_routes_and_keeps_recent_ones(
    aiohttp_client: Any, upstream: Upstream, tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "g.db"
    client, store = await start(aiohttp_client, upstream, path, clock, days=1)
    retention = client.app[RETENTION]
    await asyncio.wait_for(retention.passed.wait(), timeout=10)
    gateway = client.app[GATEWAY]
    resp = await client.post("/v1/videos", json={"model": "agnes-video-v2.0", "prompt": "p"})
    task_id = (await resp.json())["task_id"]
    assert await gateway.tasks.get(task_id) is not None
    clock.advance(DAY - 1)
    assert await retention.prune_once() == 0
    clock.advance(2)
    assert await retention.prune_once() == 1
    assert await store.get_task(task_id) is None
    assert gateway.tasks.forget_older_than(clock.now().timestamp()) == 0  # already gone from the cache too


async def test_requests_are_answered_while_a_long_prune_runs(
    aiohttp_client: Any, upstream: Upstream, tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "g.db"
    client, store = await start(aiohttp_client, upstream, path, clock, batch=50)
    retention = client.app[RETENTION]
    await asyncio.wait_for(retention.passed.wait(), timeout=10)
    await fill(path, clock.now().timestamp(), old=1000, recent=0)  # 20 batches with rests in between
    pruning = asyncio.ensure_future(retention.prune_once())
    polled = asyncio.ensure_future(client.get("/healthz"))
    done, _ = await asyncio.wait({pruning, polled}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert polled in done and pruning not in done
    assert (await polled).status == 200
    assert await asyncio.wait_for(pruning, timeout=10) == 1000
    assert await counts(store) == 0


async def test_retention_days_zero_keeps_everything(
    aiohttp_client: Any, upstream: Upstream, tmp_path: Path, clock: ManualClock
) -> None:
    path = tmp_path / "g.db"
    await fill(path, clock.now().timestamp(), old=3, recent=0)
    client, store = await start(aiohttp_client, upstream, path, clock, days=0)
    retention = client.app[RETENTION]
    await asyncio.wait_for(retention.passed.wait(), timeout=10)
    assert not retention.enabled
    assert store.prune_calls == 0 and await counts(store) == 3
