#!/usr/bin/env python3
"""The gateway's cost, measured side by side with the simulator alone, a bare aiohttp proxy and nginx.

    python benchmarks/run.py                 # everything, about 10 minutes on 2 cores
    python benchmarks/run.py --quick         # 3 s runs, 100,000 routes instead of 1,000,000
    python benchmarks/run.py --json out.json --rounds 3

Each workload runs against the simulator directly (the baseline), the gateway in front of it, a
minimal aiohttp pass-through proxy and nginx `proxy_pass` with keep-alive in front of it, one after
the other in the same run, so the ratios compare like with like on whatever else the machine is
doing. wrk generates the load.
See benchmarks/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the `gateway` package of this checkout, installed or not

from gateway.store import SQLiteStore  # noqa: E402
from gateway.tasks import DEFAULT_CACHE_SIZE  # noqa: E402

LUA = Path(__file__).resolve().with_name("wrk.lua")
GATEWAY_KEYS = ("sk-bench-key-a-000000000001", "sk-bench-key-b-000000000002", "sk-bench-key-c-000000000003")
# The baseline and nginx create with their own key, so the gateway's keys count only the gateway's creates.
DIRECT_KEY = "sk-bench-direct-00000000009"
CLIENT_TOKEN = "bench-client-token-0123456789"
CREATE_BODY = {"model": "agnes-video-v2.0", "prompt": "A cat playing piano in a jazz bar"}
GATEWAY_WORKERS = 1  # --workers: gateway processes (serve --workers N)
GATEWAY_SECTIONS: dict[str, Any] = {}  # --gateway-config: config sections replaced in every gateway started
GATEWAY_SOURCE = ROOT  # --gateway-src: the checkout whose gateway is measured (python -m gateway runs from there)
BASELINE, GATEWAY, NGINX, PASSTHROUGH = "simulator", "gateway", "nginx", "aiohttp"


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose CPU time and memory are read from /proc."""

    def __init__(self, name: str, args: Sequence[str], log: Path, cwd: Path = ROOT) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process's threads and its children (nginx's worker)."""
        return sum(_cpu_seconds(pid) for pid in (self.pid, *_children(self.pid)))

    def memory_mb(self, field_name: str = "VmHWM", *, largest: bool = False) -> float:
        """VmHWM is the peak resident set size, VmRSS the current one: summed over the process and its
        children (the workers of `serve --workers`), or with `largest` that of the largest one."""
        sizes = []
        for pid in (self.pid, *_children(self.pid)):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    sizes.append(int(line.split()[1]) / 1024)
        return (max(sizes) if largest else sum(sizes)) if sizes else float("nan")

    def check(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_ready(url: str, proc: Proc, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        proc.check()
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{proc.name} did not answer {url} within {within_s:g} s")


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


# The start_* functions take `prefix`: a command the process runs under (valgrind, for instructions.py),
# which then also has longer to start.
SLOW_START_S = 180.0


def _ready_within(prefix: Sequence[str]) -> float:
    return SLOW_START_S if prefix else 30.0


def start_simulator(tmp: Path, task_seconds: float, prefix: Sequence[str] = ()) -> tuple[Proc, int]:
    port = free_port()
    keys = [a for k in (*GATEWAY_KEYS, DIRECT_KEY) for a in ("--key", k)]
    args = python_cmd("simulate", "--uvloop", "--port", str(port), "--task-seconds", str(task_seconds), *keys)
    proc = Proc(f"simulator:{port}", [*prefix, *args], tmp / f"simulator-{port}.log")
    wait_ready(f"http://127.0.0.1:{port}/_sim/stats", proc, _ready_within(prefix))
    return proc, port


def gateway_config(tmp: Path, port: int, upstream_port: int, database: Path, **sections: Any) -> Path:
    """A gateway config file: three keys with room for every create, one client, default logging."""
    doc: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"base_url": f"http://127.0.0.1:{upstream_port}"},
        "database": str(database),
        "keys": [{"name": f"key-{i}", "key": key, "daily_limit": 100_000_000} for i, key in enumerate(GATEWAY_KEYS)],
        "clients": [{"name": "bench", "token": CLIENT_TOKEN}],
        **sections,
    }
    path = tmp / f"gateway-{port}.yaml"
    path.write_text(json.dumps(doc, indent=2))  # JSON is YAML
    return path


def start_gateway(
    tmp: Path, upstream_port: int, database: Path, *, uvloop: bool, prefix: Sequence[str] = (), **sections: Any
) -> tuple[Proc, int]:
    port = free_port()
    sections = {**sections, **GATEWAY_SECTIONS}
    if '"poll"' not in (GATEWAY_SOURCE / "gateway" / "config.py").read_text():
        sections.pop("poll", None)  # an older checkout (--gateway-src) without the poll options
    config = gateway_config(tmp, port, upstream_port, database, **sections)
    workers = ["--workers", str(GATEWAY_WORKERS)] if GATEWAY_WORKERS > 1 else []
    args = python_cmd("serve", "--config", str(config), *workers, *(["--uvloop"] if uvloop else []))
    proc = Proc(f"gateway:{port}", [*prefix, *args], tmp / f"gateway-{port}.log", cwd=GATEWAY_SOURCE)
    wait_ready(f"http://127.0.0.1:{port}/healthz", proc, _ready_within(prefix))
    return proc, port


def start_passthrough(tmp: Path, upstream_port: int, prefix: Sequence[str] = ()) -> tuple[Proc, int]:
    """The minimal aiohttp pass-through proxy (benchmarks/passthrough.py), on uvloop."""
    port = free_port()
    script = Path(__file__).resolve().with_name("passthrough.py")
    args = [sys.executable, str(script), "--port", str(port), "--upstream", f"http://127.0.0.1:{upstream_port}"]
    proc = Proc(f"passthrough:{port}", [*prefix, *args], tmp / f"passthrough-{port}.log")
    wait_ready(f"http://127.0.0.1:{port}/_sim/stats", proc, _ready_within(prefix))
    return proc, port


NGINX_CONF = """
{user}
worker_processes 1;
error_log {tmp}/nginx-error.log warn;
pid {tmp}/nginx-{port}.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    upstream simulator {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://simulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /static {{
            default_type application/json;
            return 200 '{{"status": "in_progress", "progress": 50}}';
        }}
    }}
}}
"""


def start_nginx(tmp: Path, upstream_port: int) -> tuple[Proc, int] | None:
    """nginx as a bare keep-alive reverse proxy; None (with a note) when it is not installed."""
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        return None
    port = free_port()
    conf = tmp / f"nginx-{port}.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, port=port, upstream_port=upstream_port))
    proc = Proc(f"nginx:{port}", [nginx, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"], tmp / "nginx.log")
    wait_ready(f"http://127.0.0.1:{port}/static", proc)
    return proc, port


# --- load -----------------------------------------------------------------------------------


@dataclass
class Run:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float | None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk(port: int, conns: int, seconds: float, lua_args: Sequence[str], proc: Proc | None = None) -> Run:
    """One wrk run; `proc`'s CPU time per request is measured over it."""
    cmd = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}",
        "--",
        *lua_args,
    ]
    cpu_before = proc.cpu_seconds() if proc else 0.0
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    cpu = proc.cpu_seconds() - cpu_before if proc else 0.0
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRK-JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    doc = json.loads(line.removeprefix("WRK-JSON "))
    errors = sum(doc[k] for k in ("connect_errors", "read_errors", "write_errors", "non_2xx", "timeouts"))
    return Run(
        requests=doc["requests"],
        seconds=doc["duration_us"] / 1e6,
        p50_ms=doc["p50_us"] / 1000,
        p99_ms=doc["p99_us"] / 1000,
        errors=errors,
        cpu_us_per_request=(cpu / doc["requests"] * 1e6) if proc and doc["requests"] else None,
    )


