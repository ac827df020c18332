"""The simulated upstream: lifecycle, quota days, ownership, downloads and injected faults."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway import simulator
from gateway.clock import ManualClock, QuotaSchedule
from gateway.simulator import (
    SIMULATOR_STATE,
    Fault,
    FaultKind,
    SimulatorConfig,
    SimulatorState,
    create_simulator_app,
)

KEY_A = "sk-alpha"
KEY_B = "sk-bravo"
BODY = {"model": "agnes-video-v2.0", "prompt": "a cat surfing", "width": 1152, "seed": 7}

Client = TestClient[aiohttp.web.Request, aiohttp.web.Application]
MakeSim = Callable[..., Awaitable[tuple[Client, SimulatorState]]]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(current=datetime(2026, 1, 1, 3, 0, tzinfo=UTC))


@pytest.fixture
def make_sim(aiohttp_client: Any, clock: ManualClock) -> MakeSim:
    async def make(**overrides: Any) -> tuple[Client, SimulatorState]:
        settings: dict[str, Any] = {"keys": {KEY_A: 3, KEY_B: None}, "video_bytes": 100_000}
        settings.update(overrides)
        app = create_simulator_app(SimulatorConfig(**settings), clock=clock)
        client: Client = await aiohttp_client(app)
        return client, app[SIMULATOR_STATE]

    return make


async def create(client: Client, key: str = KEY_A, **body: Any) -> aiohttp.ClientResponse:
    return await client.post("/v1/videos", json={**BODY, **body}, headers=auth(key))


async def create_task(client: Client, key: str = KEY_A, **body: Any) -> str:
    resp = await create(client, key, **body)
    assert resp.status == 200
    task_id: str = (await resp.json())["task_id"]
    return task_id


async def poll(client: Client, task_id: str, key: str = KEY_A) -> tuple[int, Any]:
    resp = await client.get(f"/v1/videos/{task_id}", headers=auth(key))
    return resp.status, await resp.json(content_type=None)


async def test_task_goes_from_queued_through_progress_to_completed(make_sim: MakeSim, clock: ManualClock) -> None:
    client, state = await make_sim(task_seconds=30.0)
    task_id = await create_task(client)

    assert await poll(client, task_id) == (200, {"status": "queued", "progress": 0})
    clock.advance(15)
    assert await poll(client, task_id) == (200, {"status": "in_progress", "progress": 50})
    clock.advance(15)
    status, answer = await poll(client, task_id)
    assert status == 200
    assert answer["status"] == "completed"
    assert answer["progress"] == 100
    assert answer["remixed_from_video_id"] == str(client.make_url(f"/files/{task_id}.mp4"))
    assert state.creates[KEY_A] == 1
    assert state.polls[KEY_A] == 3
    assert state.tasks[task_id].prompt == "a cat surfing"


async def test_zero_task_seconds_completes_at_once_with_public_base_url(make_sim: MakeSim) -> None:
    client, _ = await make_sim(task_seconds=0, public_base_url="https://cdn.example/")
    task_id = await create_task(client)
    _, answer = await poll(client, task_id)
    assert answer["remixed_from_video_id"] == f"https://cdn.example/files/{task_id}.mp4"


async def test_fail_marker_in_prompt_ends_failed(make_sim: MakeSim, clock: ManualClock) -> None:
    client, _ = await make_sim()
    task_id = await create_task(client, prompt="a riot [fail]")
    clock.advance(10)
    assert (await poll(client, task_id))[1]["status"] == "in_progress"
    clock.advance(30)
    assert await poll(client, task_id) == (
        200,
        {"status": "failed", "progress": 0, "error": "content moderation rejected the prompt"},
    )
    assert (await client.get(f"/files/{task_id}.mp4")).status == 404


async def test_quota_refused_after_limit_then_reset_on_next_quota_day(make_sim: MakeSim, clock: ManualClock) -> None:
    client, state = await make_sim(keys={KEY_A: 2})
    for _ in range(2):
        await create_task(client)
    resp = await create(client)
    assert resp.status == 429
    assert await resp.json() == {
        "error": {
            "message": "Daily quota exceeded: request limit reached for today",
            "type": "quota_exceeded",
            "code": "quota_exceeded",
        }
    }
    assert state.creates[KEY_A] == 2

    clock.set(QuotaSchedule().next_reset(clock.now()))
    await create_task(client)
    assert state.creates[KEY_A] == 3
    assert state.used_today(KEY_A) == 1


async def test_quota_status_and_message_are_configurable(make_sim: MakeSim) -> None:
    client, _ = await make_sim(keys={KEY_A: 0}, quota_status=403, quota_message="今日调用次数已达上限")
    resp = await create(client)
    assert resp.status == 403
    assert (await resp.json())["error"]["message"] == "今日调用次数已达上限"


async def test_unlimited_key_is_never_refused(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    for _ in range(5):
        await create_task(client, KEY_B)
    assert state.creates[KEY_B] == 5


@pytest.mark.parametrize("headers", [{}, auth("sk-unknown"), {"Authorization": "Basic x"}])
async def test_unknown_or_missing_key_is_401(make_sim: MakeSim, headers: dict[str, str]) -> None:
    client, state = await make_sim()
    resp = await client.post("/v1/videos", json=BODY, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_api_key"
    task_id = await create_task(client)
    resp = await client.get(f"/v1/videos/{task_id}", headers=headers)
    assert resp.status == 401
    assert sum(state.creates.values()) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"model": "m"}',
        b'{"model": "m", "prompt": ""}',
        b'{"prompt": "p"}',
    ],
)
async def test_invalid_json_body_is_400_and_not_counted(make_sim: MakeSim, body: bytes) -> None:
    client, state = await make_sim()
    resp = await client.post("/v1/videos", data=body, headers={**auth(KEY_A), "Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert state.used_today(KEY_A) == 0


async def test_multipart_upload_is_accepted_as_is(make_sim: MakeSim, clock: ManualClock) -> None:
    client, state = await make_sim()
    form = aiohttp.FormData()
    form.add_field("model", "agnes-video-v2.0")
    form.add_field("prompt", "animate this [fail]")
    form.add_field("image", b"\x89PNG fake", filename="a.png", content_type="image/png")
    resp = await client.post("/v1/videos", data=form, headers=auth(KEY_A))
    assert resp.status == 200
    task = state.tasks[(await resp.json())["task_id"]]
    assert task.prompt == "animate this [fail]"
    assert b"\x89PNG fake" in state.last_create_body
    assert state.last_create_headers["Content-Type"].startswith("multipart/form-data")
    clock.advance(60)
    assert (await poll(client, task.task_id))[1]["status"] == "failed"


async def test_create_body_and_headers_are_recorded(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    await client.post("/v1/videos", json=BODY, headers={**auth(KEY_A), "X-Trace": "t1"})
    assert state.last_create_headers["X-Trace"] == "t1"
    assert json.loads(state.last_create_body) == BODY


async def test_polling_another_keys_task_is_404(make_sim: MakeSim) -> None:
    client, _ = await make_sim()
    task_id = await create_task(client, KEY_A)
    status, answer = await poll(client, task_id, KEY_B)
    assert status == 404
    assert answer["error"]["message"] == "Task not found"
    assert (await poll(client, "no-such-task"))[0] == 404


async def test_download_full_and_ranges(make_sim: MakeSim, clock: ManualClock) -> None:
    client, _ = await make_sim(video_bytes=100_000)
    task_id = await create_task(client)
    url = f"/files/{task_id}.mp4"
    assert (await client.get(url)).status == 404
    clock.advance(30)

    resp = await client.get(url)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "video/mp4"
    assert resp.headers["Content-Length"] == "100000"
    video = await resp.read()
    assert len(video) == 100_000
    assert video[4:12] == b"ftypmp42"

    resp = await client.get(url, headers={"Range": "bytes=10-99"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == "bytes 10-99/100000"
    assert await resp.read() == video[10:100]

    resp = await client.get(url, headers={"Range": "bytes=-500"})
    assert resp.status == 206
    assert await resp.read() == video[-500:]

    resp = await client.get(url, headers={"Range": "bytes=99990-"})
    assert await resp.read() == video[99_990:]

    resp = await client.get(url, headers={"Range": "bytes=200000-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == "bytes */100000"


async def test_large_video_is_streamed_with_the_same_bytes(
    make_sim: MakeSim, clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, state = await make_sim(video_bytes=300_000, task_seconds=0)
    task_id = await create_task(client)
    cached = state.video()
    monkeypatch.setattr(simulator, "_CACHE_LIMIT", 1000)
    resp = await client.get(f"/files/{task_id}.mp4")
    assert resp.headers["Content-Length"] == "300000"
    assert await resp.read() == cached
    resp = await client.get(f"/files/{task_id}.mp4", headers={"Range": "bytes=65530-200000"})
    assert await resp.read() == cached[65_530:200_001]


async def test_status_fault_answers_once_then_normal(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    state.add_fault(Fault(FaultKind.STATUS, status=500, body='{"error": "boom"}'))
    resp = await create(client)
    assert resp.status == 500
    assert await resp.json() == {"error": "boom"}
    assert state.faults == []
    await create_task(client)
    assert state.creates[KEY_A] == 1


async def test_quota_fault_with_custom_status_and_chinese_message(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    state.add_fault(Fault(FaultKind.QUOTA, status=403, message="今日调用次数已达上限"))
    resp = await create(client)
    assert resp.status == 403
    assert (await resp.json())["error"] == {
        "message": "今日调用次数已达上限",
        "type": "quota_exceeded",
        "code": "quota_exceeded",
    }
    assert state.creates[KEY_A] == 0


async def test_rate_limit_fault_with_and_without_retry_after(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    state.add_fault(Fault(FaultKind.RATE_LIMIT, retry_after=7))
    state.add_fault(Fault(FaultKind.RATE_LIMIT))
    first = await create(client)
    assert first.status == 429
    assert first.headers["Retry-After"] == "7"
    assert await first.json() == {"error": {"message": "Too many requests", "code": "rate_limited"}}
    second = await create(client)
    assert second.status == 429
    assert "Retry-After" not in second.headers


async def test_not_json_and_html_error_faults(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    task_id = await create_task(client)
    state.add_fault(Fault(FaultKind.NOT_JSON, operation="poll"))
    state.add_fault(Fault(FaultKind.HTML_ERROR, status=503, operation="poll"))
    resp = await client.get(f"/v1/videos/{task_id}", headers=auth(KEY_A))
    assert (resp.status, await resp.text()) == (200, "<html>oops</html>")
    resp = await client.get(f"/v1/videos/{task_id}", headers=auth(KEY_A))
    assert resp.status == 503
    assert resp.content_type == "text/html"
    assert "<html>" in await resp.text()


async def test_slow_fault_delays_then_answers_normally(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    state.add_fault(Fault(FaultKind.SLOW, delay_s=0.01))
    await create_task(client)
    assert state.creates[KEY_A] == 1
    assert state.faults == []


async def test_reset_fault_drops_the_connection(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    state.add_fault(Fault(FaultKind.RESET))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await create(client)
    assert state.creates[KEY_A] == 0
    await create_task(client)


async def test_faults_filter_by_key_and_operation_and_repeat(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    state.add_fault(Fault(FaultKind.STATUS, status=502, key=KEY_B, operation="create", times=-1))
    task_id = await create_task(client, KEY_A)
    assert (await poll(client, task_id))[0] == 200
    for _ in range(3):
        assert (await create(client, KEY_B)).status == 502
    assert len(state.faults) == 1
    state.clear_faults()
    await create_task(client, KEY_B)


async def test_reset_on_a_poll_is_seen_by_the_client(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    task_id = await create_task(client)
    state.add_fault(Fault(FaultKind.RESET, operation="poll"))
    with pytest.raises(aiohttp.ClientConnectionError):
        await poll(client, task_id)
    assert (await poll(client, task_id))[0] == 200
    assert state.requests == 3


async def test_configured_faults_and_dead_every(make_sim: MakeSim) -> None:
    fault = Fault(FaultKind.STATUS, status=500, times=2)
    client, _ = await make_sim(faults=(fault,), dead_every=3)
    assert [(await create(client)).status for _ in range(2)] == [500, 500]
    assert fault.times == 2  # the config's fault is copied, not consumed
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await create(client)
    assert [(await create(client)).status for _ in range(2)] == [200, 200]
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await create(client)


async def test_fault_control_api_and_stats(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    resp = await client.post("/_sim/faults", json={"kind": "quota", "status": 403, "key": KEY_A, "times": 1})
    assert resp.status == 201
    assert (await resp.json())["kind"] == "quota"
    assert (await client.post("/_sim/faults", json={"kind": "nope"})).status == 400
    assert (await client.post("/_sim/faults", json={"kind": "slow", "bogus": 1})).status == 400
    assert (await client.post("/_sim/faults", json={"kind": "status", "status": "x"})).status == 400
    assert len((await (await client.get("/_sim/faults")).json())["faults"]) == 1

    assert (await create(client)).status == 403
    task_id = await create_task(client)
    await poll(client, task_id)
    await create_task(client, KEY_B)

    await client.post("/_sim/faults", json={"kind": "reset", "times": -1})
    assert (await client.delete("/_sim/faults")).status == 200
    assert state.faults == []

    stats = await (await client.get("/_sim/stats")).json()
    assert stats == {
        "creates": {KEY_A: 1, KEY_B: 1},
        "used_today": {KEY_A: 1, KEY_B: 1},
        "polls": {KEY_A: 1, KEY_B: 0},
        "tasks": 2,
        "faults": 0,
    }


async def test_hold_fault_keeps_requests_until_released(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    state.add_fault(Fault(FaultKind.HOLD, operation="create", times=2))
    held = [asyncio.ensure_future(create(client)) for _ in range(2)]
    await asyncio.wait_for(state.until_held(2), 5)
    assert not any(f.done() for f in held)
    assert (await create(client)).status == 200  # the fault is used up: no hold
    resp = await client.post("/_sim/release")
    assert await resp.json() == {"released": 2}
    assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
    assert state.holding == 0


async def test_calls_count_every_request_per_key_and_operation(make_sim: MakeSim) -> None:
    client, state = await make_sim()
    state.add_fault(Fault(FaultKind.STATUS, status=503, key=KEY_B, times=1))
    task_id = await create_task(client)
    await poll(client, task_id)
    assert (await create(client, KEY_B)).status == 503
    assert (await create(client, "sk-unknown")).status == 401
    assert state.calls == {(KEY_A, "create"): 1, (KEY_A, "poll"): 1, (KEY_B, "create"): 1, ("sk-unknown", "create"): 1}
