"""End to end through the native surface: a real gateway in front of the real simulator."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.app import serve
from gateway.clock import ManualClock
from gateway.config import parse_config
from gateway.simulator import Fault
from gateway.store import KeyState

from .conftest import (
    BODY,
    KEY_A,
    KEY_B,
    KEY_C,
    TOKEN,
    Running,
    Upstream,
    both_backends,
    direct_poll,
    gateway_config,
)

MakeGateway = Callable[..., Awaitable[Running]]
MakeUpstream = Callable[..., Awaitable[Upstream]]


def one_key(limit: int | None = 10) -> list[dict[str, object]]:
    return [{"name": "a", "key": KEY_A, "daily_limit": limit}]


async def states(gw: Running) -> dict[str, KeyState]:
    ts = gw.gateway.clock.now().timestamp()
    return {s.name: s.state(ts) for s in gw.gateway.pool.statuses()}


# --- 1. drop-in pass-through ------------------------------------------------------------


@both_backends
async def test_create_and_poll_pass_through_byte_for_byte(gw: Running, upstream: Upstream) -> None:
    raw = b'{"model": "agnes-video-v2.0", "prompt": "x", "image": "https://e.x/a.png", "seed": 7, "mode": {"k": [1]}}'
    resp = await gw.client.post(
        "/v1/videos", data=raw, headers={"Content-Type": "application/json", "Authorization": "Bearer client-cred"}
    )
    assert resp.status == 200
    task_id = (await resp.json())["task_id"]
    # Unknown fields reach upstream untouched; the client's credential does not.
    assert upstream.state.last_create_body == raw
    sent_auth = upstream.state.last_create_headers["Authorization"]
    assert sent_auth in {f"Bearer {KEY_A}", f"Bearer {KEY_B}"}
    assert "client-cred" not in json.dumps(upstream.state.last_create_headers)

    polled = await gw.poll(task_id)
    status, direct = await direct_poll(upstream, sent_auth.removeprefix("Bearer "), task_id)
    assert (polled.status, await polled.read()) == (status, direct)
    assert polled.headers["Content-Type"].startswith("application/json")


@both_backends
async def test_upstream_client_error_passes_through_and_spends_nothing(gw: Running, upstream: Upstream) -> None:
    resp = await gw.create({"model": "agnes-video-v2.0"})  # no prompt: the simulator refuses it
    assert resp.status == 400
    assert "prompt" in (await resp.text())
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 0


# --- 10. bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b"", b'{"prompt": "\xff\xfe"}', b"[" * 100_000 + b"]" * 100_000]
)
async def test_bad_json_is_refused_before_any_quota_or_upstream_call(
    gw: Running, upstream: Upstream, raw: bytes
) -> None:
    resp = await gw.client.post("/v1/videos", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_json"
    assert upstream.state.requests == 0
    assert await gw.gateway.store.usage(gw.gateway.pool.day) == {}


async def test_body_over_the_limit_is_413_json(make_gateway: MakeGateway, upstream: Upstream) -> None:
    gw = await make_gateway(limits={"max_body_bytes": 1024})
    resp = await gw.create({**BODY, "prompt": "x" * 2000})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "body_too_large"
    assert upstream.state.requests == 0


async def test_unknown_route_is_json_404(gw: Running) -> None:
    resp = await gw.client.get("/v2/nothing")
    assert resp.status == 404
    assert "error" in await resp.json()


# --- 4. quota reserved atomically before forwarding ---------------------------------------


@both_backends
async def test_concurrent_creates_never_exceed_the_daily_limit(make_gateway: MakeGateway, upstream: Upstream) -> None:
    gw = await make_gateway(keys=one_key(10))
    answers = await asyncio.gather(*(gw.create() for _ in range(40)))
    codes = sorted(r.status for r in answers)
    assert codes == [200] * 10 + [429] * 30
    assert upstream.state.creates[KEY_A] == 10


@both_backends
async def test_counts_survive_a_restart(make_gateway: MakeGateway, upstream: Upstream) -> None:
    first = await make_gateway(keys=one_key(5))
    for _ in range(3):
        assert (await first.create()).status == 200
    await first.client.close()
    second = await make_gateway(keys=one_key(5))
    codes = [(await second.create()).status for _ in range(3)]
    assert codes == [200, 200, 429]
    assert upstream.state.creates[KEY_A] == 5


@both_backends
async def test_quota_day_starts_again_at_midnight_shanghai(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    gw = await make_gateway(keys=one_key(2))
    assert [(await gw.create()).status for _ in range(2)] == [200, 200]
    refused = await gw.create()
    assert refused.status == 429
    # 12:00 in Shanghai: twelve hours to the next quota day.
    assert refused.headers["Retry-After"] == str(12 * 3600)
    assert (await refused.json())["error"]["code"] == "all_keys_exhausted"
    clock.advance(12 * 3600 - 1)
    assert (await gw.create()).status == 429
    clock.advance(1)
    assert (await gw.create()).status == 200


async def test_quota_day_follows_configured_reset_time_and_zone(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    # 04:00 UTC; the day starts at 05:30 UTC.
    gw = await make_gateway(keys=one_key(1), quota={"timezone": "UTC", "reset_time": "05:30"})
    assert (await gw.create()).status == 200
    refused = await gw.create()
    assert refused.headers["Retry-After"] == str(90 * 60)
    clock.advance(90 * 60)
    assert (await gw.create()).status == 200


# --- 3. key choice ----------------------------------------------------------------------


@both_backends
async def test_lowest_priority_number_first_with_turns_on_ties(gw: Running, upstream: Upstream) -> None:
    for _ in range(10):
        assert (await gw.create()).status == 200
    assert (upstream.state.creates[KEY_A], upstream.state.creates[KEY_B], upstream.state.creates[KEY_C]) == (5, 5, 0)
    for _ in range(10):
        assert (await gw.create()).status == 200
    assert upstream.state.creates[KEY_C] == 0
    # a and b are now spent: the backup takes over.
    assert (await gw.create()).status == 200
    assert upstream.state.creates[KEY_C] == 1


async def test_key_with_most_quota_left_goes_first(make_gateway: MakeGateway, upstream: Upstream) -> None:
    gw = await make_gateway(
        keys=[{"name": "a", "key": KEY_A, "daily_limit": 3}, {"name": "b", "key": KEY_B, "daily_limit": 9}]
    )
    for _ in range(6):
        assert (await gw.create()).status == 200
    assert (upstream.state.creates[KEY_A], upstream.state.creates[KEY_B]) == (0, 6)


# --- 5. failover --------------------------------------------------------------------------


@both_backends
async def test_quota_refusal_marks_key_spent_and_fails_over(
    gw: Running, upstream: Upstream, clock: ManualClock
) -> None:
    upstream.state.add_fault(Fault(kind="quota", key=KEY_A, operation="create", times=-1))
    for _ in range(4):
        assert (await gw.create()).status == 200
    assert upstream.state.creates[KEY_B] == 4
    assert (await states(gw))["a"] is KeyState.SPENT
    attempts_on_a = upstream.state.requests - 4
    assert attempts_on_a == 1  # tried once, then skipped for the rest of the day
    upstream.state.clear_faults()
    clock.advance(12 * 3600)
    await gw.create()
    assert (await states(gw))["a"] is KeyState.ACTIVE


@pytest.mark.parametrize(
    ("status", "message"), [(403, "今日调用次数已达上限"), (429, "额度不足"), (400, "quota exceeded")]
)
async def test_quota_refusal_wordings(make_gateway: MakeGateway, upstream: Upstream, status: int, message: str) -> None:
    gw = await make_gateway(upstream={"base_url": upstream.url, "quota_statuses": [429, 403, 400]})
    upstream.state.add_fault(Fault(kind="quota", status=status, message=message, key=KEY_A, times=-1))
    upstream.state.add_fault(Fault(kind="quota", status=status, message=message, key=KEY_B, times=-1))
    assert (await gw.create()).status == 200
    assert upstream.state.creates[KEY_C] == 1
    assert {s: (await states(gw))[s] for s in "ab"} == {"a": KeyState.SPENT, "b": KeyState.SPENT}


@both_backends
async def test_rate_limit_cools_key_down_for_retry_after(gw: Running, upstream: Upstream, clock: ManualClock) -> None:
    upstream.state.add_fault(Fault(kind="rate_limit", retry_after=30, key=KEY_A, times=1))
    upstream.state.add_fault(Fault(kind="rate_limit", retry_after=30, key=KEY_B, times=1))
    assert (await gw.create()).status == 200  # both cool down; the backup answers
    assert upstream.state.creates[KEY_C] == 1
    assert (await states(gw))["a"] is KeyState.COOLING
    clock.advance(29)
    assert (await gw.create()).status == 200
    assert upstream.state.creates[KEY_C] == 2
    clock.advance(1)
    assert (await gw.create()).status == 200
    assert upstream.state.creates[KEY_A] + upstream.state.creates[KEY_B] == 1


async def test_rate_limit_without_retry_after_cools_for_the_default(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    gw = await make_gateway(keys=one_key())
    upstream.state.add_fault(Fault(kind="rate_limit", key=KEY_A, times=1))
    refused = await gw.create()
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "60"
    clock.advance(60)
    assert (await gw.create()).status == 200


@both_backends
async def test_revoked_key_is_disabled_persistently_and_skipped(
    make_gateway: MakeGateway, make_upstream: MakeUpstream, database: str
) -> None:
    upstream = await make_upstream(keys={KEY_B: 100, KEY_C: 100})  # KEY_A is unknown upstream: 401
    doc = gateway_config(upstream.url, database)
    gw = await make_gateway(doc)
    for _ in range(3):
        assert (await gw.create()).status == 200
    assert upstream.state.creates[KEY_B] == 3
    assert (await states(gw))["a"] is KeyState.DISABLED
    await gw.client.close()

    again = await make_gateway(doc)
    assert (await states(again))["a"] is KeyState.DISABLED
    await again.client.close()

    # A new secret under the same name is a new key: no longer disabled.
    doc["keys"][0]["key"] = KEY_B + "x"
    replaced = await make_gateway(doc)
    assert (await states(replaced))["a"] is KeyState.ACTIVE


@both_backends
async def test_server_error_on_create_fails_over(gw: Running, upstream: Upstream) -> None:
    upstream.state.add_fault(Fault(kind="html_error", status=503, key=KEY_A, times=-1))
    upstream.state.add_fault(Fault(kind="html_error", status=503, key=KEY_B, times=-1))
    assert (await gw.create()).status == 200
    assert upstream.state.creates[KEY_C] == 1
    assert await gw.gateway.store.usage(gw.gateway.pool.day) == {"a": 0, "b": 0, "c": 1}


# --- 6. exhausted pool ------------------------------------------------------------------


async def test_each_key_is_tried_once_then_429_all_keys_exhausted(gw: Running, upstream: Upstream) -> None:
    for key in (KEY_A, KEY_B, KEY_C):
        upstream.state.add_fault(Fault(kind="quota", key=key, times=-1))
    resp = await gw.create()
    assert resp.status == 429
    doc = await resp.json()
    assert doc["error"]["code"] == "all_keys_exhausted"
    assert set(doc["error"]) == {"message", "type", "code"}
    assert int(resp.headers["Retry-After"]) == 12 * 3600
    assert upstream.state.requests == 3
    # Now the gateway knows: no upstream call at all.
    assert (await gw.create()).status == 429
    assert upstream.state.requests == 3


# --- 7. task routing --------------------------------------------------------------------


@both_backends
async def test_every_poll_goes_to_the_key_that_made_the_task(gw: Running, upstream: Upstream) -> None:
    ids = [(await (await gw.create()).json())["task_id"] for _ in range(6)]
    owners = {upstream.state.tasks[t].key for t in ids}
    assert owners == {KEY_A, KEY_B}
    for task_id in ids:
        resp = await gw.poll(task_id)  # the simulator answers 404 to any other key
        assert resp.status == 200
        assert (await resp.json())["status"] in {"queued", "in_progress"}
        record = await gw.gateway.store.get_task(task_id)
        assert record is not None and upstream.state.tasks[task_id].key == {"a": KEY_A, "b": KEY_B}[record.key_name]


@both_backends
async def test_task_made_elsewhere_is_found_on_its_key_and_remembered(
    gw: Running, upstream: Upstream, clock: ManualClock
) -> None:
    async with gw.client.session.post(
        f"{upstream.url}/v1/videos", json=BODY, headers={"Authorization": f"Bearer {KEY_C}"}
    ) as resp:
        task_id = (await resp.json())["task_id"]
    assert (await gw.poll(task_id)).status == 200
    first = sum(upstream.state.polls.values())
    assert first == 3  # a and b said 404, c knew it
    clock.advance(1)  # past the freshness window
    assert (await gw.poll(task_id)).status == 200
    assert sum(upstream.state.polls.values()) == first + 1
    record = await gw.gateway.store.get_task(task_id)
    assert record is not None and record.key_name == "c"


async def test_unknown_task_is_404_json(gw: Running, upstream: Upstream) -> None:
    resp = await gw.poll("0b5c7a1e-0000-4000-8000-000000000000")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "task_not_found"
    polls = sum(upstream.state.polls.values())
    assert (await gw.poll("0b5c7a1e-0000-4000-8000-000000000000")).status == 404
    assert sum(upstream.state.polls.values()) == polls  # remembered for a while: no new upstream calls


@pytest.mark.parametrize("task_id", ["a%20b", "x" * 200, "..%2F..%2Fetc", "abc%0d%0aX-Injected:1", "a.b"])
async def test_malformed_task_ids_never_reach_upstream(gw: Running, upstream: Upstream, task_id: str) -> None:
    resp = await gw.client.get(f"/v1/videos/{task_id}")
    assert resp.status in (400, 404)
    assert "X-Injected" not in resp.headers
    assert "error" in await resp.json()
    assert upstream.state.requests == 0


# --- 8. client auth ---------------------------------------------------------------------


async def test_clients_need_a_valid_token(make_gateway: MakeGateway, upstream: Upstream) -> None:
    gw = await make_gateway(clients=[{"name": "team-a", "token": TOKEN}])
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-000000000"},
        {"Authorization": f"Bearer {KEY_A}"},
        {"Authorization": TOKEN},
        {"Authorization": "Basic dGVhbTp4"},
    ):
        resp = await gw.create(**headers)
        assert resp.status == 401, headers
        assert (await resp.json())["error"]["code"] == "invalid_token"
        assert (await gw.poll("some-task", **headers)).status == 401
    assert upstream.state.requests == 0
    resp = await gw.create(Authorization=f"Bearer {TOKEN}")
    assert resp.status == 200
    record = await gw.gateway.store.get_task((await resp.json())["task_id"])
    assert record is not None and record.client == "team-a"


async def test_anonymous_gateway_refuses_to_listen_beyond_loopback(upstream: Upstream, tmp_path: Path) -> None:
    config = parse_config(gateway_config(upstream.url, tmp_path / "g.db", listen={"host": "0.0.0.0", "port": 0}))
    with pytest.raises(SystemExit, match="no clients are configured"):
        await serve(config)


# --- 9. secrets ---------------------------------------------------------------------------


async def test_no_secret_in_logs_bodies_or_headers(
    make_gateway: MakeGateway, make_upstream: MakeUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream = await make_upstream(keys={KEY_B: 100, KEY_C: 1})  # a is refused: 401
    gw = await make_gateway(
        gateway_config(upstream.url, tmp_path / "g.db", clients=[{"name": "team-a", "token": TOKEN}])
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    upstream.state.add_fault(Fault(kind="rate_limit", key=KEY_B, times=1))
    seen: list[str] = []
    for _ in range(4):
        resp = await gw.create(**auth)
        seen.append(await resp.text())
        seen.append(json.dumps(dict(resp.headers)))
        if resp.status == 200:
            resp = await gw.poll((await resp.json())["task_id"], **auth)
            seen.append(await resp.text() + json.dumps(dict(resp.headers)))
    seen.extend(r.getMessage() for r in caplog.records)
    text = "\n".join(seen)
    assert "disabled" in text  # the interesting paths were taken
    for secret in (KEY_A, KEY_B, KEY_C, TOKEN):
        assert secret not in text


# --- 11. upstream trouble ---------------------------------------------------------------


async def test_unreachable_upstream_is_502_and_spends_nothing(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = await make_gateway(gateway_config("http://127.0.0.1:9", tmp_path / "g.db"))
    resp = await gw.create()
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unreachable"
    assert await gw.gateway.store.usage(gw.gateway.pool.day) == {"a": 0, "b": 0, "c": 0}
    assert (await gw.client.get("/healthz")).status == 200


@both_backends
async def test_upstream_timeout_is_504_and_keeps_the_reservation(make_gateway: MakeGateway, upstream: Upstream) -> None:
    gw = await make_gateway(upstream={"base_url": upstream.url, "timeout_s": 0.3})
    upstream.state.add_fault(Fault(kind="slow", delay_s=1.0, times=1))
    resp = await gw.create()
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_outcome_unknown"
    # The task may exist upstream: the unit stays counted and no other key was tried.
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 1
    assert upstream.state.requests == 1


async def test_poll_timeout_is_504(make_gateway: MakeGateway, upstream: Upstream) -> None:
    gw = await make_gateway(upstream={"base_url": upstream.url, "timeout_s": 0.3})
    task_id = (await (await gw.create()).json())["task_id"]
    upstream.state.add_fault(Fault(kind="slow", delay_s=1.0, operation="poll", times=1))
    resp = await gw.poll(task_id)
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"


# --- 12. health ---------------------------------------------------------------------------


@both_backends
async def test_healthz(gw: Running) -> None:
    resp = await gw.client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    await gw.gateway.store.close()
    resp = await gw.client.get("/healthz")
    assert resp.status == 503
    await gw.gateway.store.open()
