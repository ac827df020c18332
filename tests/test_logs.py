"""Logs as an operator reads them: request ids, a line per request with its upstream call, refusals, key states."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from gateway import logs as gateway_logs
from gateway.clock import ManualClock
from gateway.config import Config
from gateway.logs import accept_request_id, log_line, setup_logging
from gateway.simulator import Fault

from .conftest import KEY_A, KEY_B, KEY_C, TOKEN, Running, Upstream

MakeGateway = Callable[..., Awaitable[Running]]
Capture = Callable[[Config], io.StringIO]
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def capture() -> Iterator[Capture]:
    """Install the gateway's own logging (as `serve` does) into a buffer; restore the root logger after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def install(config: Config) -> io.StringIO:
        stream = io.StringIO()
        setup_logging(config, stream)
        return stream

    yield install
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- request ids ------------------------------------------------------------------------


async def test_request_id_from_the_client_is_echoed(gw: Running) -> None:
    resp = await gw.create(**{"X-Request-ID": "order-42/try.1"})
    assert resp.status == 200
    assert resp.headers["X-Request-ID"] == "order-42/try.1"


@pytest.mark.parametrize("sent", [None, "", "x" * 129, "has space", "<script>", "naïve"])
async def test_missing_or_unsafe_request_ids_are_replaced(gw: Running, sent: str | None) -> None:
    headers = {} if sent is None else {"X-Request-ID": sent}
    ids = {(await gw.client.get("/healthz", headers=headers)).headers["X-Request-ID"] for _ in range(2)}
    assert len(ids) == 2, "a fresh id per request"
    assert all(GENERATED_ID.match(i) for i in ids)


async def test_error_answers_carry_the_request_id_too(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(clients=[{"name": "team-a", "token": TOKEN}])
    for resp in (
        await gw.create(**{"X-Request-ID": "r-401"}),
        await gw.client.get("/no/such/route", headers={"X-Request-ID": "r-404"}),
        await gw.client.post(
            "/v1/videos",
            data=b"{",
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", "X-Request-ID": "r-400"},
        ),
    ):
        assert resp.status >= 400
        assert resp.headers["X-Request-ID"] == f"r-{resp.status}"


def test_accept_request_id_bounds() -> None:
    assert accept_request_id("a" * 128) == "a" * 128
    assert GENERATED_ID.match(accept_request_id("a" * 129))
    assert GENERATED_ID.match(accept_request_id("line\nbreak"))


# --- the lines --------------------------------------------------------------------------


async def test_json_lines_carry_request_route_status_key_client_duration(
    make_gateway: MakeGateway, upstream: Upstream, capture: Capture
) -> None:
    gw = await make_gateway(clients=[{"name": "team-a", "token": TOKEN}], log={"format": "json"})
    logs = capture(gw.config)
    upstream.state.add_fault(Fault(kind="quota", key=KEY_A, times=1))
    upstream.state.add_fault(Fault(kind="quota", key=KEY_B, times=1))
    resp = await gw.create(Authorization=f"Bearer {TOKEN}", **{"X-Request-ID": "req-1"})
    assert resp.status == 200
    task_id = (await resp.json())["task_id"]
    assert (await gw.poll(task_id, Authorization=f"Bearer {TOKEN}")).status == 200

    lines = json_lines(logs)
    access = [line for line in lines if line["logger"] == "agnes_gateway.access"]
    assert len(access) == 2, "one line per request"
    create = access[0]
    assert create["request_id"] == "req-1"
    assert (create["method"], create["route"], create["status"]) == ("POST", "/v1/videos", 200)
    assert (create["client"], create["key"]) == ("team-a", "c")
    assert isinstance(create["duration_ms"], float) and create["duration_ms"] >= 0
    assert access[1]["route"] == "/v1/videos/{task_id}"
    assert GENERATED_ID.match(access[1]["request_id"])  # the poll sent no id: one was made for it

    # The refused calls have lines of their own; each request's one successful call is on its access line.
    calls = [line for line in lines if line["logger"] == "agnes_gateway.upstream"]
    assert [(c["operation"], c["outcome"], c["status"]) for c in calls] == [("create", "quota", 429)] * 2
    assert {c["request_id"] for c in calls} == {"req-1"}
    assert sorted(c["key"] for c in calls) == ["a", "b"]
    assert all(c["duration_ms"] >= 0 for c in calls)
    for line, operation in zip(access, ("create", "poll"), strict=True):
        assert (line["operation"], line["outcome"], line["upstream_status"]) == (operation, "ok", 200)
        assert 0 <= line["upstream_ms"] <= line["duration_ms"]

    spent = [line for line in lines if line.get("state") == "spent"]
    assert {line["key"] for line in spent} == {"a", "b"}
    assert all(line["request_id"] == "req-1" and line["level"] == "WARNING" for line in spent)


async def test_text_lines_show_the_same_fields(make_gateway: MakeGateway, capture: Capture) -> None:
    gw = await make_gateway(clients=[{"name": "team-a", "token": TOKEN}])
    logs = capture(gw.config)
    assert (await gw.create(Authorization=f"Bearer {TOKEN}", **{"X-Request-ID": "req-7"})).status == 200
    access = [line for line in logs.getvalue().splitlines() if "agnes_gateway.access" in line]
    assert len(access) == 1
    assert re.search(
        r"INFO agnes_gateway\.access: POST /v1/videos 200 client=team-a key=[ab] \d+\.\dms "
        r"upstream=ok 200 \d+\.\dms request_id=req-7$",
        access[0],
    )
    # Its one upstream call is on that line, not on one of its own.
    assert "agnes_gateway.upstream" not in logs.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_lines_written_directly_read_as_the_logging_module_writes_them(
    make_gateway: MakeGateway, capture: Capture, fmt: str
) -> None:
    """`log_line` skips the logging machinery while only the gateway's handler listens; the bytes are the same."""
    gw = await make_gateway(clients=[{"name": "team-a", "token": TOKEN}], log={"format": fmt})
    stream = capture(gw.config)
    logger = logging.getLogger("agnes_gateway.access")
    fields: dict[str, object] = {"request_id": "r-9", "method": "GET", "status": 200, "key": None, "duration_ms": 1.5}
    installed = gateway_logs._installed
    assert installed is not None and installed.alone_on(logger, logging.INFO)
    log_line(logger, logging.INFO, "GET /x 200 %s\nsecond line", dict(fields))
    other = logging.NullHandler()  # anything else listening: the line takes the usual way
    logging.getLogger().addHandler(other)
    try:
        assert not installed.alone_on(logger, logging.INFO)
        log_line(logger, logging.INFO, "GET /x 200 %s\nsecond line", dict(fields))
    finally:
        logging.getLogger().removeHandler(other)
    text = stream.getvalue()
    if fmt == "json":
        direct, usual = ({k: v for k, v in json.loads(line).items() if k != "time"} for line in text.splitlines())
        assert direct == usual
        assert direct["message"] == "GET /x 200 %s\nsecond line" and direct["request_id"] == "r-9"
    else:
        lines = text.splitlines()
        assert len(lines) == 4
        stamp = len("2026-01-01 00:00:00,000")
        assert lines[0][stamp:] == lines[2][stamp:] == " INFO agnes_gateway.access: GET /x 200 %s request_id=r-9"
        assert lines[1] == lines[3] == "second line"


async def test_probe_and_scrape_lines_are_debug_only(make_gateway: MakeGateway, capture: Capture) -> None:
    gw = await make_gateway(log={"format": "json"})
    logs = capture(gw.config)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await gw.client.get(path)).status == 200
    assert not [line for line in json_lines(logs) if line["logger"] == "agnes_gateway.access"]


