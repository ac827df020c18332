"""`/readyz`: ready only while the database works and some key can take a create; `/healthz` stays liveness."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gateway.clock import ManualClock
from gateway.simulator import Fault

from .conftest import KEY_A, Running, Upstream

MakeGateway = Callable[..., Awaitable[Running]]


async def test_ready_with_usable_keys(gw: Running) -> None:
    resp = await gw.client.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ready", "usable_keys": 3}


async def test_not_ready_when_every_key_is_spent_until_the_next_quota_day(
    make_gateway: MakeGateway, clock: ManualClock
) -> None:
    gw = await make_gateway(keys=[{"name": "a", "key": KEY_A, "daily_limit": 2}])
    for _ in range(2):
        assert (await gw.create()).status == 200
    resp = await gw.client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "no_usable_key"
    assert resp.headers["Retry-After"] == str(12 * 3600)  # noon in Shanghai: 12 h to the next day
    assert (await gw.client.get("/healthz")).status == 200  # alive all the same

    clock.advance(12 * 3600)
    resp = await gw.client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["usable_keys"] == 1


async def test_not_ready_while_the_only_key_cools_down(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    gw = await make_gateway(keys=[{"name": "a", "key": KEY_A, "daily_limit": 10}])
    upstream.state.add_fault(Fault(kind="rate_limit", retry_after=30, key=KEY_A, times=1))
    assert (await gw.create()).status == 429
    resp = await gw.client.get("/readyz")
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "30"
    clock.advance(30)
    assert (await gw.client.get("/readyz")).status == 200


async def test_not_ready_when_the_database_is_unusable(gw: Running) -> None:
    await gw.gateway.store.close()
    for path in ("/readyz", "/healthz"):
        resp = await gw.client.get(path)
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "database_unavailable"
