"""Overload: bounded upstream calls and queue, 503 at once beyond them, slow clients cut off, memory bounded."""

from __future__ import annotations

import asyncio
import resource
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml

from gateway.overload import Admission, Overloaded
from gateway.simulator import Fault

from .conftest import BODY, KEY_A, KEY_B, Running, Upstream
from .procs import free_port, start, stop, wait_ready

MakeGateway = Callable[..., Awaitable[Running]]

# --- the admission gate ------------------------------------------------------------------------------------


async def test_admission_holds_a_bounded_queue_and_refuses_beyond_it_at_once() -> None:
    gate = Admission(limit=1, max_queued=1, queue_timeout_s=5)
    entered: list[int] = []
    release = asyncio.Event()

    async def hold(n: int) -> None:
        async with gate.slot():
            entered.append(n)
            await release.wait()

    first = asyncio.ensure_future(hold(1))
    await asyncio.sleep(0)  # let it take the slot
    second = asyncio.ensure_future(hold(2))
    await asyncio.sleep(0)
    assert (gate.active, gate.queued) == (1, 1)
    with pytest.raises(Overloaded) as refused:
        async with gate.slot():
            pass
    assert (refused.value.status, refused.value.retry_after) == (503, 1)
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert entered == [1, 2]
    assert (gate.active, gate.queued) == (0, 0)


