"""`serve --workers 2`: two gateway processes on one port and one SQLite file, behind one supervisor."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from .conftest import BODY, KEY_A, KEY_B, Upstream
from .procs import free_port, start, wait_ready

CLIENT_TOKEN = "workers-client-token-0123"
NEW_TOKEN = "workers-new-client-token-4567"
ADMIN_TOKEN = "workers-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {CLIENT_TOKEN}"}


def workers_of(supervisor: int) -> set[int]:
    """The supervisor's child processes, from /proc."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {int(pid) for pid in children}


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def until(condition: object, within_s: float = 15.0) -> None:
    """Wait (bounded) until `condition()` is true."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def requests_counted(exposition: str, route: str) -> float:
    pattern = re.compile(r'^agnes_gateway_requests_total\{code="\d+",route="' + re.escape(route) + r'"\} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(exposition))


class Workers:
    """The running supervisor, its base URL, and everything it and its workers have printed so far."""

    def __init__(self, proc: asyncio.subprocess.Process, base: str, config: Path) -> None:
        self.proc, self.base, self.config = proc, base, config
        self.output = bytearray()
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:  # a full pipe would stop the workers' logging, and them with it
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.output += chunk

    async def stop(self) -> str:
        if self.proc.returncode is None:
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=20)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            await asyncio.wait_for(self._reading, timeout=5)
        return self.output.decode(errors="replace")


@pytest.fixture
async def two_workers(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Workers]:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "admin_token": ADMIN_TOKEN,
                "listen": {"port": port, "workers": 2},
                "upstream": {"base_url": upstream.url, "timeout_s": 5},
                "database": str(tmp_path / "gateway.db"),
                "clients": [{"name": "team", "token": CLIENT_TOKEN}],
                "keys": [
                    {"name": "a", "key": KEY_A, "daily_limit": 7},
                    {"name": "b", "key": KEY_B, "daily_limit": 6},
                ],
            }
        )
    )
    running = Workers(await start(["serve", "--config", str(config)]), f"http://127.0.0.1:{port}", config)
    try:
        await wait_ready(f"{running.base}/healthz", running.proc)
        await until(lambda: running.output.count(b"listening on") == 2)  # both workers ready
        assert len(workers_of(running.proc.pid)) == 2
        yield running
    finally:
        await running.stop()


async def test_two_workers_share_the_quota_exactly_and_both_serve(two_workers: Workers, upstream: Upstream) -> None:
    proc, base = two_workers.proc, two_workers.base
    workers = workers_of(proc.pid)
    before = {pid: cpu_ticks(pid) for pid in workers}
    # A session per request: new connections, which the kernel spreads over the two workers.

    async def create() -> tuple[int, str | None]:
        async with aiohttp.ClientSession() as session, session.post(f"{base}/v1/videos", json=BODY, headers=AUTH) as r:
            doc = await r.json()
            return r.status, doc.get("task_id") or doc.get("error", {}).get("code")

    answers = await asyncio.gather(*(create() for _ in range(40)))
    assert sorted(status for status, _ in answers) == [200] * 13 + [429] * 27
    assert {code for status, code in answers if status == 429} == {"all_keys_exhausted"}
    assert (upstream.state.creates[KEY_A], upstream.state.creates[KEY_B]) == (7, 6)

    async def poll(task_id: str) -> int:
        async with aiohttp.ClientSession() as session, session.get(f"{base}/v1/videos/{task_id}", headers=AUTH) as r:
            return r.status

    made = [task_id for status, task_id in answers if status == 200 and task_id]
    assert await asyncio.gather(*(poll(t) for t in made)) == [200] * 13
    assert all(cpu_ticks(pid) > before[pid] for pid in workers), "one worker served nothing"

    # Whichever worker answers the scrape, it counts the requests of both.
    for _ in range(3):
        async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
            text = await r.text()
        assert requests_counted(text, "/v1/videos") == 40
        assert requests_counted(text, "/v1/videos/{task_id}") == 13
        assert 'agnes_gateway_key_quota_used{key="a"} 7.0' in text


async def test_a_killed_worker_is_replaced_and_a_stop_stops_them_all(two_workers: Workers) -> None:
    proc, base = two_workers.proc, two_workers.base
    first = workers_of(proc.pid)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    await until(lambda: victim not in workers_of(proc.pid) and len(workers_of(proc.pid)) == 2)
    replaced = workers_of(proc.pid)
    await wait_ready(f"{base}/healthz", proc)
    for _ in range(10):  # every connection lands on a live worker
        async with aiohttp.ClientSession() as session, session.get(f"{base}/healthz") as r:
            assert r.status == 200

    output = await two_workers.stop()  # SIGTERM to the supervisor
    assert proc.returncode == 0
    assert not any(alive(pid) for pid in replaced)  # the supervisor waited for each
    port = int(base.rsplit(":", 1)[1])
    with socket.socket() as s:  # nobody holds the port any more
        s.bind(("127.0.0.1", port))
    assert f"worker {victim} exited" in output
    assert "all workers stopped" in output


async def test_workers_need_a_fixed_port(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"listen": {"port": 0, "workers": 2}, "keys": [{"name": "a", "key": KEY_A}]}))
    proc = await start(["serve", "--config", str(config)])
    output = (await asyncio.wait_for(proc.communicate(), timeout=15))[0].decode(errors="replace")
    assert proc.returncode != 0
    assert "listen.port 0 cannot be shared" in output


async def test_a_reload_through_the_admin_api_reaches_every_worker(two_workers: Workers) -> None:
    base = two_workers.base
    doc = yaml.safe_load(two_workers.config.read_text())
    doc["clients"].append({"name": "newcomer", "token": NEW_TOKEN})
    two_workers.config.write_text(yaml.safe_dump(doc))

    async def healthz_as_newcomer() -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/v1/videos/unknown-task", headers={"Authorization": f"Bearer {NEW_TOKEN}"}) as r,
        ):
            return r.status

    assert set(await asyncio.gather(*(healthz_as_newcomer() for _ in range(10)))) == {401}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r,
    ):
        assert r.status == 200, await r.text()

    def reloaded_twice() -> bool:  # the worker that answered, then every worker on the supervisor's SIGHUP
        return two_workers.output.count(b"config reloaded") >= 3

    await until(reloaded_twice)
    # Fresh connections, spread over both workers: each knows the new client (404: no key knows the task).
    assert set(await asyncio.gather(*(healthz_as_newcomer() for _ in range(20)))) == {404}


async def test_a_hangup_while_workers_start_kills_none(upstream: Upstream, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": port, "workers": 2},
                "upstream": {"base_url": upstream.url},
                "database": str(tmp_path / "gateway.db"),
                "keys": [{"name": "a", "key": KEY_A}],
            }
        )
    )
    running = Workers(await start(["serve", "--config", str(config)]), f"http://127.0.0.1:{port}", config)
    try:
        await until(lambda: len(workers_of(running.proc.pid)) == 2)
        for _ in range(200):  # SIGHUPs passed on while the workers import, open the store, bind
            running.proc.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.01)
            if running.output.count(b"listening on") == 2:
                break
        await until(lambda: running.output.count(b"listening on") == 2)
    finally:
        output = await running.stop()
    assert "exited with" not in output
    assert "all workers stopped" in output
