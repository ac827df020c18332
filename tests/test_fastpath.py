"""Polls answered on the connection (gateway.fastpath): aiohttp's answers, in the order asked, without aiohttp."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import create_app
from gateway.appkeys import GATEWAY
from gateway.clock import ManualClock
from gateway.config import parse_config
from gateway.fastpath import FAST_PATH_AIOHTTP
from gateway.simulator import Fault

from .conftest import BODY, TOKEN, GatewayServer, Running, Upstream, gateway_config

MakeGateway = Callable[..., Awaitable[Running]]
#: On an aiohttp the fast path was not written for, the gateway takes aiohttp's way and these do not apply.
pytestmark = pytest.mark.skipif(
    not FAST_PATH_AIOHTTP.match(aiohttp.__version__), reason=f"no fast path on aiohttp {aiohttp.__version__}"
)
#: Headers that differ between any two answers: left out when answers are compared.
VARYING = frozenset({"X-Request-ID", "Date"})


async def completed_task(gw: Running, clock: ManualClock) -> str:
    task_id: str = (await (await gw.create()).json())["task_id"]
    clock.advance(60)
    assert (await (await gw.poll(task_id)).json())["status"] == "completed"
    return task_id


Answer = tuple[bytes, dict[str, str], bytes]


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    async with asyncio.timeout(5):
        status = (await reader.readline()).rstrip(b"\r\n")
        headers: dict[str, str] = {}
        while line := (await reader.readline()).rstrip(b"\r\n"):
            name, _, value = line.decode().partition(": ")
            headers[name] = value
        return status, headers, await reader.readexactly(int(headers["Content-Length"]))


async def exchange(gw: Running, raw: bytes, answers: int) -> list[Answer]:
    """Send `raw` (requests one after another, on one connection, in one write); read `answers` answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    try:
        writer.write(raw)
        return [await read_answer(reader) for _ in range(answers)]
    finally:
        writer.close()


