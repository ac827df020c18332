"""What each storage backend costs a create and a poll: the same gateway on SQLite, then on PostgreSQL.

    python benchmarks/backends.py                                  # a temporary SQLite file only
    python benchmarks/backends.py --database ./bench.db --database postgresql://postgres@127.0.0.1:5432/bench

For each `--database` it measures, on this machine:
- the store's own work, in-process: what a create asks of it (count it for its client, read the
  pool's counts and key marks, reserve a unit, record the task) and what a poll asks of it (look a
  task up, as a replica that has not cached it does; note a new status);
- a real gateway (`agnes-gateway serve`, its own process) in front of the simulator (another
  process): creates and polls of running tasks, one at a time and 16 at a time, next to the same
  requests sent to the simulator directly, so the gateway's cost is the difference.
The PostgreSQL database should be a scratch one: the run leaves its rows there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.store import TaskRecord, mask_password, open_store  # noqa: E402

KEY = "sk-bench-0000000000000001"
BODY = {"model": "agnes-video-v2.0", "prompt": "A cat playing piano in a jazz bar"}


@dataclass(frozen=True)
class Timing:
    """Latencies of one kind of request, and how many went through per second."""

    p50_ms: float
    p99_ms: float
    per_s: float

    def cells(self) -> str:
        return f"{self.p50_ms:8.2f} {self.p99_ms:8.2f} {self.per_s:8.0f}"


def timing(latencies: list[float], elapsed: float) -> Timing:
    ordered = sorted(latencies)
    return Timing(
        statistics.median(ordered) * 1000, ordered[int(len(ordered) * 0.99) - 1] * 1000, len(ordered) / elapsed
    )


async def run_load(call: Callable[[int], Awaitable[None]], total: int, concurrency: int) -> Timing:
    """`total` calls, `concurrency` at a time; each call's latency and the overall rate."""
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return timing(latencies, time.perf_counter() - started)


# --- the store alone ----------------------------------------------------------------------------


async def store_costs(database: str, rounds: int) -> dict[str, Timing]:
    """The store calls of one create and of one poll, timed one at a time."""
    store = open_store(database)
    await store.open()
    try:
        day, run = "bench-" + time.strftime("%Y%m%d%H%M%S"), os.urandom(4).hex()

        async def create(i: int) -> None:
            await store.reserve_client("bench", day, None)
            await store.usage(day)
            await store.key_marks()
            await store.reserve("bench", day, None)
            await store.add_task(TaskRecord(f"bench-{run}-{i}", "bench", "bench", time.time()))

        async def poll(i: int) -> None:
            await store.get_task(f"bench-{run}-{i}")
            await store.update_task(f"bench-{run}-{i}", "in_progress", i % 100, time.time())

        return {
            "store: a create's calls": await run_load(create, rounds, 1),
            "store: a poll's calls (uncached)": await run_load(poll, rounds, 1),
        }
    finally:
        await store.close()


# --- real processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start(args: list[str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *args, stdout=out, stderr=out, cwd=ROOT
        )


async def wait_ready(session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process) -> None:
    for _ in range(300):
        if proc.returncode is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        try:
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


async def http_costs(base: str, session: aiohttp.ClientSession, rounds: int) -> dict[str, Timing]:
    """Creates, then polls of the tasks they made, at 1 and at 16 connections."""
    headers = {"Authorization": f"Bearer {KEY}"}  # the simulator needs it; the gateway ignores it
    ids: list[str] = []

    async def create(_: int) -> None:
        async with session.post(f"{base}/v1/videos", json=BODY, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            ids.append((await resp.json())["task_id"])

    async def poll(i: int) -> None:
        async with session.get(f"{base}/v1/videos/{ids[i % len(ids)]}", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()

    return {
        "create, 1 at a time": await run_load(create, rounds, 1),
        "create, 16 at a time": await run_load(create, rounds * 2, 16),
        "poll, 1 at a time": await run_load(poll, rounds, 1),
        "poll, 16 at a time": await run_load(poll, rounds * 2, 16),
    }


async def gateway_costs(
    database: str, sim_url: str, work: Path, session: aiohttp.ClientSession, rounds: int
) -> dict[str, Timing]:
    """A gateway process on `database` in front of the simulator: its creates and polls."""
    config = work / f"gateway-{free_port()}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "upstream": {"base_url": sim_url},
                "database": database,
                "keys": [{"name": "bench", "key": KEY}],
                "log": {"level": "WARNING"},
            }
        )
    )
    port = free_port()
    gw = await start(["serve", "--config", str(config), "--port", str(port)], work / f"{config.stem}.log")
    try:
        await wait_ready(session, f"http://127.0.0.1:{port}/healthz", gw)
        return await http_costs(f"http://127.0.0.1:{port}", session, rounds)
    finally:
        await stop(gw)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--database", action="append", help="a SQLite file or postgresql:// URL (repeatable; default: a temp file)"
    )
    parser.add_argument("--rounds", type=int, default=500, help="requests per measurement (default 500)")
    args = parser.parse_args()

    results: dict[str, dict[str, Timing]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sim_port = free_port()
        sim_url = f"http://127.0.0.1:{sim_port}"
        sim = await start(["simulate", "--port", str(sim_port), "--key", KEY, "--task-seconds", "3600"], work / "sim")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            try:
                await wait_ready(session, f"{sim_url}/_sim/stats", sim)
                results["simulator directly"] = await http_costs(sim_url, session, args.rounds)
                for database in args.database or [str(work / "bench.db")]:
                    shown = mask_password(database)
                    results[f"store {shown}"] = await store_costs(database, args.rounds)
                    results[f"gateway on {shown}"] = await gateway_costs(database, sim_url, work, session, args.rounds)
            finally:
                await stop(sim)

    print(f"{os.cpu_count()} CPU(s), Python {sys.version.split()[0]}, {args.rounds} requests per row")
    print(f"{'':52} {'p50 ms':>8} {'p99 ms':>8} {'per s':>8}")
    for target, rows in results.items():
        print(target)
        for what, t in rows.items():
            print(f"  {what:50} {t.cells()}")


if __name__ == "__main__":
    asyncio.run(main())
