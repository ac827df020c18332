"""kill -9 right after a create was answered loses no task route and no count."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import aiohttp
import yaml

from .conftest import BODY, KEY_A, KEY_B, Upstream
from .procs import free_port, start, stop, wait_ready


async def test_kill_9_right_after_creates_loses_nothing(upstream: Upstream, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": port},
                "upstream": {"base_url": upstream.url},
                "database": str(tmp_path / "gateway.db"),
                "keys": [{"name": "a", "key": KEY_A, "daily_limit": 6}, {"name": "b", "key": KEY_B, "daily_limit": 6}],
            }
        )
    )
    base = f"http://127.0.0.1:{port}"
    acknowledged: list[str] = []
    async with aiohttp.ClientSession() as session:
        for _round in range(3):
            proc = await start(["serve", "--config", str(config)])
            await wait_ready(f"{base}/healthz", proc)
            for _ in range(3):
                async with session.post(f"{base}/v1/videos", json=BODY) as resp:
                    assert resp.status == 200
                    acknowledged.append((await resp.json())["task_id"])
            await stop(proc, signal.SIGKILL)  # no chance to flush or close anything

        proc = await start(["serve", "--config", str(config)])
        await wait_ready(f"{base}/healthz", proc)
        polls_before = sum(upstream.state.polls.values())
        for task_id in acknowledged:
            async with session.get(f"{base}/v1/videos/{task_id}") as resp:
                assert resp.status == 200, task_id
        # Each poll went straight to the owning key: the routes came from the database.
        assert sum(upstream.state.polls.values()) - polls_before == len(acknowledged)
        # 9 of 12 units used: only 3 more creates fit.
        codes = []
        for _ in range(5):
            async with session.post(f"{base}/v1/videos", json=BODY) as resp:
                codes.append(resp.status)
        assert codes == [200, 200, 200, 429, 429]
        await stop(proc)
    assert sum(upstream.state.creates.values()) == 12
    with sqlite3.connect(tmp_path / "gateway.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