def get(path: str, rid: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: gateway", f"X-Request-ID: {rid}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_a_completed_task_is_answered_as_aiohttp_answers_it(
    make_gateway: MakeGateway, clock: ManualClock
) -> None:
    fast = await make_gateway()
    task_id = await completed_task(fast, clock)
    before = fast.handled_by_aiohttp
    [(status, headers, body)] = await exchange(fast, get(f"/v1/videos/{task_id}", "r-1"), 1)
    assert fast.handled_by_aiohttp == before  # answered on the connection

    slow = await make_gateway(poll={"fast_path": False})
    before = slow.handled_by_aiohttp
    [(slow_status, slow_headers, slow_body)] = await exchange(slow, get(f"/v1/videos/{task_id}", "r-1"), 1)
    assert slow.handled_by_aiohttp == before + 1  # `poll.fast_path: false`: aiohttp's way
    assert (status, body) == (slow_status, slow_body) == (b"HTTP/1.1 200 OK", body)
    assert list(headers) == list(slow_headers)  # the same headers, in the same order
    assert {k: v for k, v in headers.items() if k not in VARYING} == {
        k: v for k, v in slow_headers.items() if k not in VARYING
    }
    assert headers["X-Request-ID"] == slow_headers["X-Request-ID"] == "r-1"


async def test_a_running_task_is_polled_upstream_without_aiohttp(gw: Running, upstream: Upstream) -> None:
    task_id = (await (await gw.create()).json())["task_id"]
    before, calls = gw.handled_by_aiohttp, sum(upstream.state.polls.values())
    response = await gw.poll(task_id)
    assert response.status == 200
    assert (await response.json())["status"] in {"queued", "running"}
    assert sum(upstream.state.polls.values()) == calls + 1
    assert gw.handled_by_aiohttp == before


async def test_answers_leave_in_the_order_asked(gw: Running, upstream: Upstream, clock: ManualClock) -> None:
    """Polls answered on the connection and requests aiohttp handles, pipelined on one connection."""
    done = await completed_task(gw, clock)
    running = (await (await gw.create()).json())["task_id"]
    upstream.state.add_fault(Fault(kind="hold", operation="poll", times=1))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    try:
        writer.write(get(f"/v1/videos/{done}", "r-1") + get(f"/v1/videos/{running}", "r-2"))  # r-2 asks upstream
        async with asyncio.timeout(5):
            await upstream.state.until_held(1)
        # Arriving while r-2 waits: a poll answered at hand, one for aiohttp, another poll.
        writer.write(get(f"/v1/videos/{done}", "r-3") + get("/healthz", "r-4") + get(f"/v1/videos/{done}", "r-5"))
        await asyncio.sleep(0.05)  # time for any answer that would jump the queue
        assert (await read_answer(reader))[1]["X-Request-ID"] == "r-1"
        await upstream.state.release_held()
        answers = [await read_answer(reader) for _ in range(4)]
        assert [headers["X-Request-ID"] for _, headers, _ in answers] == ["r-2", "r-3", "r-4", "r-5"]
        assert all(status == b"HTTP/1.1 200 OK" for status, _, _ in answers)

        # A request aiohttp is still handling (a create, waiting for upstream) keeps a poll behind it.
        upstream.state.add_fault(Fault(kind="hold", operation="create", times=1))
        body = json.dumps(BODY).encode()
        writer.write(
            b"POST /v1/videos HTTP/1.1\r\nHost: gateway\r\nX-Request-ID: r-6\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        async with asyncio.timeout(5):
            await upstream.state.until_held(1)
        writer.write(get(f"/v1/videos/{done}", "r-7"))
        await asyncio.sleep(0.05)
        await upstream.state.release_held()
        answers = [await read_answer(reader) for _ in range(2)]
        assert [headers["X-Request-ID"] for _, headers, _ in answers] == ["r-6", "r-7"]
        assert [status.split()[1] for status, _, _ in answers] == [b"200", b"200"]
        assert "task_id" in json.loads(answers[0][2])
    finally:
        writer.close()


async def test_what_it_does_not_take_goes_to_aiohttp(make_gateway: MakeGateway, clock: ManualClock) -> None:
    gw = await make_gateway(clients=[{"name": "team-a", "token": TOKEN}])
    auth = f"Authorization: Bearer {TOKEN}"
    task_id: str = (await (await gw.create(Authorization=f"Bearer {TOKEN}")).json())["task_id"]
    clock.advance(60)
    path = f"/v1/videos/{task_id}"
    await exchange(gw, get(path, "warm", auth), 1)
    cases = {
        get(path, "no-token"): b"401",
        get(path, "bad-token", "Authorization: Bearer wrong"): b"401",
        get(f"{path}?x=1", "query", auth): b"200",
        get(path, "closing", auth, "Connection: close"): b"200",
        f"GET {path} HTTP/1.0\r\nX-Request-ID: old\r\n{auth}\r\n\r\n".encode(): b"200",
        f"HEAD {path} HTTP/1.1\r\nHost: gateway\r\nX-Request-ID: head\r\n{auth}\r\n\r\n".encode(): b"200",
    }
    for raw, status in cases.items():
        before = gw.handled_by_aiohttp
        if raw.startswith(b"HEAD"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
            writer.write(raw)
            async with asyncio.timeout(5):
                assert (await reader.readline()).split()[1] == status
            writer.close()
        else:
            [(line, _, _)] = await exchange(gw, raw, 1)
            assert line.split()[1] == status
        assert gw.handled_by_aiohttp == before + 1, raw
    before = gw.handled_by_aiohttp
    [(line, _, _)] = await exchange(gw, get(path, "fast", auth), 1)
    assert line.split()[1] == b"200"
    assert gw.handled_by_aiohttp == before


async def test_an_upstream_failure_reads_as_on_aiohttps_way(make_gateway: MakeGateway, upstream: Upstream) -> None:
    answers = []
    for fast_path in (True, False):
        gw = await make_gateway(poll={"fast_path": fast_path}, resilience={"poll_retries": 0})
        task_id = (await (await gw.create()).json())["task_id"]
        upstream.state.add_fault(Fault(kind="status", status=500, operation="poll", times=1))
        response = await gw.poll(task_id)
        answers.append((response.status, response.headers["Content-Type"], await response.json()))
    assert answers[0] == answers[1]
    assert answers[0][0] == 502


async def test_the_access_line_and_metrics_count_fast_answers(
    gw: Running, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    task_id = await completed_task(gw, clock)
    caplog.set_level(logging.INFO, "agnes_gateway.access")
    await exchange(gw, get(f"/v1/videos/{task_id}", "r-fast"), 1)
    await asyncio.sleep(0)  # access lines are written on the loop's next turn
    [line] = [r for r in caplog.records if getattr(r, "request_id", None) == "r-fast"]
    assert line.getMessage().startswith("GET /v1/videos/{task_id} 200 client=anonymous key=")
    text = await (await gw.client.get("/metrics")).text()
    assert 'agnes_gateway_requests_total{code="200",route="/v1/videos/{task_id}"} 2.0' in text


async def test_shutdown_lets_a_poll_in_flight_finish(gw: Running, upstream: Upstream) -> None:
    task_id = (await (await gw.create()).json())["task_id"]
    upstream.state.add_fault(Fault(kind="hold", operation="poll", times=1))
    answering = asyncio.create_task(exchange(gw, get(f"/v1/videos/{task_id}", "r-1"), 1))
    async with asyncio.timeout(5):
        await upstream.state.until_held(1)
    runner = gw.client.server.runner
    assert runner is not None
    closing = asyncio.create_task(runner.cleanup())
    await asyncio.sleep(0.05)
    assert not answering.done()  # still waiting for upstream, the connection still open
    await upstream.state.release_held()
    [(status, _, body)] = await answering
    assert status == b"HTTP/1.1 200 OK"
    assert b"status" in body
    await closing


async def test_a_client_gone_before_the_answer_is_logged_as_499(
    gw: Running, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    task_id = (await (await gw.create()).json())["task_id"]
    upstream.state.add_fault(Fault(kind="hold", operation="poll", times=1))
    caplog.set_level(logging.INFO, "agnes_gateway.access")
    _, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    writer.write(get(f"/v1/videos/{task_id}", "r-gone"))
    async with asyncio.timeout(5):
        await upstream.state.until_held(1)
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.05)
    await upstream.state.release_held()
    for _ in range(50):
        lines = [r for r in caplog.records if getattr(r, "request_id", None) == "r-gone"]
        if lines:
            break
        await asyncio.sleep(0.01)
    assert " 499 " in lines[0].getMessage()
    assert (await gw.poll(task_id)).status == 200  # the gateway goes on serving


def test_config_turns_it_off(tmp_path: Path) -> None:
    assert parse_config(gateway_config("http://127.0.0.1:1", tmp_path / "g.db")).poll.fast_path is True
    off = parse_config(gateway_config("http://127.0.0.1:1", tmp_path / "g.db", poll={"fast_path": False}))
    assert off.poll.fast_path is False


async def test_polls_of_tasks_not_in_memory_read_as_on_aiohttps_way(make_gateway: MakeGateway) -> None:
    """A task known only to the store (after a restart), and one no key knows."""
    first = await make_gateway()
    task_id = (await (await first.create()).json())["task_id"]
    answers = []
    for fast_path in (True, False):
        gw = await make_gateway(poll={"fast_path": fast_path})  # a fresh process: nothing in memory
        before = gw.handled_by_aiohttp
        known, unknown = await gw.poll(task_id), await gw.poll("never-made")
        answers.append((known.status, await known.json(), unknown.status, await unknown.json()))
        assert gw.handled_by_aiohttp == before + (0 if fast_path else 2)
    assert answers[0] == answers[1]
    assert answers[0][0] == 200 and answers[0][2] == 404


async def test_fast_answers_keep_a_connection_alive_and_idle_ones_still_close(
    aiohttp_client: Any, upstream: Upstream, database: str, clock: ManualClock
) -> None:
    app = create_app(parse_config(gateway_config(upstream.url, database)), clock=clock)
    gw = Running(await aiohttp_client(GatewayServer(app, keepalive_timeout=0.3)), app, app[GATEWAY].config)
    done = await completed_task(gw, clock)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    try:
        for n in range(8):  # 0.8 s of polls 0.1 s apart: longer than the idle timeout, never idle that long
            writer.write(get(f"/v1/videos/{done}", f"r-{n}"))
            assert (await read_answer(reader))[0] == b"HTTP/1.1 200 OK"
            await asyncio.sleep(0.1)
        async with asyncio.timeout(3):
            assert await reader.read() == b""  # then idle: closed by the server
    finally:
        writer.close()


async def test_a_malformed_request_after_fast_answers_gets_aiohttps_400(gw: Running, clock: ManualClock) -> None:
    done = await completed_task(gw, clock)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.client.server.port)
    try:
        writer.write(get(f"/v1/videos/{done}", "r-1"))
        assert (await read_answer(reader))[0] == b"HTTP/1.1 200 OK"
        writer.write(b"GARBAGE\r\n\r\n" + get(f"/v1/videos/{done}", "r-2"))
        async with asyncio.timeout(5):
            rest = await reader.read()  # aiohttp's answer, then it closes the connection
        assert rest.split(b"\r\n")[0].endswith(b" 400 Bad Request")
    finally:
        writer.close()
