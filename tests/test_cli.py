"""The `agnes-gateway` command as a user runs it: check-config, demo, simulate."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from .conftest import BODY
from .procs import free_port, start, start_demo, stop, wait_ready

ROOT = Path(__file__).parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30, env=env, cwd=ROOT
    )


def test_check_config_accepts_a_good_file_without_showing_secrets(tmp_path: Path) -> None:
    config = tmp_path / "g.yaml"
    config.write_text("keys:\n  - {name: main, key: sk-secret-key-000000009999, daily_limit: 5}\n")
    result = run("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "main" in result.stdout and "…9999" in result.stdout
    assert "sk-secret-key" not in result.stdout


def test_check_config_names_the_bad_field(tmp_path: Path) -> None:
    config = tmp_path / "g.yaml"
    config.write_text("keys:\n  - {name: main, key: sk-1}\nquota: {timezone: Nowhere/Land}\n")
    result = run("check-config", str(config))
    assert result.returncode == 2
    assert "quota.timezone" in result.stderr


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "check-config", "simulate", "demo", "keys"):
        assert command in result.stdout


async def test_demo_runs_a_gateway_over_the_simulator(tmp_path: Path) -> None:
    proc, base = await start_demo(tmp_path / "d.db")
    try:
        await wait_ready(f"{base}/healthz", proc)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/v1/videos", json=BODY) as resp:
                assert resp.status == 200
                task_id = (await resp.json())["task_id"]
            async with session.get(f"{base}/v1/videos/{task_id}") as resp:
                doc = await resp.json()
            assert doc["status"] == "completed"
            async with session.get(doc["remixed_from_video_id"]) as resp:
                assert resp.status == 200
                assert (await resp.read())[4:8] == b"ftyp"
            # 18 units in the demo pool: the 19th create finds it dry.
            codes = []
            for _ in range(18):
                async with session.post(f"{base}/v1/videos", json=BODY) as resp:
                    codes.append(resp.status)
            assert codes[-1] == 429 and codes.count(200) == 17
    finally:
        out = await stop(proc, signal.SIGINT)
    assert b"curl" in out
    assert proc.returncode == 0


async def two_creates_on_simulator(*args: str) -> list[tuple[int, str]]:
    """Run `agnes-gateway simulate ARGS` with key sk-sim-0001; status and content type of two creates."""
    port = free_port()
    proc = await start(["simulate", "--port", str(port), *args])
    base = f"http://127.0.0.1:{port}"
    answers = []
    try:
        await wait_ready(f"{base}/_sim/stats", proc)
        headers = {"Authorization": "Bearer sk-sim-0001"}
        async with aiohttp.ClientSession(headers=headers) as session:
            for _ in range(2):
                async with session.post(f"{base}/v1/videos", json=BODY) as resp:
                    answers.append((resp.status, resp.content_type))
    finally:
        await stop(proc)
    return answers


async def test_simulate_serves_the_upstream_api() -> None:
    answers = await two_creates_on_simulator("--key", "sk-sim-0001:1", "--task-seconds", "0")
    assert [status for status, _ in answers] == [200, 429]


async def test_simulate_takes_faults_for_the_whole_run() -> None:
    fault = '{"kind": "html_error", "status": 503, "operation": "create", "times": 1}'
    answers = await two_creates_on_simulator("--key", "sk-sim-0001", "--fault", fault)
    assert answers[0] == (503, "text/html")
    assert answers[1][0] == 200


def test_simulate_refuses_a_bad_fault() -> None:
    result = run("simulate", "--fault", '{"kind": "meteor"}')
    assert result.returncode == 2
    assert "--fault" in result.stderr and "meteor" in result.stderr


async def test_serve_on_uvloop_proxies_to_upstream(tmp_path: Path) -> None:
    upstream_port, port = free_port(), free_port()
    simulator = await start(["simulate", "--port", str(upstream_port), "--key", "sk-sim-uvloop-0001"])
    config = tmp_path / "g.yaml"
    config.write_text(
        f"listen: {{port: {port}}}\nupstream: {{base_url: 'http://127.0.0.1:{upstream_port}'}}\n"
        f"database: {tmp_path / 'g.db'}\nkeys: [{{name: main, key: sk-sim-uvloop-0001}}]\n"
    )
    gateway = await start(["serve", "--uvloop", "--config", str(config)])
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(f"http://127.0.0.1:{upstream_port}/_sim/stats", simulator)
        await wait_ready(f"{base}/healthz", gateway)
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/v1/videos", json=BODY) as resp:
                assert resp.status == 200
                task_id = (await resp.json())["task_id"]
            async with session.get(f"{base}/v1/videos/{task_id}") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] in {"queued", "in_progress"}
    finally:
        out = await stop(gateway)
        await stop(simulator)
    assert gateway.returncode == 0, out
