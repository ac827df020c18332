"""Finished videos: `GET /v1/videos/{task_id}/content` streams the MP4, chunk by chunk, never whole in memory.

Without an archive each download is relayed from the URL upstream gave (`remixed_from_video_id`), `Range`
included. With `archive.dir` a completed video is fetched once into that directory (a temporary file, then
an atomic rename) and served from there afterwards, since upstream's URLs may expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from .appkeys import GATEWAY
from .errors import GatewayError
from .proxy import KEY_NAME, send_request_id
from .service import TASK_ID_RE, Gateway, PassThrough
from .upstream import Outcome

log = logging.getLogger("agnes_gateway.download")

CHUNK_BYTES: Final = 256 * 1024
VIDEO_URL_FIELDS: Final = ("remixed_from_video_id", "video_url")
RELAYED_HEADERS: Final = (
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Encoding",
    "Accept-Ranges",
    "ETag",
    "Last-Modified",
)

routes = web.RouteTableDef()


class VideoFiles:
    """Finds a completed task's video and sends it to a client, from the archive or relayed from upstream."""

    def __init__(self, gateway: Gateway, archive_dir: str | None) -> None:
        self.gateway = gateway
        self.archive = Path(archive_dir) if archive_dir else None
        upstream = gateway.config.upstream
        # No overall limit: a large video may take long; each read and the connect have one.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=upstream.connect_timeout_s, sock_read=upstream.timeout_s
        )
        self._fetches: dict[str, asyncio.Task[Path]] = {}

    async def respond(self, request: web.Request, task_id: str) -> web.StreamResponse:
        """The task's MP4 as an HTTP response (200 or 206); 409 while it is not completed."""
        if not TASK_ID_RE.match(task_id):
            raise GatewayError(400, "invalid_task_id", "task ids are 1-128 letters, digits, '-' or '_'")
        if self.archive is not None:
            path = self.archive_path(task_id)
            if not await asyncio.to_thread(path.is_file):
                path = await self._fetch_once(task_id, await self.video_url(request, task_id))
            return web.FileResponse(path, chunk_size=CHUNK_BYTES, headers={"Content-Type": "video/mp4"})
        return await self._relay(request, await self.video_url(request, task_id))

    async def video_url(self, request: web.Request, task_id: str) -> str:
        """Where upstream keeps the finished video; 409 while the task is not completed."""
        polled = await self.gateway.poll(task_id)
        request[KEY_NAME] = polled.task.key_name
        if polled.answer.outcome is not Outcome.OK:
            raise PassThrough(polled.answer)
        doc = _json(polled.answer.body)
        status = doc.get("status")
        if status == "failed":
            reason = doc.get("error")
            detail = f": {reason}" if isinstance(reason, str) and reason else ""
            raise GatewayError(409, "video_failed", f"task {task_id} failed{detail}; it has no video")
        if status != "completed":
            progress = doc.get("progress")
            at = f", {progress}%" if isinstance(progress, int) else ""
            raise GatewayError(
                409, "video_not_ready", f"task {task_id} is {status or 'not completed'}{at}; download it once completed"
            )
        for field in VIDEO_URL_FIELDS:
            url = doc.get(field)
            if isinstance(url, str) and url.startswith(("https://", "http://")):
                return url
        raise GatewayError(502, "upstream_bad_answer", f"upstream says task {task_id} is completed but gives no URL")

    def archive_path(self, task_id: str) -> Path:
        assert self.archive is not None
        return self.archive / f"{task_id}.mp4"

    async def forget(self, task_id: str) -> None:
        """Remove a task's archived video, if there is one."""
        if self.archive is not None and TASK_ID_RE.match(task_id):
            await asyncio.to_thread(self.archive_path(task_id).unlink, missing_ok=True)

    async def _relay(self, request: web.Request, url: str) -> web.StreamResponse:
        """Stream the video from `url` to the client as it arrives; backpressure keeps memory flat."""
        headers = {"Accept-Encoding": "identity"}
        if "Range" in request.headers:
            headers["Range"] = request.headers["Range"]
        session = self.gateway.upstream.session
        try:
            async with session.request(
                "HEAD" if request.method == "HEAD" else "GET",
                url,
                headers=headers,
                timeout=self._timeout,
                auto_decompress=False,
            ) as source:
                if source.status == 416:
                    return web.Response(status=416, headers=_pick(source.headers, ("Content-Range",)))
                if source.status not in (200, 206):
                    raise _unavailable(source.status)
                response = web.StreamResponse(status=source.status, headers=_pick(source.headers, RELAYED_HEADERS))
                response.headers.setdefault("Content-Type", "video/mp4")
                send_request_id(request, response)
                await response.prepare(request)
                try:
                    async for chunk in source.content.iter_chunked(CHUNK_BYTES):
                        await response.write(chunk)
                except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                    # Headers are gone: the only honest signal left is a connection closed short of Content-Length.
                    log.warning("video download broke off: %s", type(exc).__name__)
                    response.force_close()
                    return response
                await response.write_eof()
                return response
        except TimeoutError:
            raise GatewayError(504, "upstream_timeout", "the video's URL did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise GatewayError(502, "video_unavailable", f"cannot fetch the video ({type(exc).__name__})") from None

    async def _fetch_once(self, task_id: str, url: str) -> Path:
        """Archive the video; concurrent requests share one fetch, which finishes even if they leave."""
        fetch = self._fetches.get(task_id)
        if fetch is None:
            fetch = asyncio.create_task(self._fetch(task_id, url))
            self._fetches[task_id] = fetch
            fetch.add_done_callback(lambda done: self._fetched(task_id, done))
        return await asyncio.shield(fetch)

    def _fetched(self, task_id: str, done: asyncio.Task[Path]) -> None:
        self._fetches.pop(task_id, None)
        if not done.cancelled() and done.exception() is not None and not isinstance(done.exception(), GatewayError):
            log.warning("archiving task %s failed: %r", task_id, done.exception())

    async def _fetch(self, task_id: str, url: str) -> Path:
        path = self.archive_path(task_id)
        partial = path.with_name(f".{task_id}.{uuid.uuid4().hex}.part")
        session = self.gateway.upstream.session
        try:
            async with session.get(
                url, headers={"Accept-Encoding": "identity"}, timeout=self._timeout, auto_decompress=False
            ) as source:
                if source.status != 200:
                    raise _unavailable(source.status)
                await _write_file(partial, source.content.iter_chunked(CHUNK_BYTES))
            await asyncio.to_thread(os.replace, partial, path)
        except TimeoutError:
            raise GatewayError(504, "upstream_timeout", "the video's URL did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise GatewayError(502, "video_unavailable", f"cannot fetch the video ({type(exc).__name__})") from None
        finally:
            await asyncio.to_thread(partial.unlink, missing_ok=True)
        log.info("archived the video of task %s", task_id)
        return path

    async def close(self) -> None:
        """Stop fetches in flight (their partial files are removed)."""
        fetches = list(self._fetches.values())
        for fetch in fetches:
            fetch.cancel()
        for fetch in fetches:
            with contextlib.suppress(BaseException):
                await fetch


async def _write_file(path: Path, chunks: AsyncIterator[bytes]) -> None:
    """Write `chunks` to a new file at `path` and flush it to disk before it may be renamed into place."""
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    file = await asyncio.to_thread(path.open, "xb")
    try:
        async for chunk in chunks:
            await asyncio.to_thread(file.write, chunk)
        await asyncio.to_thread(file.flush)
        await asyncio.to_thread(os.fsync, file.fileno())
    finally:
        await asyncio.to_thread(file.close)


def _unavailable(status: int) -> GatewayError:
    return GatewayError(502, "video_unavailable", f"the video's URL answered HTTP {status} (it may have expired)")


def _pick(headers: Any, names: tuple[str, ...]) -> dict[str, str]:
    return {name: headers[name] for name in names if name in headers}


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


VIDEOS = web.AppKey("videos", VideoFiles)


async def video_files(app: web.Application) -> AsyncIterator[None]:
    """`cleanup_ctx` entry, after the gateway's own: the video files service for both API surfaces."""
    app[VIDEOS] = VideoFiles(app[GATEWAY], app[GATEWAY].config.archive.dir)
    try:
        yield
    finally:
        await app[VIDEOS].close()


@routes.get("/v1/videos/{task_id}/content")
async def get_video_content(request: web.Request) -> web.StreamResponse:
    return await request.app[VIDEOS].respond(request, request.match_info["task_id"])