@dataclass
class Target:
    name: str
    port: int
    lua_args: list[str]
    proc: Proc | None = None  # whose CPU time per request to report


@dataclass
class Row:
    workload: str
    target: str
    conns: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float | None
    ratio: float | None = None
    added_p50_ms: float | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


def measure(workload: str, targets: Sequence[Target], conns: int, args: argparse.Namespace) -> list[Row]:
    """Each target in turn, `rounds` times; rows hold the median of the rounds, ratios to the first target."""
    runs: dict[str, list[Run]] = defaultdict(list)
    for _ in range(args.rounds):
        for target in targets:
            wrk(target.port, conns, args.warmup, target.lua_args)
            profiler = None
            if args.profile and target.name == GATEWAY and target.proc is not None:
                name = f"{workload.replace(' ', '').replace(',', '-')}-{conns}c"
                profiler = Profiler(Path(args.profile) / name, target.proc.pid, args.duration)
            runs[target.name].append(wrk(target.port, conns, args.duration, target.lua_args, target.proc))
            if profiler is not None:
                profiler.finish()
    rows = []
    for target in targets:
        got = runs[target.name]
        cpu = [r.cpu_us_per_request for r in got if r.cpu_us_per_request is not None]
        rows.append(
            Row(
                workload=workload,
                target=target.name,
                conns=conns,
                rps=statistics.median(r.rps for r in got),
                p50_ms=statistics.median(r.p50_ms for r in got),
                p99_ms=statistics.median(r.p99_ms for r in got),
                errors=sum(r.errors for r in got),
                cpu_us_per_request=statistics.median(cpu) if cpu else None,
                rounds=[{**asdict(r), "rps": r.rps} for r in got],
            )
        )
    base = rows[0]
    for row in rows[1:]:
        row.ratio = row.rps / base.rps if base.rps else None
        row.added_p50_ms = row.p50_ms - base.p50_ms
    for row in rows:
        print_row(row)
    return rows


