"""The real `agnes-gateway serve` process: SIGHUP reloads its config, SIGTERM drains it and closes cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.simulator import Fault

from .conftest import BODY, KEY_A, KEY_B, Upstream
from .procs import free_port, read_until, start, stop, wait_exit, wait_ready

ADMIN = "adm-0123456789abcdef-secret"


def write_config(path: Path, upstream: Upstream, port: int, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listen": {"port": port},
        "upstream": {"base_url": upstream.url},
        "database": str(path.parent / "gateway.db"),
        "admin_token": ADMIN,
        "keys": [{"name": "a", "key": KEY_A, "daily_limit": 10}],
        **extra,
    }
    path.write_text(yaml.safe_dump(doc))
    return doc


async def create(session: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{base}/v1/videos", json=BODY) as resp:
        return resp.status, await resp.json()


async def test_sighup_reloads_the_file_and_a_broken_one_changes_nothing(upstream: Upstream, tmp_path: Path) -> None:
    port, path = free_port(), tmp_path / "gateway.yaml"
    doc = write_config(path, upstream, port)
    base = f"http://127.0.0.1:{port}"
    proc = await start(["serve", "--config", str(path)])
    try:
        await wait_ready(f"{base}/healthz", proc)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as session:
            assert (await create(session, base))[0] == 200

            path.write_text("keys: [{name: a, key: " + KEY_A + "\n")
            proc.send_signal(signal.SIGHUP)
            out = await read_until(proc, b"reload refused")
            assert b"not valid YAML" in out and KEY_A.encode() not in out
            assert (await create(session, base))[0] == 200  # still serving with the old config

            doc["keys"].append({"name": "b", "key": KEY_B, "daily_limit": 10})
            path.write_text(yaml.safe_dump(doc))
            proc.send_signal(signal.SIGHUP)
            await read_until(proc, b"config reloaded")
            async with session.get(f"{base}/admin/keys") as resp:
                keys = {k["name"]: k["used"] for k in (await resp.json())["keys"]}
            assert keys == {"a": 2, "b": 0}
            for _ in range(2):
                assert (await create(session, base))[0] == 200
            assert upstream.state.creates[KEY_B] >= 1
    finally:
        out = await stop(proc)
    assert proc.returncode == 0, out


async def test_sigterm_finishes_in_flight_creates_and_loses_no_task_route(upstream: Upstream, tmp_path: Path) -> None:
    port, path = free_port(), tmp_path / "gateway.yaml"
    write_config(
        path,
        upstream,
        port,
        keys=[{"name": "a", "key": KEY_A, "daily_limit": 10}, {"name": "b", "key": KEY_B, "daily_limit": 10}],
        shutdown={"drain_s": 10},
    )
    base = f"http://127.0.0.1:{port}"
    proc = await start(["serve", "--config", str(path)])
    await wait_ready(f"{base}/healthz", proc)
    upstream.state.add_fault(Fault(kind="slow", delay_s=1.0, operation="create", times=-1))
    async with aiohttp.ClientSession() as session:
        in_flight = [asyncio.ensure_future(create(session, base)) for _ in range(4)]
        for _ in range(400):  # bounded: until all four are held upstream
            if upstream.state.requests == 4:
                break
            await asyncio.sleep(0.005)
        assert upstream.state.requests == 4
        proc.send_signal(signal.SIGTERM)

        # The listener closes at once: new connections are refused while the four finish.
        refused = False
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as fresh:
            for _ in range(200):
                try:
                    async with fresh.get(f"{base}/healthz"):
                        pass
                except aiohttp.ClientConnectorError:
                    refused = True
                    break
                await asyncio.sleep(0.005)
        assert refused
        assert not any(t.done() for t in in_flight)

        answers = [await t for t in in_flight]
    assert [status for status, _ in answers] == [200] * 4
    out = await wait_exit(proc)
    assert proc.returncode == 0, out
    assert b"database closed" in out

    db_path = tmp_path / "gateway.db"
    # The last connection closed cleanly: the write-ahead log was checkpointed and removed.
    assert "gateway.db-wal" not in os.listdir(tmp_path)
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        routes = dict(db.execute("SELECT task_id, key_name FROM tasks").fetchall())
        used = sum(n for (n,) in db.execute("SELECT used FROM quota_usage"))
    assert used == 4
    for _, doc in answers:
        task_id = doc["task_id"]
        assert {"a": KEY_A, "b": KEY_B}[routes[task_id]] == upstream.state.tasks[task_id].key


async def test_drain_time_bounds_the_shutdown(upstream: Upstream, tmp_path: Path) -> None:
    port, path = free_port(), tmp_path / "gateway.yaml"
    write_config(path, upstream, port, shutdown={"drain_s": 0.2})
    base = f"http://127.0.0.1:{port}"
    proc = await start(["serve", "--config", str(path)])
    await wait_ready(f"{base}/healthz", proc)
    upstream.state.add_fault(Fault(kind="slow", delay_s=2.0, operation="create", times=1))
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        stuck = asyncio.ensure_future(create(session, base))
        for _ in range(400):
            if upstream.state.requests == 1:
                break
            await asyncio.sleep(0.005)
        started = loop.time()
        proc.send_signal(signal.SIGTERM)
        out = await wait_exit(proc)
        elapsed = loop.time() - started
        results = await asyncio.gather(stuck, return_exceptions=True)
    assert proc.returncode == 0, out
    # Cut off after the drain time, well before upstream would have answered.
    assert elapsed < 1.6, elapsed
    assert isinstance(results[0], aiohttp.ClientError)
    assert b"database closed" in out
