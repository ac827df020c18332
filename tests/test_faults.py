"""The fault policy end to end: poll retries, what a failed create costs, idempotent creates, breakers."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import ManualClock
from gateway.events import Events
from gateway.simulator import Fault
from gateway.store import TaskRecord

from .conftest import BODY, KEY_A, KEY_B, KEY_C, TOKEN, Running, Upstream, gateway_config

MakeGateway = Callable[..., Awaitable[Running]]


def clock_sleeps(gw: Running, clock: ManualClock) -> list[float]:
    """Make the gateway's retry waits move the manual clock instead of sleeping; returns the waits."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.advance(seconds)

    gw.gateway.sleep = sleep
    gw.gateway._jitter = random.Random(7)
    return waits


class Calls(Events):
    """Counts the gateway's own upstream attempts (aiohttp may resend a GET once on a stale connection)."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str, str]] = []

    def upstream_call(self, key: str, operation: str, outcome: str, seconds: float) -> None:
        self.outcomes.append((key, operation, outcome))

    def count(self, operation: str) -> int:
        return sum(1 for _, op, _ in self.outcomes if op == operation)


def record_calls(gw: Running) -> Calls:
    calls = Calls()
    gw.gateway.events = calls
    return calls


async def task_on(gw: Running, upstream: Upstream) -> tuple[str, str]:
    """Create one task; returns its id and the upstream key that owns it."""
    resp = await gw.create()
    assert resp.status == 200
    task_id = (await resp.json())["task_id"]
    return task_id, upstream.state.tasks[task_id].key


def polls(upstream: Upstream, key: str) -> int:
    return upstream.state.calls[(key, "poll")]


async def error_code(resp: Any) -> str:
    doc = await resp.json()
    return str(doc["error"]["code"])


# --- polls: transient failures are retried on the same key ------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault(kind="html_error", status=502, operation="poll", times=2),
        Fault(kind="status", status=503, operation="poll", times=2),
        Fault(kind="status", status=504, body="gateway timeout", operation="poll", times=2),
    ],
    ids=["502-html", "503-json", "504-text"],
)
async def test_transient_poll_failure_is_retried_on_the_same_key(
    gw: Running, upstream: Upstream, clock: ManualClock, fault: Fault
) -> None:
    waits = clock_sleeps(gw, clock)
    task_id, key = await task_on(gw, upstream)
    upstream.state.add_fault(fault)
    resp = await gw.poll(task_id)
    assert resp.status == 200
    assert (await resp.json())["status"] in {"queued", "in_progress"}
    assert polls(upstream, key) == 3  # two failures, then the answer; no other key was asked
    assert sum(upstream.state.calls[(k, "poll")] for k in (KEY_A, KEY_B, KEY_C)) == 3
    # Full jitter: the first wait is at most the base backoff, the second at most twice it.
    assert len(waits) == 2
    assert 0 <= waits[0] <= 0.2 and 0 <= waits[1] <= 0.4


async def test_reset_poll_connections_are_retried_then_502(gw: Running, upstream: Upstream, clock: ManualClock) -> None:
    waits = clock_sleeps(gw, clock)
    task_id, _ = await task_on(gw, upstream)
    calls = record_calls(gw)
    upstream.state.add_fault(Fault(kind="reset", operation="poll", times=-1))
    resp = await gw.poll(task_id)
    assert (resp.status, await error_code(resp)) == (502, "upstream_unreachable")
    assert calls.outcomes == [(calls.outcomes[0][0], "poll", "broken")] * 3
    assert len(waits) == 2
    upstream.state.clear_faults()
    upstream.state.add_fault(Fault(kind="reset", operation="poll", times=1))
    assert (await gw.poll(task_id)).status == 200


async def test_poll_still_failing_after_the_retries_is_502_json(
    gw: Running, upstream: Upstream, clock: ManualClock
) -> None:
    clock_sleeps(gw, clock)
    task_id, key = await task_on(gw, upstream)
    upstream.state.add_fault(Fault(kind="html_error", status=503, operation="poll", times=-1))
    resp = await gw.poll(task_id)
    assert resp.status == 502
    assert resp.headers["Content-Type"].startswith("application/json")
    assert await error_code(resp) == "upstream_error"
    assert polls(upstream, key) == 1 + gw.config.resilience.poll_retries


async def test_upstream_504_on_a_poll_becomes_a_504_json(make_gateway: MakeGateway, upstream: Upstream) -> None:
    gw = await make_gateway(resilience={"poll_retries": 0})
    task_id, key = await task_on(gw, upstream)
    upstream.state.add_fault(Fault(kind="html_error", status=504, operation="poll", times=1))
    resp = await gw.poll(task_id)
    assert (resp.status, await error_code(resp)) == (504, "upstream_timeout")
    assert polls(upstream, key) == 1


async def test_poll_retries_stop_at_the_time_budget(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    gw = await make_gateway(
        resilience={"poll_retries": 50, "poll_backoff_s": 0.2, "poll_retry_budget_s": 1.0, "breaker_failures": 0}
    )
    waits = clock_sleeps(gw, clock)
    task_id, key = await task_on(gw, upstream)
    upstream.state.add_fault(Fault(kind="status", status=503, operation="poll", times=-1))
    resp = await gw.poll(task_id)
    assert (resp.status, await error_code(resp)) == (502, "upstream_error")
    assert sum(waits) <= 1.0
    assert 1 <= len(waits) < 50
    assert polls(upstream, key) == len(waits) + 1


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Fault(kind="status", status=500, operation="poll", times=-1), 502, "upstream_error"),
        (Fault(kind="slow", delay_s=1.0, operation="poll", times=-1), 504, "upstream_timeout"),
    ],
    ids=["500", "timeout"],
)
async def test_non_transient_poll_failures_are_not_retried(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock, fault: Fault, status: int, code: str
) -> None:
    gw = await make_gateway(upstream={"base_url": upstream.url, "timeout_s": 0.3})
    waits = clock_sleeps(gw, clock)
    task_id, key = await task_on(gw, upstream)
    upstream.state.add_fault(fault)
    resp = await gw.poll(task_id)
    assert (resp.status, await error_code(resp)) == (status, code)
    assert polls(upstream, key) == 1
    assert waits == []


async def test_poll_of_an_unreachable_upstream_is_retried_then_502(
    make_gateway: MakeGateway, tmp_path: Path, clock: ManualClock
) -> None:
    gw = await make_gateway(gateway_config("http://127.0.0.1:9", tmp_path / "g.db"))
    waits = clock_sleeps(gw, clock)
    await gw.gateway.store.add_task(TaskRecord("known-task", "a", "anonymous", 0.0))
    resp = await gw.poll("known-task")
    assert (resp.status, await error_code(resp)) == (502, "upstream_unreachable")
    assert len(waits) == gw.config.resilience.poll_retries


# --- creates: retried elsewhere only when it provably made nothing -------------------------------------


@pytest.mark.parametrize(
    "fault",
    [Fault(kind="reset", operation="create", times=1), Fault(kind="slow", delay_s=1.0, operation="create", times=1)],
    ids=["reset", "timeout"],
)
async def test_create_with_an_unknown_outcome_is_504_and_keeps_its_unit(
    make_gateway: MakeGateway, upstream: Upstream, fault: Fault
) -> None:
    gw = await make_gateway(upstream={"base_url": upstream.url, "timeout_s": 0.3})
    upstream.state.add_fault(fault)
    resp = await gw.create()
    assert (resp.status, await error_code(resp)) == (504, "upstream_outcome_unknown")
    assert upstream.state.requests == 1  # no second key was tried: that could make two videos
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 1


async def test_accepted_create_without_a_task_id_is_502_and_keeps_its_unit(gw: Running, upstream: Upstream) -> None:
    upstream.state.add_fault(Fault(kind="not_json", status=200, operation="create", times=1))
    resp = await gw.create()
    assert (resp.status, await error_code(resp)) == (502, "upstream_bad_answer")
    assert upstream.state.requests == 1
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 1


@pytest.mark.parametrize(
    "fault",
    [
        Fault(kind="status", status=500),
        Fault(kind="html_error", status=502),
        Fault(kind="status", status=503, body="<html>busy</html>"),
        Fault(kind="quota", status=403, message="今日调用次数已达上限"),
        Fault(kind="quota", status=429, message="Daily quota exceeded"),
        Fault(kind="rate_limit", retry_after=5),
        Fault(kind="rate_limit"),
    ],
    ids=["500", "502-html", "503-text", "quota-403-zh", "quota-429-en", "rate-limit-retry-after", "rate-limit-bare"],
)
async def test_create_refused_by_upstream_moves_to_the_next_key_and_gives_the_unit_back(
    gw: Running, upstream: Upstream, fault: Fault
) -> None:
    fault.operation = "create"
    upstream.state.add_fault(fault)  # hits whichever key goes first
    resp = await gw.create()
    assert resp.status == 200
    assert upstream.state.requests == 2
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 1


async def test_intermittently_dead_upstream_loses_no_acknowledged_task(
    make_gateway: MakeGateway, make_upstream: Callable[..., Awaitable[Upstream]], tmp_path: Path, clock: ManualClock
) -> None:
    upstream = await make_upstream(dead_every=3)
    gw = await make_gateway(gateway_config(upstream.url, tmp_path / "g.db"))
    clock_sleeps(gw, clock)
    created: list[str] = []
    statuses: list[int] = []
    for _ in range(12):
        resp = await gw.create()
        statuses.append(resp.status)
        if resp.status == 200:
            created.append((await resp.json())["task_id"])
    assert set(statuses) <= {200, 504} and 504 in statuses and created
    for task_id in created:
        assert (await gw.poll(task_id)).status == 200  # a dropped poll connection is retried
    # Every unit counted by the gateway either made a task or may have: never fewer than upstream made.
    used = sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values())
    assert used == len(statuses) >= sum(upstream.state.creates.values())


# --- Idempotency-Key ---------------------------------------------------------------------------------------


async def test_repeated_create_with_the_same_idempotency_key_answers_the_first_task(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    gw = await make_gateway()
    first = await gw.create(**{"Idempotency-Key": "order-42"})
    again = await gw.create(**{"Idempotency-Key": "order-42"})
    assert first.status == again.status == 200
    task_id = (await first.json())["task_id"]
    assert await again.json() == {"task_id": task_id}
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert sum(upstream.state.creates.values()) == 1
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 1
    other = await gw.create(**{"Idempotency-Key": "order-43"})
    assert (await other.json())["task_id"] != task_id
    await gw.client.close()

    # The key is stored with the task: a restarted gateway still knows it.
    restarted = await make_gateway()
    replay = await restarted.create(**{"Idempotency-Key": "order-42"})
    assert await replay.json() == {"task_id": task_id}
    assert sum(upstream.state.creates.values()) == 2


async def test_concurrent_creates_with_one_idempotency_key_make_one_upstream_create(
    gw: Running, upstream: Upstream
) -> None:
    upstream.state.add_fault(Fault(kind="hold", operation="create", times=1))
    pending = [asyncio.ensure_future(gw.create(**{"Idempotency-Key": "same"})) for _ in range(10)]
    await asyncio.wait_for(upstream.state.until_held(1), 5)
    assert await upstream.state.release_held() == 1
    answers = await asyncio.gather(*pending)
    ids = {(await r.json())["task_id"] for r in answers}
    assert [r.status for r in answers] == [200] * 10
    assert len(ids) == 1
    assert upstream.state.calls[(KEY_A, "create")] + upstream.state.calls[(KEY_B, "create")] == 1


async def test_idempotency_keys_belong_to_one_client(make_gateway: MakeGateway, upstream: Upstream) -> None:
    other_token = "tok-team-b-0123456789abcdef"
    gw = await make_gateway(clients=[{"name": "team-a", "token": TOKEN}, {"name": "team-b", "token": other_token}])
    a = await gw.create(**{"Idempotency-Key": "k1", "Authorization": f"Bearer {TOKEN}"})
    b = await gw.create(**{"Idempotency-Key": "k1", "Authorization": f"Bearer {other_token}"})
    assert (await a.json())["task_id"] != (await b.json())["task_id"]
    assert sum(upstream.state.creates.values()) == 2


async def test_failed_create_leaves_its_idempotency_key_free(gw: Running, upstream: Upstream) -> None:
    for key in (KEY_A, KEY_B, KEY_C):
        upstream.state.add_fault(Fault(kind="status", status=500, key=key, times=1))
    failed = await gw.create(**{"Idempotency-Key": "retry-me"})
    assert failed.status == 502
    retried = await gw.create(**{"Idempotency-Key": "retry-me"})
    assert retried.status == 200
    assert "Idempotent-Replayed" not in retried.headers
    assert sum(upstream.state.creates.values()) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "ünïcode"])
async def test_malformed_idempotency_key_is_400(gw: Running, upstream: Upstream, key: str) -> None:
    resp = await gw.client.post("/v1/videos", json=BODY, headers={"Idempotency-Key": key.encode().decode("latin-1")})
    assert (resp.status, await error_code(resp)) == (400, "invalid_idempotency_key")
    assert upstream.state.requests == 0


# --- circuit breaker ---------------------------------------------------------------------------------------


async def test_breaker_stops_calls_to_a_failing_key_and_probes_it_later(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    gw = await make_gateway(resilience={"breaker_failures": 3, "breaker_open_s": 30})
    upstream.state.add_fault(Fault(kind="status", status=500, key=KEY_A, operation="create", times=-1))
    for _ in range(10):
        assert (await gw.create()).status == 200
    # Three failures opened a's circuit: from then on creates went to b without asking a.
    assert upstream.state.calls[(KEY_A, "create")] == 3
    assert upstream.state.creates[KEY_B] == 10
    assert gw.gateway.breakers.state("a") == "open"

    clock.advance(30)
    assert (await gw.create()).status == 200  # a is probed once; it still fails: open again
    assert upstream.state.calls[(KEY_A, "create")] == 4
    assert gw.gateway.breakers.state("a") == "open"
    assert (await gw.create()).status == 200
    assert upstream.state.calls[(KEY_A, "create")] == 4

    upstream.state.clear_faults()
    clock.advance(30)
    for _ in range(4):
        assert (await gw.create()).status == 200
    assert gw.gateway.breakers.state("a") == "closed"
    assert upstream.state.creates[KEY_A] >= 1


async def test_polls_of_a_key_with_an_open_circuit_fail_fast_with_retry_after(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    gw = await make_gateway(resilience={"breaker_failures": 2, "breaker_open_s": 20, "poll_retries": 0})
    task_id, _ = await task_on(gw, upstream)
    calls = record_calls(gw)
    upstream.state.add_fault(Fault(kind="reset", operation="poll", times=-1))
    assert [(await gw.poll(task_id)).status for _ in range(2)] == [502, 502]
    resp = await gw.poll(task_id)
    assert (resp.status, await error_code(resp)) == (503, "upstream_unavailable")
    assert resp.headers["Retry-After"] == "20"
    assert calls.count("poll") == 2  # the third poll never left the gateway
    upstream.state.clear_faults()
    clock.advance(20)
    assert (await gw.poll(task_id)).status == 200
    assert (await gw.poll(task_id)).status == 200


async def test_every_circuit_open_is_503_with_retry_after(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    gw = await make_gateway(resilience={"breaker_failures": 1, "breaker_open_s": 45})
    upstream.state.add_fault(Fault(kind="status", status=502, operation="create", times=-1))
    first = await gw.create()
    assert (first.status, await error_code(first)) == (502, "upstream_error")
    calls = upstream.state.requests
    resp = await gw.create()
    assert (resp.status, await error_code(resp)) == (503, "upstream_unavailable")
    assert resp.headers["Retry-After"] == "45"
    assert upstream.state.requests == calls
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 0


async def test_open_circuits_show_in_the_metrics(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    gw = await make_gateway(resilience={"breaker_failures": 1, "breaker_open_s": 30})
    upstream.state.add_fault(Fault(kind="status", status=500, key=KEY_A, operation="create", times=-1))
    for _ in range(3):  # keys a and b take turns: a is tried within two creates
        assert (await gw.create()).status == 200
    assert upstream.state.calls[(KEY_A, "create")] == 1
    text = await (await gw.client.get("/metrics")).text()
    assert 'agnes_gateway_key_circuit_open{key="a"} 1.0' in text
    assert 'agnes_gateway_key_circuit_open{key="b"} 0.0' in text
