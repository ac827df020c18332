"""Per-client daily limits: counted atomically in the store, refused before any pool quota is spent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.clock import ManualClock
from gateway.simulator import Fault

from .conftest import KEY_A, KEY_B, KEY_C, TOKEN, Running, Upstream

MakeGateway = Callable[..., Awaitable[Running]]

TOKEN_B = "tok-team-b-0123456789abcdef"
A = {"Authorization": f"Bearer {TOKEN}"}
B = {"Authorization": f"Bearer {TOKEN_B}"}


def clients(limit_a: int | None) -> list[dict[str, object]]:
    return [{"name": "team-a", "token": TOKEN, "daily_limit": limit_a}, {"name": "team-b", "token": TOKEN_B}]


async def test_client_limit_holds_under_concurrency_without_spending_pool_quota(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    gw = await make_gateway(clients=clients(5))
    answers = await asyncio.gather(*(gw.create(**A) for _ in range(20)))
    assert sorted(r.status for r in answers) == [200] * 5 + [429] * 15
    refused = [r for r in answers if r.status == 429]
    for resp in refused:
        doc = await resp.json()
        assert doc["error"]["code"] == "client_quota_exceeded"
        assert doc["error"]["type"] == "rate_limit_error"
        assert resp.headers["Retry-After"] == str(12 * 3600)  # 12:00 in Shanghai
    day = gw.gateway.pool.day
    assert sum(upstream.state.creates.values()) == 5
    assert sum((await gw.gateway.store.usage(day)).values()) == 5
    assert await gw.gateway.store.client_usage(day) == {"team-a": 5}
    # Another team is not held back by team-a's limit.
    assert (await gw.create(**B)).status == 200


async def test_a_create_that_makes_no_task_gives_the_client_unit_back(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    gw = await make_gateway(clients=clients(2))
    day = gw.gateway.pool.day
    # Upstream refuses the request itself: passed through, nothing counted.
    assert (await gw.create({"model": "agnes-video-v2.0"}, **A)).status == 400
    # Every key refuses for quota: 429 all_keys_exhausted, nothing counted.
    for key in (KEY_A, KEY_B, KEY_C):
        upstream.state.add_fault(Fault(kind="quota", key=key, times=1))
    resp = await gw.create(**A)
    assert (await resp.json())["error"]["code"] == "all_keys_exhausted"
    assert await gw.gateway.store.client_usage(day) == {"team-a": 0}
    for status in gw.gateway.pool.statuses():
        await gw.gateway.pool.enable(status.config)
    assert [(await gw.create(**A)).status for _ in range(3)] == [200, 200, 429]


async def test_unknown_outcome_keeps_the_client_unit(make_gateway: MakeGateway, upstream: Upstream) -> None:
    gw = await make_gateway(clients=clients(2), upstream={"base_url": upstream.url, "timeout_s": 0.3})
    upstream.state.add_fault(Fault(kind="slow", delay_s=1.0, times=1))
    resp = await gw.create(**A)
    assert (await resp.json())["error"]["code"] == "upstream_outcome_unknown"
    # The task may exist upstream, so it counts, like the key's unit does.
    assert await gw.gateway.store.client_usage(gw.gateway.pool.day) == {"team-a": 1}


async def test_client_limit_starts_again_with_the_quota_day(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    gw = await make_gateway(clients=clients(1))
    assert [(await gw.create(**A)).status for _ in range(2)] == [200, 429]
    clock.advance(12 * 3600)
    assert (await gw.create(**A)).status == 200


async def test_zero_limit_refuses_every_create(make_gateway: MakeGateway, upstream: Upstream) -> None:
    gw = await make_gateway(clients=clients(0))
    resp = await gw.create(**A)
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "client_quota_exceeded"
    assert upstream.state.requests == 0
