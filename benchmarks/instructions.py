#!/usr/bin/env python3
"""Instructions per request, counted by valgrind's callgrind: a figure the machine's load does not move.

    python benchmarks/instructions.py                        # this checkout's gateway and the baselines
    python benchmarks/instructions.py --gateway-src DIR      # another checkout's gateway (compare two)

Requests per second and CPU time (run.py) swing by ±20 % on a shared machine; the instructions a
server executes for the same requests do not (within about 1 %), so two versions of the gateway can
be compared in one figure each. Each server runs under callgrind with counting off; counting is
switched on only around the measured requests (after a warm-up), and only that server's user-space
instructions are counted (not the kernel's: a socket write is the same for every target).

Per workload (8 keep-alive connections, `--requests` each): the simulator answering directly (the
baseline), the gateway in front of it and, for running polls, the minimal aiohttp pass-through proxy;
for completed polls also a bare aiohttp application answering a fixed body (`aiohttp app`: what any
aiohttp server costs per request).
Needs Debian's valgrind. Takes a few minutes: programs run ~50 times slower under callgrind.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import run as bench

CONNECTIONS = 8
FIXED_APP = "aiohttp app"
FIXED_BODY = b'{"task_id": "t", "status": "completed", "progress": 100, "video_url": "http://127.0.0.1/v.mp4"}'


def callgrind(tmp: Path) -> list[str]:
    """The command prefix that runs a server under callgrind with counting off (see `Counted`)."""
    out = tmp / "callgrind.%p.out"
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


class Counted:
    """A server process started under `callgrind(tmp)`, counting only between `start()` and `stop()`."""

    def __init__(self, proc: bench.Proc, tmp: Path) -> None:
        self.proc = proc
        self.out = tmp / f"callgrind.{proc.pid}.out"  # valgrind runs the program in its own process

    def _control(self, *flags: str) -> None:
        subprocess.run(["callgrind_control", *flags, str(self.proc.pid)], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._control("-i", "on")
        self._control("-z")  # nothing counted before this moment

    def stop(self) -> int:
        """Instructions counted since `start()`."""
        self._control("-i", "off")
        before = set(self.out.parent.glob(f"{self.out.name}.*"))
        self._control("-d")
        for _ in range(100):
            new = set(self.out.parent.glob(f"{self.out.name}.*")) - before
            if new:
                text = max(new, key=lambda p: int(p.suffix[1:])).read_text(errors="replace")
                for line in text.splitlines():
                    if line.startswith("totals:"):
                        return int(line.split()[1])
            time.sleep(0.1)
        raise SystemExit(f"callgrind wrote no dump for {self.proc.name}")


Request = tuple[str, str]  # path, Authorization


async def drive(port: int, requests: list[Request], count: int, post: bool = False) -> None:
    """`count` requests (taken in turn from `requests`) over CONNECTIONS keep-alive connections, all 200."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:
        numbers = iter(range(count))

        async def connection() -> None:
            for n in numbers:
                path, authorization = requests[n % len(requests)]
                url, headers = f"http://127.0.0.1:{port}{path}", {"Authorization": authorization}
                if post:
                    method = session.post(url, json=bench.CREATE_BODY, headers=headers)
                else:
                    method = session.get(url, headers=headers)
                async with method as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"{url}: HTTP {resp.status}")

        await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))


