"""The OpenAI Videos dialect, driven by the real, unmodified `openai` SDK against a live gateway and simulator."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.clock import ManualClock
from gateway.simulator import Fault

from .conftest import KEY_A, TOKEN, Running, Upstream, gateway_config

# The SDK marks the Sora endpoints deprecated; the warnings say nothing about the gateway.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MakeGateway = Callable[..., Awaitable[Running]]
README = Path(__file__).parent.parent / "README.md"
OTHER_TOKEN = "tok-team-b-fedcba9876543210"


@pytest.fixture
def sim(ticking_upstream: Upstream) -> Upstream:
    return ticking_upstream


@pytest.fixture
async def make_oai(make_gateway: MakeGateway, sim: Upstream, tmp_path: Path) -> Callable[..., Awaitable[Running]]:
    async def make(**overrides: Any) -> Running:
        doc = gateway_config(
            sim.url,
            tmp_path / "g.db",
            clients=[{"name": "team-a", "token": TOKEN}, {"name": "team-b", "token": OTHER_TOKEN}],
            openai={"poll_after_ms": 1},
        )
        doc.update(overrides)
        return await make_gateway(doc)

    return make


@pytest.fixture
async def gw(make_oai: Callable[..., Awaitable[Running]]) -> Running:
    return await make_oai()


def sdk(gw: Running, token: str = TOKEN, **options: Any) -> openai.AsyncOpenAI:
    """The official client, pointed at the gateway exactly as the README says."""
    return openai.AsyncOpenAI(
        base_url=str(gw.client.make_url("/openai/v1")), api_key=token, max_retries=options.pop("max_retries", 0)
    )


@pytest.fixture
async def client(gw: Running) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(gw) as client:
        yield client


def upstream_body(sim: Upstream) -> dict[str, Any]:
    doc = json.loads(sim.state.last_create_body)
    assert isinstance(doc, dict)
    return doc


async def test_create_translates_to_upstream_fields_and_answers_a_video(
    client: openai.AsyncOpenAI, sim: Upstream, gw: Running
) -> None:
    video = await client.videos.create(prompt="A cat playing piano", model="sora-2", seconds="8", size="1280x720")
    assert video.object == "video"
    assert (video.status, video.progress) == ("queued", 0)
    assert (video.model, video.seconds, video.size, video.prompt) == ("sora-2", "8", "1280x720", "A cat playing piano")
    assert video.created_at == int(gw.gateway.clock.now().timestamp())
    assert upstream_body(sim) == {
        "model": "agnes-video-v2.0",
        "prompt": "A cat playing piano",
        "width": 1280,
        "height": 720,
        "num_frames": 8 * 24 + 1,
        "frame_rate": 24,
    }
    # The id is the upstream task id, routed like any other task and spending one unit of quota.
    assert video.id in sim.state.tasks
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 1


async def test_retrieve_reports_progress_and_the_poll_pacing_header(client: openai.AsyncOpenAI, sim: Upstream) -> None:
    video = await client.videos.create(prompt="A slow sunrise")
    raw = await client.videos.with_raw_response.retrieve(video.id)
    assert raw.headers["openai-poll-after-ms"] == "1"
    first = raw.parse()
    assert (first.status, first.progress, first.completed_at) == ("queued", 0, None)
    second = await client.videos.retrieve(video.id)  # the simulated clock moved 4 s of 10
    assert (second.status, second.progress) == ("in_progress", 40)
    # Unset fields echo what the upstream makes by default: 1152x768, 121 frames at 24 fps.
    assert (second.size, second.seconds, second.model) == ("1152x768", "5", "agnes-video-v2.0")


async def test_create_and_poll_then_download_content(client: openai.AsyncOpenAI, sim: Upstream) -> None:
    video = await client.videos.create_and_poll(prompt="A dog on a skateboard", size="720x1280", seconds="4")
    assert video.status == "completed" and video.progress == 100
    assert video.completed_at is not None and video.error is None
    assert video.remixed_from_video_id is None  # the upstream's URL is not OpenAI's remix source
    # queued (0 s), 40 %, 80 %, completed: the SDK polled until done, paced by openai-poll-after-ms.
    assert sum(sim.state.polls.values()) == 4

    content = await client.videos.download_content(video.id)
    data = content.read()
    assert len(data) == sim.state.config.video_bytes
    assert data == sim.state.video()
    assert content.response.headers["content-type"] == "video/mp4"


async def test_failed_generation_is_a_failed_video_with_an_error(client: openai.AsyncOpenAI) -> None:
    video = await client.videos.create_and_poll(prompt="[fail] a forbidden scene")
    assert video.status == "failed"
    assert video.error is not None
    assert video.error.code == "video_generation_failed"
    assert "moderation" in video.error.message


async def test_list_is_newest_first_paged_and_only_the_callers_own(
    gw: Running, client: openai.AsyncOpenAI, clock: ManualClock
) -> None:
    ids = []
    for n in range(3):
        ids.append((await client.videos.create(prompt=f"video {n}")).id)
        clock.advance(1)
    async with sdk(gw, OTHER_TOKEN) as other:
        await other.videos.create(prompt="someone else's")
        page = await client.videos.list(limit=2)
        assert [v.id for v in page.data] == [ids[2], ids[1]]
        assert page.has_more is True
        assert [v.prompt for v in page.data] == ["video 2", "video 1"]
        everything = [v.id async for v in client.videos.list(limit=2)]
        assert everything == ids[::-1]
        assert len((await other.videos.list()).data) == 1


async def test_native_creates_are_listed_with_what_they_asked_for(gw: Running, client: openai.AsyncOpenAI) -> None:
    native = {"model": "agnes-video-v2.0", "prompt": "made natively", "width": 1280, "height": 720, "num_frames": 241}
    resp = await gw.client.post("/v1/videos", json=native, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 200
    [video] = (await client.videos.list()).data
    assert video.id == (await resp.json())["task_id"]
    assert (video.prompt, video.size, video.seconds, video.model) == (
        "made natively",
        "1280x720",
        "10",
        native["model"],
    )


async def test_delete_forgets_the_video_here(client: openai.AsyncOpenAI, gw: Running) -> None:
    video = await client.videos.create(prompt="temporary")
    deleted = await client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    assert await gw.gateway.store.get_task(video.id) is None
    assert (await client.videos.list()).data == []
    with pytest.raises(openai.NotFoundError):
        await client.videos.delete(video.id)


async def test_input_reference_upload_reaches_upstream_as_an_image(client: openai.AsyncOpenAI, sim: Upstream) -> None:
    image = bytes(range(256)) * 40
    await client.videos.create(prompt="Animate this", input_reference=("ref.png", image, "image/png"))
    field = upstream_body(sim)["image"]
    assert field == "data:image/png;base64," + base64.b64encode(image).decode()


async def test_input_reference_as_multipart_when_configured(
    make_oai: Callable[..., Awaitable[Running]], sim: Upstream
) -> None:
    gw = await make_oai(openai={"poll_after_ms": 1, "image_field": "first_frame", "image_format": "multipart"})
    image = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 100
    async with sdk(gw) as client:
        await client.videos.create(prompt="Animate this", input_reference=("ref.png", image, "image/png"))
    body = sim.state.last_create_body
    assert sim.state.last_create_headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert b'name="first_frame"; filename="ref.png"\r\nContent-Type: image/png\r\n\r\n' + image + b"\r\n" in body
    assert b'name="prompt"\r\n\r\nAnimate this\r\n' in body


async def test_errors_map_to_the_sdks_exceptions(gw: Running, sim: Upstream) -> None:
    async with sdk(gw, "wrong-token-000000000000") as stranger:
        with pytest.raises(openai.AuthenticationError) as denied:
            await stranger.videos.list()
    assert isinstance(denied.value.body, dict)
    assert set(denied.value.body) == {"message", "type", "param", "code"}
    assert (denied.value.code, denied.value.type) == ("invalid_api_key", "authentication_error")
    async with sdk(gw) as client:
        with pytest.raises(openai.NotFoundError):
            await client.videos.retrieve("no-such-task")
        with pytest.raises(openai.BadRequestError) as bad:
            await client.videos.create(prompt="x", size="huge")
        assert bad.value.param == "size"
        assert bad.value.code == "invalid_value"
        video = await client.videos.create(prompt="not done yet")
        with pytest.raises(openai.ConflictError) as early:
            await client.videos.download_content(video.id)
        assert early.value.response.headers["x-should-retry"] == "false"
        with pytest.raises(openai.NotFoundError):
            await client.videos.remix(video.id, prompt="remixes are not supported")
    # Upstream saw the unknown id asked of each of the 3 keys, one create and the content's poll: no more.
    assert sim.state.requests == 3 + 1 + 1
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 1


async def test_exhausted_pool_is_a_rate_limit_error_with_retry_after(
    make_oai: Callable[..., Awaitable[Running]], sim: Upstream
) -> None:
    gw = await make_oai(keys=[{"name": "a", "key": KEY_A, "daily_limit": 0}])
    async with sdk(gw, max_retries=2) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            await client.videos.create(prompt="one more")
    # Twelve hours to the next quota day: far past what the SDK would wait, so it does not retry either.
    assert refused.value.response.headers["retry-after"] == str(12 * 3600)
    assert refused.value.code == "all_keys_exhausted"
    assert sim.state.requests == 0


async def test_upstream_refusals_come_back_in_openais_shape(client: openai.AsyncOpenAI, sim: Upstream) -> None:
    sim.state.add_fault(Fault(kind="status", status=400, message="width must be a multiple of 32", operation="create"))
    with pytest.raises(openai.BadRequestError) as refused:
        await client.videos.create(prompt="odd size", size="1000x700")
    assert refused.value.message.endswith("width must be a multiple of 32")
    assert refused.value.code == "simulated_error"


async def test_json_create_is_accepted_too(gw: Running, sim: Upstream) -> None:
    resp = await gw.client.post(
        "/openai/v1/videos",
        json={"prompt": "json please", "seconds": 4, "input_reference": {"image_url": "https://e.x/a.png"}, "seed": 7},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert resp.status == 200
    assert resp.headers["openai-poll-after-ms"] == "1"
    assert (await resp.json())["seconds"] == "4"
    sent = upstream_body(sim)
    assert (sent["image"], sent["seed"], sent["num_frames"]) == ("https://e.x/a.png", 7, 97)


async def test_bad_requests_spend_nothing(gw: Running, sim: Upstream) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for body in (
        {"seconds": "4"},
        {"prompt": "x", "seconds": "0"},
        {"prompt": "x", "seconds": "four"},
        {"prompt": "x", "size": "10x10"},
        {"prompt": "x", "input_reference": {"file_id": "file-1"}},
    ):
        resp = await gw.client.post("/openai/v1/videos", json=body, headers=headers)
        assert resp.status == 400, body
        error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
    resp = await gw.client.post("/openai/v1/videos", data=b"x" * 10, headers={**headers, "Content-Type": "text/plain"})
    assert resp.status == 415
    assert sim.state.requests == 0


async def test_body_over_the_limit_is_413_in_openais_shape(
    make_oai: Callable[..., Awaitable[Running]], sim: Upstream
) -> None:
    gw = await make_oai(limits={"max_body_bytes": 4096})
    async with sdk(gw) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.videos.create(prompt="big", input_reference=("big.png", b"\0" * 10_000, "image/png"))
    assert refused.value.status_code == 413
    assert refused.value.code == "body_too_large"
    assert sim.state.requests == 0


async def test_the_readme_example_runs_as_written(
    gw: Running, sim: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = README.read_text(encoding="utf-8").split("## Using the OpenAI SDK", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = example.replace("http://localhost:8080", str(gw.client.make_url("")).rstrip("/"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GATEWAY_TOKEN", TOKEN)
    # The synchronous client, as the README shows it, in a thread while this loop serves the gateway.
    await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {})
    assert (tmp_path / "cat.mp4").read_bytes() == sim.state.video()
