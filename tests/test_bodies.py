"""Multipart and other non-JSON creates: spooled within the body limit, forwarded as they came, failover-safe."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.bodies import SpooledBody
from gateway.errors import GatewayError, error_response
from gateway.simulator import Fault

from .conftest import KEY_A, KEY_B, KEY_C, Running, Upstream

MakeGateway = Callable[..., Awaitable[Running]]
BOUNDARY = "----agnes-test-boundary-7f3a"


def multipart(prompt: str, image: bytes) -> bytes:
    """An image-to-video create as a browser or `curl -F` would send it."""
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nagnes-video-v2.0\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n{prompt}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="ref.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


async def usage(gw: Running) -> int:
    return sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values())


async def test_multipart_create_reaches_upstream_byte_for_byte(gw: Running, upstream: Upstream) -> None:
    body = multipart("Animate this photo", os.urandom(3 * 1024 * 1024))
    resp = await gw.client.post("/v1/videos", data=body, headers={"Content-Type": CONTENT_TYPE})
    assert resp.status == 200
    task_id = (await resp.json())["task_id"]
    assert upstream.state.last_create_body == body
    assert upstream.state.last_create_headers["Content-Type"] == CONTENT_TYPE
    assert upstream.state.last_create_headers["Content-Length"] == str(len(body))
    assert upstream.state.tasks[task_id].prompt == "Animate this photo"
    assert await usage(gw) == 1


async def test_a_spooled_body_is_sent_again_whole_on_failover(gw: Running, upstream: Upstream) -> None:
    upstream.state.add_fault(Fault(kind="quota", key=KEY_A, operation="create", times=-1))
    upstream.state.add_fault(Fault(kind="status", status=503, key=KEY_B, operation="create", times=-1))
    body = multipart("Third time lucky", os.urandom(2 * 1024 * 1024 + 17))
    resp = await gw.client.post("/v1/videos", data=body, headers={"Content-Type": CONTENT_TYPE})
    assert resp.status == 200
    assert upstream.state.requests == 3
    assert upstream.state.creates[KEY_C] == 1
    assert upstream.state.last_create_body == body  # the backup got every byte, not what was left of a stream
    assert await usage(gw) == 1  # units of the refused keys were given back


async def test_chunked_upload_without_length_is_forwarded_with_one(gw: Running, upstream: Upstream) -> None:
    body = multipart("Sent in pieces", os.urandom(1024 * 1024 + 5))

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start : start + 100_000]

    resp = await gw.client.post("/v1/videos", data=pieces(), headers={"Content-Type": CONTENT_TYPE})
    assert resp.status == 200
    assert upstream.state.last_create_body == body
    assert upstream.state.last_create_headers["Content-Length"] == str(len(body))


async def test_over_the_limit_is_413_before_any_quota_or_upstream_call(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    gw = await make_gateway(limits={"max_body_bytes": 1024 * 1024})
    body = multipart("too big", b"\0" * (1024 * 1024))
    declared = await gw.client.post("/v1/videos", data=body, headers={"Content-Type": CONTENT_TYPE})
    assert declared.status == 413
    assert (await declared.json())["error"]["code"] == "body_too_large"

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(64):  # 4 MiB without a Content-Length: counted as it arrives
            yield b"\0" * 65536

    streamed = await gw.client.post("/v1/videos", data=endless(), headers={"Content-Type": CONTENT_TYPE})
    assert streamed.status == 413
    assert upstream.state.requests == 0
    assert await usage(gw) == 0


async def test_spooled_body_spills_to_disk_and_rereads_whole(aiohttp_client: Any) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        try:
            body = await SpooledBody.read(request.content, "application/octet-stream", 8 * 1024 * 1024, in_memory=4096)
        except GatewayError as exc:
            return error_response(exc)
        try:
            seen["on_disk"] = body.on_disk
            seen["reads"] = [hashlib.sha256(await body.read_all()).hexdigest() for _ in range(2)]
            seen["size"] = body.size
        finally:
            body.close()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", handler)
    client = await aiohttp_client(app)
    small, large = b"s" * 100, os.urandom(300_000)
    assert (await client.post("/", data=large)).status == 200
    assert seen == {"on_disk": True, "reads": [hashlib.sha256(large).hexdigest()] * 2, "size": len(large)}
    assert (await client.post("/", data=small)).status == 200
    assert seen["on_disk"] is False and seen["reads"] == [hashlib.sha256(small).hexdigest()] * 2
    assert (await client.post("/", data=b"x" * (8 * 1024 * 1024 + 1))).status == 413