class Profiler:
    """py-spy sampling the gateway during one run; writes raw stacks and a summary of where the time went."""

    def __init__(self, stem: Path, pid: int, seconds: float) -> None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        self.stem = stem
        self.raw = stem.with_suffix(".stacks.txt")
        cmd = ["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "250"]
        cmd += ["--format", "raw", "--nonblocking", "--output", str(self.raw)]
        self.popen = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finish(self) -> None:
        self.popen.wait(timeout=60)
        if self.raw.exists():
            summary = summarize_stacks(self.raw.read_text())
            self.stem.with_suffix(".top.txt").write_text(summary)
            print(f"profile: {self.stem.with_suffix('.top.txt')}")


def summarize_stacks(raw: str, top: int = 40) -> str:
    """Self and inclusive shares of samples per function, from py-spy's collapsed stacks."""
    own: dict[str, int] = defaultdict(int)
    inclusive: dict[str, int] = defaultdict(int)
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "", "self %  function"]
    lines += [f"{100 * n / total:6.1f}  {f}" for f, n in sorted(own.items(), key=lambda x: -x[1])[:top]]
    lines += ["", "incl %  function"]
    lines += [f"{100 * n / total:6.1f}  {f}" for f, n in sorted(inclusive.items(), key=lambda x: -x[1])[:top]]
    return "\n".join(lines) + "\n"


