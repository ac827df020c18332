"""kill -9 during a load of creates and polls: no acknowledged task lost, no quota over-spent, a sound database."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp
import yaml

from .conftest import BODY, KEY_A, KEY_B, KEY_C, Upstream
from .procs import free_port, start, stop, wait_ready

LIMIT = 40  # per key and day, in the gateway's config; the simulator would take 100
KEYS = {"a": KEY_A, "b": KEY_B, "c": KEY_C}
WORKERS = 8
ROUNDS = 5
PER_ROUND = 10  # acknowledged creates before each kill


class Load:
    """Clients creating and polling as fast as they can, noting every task id they were given."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base
        self.acknowledged: list[str] = []
        self.unexpected: list[tuple[str, int]] = []
        self.target = 0
        self.reached = asyncio.Event()

    async def worker(self, n: int) -> None:
        while True:
            try:
                async with self.session.post(f"{self.base}/v1/videos", json=BODY) as resp:
                    if resp.status == 200:
                        self.acknowledged.append((await resp.json())["task_id"])
                        if len(self.acknowledged) >= self.target:
                            self.reached.set()
                    elif resp.status != 429:
                        self.unexpected.append(("create", resp.status))
                    else:
                        self.reached.set()  # the pool is spent: nothing more to wait for
                if self.acknowledged:
                    task_id = self.acknowledged[(n * 7 + len(self.acknowledged)) % len(self.acknowledged)]
                    async with self.session.get(f"{self.base}/v1/videos/{task_id}") as resp:
                        await resp.read()
                        if resp.status != 200:
                            self.unexpected.append(("poll", resp.status))
            except (aiohttp.ClientError, ConnectionError):
                return  # the gateway was killed under us


async def test_kill_9_during_creates_and_polls_loses_nothing_and_never_overspends(
    upstream: Upstream, tmp_path: Path
) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    database = tmp_path / "gateway.db"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": port},
                "upstream": {"base_url": upstream.url},
                "database": str(database),
                "keys": [{"name": name, "key": key, "daily_limit": LIMIT} for name, key in KEYS.items()],
                "log": {"level": "WARNING"},
            }
        )
    )
    base = f"http://127.0.0.1:{port}"
    connector = aiohttp.TCPConnector(limit=WORKERS * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        load = Load(session, base)
        for _round in range(ROUNDS):
            proc = await start(["serve", "--config", str(config)])
            await wait_ready(f"{base}/healthz", proc)
            load.target = len(load.acknowledged) + PER_ROUND
            load.reached.clear()
            workers = [asyncio.ensure_future(load.worker(n)) for n in range(WORKERS)]
            await asyncio.wait_for(load.reached.wait(), 10)
            await stop(proc, signal.SIGKILL)  # mid-flight: creates and polls are under way
            await asyncio.wait_for(asyncio.gather(*workers), 10)
        assert load.unexpected == []
        assert len(load.acknowledged) >= ROUNDS * PER_ROUND
        # Every task id a client was given has its route, to the key upstream says made it.
        with sqlite3.connect(database) as db:
            routes = dict(db.execute("SELECT task_id, key_name FROM tasks").fetchall())
        owners = {task.task_id: task.key for task in upstream.state.tasks.values()}
        lost = [task_id for task_id in load.acknowledged if task_id not in routes]
        assert lost == []
        assert all(KEYS[routes[task_id]] == owners[task_id] for task_id in load.acknowledged)

        proc = await start(["serve", "--config", str(config)])
        await wait_ready(f"{base}/healthz", proc)
        polls_before = sum(upstream.state.polls.values())
        for task_id in load.acknowledged:
            async with session.get(f"{base}/v1/videos/{task_id}") as resp:
                assert resp.status == 200, task_id
        # Each poll went straight to the owning key: every route came from the database.
        assert sum(upstream.state.polls.values()) - polls_before == len(load.acknowledged)
        # Spend whatever is left: the gateway's counts, not upstream's refusals, stop it.
        for _ in range(3 * LIMIT):
            async with session.post(f"{base}/v1/videos", json=BODY) as resp:
                if resp.status == 429:
                    break
                assert resp.status == 200
        await stop(proc)

    for key in KEYS.values():
        assert upstream.state.creates[key] <= LIMIT
    assert sum(upstream.state.calls[(key, "create")] for key in KEYS.values()) <= 3 * LIMIT
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


KILL_DURING_RESERVE = """
import asyncio, os, signal, sys
from gateway.store import SQLiteStore, TaskRecord

async def main():
    store = SQLiteStore(sys.argv[1])
    await store.open()
    # A reservation and a task route in flight together, as under load; the route is acknowledged
    # as soon as add_task returns, and the process dies right then.
    reserving = asyncio.ensure_future(store.reserve("a", "2026-03-02", 10))
    await asyncio.sleep(0)  # the reservation's statement is queued first
    await store.add_task(TaskRecord("acknowledged", "a", "c", 1.0))
    os.kill(os.getpid(), signal.SIGKILL)
    await reserving

asyncio.run(main())
"""


async def test_a_route_written_beside_a_reservation_survives_kill_9(tmp_path: Path) -> None:
    database = tmp_path / "store.db"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", KILL_DURING_RESERVE, str(database))
    assert await asyncio.wait_for(proc.wait(), 15) == -signal.SIGKILL
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT task_id FROM tasks").fetchall() == [("acknowledged",)]
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
