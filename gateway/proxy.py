"""The native surface: `/v1/videos` exactly as upstream speaks it, plus `/healthz` and `/readyz`."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .appkeys import GATEWAY
from .bodies import SpooledBody
from .errors import GatewayError
from .meta import RequestMeta
from .upstream import Answer

routes = web.RouteTableDef()

CLIENT = "agnes_client"  # request key: the authenticated client's name
KEY_NAME = "agnes_key"  # request key: the upstream key that served the request, for logs


def answer_response(answer: Answer) -> web.Response:
    """Upstream's answer, status and body unchanged."""
    return web.Response(status=answer.status, body=answer.body, headers={"Content-Type": answer.content_type})


def json_create_body(body: bytes, content_type: str) -> dict[str, Any]:
    """Refuse a JSON create body that is not a JSON object, before any quota is touched."""
    if not body.strip():
        raise GatewayError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise GatewayError(400, "invalid_json", "the request body is not valid JSON (UTF-8)") from None
    if not isinstance(doc, dict):
        raise GatewayError(400, "invalid_json", "the request body must be a JSON object")
    return doc


@routes.post("/v1/videos")
async def create_video(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    content_type = request.headers.get("Content-Type", "")
    if request.content_type != "application/json" and content_type:
        return await _create_streamed(request, content_type)
    body = await request.read()
    meta = RequestMeta.from_native(json_create_body(body, content_type))
    created = await gateway.create(
        body, content_type or "application/json", request[CLIENT], request_meta=meta.to_json()
    )
    request[KEY_NAME] = created.task.key_name
    return answer_response(created.answer)


async def _create_streamed(request: web.Request, content_type: str) -> web.Response:
    """A multipart (or other non-JSON) create: spooled within the body limit, then forwarded as it came."""
    gateway = request.app[GATEWAY]
    body = await SpooledBody.read(
        request.content, content_type, gateway.config.limits.max_body_bytes, request.content_length
    )
    try:
        created = await gateway.create(body, content_type, request[CLIENT])
    finally:
        body.close()
    request[KEY_NAME] = created.task.key_name
    return answer_response(created.answer)


@routes.get("/v1/videos/{task_id}")
async def get_video(request: web.Request) -> web.Response:
    polled = await request.app[GATEWAY].poll(request.match_info["task_id"])
    request[KEY_NAME] = polled.task.key_name
    return answer_response(polled.answer)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers and the database is reachable."""
    try:
        await request.app[GATEWAY].store.ping()
    except Exception as exc:  # any database failure means "not healthy"
        raise GatewayError(503, "database_unavailable", f"database unreachable: {type(exc).__name__}") from None
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Readiness: the database is usable and at least one key can take a create now."""
    gateway = request.app[GATEWAY]
    now = gateway.clock.now()
    try:
        await gateway.store.ping()
        await gateway.pool.roll_day(now)
    except Exception as exc:  # any database failure means "not ready"
        raise GatewayError(503, "database_unavailable", f"database unreachable: {type(exc).__name__}") from None
    ready = gateway.pool.ready(now)
    if not ready:
        retry = gateway.pool.retry_after(now)
        raise GatewayError(
            503,
            "no_usable_key",
            f"every upstream key is spent, cooling down or disabled; the earliest may take creates in {retry} s",
            retry_after=retry,
        )
    return web.json_response({"status": "ready", "usable_keys": len(ready)})
