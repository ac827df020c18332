"""The admin API: who may use it, the key table, key actions, task and client lookups."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.clock import ManualClock
from gateway.simulator import Fault
from gateway.store import KeyState

from .conftest import KEY_A, KEY_B, KEY_C, TOKEN, Running, Upstream, gateway_config

MakeGateway = Callable[..., Awaitable[Running]]
MakeUpstream = Callable[..., Awaitable[Upstream]]

ADMIN = "adm-0123456789abcdef-secret"
TOKEN_B = "tok-team-b-0123456789abcdef"
CLIENTS = [{"name": "team-a", "token": TOKEN}, {"name": "team-b", "token": TOKEN_B, "daily_limit": 3}]


async def admin(
    gw: Running, method: str, path: str, token: str | None = ADMIN, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await gw.client.request(method, f"/admin{path}", headers=headers, **kwargs)
    return resp.status, await resp.json()


def keys_by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k["name"]: k for k in doc["keys"]}


@pytest.fixture
async def agw(make_gateway: MakeGateway) -> Running:
    return await make_gateway(admin_token=ADMIN, clients=CLIENTS)


async def created_id(gw: Running, token: str = TOKEN) -> str:
    resp = await gw.create(Authorization=f"Bearer {token}")
    assert resp.status == 200
    return str((await resp.json())["task_id"])


# --- who may use it ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "invalid_admin_token"),
        ({"Authorization": "Bearer wrong-token-000000000000"}, 401, "invalid_admin_token"),
        ({"Authorization": f"Bearer {KEY_A}"}, 401, "invalid_admin_token"),
        ({"Authorization": ADMIN}, 401, "invalid_admin_token"),
        ({"Authorization": f"Bearer {TOKEN}"}, 403, "not_admin"),
        ({"Authorization": f"Bearer {TOKEN_B}"}, 403, "not_admin"),
    ],
)
async def test_admin_endpoints_refuse_anything_but_the_admin_token(
    agw: Running, upstream: Upstream, headers: dict[str, str], status: int, code: str
) -> None:
    for method, path in (
        ("GET", "/keys"),
        ("POST", "/keys/a/disable"),
        ("POST", "/keys/a/enable"),
        ("POST", "/keys/a/reset?counts=true"),
        ("GET", "/tasks/some-task"),
        ("GET", "/clients"),
        ("POST", "/reload"),
    ):
        resp = await agw.client.request(method, f"/admin{path}", headers=headers)
        assert resp.status == status, (method, path)
        doc = await resp.json()
        assert doc["error"]["code"] == code
        assert ADMIN not in json.dumps(doc) and TOKEN not in json.dumps(doc)
    # Nothing was changed by the refused calls.
    assert {s.name: s.mark for s in agw.gateway.pool.statuses()} == {"a": None, "b": None, "c": None}
    assert upstream.state.requests == 0


async def test_the_admin_token_is_not_a_client_token(agw: Running, upstream: Upstream) -> None:
    resp = await agw.create(Authorization=f"Bearer {ADMIN}")
    assert resp.status == 401
    assert upstream.state.requests == 0


async def test_admin_api_is_off_without_an_admin_token(gw: Running) -> None:
    status, doc = await admin(gw, "GET", "/keys")
    assert status == 404
    assert doc["error"]["code"] == "admin_disabled"


# --- the key table ----------------------------------------------------------------------


async def test_key_table_shows_counts_states_and_masked_secrets(
    agw: Running, upstream: Upstream, clock: ManualClock
) -> None:
    upstream.state.add_fault(Fault(kind="rate_limit", retry_after=30, key=KEY_B, times=1))
    for _ in range(3):
        await created_id(agw)
    resp = await agw.client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"})
    text = await resp.text()
    assert resp.status == 200
    for secret in (KEY_A, KEY_B, KEY_C, ADMIN, TOKEN):
        assert secret not in text
    doc = json.loads(text)
    assert doc["day"] == "2026-03-02" and doc["retired"] == []
    keys = keys_by_name(doc)
    assert list(keys) == ["a", "b", "c"]
    assert keys["a"] == {
        "name": "a",
        "secret": "…" + KEY_A[-4:],
        "priority": 0,
        "daily_limit": 10,
        "used": 3,
        "remaining": 7,
        "state": "active",
        "reason": None,
        "until": None,
        "disabled_by": None,
        "last_error": None,
    }
    # b was rate limited on the first create: cooling for 30 s from 04:00 UTC.
    assert keys["b"]["state"] == "cooling"
    assert keys["b"]["until"] == "2026-03-02T04:00:30+00:00"
    assert "30" in keys["b"]["reason"] and keys["b"]["last_error"] == keys["b"]["reason"]
    assert (keys["b"]["used"], keys["c"]["priority"]) == (0, 1)
    clock.advance(30)
    _, doc = await admin(agw, "GET", "/keys")
    assert keys_by_name(doc)["b"]["state"] == "active"


async def test_key_at_its_daily_limit_shows_spent_until_the_next_quota_day(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(admin_token=ADMIN, keys=[{"name": "a", "key": KEY_A, "daily_limit": 1}])
    assert (await gw.create()).status == 200
    _, doc = await admin(gw, "GET", "/keys")
    row = keys_by_name(doc)["a"]
    # Midnight in Shanghai is 16:00 UTC.
    assert (row["state"], row["remaining"], row["until"]) == ("spent", 0, "2026-03-02T16:00:00+00:00")
    assert row["reason"] == "daily limit of 1 reached"


# --- key actions ------------------------------------------------------------------------


async def test_disable_and_enable_persist_across_restarts(
    make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path
) -> None:
    doc = gateway_config(upstream.url, tmp_path / "g.db", admin_token=ADMIN)
    gw = await make_gateway(doc)
    status, row = await admin(gw, "POST", "/keys/a/disable", json={"reason": "rotating it"})
    assert status == 200
    assert (row["state"], row["disabled_by"], row["reason"]) == (
        "disabled",
        "operator",
        "disabled by an operator: rotating it",
    )
    assert row["last_error"] is None
    for _ in range(4):
        assert (await gw.create()).status == 200
    assert (upstream.state.creates[KEY_A], upstream.state.creates[KEY_B]) == (0, 4)
    await gw.client.close()

    again = await make_gateway(doc)
    _, table = await admin(again, "GET", "/keys")
    assert keys_by_name(table)["a"]["state"] == "disabled"
    status, row = await admin(again, "POST", "/keys/a/enable")
    assert (status, row["state"], row["reason"]) == (200, "active", None)
    await again.client.close()

    third = await make_gateway(doc)
    assert (await third.create()).status == 200
    assert (await third.create()).status == 200
    assert upstream.state.creates[KEY_A] >= 1


async def test_manual_disable_reads_differently_from_an_upstream_refusal(
    make_gateway: MakeGateway, make_upstream: MakeUpstream, tmp_path: Path
) -> None:
    upstream = await make_upstream(keys={KEY_B: 100, KEY_C: 100})  # KEY_A is refused: 401
    gw = await make_gateway(gateway_config(upstream.url, tmp_path / "g.db", admin_token=ADMIN))
    await admin(gw, "POST", "/keys/b/disable")
    assert (await gw.create()).status == 200  # a is tried and refused, the backup answers
    assert upstream.state.creates[KEY_C] == 1
    _, table = await admin(gw, "GET", "/keys")
    keys = keys_by_name(table)
    assert (keys["a"]["state"], keys["a"]["disabled_by"]) == ("disabled", "upstream")
    assert "401" in keys["a"]["reason"] and "401" in keys["a"]["last_error"]
    assert (keys["b"]["state"], keys["b"]["disabled_by"], keys["b"]["reason"]) == (
        "disabled",
        "operator",
        "disabled by an operator",
    )


async def test_reset_clears_the_mark_and_only_on_request_the_count(
    agw: Running, upstream: Upstream, clock: ManualClock
) -> None:
    upstream.state.add_fault(Fault(kind="quota", key=KEY_A, times=1))
    for _ in range(4):
        await created_id(agw)
    assert agw.gateway.pool.statuses()[0].state(clock.now().timestamp()) is KeyState.SPENT
    used_b = upstream.state.creates[KEY_B]
    status, row = await admin(agw, "POST", "/keys/a/reset")
    assert (status, row["state"], row["used"]) == (200, "active", 0)
    await created_id(agw)  # a has the most quota left again
    assert upstream.state.creates[KEY_A] == 1
    status, row = await admin(agw, "POST", "/keys/b/reset")
    assert (row["state"], row["used"]) == ("active", used_b)
    status, row = await admin(agw, "POST", "/keys/b/reset?counts=true")
    assert (status, row["used"], row["remaining"]) == (200, 0, 10)
    assert (await agw.gateway.store.usage("2026-03-02")).get("b", 0) == 0


async def test_reset_leaves_a_disabled_key_disabled(agw: Running) -> None:
    await admin(agw, "POST", "/keys/a/disable")
    status, row = await admin(agw, "POST", "/keys/a/reset?counts=1")
    assert (status, row["state"]) == (200, "disabled")


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [
        ("/keys/nope/disable", {}, 404, "key_not_found"),
        ("/keys/nope/enable", {}, 404, "key_not_found"),
        ("/keys/a/reset?counts=maybe", {}, 400, "invalid_query"),
        ("/keys/a/disable", {"data": b"{nope"}, 400, "invalid_json"),
        ("/keys/a/disable", {"json": {"reason": "x", "other": 1}}, 400, "invalid_json"),
        ("/keys/a/disable", {"json": {"reason": "line\nbreak"}}, 400, "invalid_reason"),
        ("/keys/a/disable", {"json": {"reason": "x" * 201}}, 400, "invalid_reason"),
    ],
)
async def test_bad_key_actions_are_clear_json_errors(
    agw: Running, path: str, kwargs: dict[str, Any], status: int, code: str
) -> None:
    got, doc = await admin(agw, "POST", path, **kwargs)
    assert (got, doc["error"]["code"]) == (status, code)
    assert all(s.mark is None for s in agw.gateway.pool.statuses())


# --- tasks and clients ------------------------------------------------------------------


async def test_task_lookup_shows_key_client_time_and_last_status(agw: Running, upstream: Upstream) -> None:
    task_id = await created_id(agw, TOKEN_B)
    _, doc = await admin(agw, "GET", f"/tasks/{task_id}")
    owner = {KEY_A: "a", KEY_B: "b"}[upstream.state.tasks[task_id].key]
    assert doc == {
        "task_id": task_id,
        "key": owner,
        "key_configured": True,
        "client": "team-b",
        "created_at": "2026-03-02T04:00:00+00:00",
        "status": None,
        "progress": None,
        "updated_at": None,
    }
    assert (await agw.poll(task_id, Authorization=f"Bearer {TOKEN}")).status == 200
    _, doc = await admin(agw, "GET", f"/tasks/{task_id}")
    assert doc["status"] in {"queued", "in_progress"} and doc["updated_at"] == "2026-03-02T04:00:00+00:00"

    status, doc = await admin(agw, "GET", "/tasks/never-made-here")
    assert (status, doc["error"]["code"]) == (404, "task_not_found")
    status, doc = await admin(agw, "GET", "/tasks/a.b")
    assert (status, doc["error"]["code"]) == (400, "invalid_task_id")
    assert sum(upstream.state.polls.values()) == 1  # lookups never call upstream


async def test_clients_show_todays_usage_and_limits(agw: Running, clock: ManualClock) -> None:
    for _ in range(2):
        await created_id(agw, TOKEN)
    await created_id(agw, TOKEN_B)
    status, doc = await admin(agw, "GET", "/clients")
    assert status == 200
    assert doc == {
        "day": "2026-03-02",
        "clients": [
            {"name": "team-a", "daily_limit": None, "used": 2, "remaining": None, "configured": True},
            {"name": "team-b", "daily_limit": 3, "used": 1, "remaining": 2, "configured": True},
        ],
    }
    clock.advance(12 * 3600)  # a new quota day
    _, doc = await admin(agw, "GET", "/clients")
    assert doc["day"] == "2026-03-03" and [c["used"] for c in doc["clients"]] == [0, 0]


async def test_unknown_admin_route_is_json_404(agw: Running) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.get(agw.client.make_url("/admin/nothing"), headers={"Authorization": f"Bearer {ADMIN}"})
        assert resp.status == 404
        assert "error" in await resp.json()