def per_request(server: Counted, port: int, requests: list[Request], count: int, post: bool = False) -> float:
    asyncio.run(drive(port, requests, max(count // 5, 50), post))  # warm-up
    server.start()
    asyncio.run(drive(port, requests, count, post))
    return server.stop() / count


def fixed_app(tmp: Path) -> tuple[Counted, int]:
    port = bench.free_port()
    args = [*callgrind(tmp), sys.executable, __file__, "--serve-fixed", str(port)]
    proc = bench.Proc(f"fixed:{port}", args, tmp / f"fixed-{port}.log")
    bench.wait_ready(f"http://127.0.0.1:{port}/v1/videos/ready", proc, bench.SLOW_START_S)
    return Counted(proc, tmp), port


def serve_fixed(port: int) -> None:
    """A bare aiohttp application on uvloop: one route, a fixed JSON answer, no access log."""
    import uvloop
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=FIXED_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/videos/{task_id}", answer)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())


def requests_in(listing: Path) -> list[Request]:
    """A poll list of run.py: a path and an Authorization header per line."""
    return [
        (path, authorization) for path, authorization in (line.split("\t") for line in listing.read_text().splitlines())
    ]


def report(workload: str, figures: dict[str, float]) -> None:
    base = figures.get(bench.BASELINE)
    for target, value in figures.items():
        ratio = f"{value / base:6.2f}" if base else ""
        print(f"{workload:<26} {target:<10} {value / 1000:10.0f} {ratio:>8}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per target and workload")
    parser.add_argument("--gateway-src", type=Path, default=bench.ROOT, help="the checkout whose gateway is measured")
    parser.add_argument(
        "--only", action="append", choices=("completed", "running", "creates"), help="measure only these workloads"
    )
    parser.add_argument("--serve-fixed", type=int, help=argparse.SUPPRESS)  # the `aiohttp app` target itself
    args = parser.parse_args()
    if args.serve_fixed:
        serve_fixed(args.serve_fixed)
        return 0
    parts = set(args.only or ("completed", "running", "creates"))
    bench.GATEWAY_SOURCE = args.gateway_src.resolve()
    count = args.requests
    print(f"gateway: {bench.GATEWAY_SOURCE}; {count} requests per figure over {CONNECTIONS} connections")
    print(f"{'workload':<26} {'target':<10} {'k instr/req':>10} {'x base':>8}")
    with tempfile.TemporaryDirectory(prefix="agnes-instructions-") as tmpdir:
        tmp = Path(tmpdir)
        for workload, task_seconds in (("polls, completed tasks", 0.0), ("polls, running tasks", 1e9)):
            running = task_seconds > 0
            if not parts & ({"running", "creates"} if running else {"completed"}):
                continue
            sim_proc, sim_port = bench.start_simulator(tmp, task_seconds, prefix=callgrind(tmp))
            sim = Counted(sim_proc, tmp)
            servers = [sim]
            sections = {"poll": {"freshness_s": 0}} if running else {}
            gw_proc, gw_port = bench.start_gateway(
                tmp, sim_port, tmp / f"{sim_port}.db", uvloop=True, prefix=callgrind(tmp), **sections
            )
            gw = Counted(gw_proc, tmp)
            servers.append(gw)
            try:
                if ("running" if running else "completed") in parts:
                    direct, via = bench.make_poll_lists(tmp, gw_port, tmp / f"{sim_port}.db", 200, str(sim_port))
                    figures = {
                        bench.BASELINE: per_request(sim, sim_port, requests_in(direct), count),
                        bench.GATEWAY: per_request(gw, gw_port, requests_in(via), count),
                    }
                    if running:
                        proxy_proc, proxy_port = bench.start_passthrough(tmp, sim_port, prefix=callgrind(tmp))
                        proxy = Counted(proxy_proc, tmp)
                        servers.append(proxy)
                        figures[bench.PASSTHROUGH] = per_request(proxy, proxy_port, requests_in(direct), count)
                    else:
                        fixed, fixed_port = fixed_app(tmp)
                        servers.append(fixed)
                        figures[FIXED_APP] = per_request(fixed, fixed_port, requests_in(direct), count)
                    report(workload, figures)
                if running and "creates" in parts:
                    direct_create = [("/v1/videos", f"Bearer {bench.DIRECT_KEY}")]
                    via_create = [("/v1/videos", f"Bearer {bench.CLIENT_TOKEN}")]
                    report(
                        "creates",
                        {
                            bench.BASELINE: per_request(sim, sim_port, direct_create, count, post=True),
                            bench.GATEWAY: per_request(gw, gw_port, via_create, count, post=True),
                        },
                    )
            finally:
                for server in servers:
                    server.proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