def _short(frame: str) -> str:
    """`handler (/long/path/site-packages/aiohttp/web.py:12)` -> `handler (aiohttp/web.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3", "/gateway/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/gateway/":
                path = "gateway/" + path
            break
    return f"{name} ({path})" if path else name


# --- setup ----------------------------------------------------------------------------------


async def _create_tasks(port: int, count: int) -> None:
    """Create `count` tasks through the gateway and poll each once, so its first status is on record."""
    import aiohttp

    headers = {"Authorization": f"Bearer {CLIENT_TOKEN}"}
    base = f"http://127.0.0.1:{port}/v1/videos"
    async with aiohttp.ClientSession(headers=headers) as session:
        sem = asyncio.Semaphore(32)

        async def one() -> None:
            async with sem:
                async with session.post(base, json=CREATE_BODY) as resp:
                    if resp.status != 200:
                        raise SystemExit(f"setup create failed: HTTP {resp.status} {await resp.text()}")
                    task_id = (await resp.json())["task_id"]
                async with session.get(f"{base}/{task_id}") as resp:
                    if resp.status != 200:
                        raise SystemExit(f"setup poll failed: HTTP {resp.status} {await resp.text()}")

        await asyncio.gather(*(one() for _ in range(count)))


def make_poll_lists(tmp: Path, gateway_port: int, database: Path, count: int, tag: str) -> tuple[Path, Path]:
    """Create `count` tasks through the gateway; write the poll lists for direct callers and for gateway clients."""
    asyncio.run(_create_tasks(gateway_port, count))
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        routes = db.execute("SELECT task_id, key_name FROM tasks").fetchall()
    keys = {f"key-{i}": key for i, key in enumerate(GATEWAY_KEYS)}
    random.Random(7).shuffle(routes)
    direct, via_gateway = tmp / f"polls-{tag}-direct.tsv", tmp / f"polls-{tag}-gateway.tsv"
    direct.write_text("".join(f"/v1/videos/{t}\tBearer {keys[k]}\n" for t, k in routes))
    via_gateway.write_text("".join(f"/v1/videos/{t}\tBearer {CLIENT_TOKEN}\n" for t, _ in routes))
    return direct, via_gateway


def fill_routes(database: Path, count: int, upstream_port: int) -> None:
    """A gateway database holding `count` completed task routes named bench-0000000, bench-0000001, ..."""
    store = SQLiteStore(str(database))

    async def schema() -> None:
        await store.open()
        await store.close()

    asyncio.run(schema())
    now = time.time()
    with sqlite3.connect(database) as db:

        def rows() -> Iterator[tuple[Any, ...]]:
            for i in range(count):
                task_id = f"bench-{i:07d}"
                body = (
                    f'{{"status": "completed", "progress": 100, "remixed_from_video_id": '
                    f'"http://127.0.0.1:{upstream_port}/files/{task_id}.mp4"}}'
                ).encode()
                yield task_id, f"key-{i % 3}", "bench", now, "completed", None, now, body

        db.execute("PRAGMA journal_mode = WAL")
        db.executemany(
            "INSERT INTO tasks (task_id, key_name, client, created_at, status, progress, updated_at, terminal_body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows(),
        )


def fill_route_cache(tmp: Path, port: int, count: int, rps: float, args: argparse.Namespace) -> int:
    """Poll enough distinct tasks to fill the gateway's route cache, so peak RSS is its worst case."""
    distinct = min(count, DEFAULT_CACHE_SIZE + DEFAULT_CACHE_SIZE // 5)
    if args.quick:
        return 0
    ids = list(range(distinct))
    random.Random(5).shuffle(ids)
    path = tmp / f"fill-{count}.tsv"
    path.write_text("".join(f"/v1/videos/bench-{i:07d}\tBearer {CLIENT_TOKEN}\n" for i in ids))
    seconds = min(120, int(distinct / max(rps, 1.0) * 1.3) + 2)
    print(f"filling the route cache: {distinct:,} distinct tasks polled over {seconds} s", flush=True)
    wrk(port, 64, seconds, ["list", str(path)])
    return distinct


def lookup_times(database: Path, count: int, lookups: int) -> dict[str, float]:
    """Time `Store.get_task` (the lookup behind every route-cache miss) for random ids, in microseconds."""

    async def run() -> list[float]:
        store = SQLiteStore(str(database))
        await store.open()
        rng = random.Random(11)
        times = []
        try:
            for _ in range(lookups):
                task_id = f"bench-{rng.randrange(count):07d}"
                started = time.perf_counter()
                task = await store.get_task(task_id)
                times.append((time.perf_counter() - started) * 1e6)
                assert task is not None
        finally:
            await store.close()
        return times

    times = sorted(asyncio.run(run()))
    return {
        "p50_us": times[len(times) // 2],
        "p99_us": times[int(len(times) * 0.99)],
        "mean_us": statistics.mean(times),
    }


def accounting(database: Path, simulator_port: int) -> dict[str, int]:
    """What the gateway counted against its keys, and what upstream counted for the same keys."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        (counted,) = db.execute("SELECT COALESCE(SUM(used), 0) FROM quota_usage").fetchone()
        (routes,) = db.execute("SELECT COUNT(*) FROM tasks").fetchone()
    with urllib.request.urlopen(f"http://127.0.0.1:{simulator_port}/_sim/stats", timeout=5) as resp:
        stats = json.load(resp)
    upstream = sum(stats["creates"][k] for k in GATEWAY_KEYS)
    return {"gateway_counted": int(counted), "gateway_routes": int(routes), "upstream_counted": int(upstream)}


# --- output ---------------------------------------------------------------------------------

HEADER = (
    f"{'workload':<36} {'target':<10} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
    f"{'x base':>7} {'+p50 ms':>8} {'CPU us/req':>10} {'errors':>6}"
)


def print_row(row: Row) -> None:
    ratio = f"{row.ratio:.2f}" if row.ratio is not None else "1.00"
    added = f"{row.added_p50_ms:+.3f}" if row.added_p50_ms is not None else ""
    cpu = f"{row.cpu_us_per_request:.0f}" if row.cpu_us_per_request is not None else ""
    print(
        f"{row.workload:<36} {row.target:<10} {row.conns:>5} {row.rps:>9.0f} {row.p50_ms:>8.3f} {row.p99_ms:>8.3f} "
        f"{ratio:>7} {added:>8} {cpu:>10} {row.errors:>6}",
        flush=True,
    )


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)
    print(HEADER, flush=True)


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((x.split(":", 1)[1].strip() for x in out.splitlines() if x.startswith("Model name")), model)
    except OSError:
        pass
    load = os.getloadavg()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load],
    }


def version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except OSError:
        return "absent"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


# --- the run --------------------------------------------------------------------------------


def targets_for(
    sim: tuple[Proc, int],
    gw: tuple[Proc, int],
    nginx: tuple[Proc, int] | None,
    direct: list[str],
    via: list[str],
    passthrough: tuple[Proc, int] | None = None,
) -> list[Target]:
    found = [Target(BASELINE, sim[1], direct, sim[0]), Target(GATEWAY, gw[1], via, gw[0])]
    if passthrough is not None:
        found.append(Target(PASSTHROUGH, passthrough[1], direct, passthrough[0]))
    if nginx is not None:
        found.append(Target(NGINX, nginx[1], direct, nginx[0]))
    return found


@contextmanager
def running(procs: list[Proc]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in reversed(procs):
            proc.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each run (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every target this many times (median)")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks the poll workloads spread over")
    parser.add_argument("--routes", type=int, default=1_000_000, help="routes in the large database")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up, 100,000 routes")
    parser.add_argument("--no-uvloop", action="store_true", help="run the gateway on asyncio's own loop")
    parser.add_argument(
        "--workers", type=int, default=1, help="gateway processes on the port (serve --workers; default 1)"
    )
    parser.add_argument("--only", action="append", help="run only these parts: running, completed, creates, routes")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument("--profile", metavar="DIR", help="sample the gateway with py-spy during its runs, into DIR")
    parser.add_argument(
        "--gateway-src", metavar="DIR", help="measure the gateway of another checkout (e.g. an older commit)"
    )
    parser.add_argument(
        "--gateway-config",
        metavar="JSON",
        help='config sections for the gateway, e.g. \'{"log": {"level": "WARNING"}}\' (replace the defaults)',
    )
    args = parser.parse_args(argv)
    global GATEWAY_WORKERS
    GATEWAY_WORKERS = args.workers
    if args.gateway_config:
        GATEWAY_SECTIONS.update(json.loads(args.gateway_config))
    if args.gateway_src:
        global GATEWAY_SOURCE
        GATEWAY_SOURCE = Path(args.gateway_src).resolve()
    if args.quick:
        args.duration, args.warmup, args.routes = 3.0, 1.0, 100_000
    parts = set(args.only or ("running", "completed", "creates", "routes"))

    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk (Debian/Ubuntu)", file=sys.stderr)
        return 2
    try:
        import uvloop  # noqa: F401
    except ImportError:
        print("note: uvloop is not installed (pip install uvloop): the simulator baseline runs on asyncio's loop")

    info = {
        "machine": machine(),
        "wrk": version(["wrk", "--version"]),
        "nginx": version(["nginx", "-v"]) if shutil.which("nginx") or Path("/usr/sbin/nginx").exists() else "absent",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "gateway_loop": "asyncio" if args.no_uvloop else "uvloop",
        "gateway_workers": args.workers,
    }
    print(f"machine: {info['machine']}")
    print(
        f"wrk: {info['wrk']}; nginx: {info['nginx']}; gateway loop: {info['gateway_loop']}; "
        f"gateway workers: {info['gateway_workers']}"
    )
    print(f"each figure: median of {args.rounds} run(s) of {args.duration:g} s after {args.warmup:g} s of warm-up")
    if info["nginx"] == "absent":
        print("note: nginx is not installed (apt-get install nginx-light): its rows are skipped")
    uvloop_gw = not args.no_uvloop
    results: list[Row] = []
    extra: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="agnes-bench-") as tmpdir:
        tmp = Path(tmpdir)

        if parts & {"running", "creates"}:
            # Tasks that never finish; every poll goes upstream (freshness 0) to show the pass-through cost.
            sim, sim_port = start_simulator(tmp, task_seconds=1e9)
            db = tmp / "running.db"
            gw = start_gateway(tmp, sim_port, db, uvloop=uvloop_gw, poll={"freshness_s": 0})
            nginx = start_nginx(tmp, sim_port)
            passthrough = start_passthrough(tmp, sim_port)
            procs = [sim, gw[0], passthrough[0], *([nginx[0]] if nginx else [])]
            with running(procs):
                if nginx:
                    section("load generator ceiling (wrk against a static nginx answer)")
                    ceiling = wrk(nginx[1], 64, args.duration / 2, ["list", str(write_static_list(tmp))])
                    extra["wrk_ceiling_rps"] = ceiling.rps
                    print(f"wrk alone: {ceiling.rps:.0f} req/s at 64 connections (p50 {ceiling.p50_ms:.3f} ms)")
                if "running" in parts:
                    direct, via = make_poll_lists(tmp, gw[1], db, args.tasks, "running")
                    targets = targets_for(
                        (sim, sim_port), gw, nginx, ["list", str(direct)], ["list", str(via)], passthrough
                    )
                    section(f"polls of running tasks ({args.tasks} tasks, every poll goes upstream)")
                    results += measure("polls, running tasks", targets, 1, args)
                    results += measure("polls, running tasks", targets, 64, args)
                if "creates" in parts:
                    body = tmp / "create.json"
                    body.write_text(json.dumps(CREATE_BODY))
                    targets = [
                        Target(BASELINE, sim_port, ["post", str(body), f"Bearer {DIRECT_KEY}"], sim),
                        Target(GATEWAY, gw[1], ["post", str(body), f"Bearer {CLIENT_TOKEN}"], gw[0]),
                    ]
                    direct_post = ["post", str(body), f"Bearer {DIRECT_KEY}"]
                    targets.append(Target(PASSTHROUGH, passthrough[1], direct_post, passthrough[0]))
                    if nginx:
                        targets.append(Target(NGINX, nginx[1], direct_post, nginx[0]))
                    section("creates (quota reserved in SQLite before each is forwarded)")
                    results += measure("creates", targets, 64, args)
                    time.sleep(1.0)  # requests wrk left in flight finish
                    counts = accounting(db, sim_port)
                    counts["exact"] = int(
                        counts["gateway_counted"] == counts["upstream_counted"] == counts["gateway_routes"]
                    )
                    extra["create_accounting"] = counts
                    print(
                        f"quota accounting: gateway counted {counts['gateway_counted']}, upstream counted "
                        f"{counts['upstream_counted']}, routes recorded {counts['gateway_routes']}: "
                        + ("exact" if counts["exact"] else "MISMATCH")
                    )
                extra["gateway_peak_rss_mb"] = gw[0].memory_mb()

        if "completed" in parts:
            sim, sim_port = start_simulator(tmp, task_seconds=0)
            db = tmp / "completed.db"
            gw = start_gateway(tmp, sim_port, db, uvloop=uvloop_gw)
            nginx = start_nginx(tmp, sim_port)
            procs = [sim, gw[0], *([nginx[0]] if nginx else [])]
            with running(procs):
                direct, via = make_poll_lists(tmp, gw[1], db, args.tasks, "completed")
                targets = targets_for((sim, sim_port), gw, nginx, ["list", str(direct)], ["list", str(via)])
                section(f"polls of completed tasks ({args.tasks} tasks, the gateway answers from its own state)")
                results += measure("polls, completed tasks", targets, 1, args)
                results += measure("polls, completed tasks", targets, 64, args)
                polls = sum(
                    json.load(urllib.request.urlopen(f"http://127.0.0.1:{sim_port}/_sim/stats"))["polls"].values()
                )
                extra["completed_upstream_polls"] = polls
                extra["gateway_peak_rss_mb_completed"] = gw[0].memory_mb()

        if "routes" in parts:
            sim, sim_port = start_simulator(tmp, task_seconds=0)
            with running([sim]):
                section(f"task routes: 1,000 vs {args.routes:,} in the database (random completed tasks)")
                routes: dict[str, Any] = {}
                for count in (1000, args.routes):
                    db = tmp / f"routes-{count}.db"
                    started = time.monotonic()
                    fill_routes(db, count, sim_port)
                    filled = time.monotonic() - started
                    lookup = lookup_times(db, count, 5000)
                    gw = start_gateway(tmp, sim_port, db, uvloop=uvloop_gw)
                    with running([gw[0]]):
                        target = [Target(GATEWAY, gw[1], ["random", str(count), f"Bearer {CLIENT_TOKEN}"], gw[0])]
                        rows = measure(f"polls, {count:,} routes", target, 1, args)
                        rows += measure(f"polls, {count:,} routes", target, 64, args)
                        results += rows
                        distinct = fill_route_cache(tmp, gw[1], count, rows[1].rps, args)
                        routes[str(count)] = {
                            "fill_s": filled,
                            "db_mb": db.stat().st_size / 2**20,
                            "store_lookup": lookup,
                            "gateway_peak_rss_mb": gw[0].memory_mb(),
                            "gateway_peak_rss_mb_per_process": gw[0].memory_mb(largest=True),
                            "polls_1_conn_p50_ms": rows[0].p50_ms,
                            "polls_64_conns_rps": rows[1].rps,
                            "distinct_tasks_polled_before_rss": distinct,
                        }
                    print(
                        f"{count:>9,} routes: database {routes[str(count)]['db_mb']:.0f} MB; Store.get_task p50 "
                        f"{lookup['p50_us']:.0f} us, p99 {lookup['p99_us']:.0f} us; gateway peak RSS "
                        f"{routes[str(count)]['gateway_peak_rss_mb']:.0f} MB"
                        + (
                            f" in all, largest process {routes[str(count)]['gateway_peak_rss_mb_per_process']:.0f} MB"
                            if GATEWAY_WORKERS > 1
                            else ""
                        )
                    )
                    db.unlink()
                extra["routes"] = routes

    summary = targets_summary(results, extra)
    print("\n== targets")
    for line in summary:
        print(line)
    if args.json:
        Path(args.json).write_text(
            json.dumps({**info, "rows": [asdict(r) for r in results], **extra, "targets": summary}, indent=2)
        )
        print(f"\nwritten to {args.json}")
    return 0


def write_static_list(tmp: Path) -> Path:
    path = tmp / "static.tsv"
    path.write_text("/static\tBearer none\n")
    return path


def targets_summary(rows: list[Row], extra: dict[str, Any]) -> list[str]:
    """The performance targets, each with the figure it was judged on."""
    by: dict[tuple[str, str, int], Row] = {(r.workload, r.target, r.conns): r for r in rows}
    out: list[str] = []

    def check(name: str, ok: bool | None, figure: str) -> None:
        verdict = "n/a " if ok is None else ("met " if ok else "MISSED")
        out.append(f"{verdict:<7} {name}: {figure}")

    r = by.get(("polls, running tasks", GATEWAY, 64))
    check("running polls, 64 conns >= 0.40x baseline", r and r.ratio is not None and r.ratio >= 0.40, _ratio(r))
    r = by.get(("polls, running tasks", GATEWAY, 1))
    check(
        "added p50 at 1 conn <= 0.4 ms",
        r and r.added_p50_ms is not None and r.added_p50_ms <= 0.4,
        f"{r.added_p50_ms:+.3f} ms" if r and r.added_p50_ms is not None else "not run",
    )
    for conns in (1, 64):
        r = by.get(("polls, completed tasks", GATEWAY, conns))
        check(
            f"completed polls, {conns} conns >= 1.0x baseline", r and r.ratio is not None and r.ratio >= 1.0, _ratio(r)
        )
    r = by.get(("creates", GATEWAY, 64))
    acc = extra.get("create_accounting")
    check("creates >= 0.30x baseline", r and r.ratio is not None and r.ratio >= 0.30, _ratio(r))
    check("creates: exact quota accounting", bool(acc["exact"]) if acc else None, json.dumps(acc) if acc else "not run")
    routes = extra.get("routes")
    if routes:
        big = max(routes, key=int)
        rss = routes[big]["gateway_peak_rss_mb"]
        each = routes[big].get("gateway_peak_rss_mb_per_process", rss)
        check(f"peak RSS <= 100 MB with {int(big):,} routes", rss <= 100, f"{rss:.0f} MB")
        if GATEWAY_WORKERS > 1:
            check(f"peak RSS <= 100 MB per gateway process with {int(big):,} routes", each <= 100, f"{each:.0f} MB")
        small = routes["1000"]["store_lookup"]["p50_us"]
        large = routes[big]["store_lookup"]["p50_us"]
        check(
            "lookup time flat 1,000 -> " + f"{int(big):,}",
            large <= 2 * small,
            f"Store.get_task p50 {small:.0f} us -> {large:.0f} us; poll p50 at 1 conn "
            f"{routes['1000']['polls_1_conn_p50_ms']:.3f} ms -> {routes[big]['polls_1_conn_p50_ms']:.3f} ms",
        )
    else:
        check("peak RSS with 1M routes / flat lookups", None, "not run")
    return out


def _ratio(row: Row | None) -> str:
    if row is None or row.ratio is None:
        return "not run"
    return f"{row.ratio:.2f}x ({row.rps:.0f} req/s)"


if __name__ == "__main__":
    sys.exit(main())