async def test_no_secret_in_any_line(make_gateway: MakeGateway, upstream: Upstream, capture: Capture) -> None:
    gw = await make_gateway(
        clients=[{"name": "team-a", "token": TOKEN}],
        metrics={"token": "scrape-token-0123456789"},
        log={"format": "json"},
    )
    logs = capture(gw.config)
    upstream.state.add_fault(Fault(kind="status", status=401, key=KEY_A, times=-1))
    # A client that sends its own token as a request id gets it back, but the log never shows it.
    for _ in range(3):
        assert (await gw.create(Authorization=f"Bearer {TOKEN}", **{"X-Request-ID": TOKEN})).status == 200
    await gw.client.get("/metrics", headers={"Authorization": "Bearer scrape-token-0123456789"})
    text = logs.getvalue()
    assert '"request_id": "[REDACTED]"' in text
    for secret in (KEY_A, KEY_B, KEY_C, TOKEN, "scrape-token-0123456789"):
        assert secret not in text


# --- key state changes ------------------------------------------------------------------


async def test_key_state_changes_are_logged(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock, capture: Capture
) -> None:
    gw = await make_gateway(
        keys=[
            {"name": "a", "key": KEY_A, "daily_limit": 1},
            {"name": "b", "key": KEY_B, "daily_limit": 5},
            {"name": "c", "key": KEY_C, "daily_limit": 5, "priority": 1},
        ],
        log={"format": "json"},
    )
    logs = capture(gw.config)
    upstream.state.add_fault(Fault(kind="rate_limit", retry_after=30, key=KEY_B, times=1))
    upstream.state.add_fault(Fault(kind="status", status=401, key=KEY_C, times=1))
    assert (await gw.create()).status == 200  # a takes it (most left) and reaches its limit of 1
    assert (await gw.create()).status == 429  # b cools down, c is refused: nothing left
    clock.advance(30)
    assert (await gw.create()).status == 200  # b is back
    clock.advance(12 * 3600)
    assert (await gw.create()).status == 200  # a new quota day

    changes = [
        (line["level"], line.get("key"), line.get("state"), line["message"])
        for line in json_lines(logs)
        if line["logger"] == "agnes_gateway.pool"
    ]
    levels = {(key, state): level for level, key, state, _ in changes}
    assert levels[("a", "spent")] == "INFO"  # by the gateway's own count
    assert levels[("b", "cooling")] == "WARNING"
    assert levels[("c", "disabled")] == "ERROR"
    assert levels[("b", "active")] == "INFO"  # the cooldown ended
    assert any(message.startswith("new quota day") for *_, message in changes)
    assert any("reached its daily limit of 1" in message for *_, message in changes)
