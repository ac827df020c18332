"""`agnes-gateway generate`: the real command in a child process, against a live gateway (or the demo)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pty
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.clock import ManualClock
from gateway.generate import Exit, Progress

from .conftest import KEY_A, TOKEN, Running, Upstream, gateway_config
from .procs import free_port, start_demo, stop, wait_ready

ROOT = Path(__file__).parent.parent
MakeGateway = Callable[..., Awaitable[Running]]


@dataclass
class Result:
    code: int
    out: str
    err: str


async def generate(*args: str, env: dict[str, str] | None = None, within_s: float = 30) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "generate",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=within_s)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def files(out: Path, folder: Path) -> tuple[bytes, list[Path]]:
    """The output's bytes, and any partial download left in `folder`."""
    return out.read_bytes(), list(folder.glob(".*.part"))


def base(gw: Running) -> str:
    return str(gw.client.make_url("")).rstrip("/")


async def test_generate_end_to_end_against_the_demo(tmp_path: Path) -> None:
    demo, url = await start_demo(tmp_path / "d.db", cwd=ROOT)
    try:
        await wait_ready(f"{url}/healthz", demo)
        out = tmp_path / "cat.mp4"
        done = await generate("A cat playing piano", "--url", url, "-o", str(out), "--interval", "0.05")
        assert done.code == Exit.OK, done.err
        assert done.out.strip().splitlines()[-1] == str(out.resolve())
        data, leftovers = files(out, tmp_path)
        assert data[4:8] == b"ftyp" and len(data) == 1_400_000
        assert leftovers == []  # the partial file was renamed into place
        assert "completed 100%" in done.out  # plain lines: stdout is a pipe here

        failed = await generate("[fail] a forbidden scene", "--url", url, "-o", str(tmp_path), "--interval", "0.05")
        assert failed.code == Exit.FAILED
        assert "moderation" in failed.err
    finally:
        await stop(demo, signal.SIGINT)


async def test_exit_codes_tell_quota_refusal_and_network_apart(
    make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path
) -> None:
    dry = await make_gateway(keys=[{"name": "a", "key": KEY_A, "daily_limit": 0}])
    guarded = await make_gateway(
        gateway_config(upstream.url, tmp_path / "g2.db", clients=[{"name": "team-a", "token": TOKEN}])
    )
    quota, refused, offline, usage = await asyncio.gather(
        generate("x", "--url", base(dry), "-o", str(tmp_path)),
        generate("x", "--url", base(guarded), env={"AGNES_GATEWAY_TOKEN": "not-the-token-0000"}),
        generate("x", "--url", f"http://127.0.0.1:{free_port()}"),
        generate("--url", base(dry)),
    )
    assert quota.code == Exit.QUOTA
    assert "retry in" in quota.err
    assert refused.code == Exit.REFUSED
    assert "401" in refused.err and "not-the-token" not in refused.err + refused.out
    assert offline.code == Exit.NETWORK
    assert usage.code == Exit.USAGE
    assert upstream.state.requests == 0


async def test_ctrl_c_leaves_the_task_id_and_resume_finishes(
    gw: Running, upstream: Upstream, clock: ManualClock, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "generate",
        "A long one",
        "--url",
        base(gw),
        "--interval",
        "0.05",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), timeout=15)
        assert first.startswith(b"task ")
        task_id = first.split()[1].decode()
        # Wait for the first progress line: the command is polling (the clock is still, so it never ends).
        assert b"queued 0%" in await asyncio.wait_for(proc.stdout.readline(), timeout=15)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == Exit.INTERRUPTED
    assert f"agnes-gateway generate --resume {task_id}" in err.decode()
    assert upstream.state.creates.total() == 1

    clock.advance(10)
    resumed = await generate("--resume", task_id, "--url", base(gw), "-o", str(tmp_path / "v.mp4"))
    assert resumed.code == Exit.OK, resumed.err
    assert (tmp_path / "v.mp4").read_bytes() == upstream.state.video()
    assert upstream.state.creates.total() == 1  # resuming made no second video


async def test_live_progress_bar_on_a_terminal(
    make_gateway: MakeGateway, ticking_upstream: Upstream, tmp_path: Path
) -> None:
    gw = await make_gateway(gateway_config(ticking_upstream.url, tmp_path / "g.db"))
    master, slave = pty.openpty()
    screen = bytearray()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            screen.extend(os.read(master, 65536))
        except OSError:  # EIO once the child has closed the terminal
            loop.remove_reader(master)

    loop.add_reader(master, readable)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "generate",
            "A sunrise",
            "--url",
            base(gw),
            "--interval",
            "0.01",
            "-o",
            str(tmp_path / "sun.mp4"),
            stdout=slave,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        os.close(slave)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        with contextlib.suppress(OSError):
            screen.extend(os.read(master, 65536))
    finally:
        loop.remove_reader(master)
        os.close(master)
    assert proc.returncode == 0, err
    text = screen.decode()
    # One line redrawn in place with \r: queued, 40 %, 80 %, then done.
    assert "\r[" in text and "█" in text
    for step in ("  0% queued", " 40% in_progress", " 80% in_progress", "100% completed"):
        assert step in text
    assert text.strip().splitlines()[-1] == str((tmp_path / "sun.mp4").resolve())


async def test_upstream_mode_talks_to_the_api_directly(ticking_upstream: Upstream, tmp_path: Path) -> None:
    done = await generate(
        "Straight to the source",
        "--upstream",
        "--url",
        ticking_upstream.url,
        "--interval",
        "0.01",
        "-o",
        str(tmp_path / "d.mp4"),
        env={"AGNES_API_KEY": KEY_A},
    )
    assert done.code == Exit.OK, done.err
    assert (tmp_path / "d.mp4").read_bytes() == ticking_upstream.state.video()
    assert ticking_upstream.state.creates[KEY_A] == 1


def test_progress_prints_a_line_per_change_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(out, tty=False)
    for status, percent in (("queued", 0), ("in_progress", 40), ("in_progress", 40), ("completed", 100)):
        progress.update(status, percent)
    lines = out.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[0] for line in lines] == ["queued 0%", "in_progress 40%", "completed 100%"]
    assert "\r" not in out.getvalue()
