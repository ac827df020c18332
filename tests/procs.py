"""Running the real `agnes-gateway` command in a child process, for crash and CLI tests."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start(
    args: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> asyncio.subprocess.Process:
    """Start `python -m gateway ARGS` with its output kept in a pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


async def wait_ready(url: str, proc: asyncio.subprocess.Process, within_s: float = 15.0) -> None:
    """Wait until `url` answers 200 (bounded), failing early if the process exits."""
    deadline = asyncio.get_running_loop().time() + within_s
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            if proc.returncode is not None:
                out = await proc.stdout.read() if proc.stdout else b""
                raise AssertionError(f"process exited with {proc.returncode}: {out.decode(errors='replace')}")
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not become ready in {within_s} s")


async def stop(proc: asyncio.subprocess.Process, sig: int | None = None) -> bytes:
    """Stop the process (SIGTERM by default) and return everything it printed."""
    if proc.returncode is None:
        if sig is None:
            proc.terminate()
        else:
            proc.send_signal(sig)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=15)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
    return out or b""


async def read_until(proc: asyncio.subprocess.Process, marker: bytes, within_s: float = 15.0) -> bytes:
    """Read the process's output line by line until a line holds `marker` (bounded); returns what was read."""
    assert proc.stdout is not None
    seen = b""
    deadline = asyncio.get_running_loop().time() + within_s
    while marker not in seen:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise AssertionError(f"{marker!r} not printed within {within_s} s; got: {seen.decode(errors='replace')}")
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=left)
        except TimeoutError:
            continue
        if not line:
            raise AssertionError(f"process ended before printing {marker!r}: {seen.decode(errors='replace')}")
        seen += line
    return seen


async def wait_exit(proc: asyncio.subprocess.Process, within_s: float = 15.0) -> bytes:
    """Wait for the process to end on its own (bounded) and return the rest of its output."""
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=within_s)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise AssertionError(f"process did not exit within {within_s} s") from None
    return out or b""


async def start_demo(database: Path, *, cwd: Path | None = None) -> tuple[asyncio.subprocess.Process, str]:
    """Start `agnes-gateway demo` on free ports with instant videos; returns it and the gateway's base URL."""
    port, upstream_port = free_port(), free_port()
    args = ["demo", "--port", str(port), "--upstream-port", str(upstream_port), "--database", str(database)]
    proc = await start([*args, "--task-seconds", "0"], cwd=cwd)
    return proc, f"http://127.0.0.1:{port}"