async def test_admission_queue_wait_is_bounded_and_a_cancelled_waiter_leaks_no_slot() -> None:
    gate = Admission(limit=1, max_queued=5, queue_timeout_s=0.05)
    async with gate.slot():
        with pytest.raises(Overloaded, match="within"):
            async with gate.slot():
                pass
        waiter = asyncio.ensure_future(gate.slot().__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.queued == 0
    assert gate.active == 0
    async with gate.slot():
        assert gate.active == 1


# --- through the gateway -----------------------------------------------------------------------------------


async def test_beyond_the_upstream_slots_and_queue_the_gateway_answers_503_at_once(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    gw = await make_gateway(limits={"max_concurrent_upstream": 2, "max_queued": 1})
    upstream.state.add_fault(Fault(kind="hold", operation="create", times=-1))
    pending = {asyncio.ensure_future(gw.create()) for _ in range(6)}
    await asyncio.wait_for(upstream.state.until_held(2), 5)
    done: set[asyncio.Future[aiohttp.ClientResponse]] = set()
    for _ in range(6):  # bounded: each round completes at least one request, or times out
        if len(done) >= 3:
            break
        finished, pending = await asyncio.wait(pending, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert finished, "refusals did not come back while upstream was busy"
        done |= finished
    refused = [f.result() for f in done]
    assert [r.status for r in refused] == [503] * 3
    for resp in refused:
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "overloaded"
    metrics = await (await gw.client.get("/metrics")).text()
    assert "agnes_gateway_overload_rejections_total 3.0" in metrics
    assert "agnes_gateway_upstream_calls_in_flight 2.0" in metrics
    assert "agnes_gateway_requests_queued 1.0" in metrics
    # Two in flight hold one unit each; the queued one has not reserved any yet.
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 2
    upstream.state.clear_faults()
    await upstream.state.release_held()
    answers = await asyncio.wait_for(asyncio.gather(*pending), 5)
    assert [r.status for r in answers] == [200] * 3
    assert upstream.state.creates[KEY_A] + upstream.state.creates[KEY_B] == 3


async def test_a_request_waits_in_the_queue_at_most_queue_timeout(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    gw = await make_gateway(limits={"max_concurrent_upstream": 1, "max_queued": 4, "queue_timeout_s": 0.2})
    upstream.state.add_fault(Fault(kind="hold", operation="create", times=1))
    held = asyncio.ensure_future(gw.create())
    await asyncio.wait_for(upstream.state.until_held(1), 5)
    resp = await gw.create()
    assert resp.status == 503
    assert "within 0.2 s" in (await resp.json())["error"]["message"]
    await upstream.state.release_held()
    assert (await held).status == 200


async def test_a_trickling_body_gets_408_and_the_connection_closes(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    gw = await make_gateway(limits={"body_read_timeout_s": 0.3})
    server = gw.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)  # read() returns at EOF: the gateway closed it
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b'"body_timeout"' in body
    assert upstream.state.requests == 0
    assert await gw.gateway.store.usage(gw.gateway.pool.day) == {}


# --- a flood of idle and slow connections against the real process -----------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def accept_queue(port: int) -> int:
    """Connections the kernel holds for the listening socket on `port` that the gateway has not accepted yet."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
            return int(fields[4].split(":")[1], 16)
    return 0


SLOW_HEADERS = b"GET /v1/videos/abc HTTP/1.1\r\nHost: x\r\nX-Slow: "
SLOW_BODY = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 99\r\n\r\n{"


def open_flood(port: int, count: int, first_bytes: bytes = b"") -> list[socket.socket]:
    """Open `count` connections that send `first_bytes` (or nothing) and then stay silent.

    Paced so the kernel's accept queue never overflows: an overflowing queue delays connections by
    seconds of SYN-ACK retries, and the idle timeout of such a connection starts only when it is accepted.
    """
    socks: list[socket.socket] = []
    for i in range(count):
        if i % 250 == 0:
            for _ in range(1000):  # at most ~10 s
                if accept_queue(port) < 500:
                    break
                time.sleep(0.01)
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first_bytes:
            s.sendall(first_bytes)
        socks.append(s)
    return socks


def closed_by_server(s: socket.socket, within_s: float) -> bytes | None:
    """What the server sent before closing `s` (EOF or reset) within `within_s`; None if it stayed open."""
    s.settimeout(within_s)
    received = b""
    try:
        while chunk := s.recv(65536):
            received += chunk
    except ConnectionResetError:
        return received
    except TimeoutError:
        return None
    return received


async def serve_process(upstream: Upstream, tmp_path: Path, **limits: float) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": port},
                "upstream": {"base_url": upstream.url},
                "database": str(tmp_path / "gateway.db"),
                "keys": [{"name": "a", "key": KEY_A}],
                "limits": limits,
                "log": {"level": "WARNING"},
            }
        )
    )
    proc = await start(["serve", "--config", str(config)])
    await wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
    return proc, port


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_ten_thousand_idle_connections_keep_memory_bounded(upstream: Upstream, tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 10_500:
        pytest.fail(f"needs 10,500 file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the gateway inherits it
    proc, port = await serve_process(upstream, tmp_path)
    base = f"http://127.0.0.1:{port}"
    socks: list[socket.socket] = []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(20):  # warm the request path up before measuring
                async with session.post(f"{base}/v1/videos", json=BODY) as resp:
                    assert resp.status == 200
            fds, before = open_fds(proc.pid), rss_mib(proc.pid)
            socks = await asyncio.to_thread(open_flood, port, 10_000)
            async with session.get(f"{base}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as resp:
                assert resp.status == 200  # still serving while flooded
            for _ in range(500):  # the last few may still sit in the accept queue (bounded: ~5 s)
                if open_fds(proc.pid) - fds >= 10_000:
                    break
                await asyncio.sleep(0.01)
            assert open_fds(proc.pid) - fds >= 10_000  # all of them open at once in the gateway
            flooded = rss_mib(proc.pid)
            print(f"gateway RSS {before:.1f} MiB -> {flooded:.1f} MiB with {len(socks)} idle connections")
            # About 4 KiB per idle connection on aiohttp 3.14; 12 KiB is the bound asserted.
            assert flooded - before < len(socks) * 12 / 1024
            for s in socks:
                s.close()
            for _ in range(500):  # the gateway lets go of every one of them (bounded: ~5 s)
                if open_fds(proc.pid) <= fds + 5:
                    break
                await asyncio.sleep(0.01)
            assert open_fds(proc.pid) <= fds + 5
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await stop(proc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_idle_slow_header_and_slow_body_connections_are_cut_off(upstream: Upstream, tmp_path: Path) -> None:
    proc, port = await serve_process(upstream, tmp_path, idle_timeout_s=1, body_read_timeout_s=1)
    socks: list[socket.socket] = []
    try:
        fds = open_fds(proc.pid)
        for first_bytes in (b"", SLOW_HEADERS, SLOW_BODY):
            socks += await asyncio.to_thread(open_flood, port, 100, first_bytes)
        answers = await asyncio.to_thread(lambda: [closed_by_server(s, 10) for s in socks])
        # Idle and slow-header connections are closed without a word; slow bodies get a 408 first.
        assert answers[:200] == [b""] * 200
        assert all(a is not None and a.startswith(b"HTTP/1.1 408 ") and b"body_timeout" in a for a in answers[200:])
        assert open_fds(proc.pid) <= fds + 5
        assert upstream.state.requests == 0
    finally:
        for s in socks:
            s.close()
        await stop(proc)
