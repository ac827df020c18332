"""`GET /v1/videos/{id}/content`: the finished MP4, streamed from upstream's URL or from the archive."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.clock import ManualClock

from .conftest import Running, Upstream

MakeGateway = Callable[..., Awaitable[Running]]
MakeUpstream = Callable[..., Awaitable[Upstream]]


async def finished_task(gw: Running, clock: ManualClock, prompt: str = "A cat") -> str:
    resp = await gw.create({"model": "agnes-video-v2.0", "prompt": prompt})
    assert resp.status == 200
    clock.advance(10)  # the simulator's videos take 10 s
    return str((await resp.json())["task_id"])


async def test_content_streams_the_finished_video(gw: Running, upstream: Upstream, clock: ManualClock) -> None:
    task_id = await finished_task(gw, clock)
    resp = await gw.client.get(f"/v1/videos/{task_id}/content", headers={"X-Request-ID": "dl-1"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "video/mp4"
    assert resp.headers["X-Request-ID"] == "dl-1"  # streamed by its handler, it still carries the id
    assert resp.headers["Content-Length"] == str(upstream.state.config.video_bytes)
    assert await resp.read() == upstream.state.video()


async def test_content_is_409_json_until_completed(gw: Running, upstream: Upstream, clock: ManualClock) -> None:
    task_id = (await (await gw.create()).json())["task_id"]
    clock.advance(4)
    early = await gw.client.get(f"/v1/videos/{task_id}/content")
    assert early.status == 409
    error = (await early.json())["error"]
    assert error["code"] == "video_not_ready"
    assert "in_progress, 40%" in error["message"]
    assert upstream.state.downloads[task_id] == 0

    failed_id = (await (await gw.create({"model": "agnes-video-v2.0", "prompt": "[fail] x"})).json())["task_id"]
    clock.advance(10)
    failed = await gw.client.get(f"/v1/videos/{failed_id}/content")
    assert failed.status == 409
    assert (await failed.json())["error"]["code"] == "video_failed"


async def test_range_requests_get_partial_content(gw: Running, upstream: Upstream, clock: ManualClock) -> None:
    task_id = await finished_task(gw, clock)
    video, size = upstream.state.video(), upstream.state.config.video_bytes
    resp = await gw.client.get(f"/v1/videos/{task_id}/content", headers={"Range": "bytes=100-199"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 100-199/{size}"
    assert await resp.read() == video[100:200]
    tail = await gw.client.get(f"/v1/videos/{task_id}/content", headers={"Range": "bytes=-10"})
    assert (tail.status, await tail.read()) == (206, video[-10:])
    beyond = await gw.client.get(f"/v1/videos/{task_id}/content", headers={"Range": f"bytes={size + 5}-"})
    assert beyond.status == 416
    assert beyond.headers["Content-Range"] == f"bytes */{size}"


async def test_unknown_and_invalid_tasks(gw: Running) -> None:
    assert (await gw.client.get("/v1/videos/never-made/content")).status == 404
    resp = await gw.client.get("/v1/videos/bad.id/content")
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_task_id"


async def test_unreachable_video_url_is_a_clean_502(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, clock: ManualClock
) -> None:
    broken = await make_upstream(public_base_url="http://127.0.0.1:9")  # nothing listens on the discard port
    gw = await make_gateway(upstream={"base_url": broken.url, "timeout_s": 2})
    task_id = await finished_task(gw, clock)
    resp = await gw.client.get(f"/v1/videos/{task_id}/content")
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "video_unavailable"


async def test_a_video_url_that_breaks_off_is_never_passed_on_as_whole(
    aiohttp_server: Any, make_upstream: MakeUpstream, make_gateway: MakeGateway, clock: ManualClock
) -> None:
    async def half_a_file(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = 1_000_000
        await response.prepare(request)
        await response.write(b"\0" * 300_000)
        assert request.transport is not None
        request.transport.close()  # the CDN drops the connection a third of the way in
        return response

    cdn = web.Application()
    cdn.router.add_get("/files/{name}", half_a_file)
    cdn_server = await aiohttp_server(cdn)
    up = await make_upstream(public_base_url=str(cdn_server.make_url("")).rstrip("/"))
    gw = await make_gateway(upstream={"base_url": up.url, "timeout_s": 2})
    task_id = await finished_task(gw, clock)
    resp = await gw.client.get(f"/v1/videos/{task_id}/content")
    assert (resp.status, resp.headers["Content-Length"]) == (200, "1000000")
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # the client learns the body is short; no error text is spliced into it
    healthy = await gw.client.get("/healthz")
    assert healthy.status == 200


async def test_archive_downloads_once_atomically_and_serves_from_disk(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock, tmp_path: Path
) -> None:
    archive = tmp_path / "videos"
    gw = await make_gateway(archive={"dir": str(archive)})
    task_id = await finished_task(gw, clock)
    answers = await asyncio.gather(*(gw.client.get(f"/v1/videos/{task_id}/content") for _ in range(5)))
    bodies = {await resp.read() for resp in answers}
    assert bodies == {upstream.state.video()}
    assert upstream.state.downloads[task_id] == 1  # five clients, one fetch
    assert sorted(p.name for p in archive.iterdir()) == [f"{task_id}.mp4"]  # no partial file left behind

    # Served from disk from now on, even once upstream no longer has it; Range works there too.
    del upstream.state.tasks[task_id]
    resp = await gw.client.get(f"/v1/videos/{task_id}/content", headers={"Range": "bytes=0-7", "X-Request-ID": "dl-2"})
    assert (resp.status, await resp.read()) == (206, upstream.state.video()[:8])
    assert resp.headers["Content-Type"] == "video/mp4"
    assert resp.headers["X-Request-ID"] == "dl-2"
    assert upstream.state.downloads[task_id] == 1


async def test_archive_keeps_nothing_of_a_failed_fetch(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, clock: ManualClock, tmp_path: Path
) -> None:
    broken = await make_upstream(public_base_url="http://127.0.0.1:9")
    gw = await make_gateway(upstream={"base_url": broken.url, "timeout_s": 2}, archive={"dir": str(tmp_path / "v")})
    task_id = await finished_task(gw, clock)
    assert (await gw.client.get(f"/v1/videos/{task_id}/content")).status == 502
    assert list((tmp_path / "v").glob("*")) == []


@pytest.mark.parametrize("archived", [False, True], ids=["relayed", "archived"])
async def test_a_large_video_streams_with_bounded_memory(
    make_upstream: MakeUpstream, make_gateway: MakeGateway, clock: ManualClock, tmp_path: Path, archived: bool
) -> None:
    size = 24 * 1024 * 1024
    big = await make_upstream(video_bytes=size)
    extra = {"archive": {"dir": str(tmp_path / "videos")}} if archived else {}
    gw = await make_gateway(upstream={"base_url": big.url, "timeout_s": 5}, **extra)
    task_id = await finished_task(gw, clock)
    digest, received = hashlib.sha256(), 0
    tracemalloc.start()
    try:
        resp = await gw.client.get(f"/v1/videos/{task_id}/content")
        assert resp.status == 200
        async for chunk in resp.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size
    assert resp.headers["Content-Length"] == str(size)
    # Everything in this process (simulator, gateway, client) together stayed far below the file's size.
    assert peak < size // 8, f"peak {peak} bytes while streaming {size}"
