"""Poll coalescing and the terminal-status cache: fewer upstream calls, the same answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.clock import ManualClock
from gateway.errors import GatewayError
from gateway.polls import PollCoalescer
from gateway.simulator import Fault

from .conftest import BODY, KEY_A, KEY_B, Running, Upstream, direct_poll, gateway_config

MakeGateway = Callable[..., Awaitable[Running]]


class Gate:
    """An upstream stand-in for the coalescer: counts calls, answers when released."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.error: Exception | None = None

    async def fetch(self) -> str:
        self.calls += 1
        number = self.calls
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return f"answer {number}"


async def settle() -> None:
    """Let every ready task run (bounded), without waiting for time to pass."""
    for _ in range(10):
        await asyncio.sleep(0)


# --- the coalescer on its own -------------------------------------------------------------


async def test_concurrent_polls_share_one_call(clock: ManualClock) -> None:
    polls: PollCoalescer[str] = PollCoalescer(clock, freshness_s=0)
    gate = Gate()
    waiting = [asyncio.ensure_future(polls.share("t1", gate.fetch)) for _ in range(50)]
    other = asyncio.ensure_future(polls.share("t2", gate.fetch))
    await settle()
    assert gate.calls == 2  # one for t1, one for t2
    gate.release.set()
    assert await asyncio.gather(*waiting) == ["answer 1"] * 50
    assert await other == "answer 2"
    # Nothing in flight any more and no freshness window: the next poll calls again.
    assert await polls.share("t1", gate.fetch) == "answer 3"


async def test_an_answer_stays_fresh_for_the_window(clock: ManualClock) -> None:
    polls: PollCoalescer[str] = PollCoalescer(clock, freshness_s=1.0)
    gate = Gate()
    gate.release.set()
    assert await polls.share("t", gate.fetch) == "answer 1"
    clock.advance(0.99)
    assert await polls.share("t", gate.fetch) == "answer 1"
    clock.advance(0.01)
    assert await polls.share("t", gate.fetch) == "answer 2"
    assert gate.calls == 2


async def test_freshness_counts_from_when_upstream_was_asked(clock: ManualClock) -> None:
    polls: PollCoalescer[str] = PollCoalescer(clock, freshness_s=1.0)
    calls = 0

    async def slow_upstream() -> str:
        nonlocal calls
        calls += 1
        clock.advance(0.6)  # the answer took 0.6 s to come
        return f"answer {calls}"

    assert await polls.share("t", slow_upstream) == "answer 1"
    clock.advance(0.39)
    assert await polls.share("t", slow_upstream) == "answer 1"
    clock.advance(0.01)
    assert await polls.share("t", slow_upstream) == "answer 2"


async def test_a_failure_is_shared_but_not_remembered(clock: ManualClock) -> None:
    polls: PollCoalescer[str] = PollCoalescer(clock, freshness_s=1.0)
    gate = Gate()
    gate.error = GatewayError(502, "upstream_unreachable", "down")
    waiting = [asyncio.ensure_future(polls.share("t", gate.fetch)) for _ in range(5)]
    await settle()
    gate.release.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, GatewayError) and r.status == 502 for r in results)
    assert gate.calls == 1
    gate.error = None
    assert await polls.share("t", gate.fetch) == "answer 2"


async def test_answers_that_keep_refuses_are_not_reused(clock: ManualClock) -> None:
    polls: PollCoalescer[str] = PollCoalescer(clock, freshness_s=1.0, keep=lambda a: a.endswith("2"))
    gate = Gate()
    gate.release.set()
    assert [await polls.share("t", gate.fetch) for _ in range(3)] == ["answer 1", "answer 2", "answer 2"]


async def test_a_waiting_poll_that_goes_away_does_not_cancel_the_call(clock: ManualClock) -> None:
    polls: PollCoalescer[str] = PollCoalescer(clock, freshness_s=0)
    gate = Gate()
    first = asyncio.ensure_future(polls.share("t", gate.fetch))
    await settle()
    second = asyncio.ensure_future(polls.share("t", gate.fetch))
    await settle()
    second.cancel()
    await settle()
    gate.release.set()
    assert await first == "answer 1"
    assert second.cancelled() and gate.calls == 1


async def test_when_the_calling_poll_goes_away_the_others_still_get_an_answer(clock: ManualClock) -> None:
    polls: PollCoalescer[str] = PollCoalescer(clock, freshness_s=0)
    gate = Gate()
    first = asyncio.ensure_future(polls.share("t", gate.fetch))
    await settle()
    others = [asyncio.ensure_future(polls.share("t", gate.fetch)) for _ in range(3)]
    await settle()
    first.cancel()
    await settle()
    assert gate.calls == 2  # one of the others took over
    gate.release.set()
    assert await asyncio.gather(*others) == ["answer 2"] * 3
    assert first.cancelled()


async def test_remembered_answers_are_bounded_and_stale_ones_swept(clock: ManualClock) -> None:
    polls: PollCoalescer[str] = PollCoalescer(clock, freshness_s=1.0, max_entries=10)
    gate = Gate()
    gate.release.set()
    for i in range(25):
        await polls.share(f"t{i}", gate.fetch)
    assert len(polls) == 10
    clock.advance(2)
    await polls.share("last", gate.fetch)
    assert len(polls) == 1


# --- through the gateway ------------------------------------------------------------------


async def create(gw: Running, prompt: str = BODY["prompt"]) -> str:
    resp = await gw.create({**BODY, "prompt": prompt})
    assert resp.status == 200
    return str((await resp.json())["task_id"])


async def test_50_concurrent_polls_of_one_task_make_one_upstream_call(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    gw = await make_gateway(poll={"freshness_s": 0})
    task_id = await create(gw)
    upstream.state.add_fault(Fault(kind="slow", delay_s=0.5, operation="poll", times=1))
    before = upstream.state.requests
    answers = await asyncio.gather(*(gw.poll(task_id) for _ in range(50)))
    assert upstream.state.requests - before == 1
    assert {r.status for r in answers} == {200}
    assert len({await r.read() for r in answers}) == 1


async def test_repeated_polls_within_the_window_reuse_the_last_answer(
    gw: Running, upstream: Upstream, clock: ManualClock
) -> None:
    task_id = await create(gw)
    before = upstream.state.requests
    first = await (await gw.poll(task_id)).read()
    assert await (await gw.poll(task_id)).read() == first
    assert upstream.state.requests - before == 1
    clock.advance(1.0)  # the default window is 1 s
    assert (await gw.poll(task_id)).status == 200
    assert upstream.state.requests - before == 2


async def test_upstream_error_answers_are_not_reused(gw: Running, upstream: Upstream) -> None:
    task_id = await create(gw)
    upstream.state.add_fault(Fault(kind="status", status=500, operation="poll", times=1))
    failed = await gw.poll(task_id)
    assert failed.status == 502 and (await failed.json())["error"]["code"] == "upstream_error"
    assert (await gw.poll(task_id)).status == 200  # asked again at once: the failure was not kept


@pytest.mark.parametrize(("prompt", "status"), [("a cat", "completed"), ("a cat [fail]", "failed")])
async def test_finished_task_is_served_without_upstream_and_survives_a_restart(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock, tmp_path: Path, prompt: str, status: str
) -> None:
    doc = gateway_config(upstream.url, tmp_path / "g.db")
    gw = await make_gateway(doc)
    task_id = await create(gw, prompt)
    clock.advance(10)  # the simulator's tasks take 10 s
    resp = await gw.poll(task_id)
    body = await resp.read()
    assert resp.status == 200 and (await resp.json())["status"] == status
    key = {"a": KEY_A, "b": KEY_B}[(await gw.gateway.store.get_task(task_id)).key_name]  # type: ignore[union-attr]
    assert await direct_poll(upstream, key, task_id) == (200, body)
    calls = upstream.state.requests
    for _ in range(3):
        clock.advance(5)
        again = await gw.poll(task_id)
        assert (again.status, await again.read()) == (200, body)
        assert again.headers["Content-Type"].startswith("application/json")
    assert upstream.state.requests == calls
    await gw.client.close()

    restarted = await make_gateway(doc)
    resp = await restarted.poll(task_id)
    assert (resp.status, await resp.read()) == (200, body)
    assert upstream.state.requests == calls


async def test_terminal_cache_can_be_turned_off(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    gw = await make_gateway(poll={"terminal_cache": False})
    task_id = await create(gw)
    clock.advance(10)
    before = upstream.state.requests
    for _ in range(3):
        assert (await (await gw.poll(task_id)).json())["status"] == "completed"
        clock.advance(1)
    assert upstream.state.requests - before == 3
    record = await gw.gateway.store.get_task(task_id)
    assert record is not None and record.status == "completed" and record.terminal_body is None


async def test_running_task_is_never_taken_for_finished(gw: Running, upstream: Upstream, clock: ManualClock) -> None:
    task_id = await create(gw)
    clock.advance(5)
    assert (await (await gw.poll(task_id)).json())["status"] == "in_progress"
    record = await gw.gateway.store.get_task(task_id)
    assert record is not None and record.status == "in_progress" and record.terminal_body is None
    clock.advance(5)
    assert (await (await gw.poll(task_id)).json())["status"] == "completed"
