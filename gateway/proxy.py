"""The native surface: `/v1/videos` exactly as upstream speaks it, plus `/healthz` and `/readyz`."""

from __future__ import annotations

import asyncio
import json
from email.message import Message
from importlib import resources
from typing import Any

from aiohttp import web

from .appkeys import GATEWAY
from .bodies import SpooledBody
from .errors import GatewayError
from .meta import RequestMeta
from .service import Created
from .upstream import Answer

routes = web.RouteTableDef()

CLIENT = "agnes_client"  # request key: the authenticated client's name
KEY_NAME = "agnes_key"  # request key: the upstream key that served the request, for logs
REQUEST_ID = "agnes_request_id"  # request key: this request's id
REQUEST_ID_HEADER = "X-Request-ID"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


def answer_response(answer: Answer) -> web.Response:
    """Upstream's answer, status and body unchanged."""
    return web.Response(status=answer.status, body=answer.body, headers={"Content-Type": answer.content_type})


def send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Put the request's id on an answer its handler prepares (streams) itself; the middleware does the rest."""
    rid = request.get(REQUEST_ID)
    if isinstance(rid, str):
        response.headers[REQUEST_ID_HEADER] = rid


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


def is_json(mime: str) -> bool:
    return mime == "application/json" or mime.endswith("+json")


async def multipart_create_body(body: SpooledBody, content_type: str) -> None:
    """Refuse a multipart body that does not have the shape its boundary promises (it starts and ends with it)."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise GatewayError(400, "invalid_multipart", "multipart/form-data needs a boundary of 1-70 characters")
    delimiter = b"--" + boundary.encode("utf-8", "surrogateescape")
    head = await body.head(len(delimiter))
    tail = await body.tail(len(delimiter) + 512)  # the closing delimiter, then at most a short epilogue
    if head != delimiter or delimiter + b"--" not in tail:
        raise GatewayError(400, "invalid_multipart", "the body is not multipart/form-data with the given boundary")


def body_timeout(limit: float) -> GatewayError:
    return GatewayError(408, "body_timeout", f"the request body did not arrive within {limit:g} s")


async def read_body(request: web.Request) -> bytes:
    """The whole body, if it arrives within `limits.body_read_timeout_s` (a trickling body gets 408)."""
    limits = request.app[GATEWAY].config.limits
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise GatewayError(
            413, "body_too_large", f"the request body is over the limit of {limits.max_body_bytes} bytes"
        )
    if request.content.is_eof():
        return await request.read()  # it came whole with the headers (a small JSON create): nothing to time
    limit = limits.body_read_timeout_s
    try:
        async with asyncio.timeout(limit):
            return await request.read()
    except TimeoutError:
        raise body_timeout(limit) from None


@routes.post("/v1/videos")
async def create_video(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    content_type = request.headers.get("Content-Type", "")
    idempotency_key = request.headers.get(IDEMPOTENCY_HEADER)
    if content_type and not is_json(request.content_type):
        if request.content_type != "multipart/form-data":
            raise GatewayError(
                415,
                "unsupported_media_type",
                "send the create as application/json (or multipart/form-data for uploads)",
            )
        return await _create_streamed(request, content_type, idempotency_key)
    body = await read_body(request)
    meta = RequestMeta.from_native(json_create_body(body, content_type))
    created = await gateway.create(
        body,
        content_type or "application/json",
        request[CLIENT],
        request_meta=meta.to_json(),
        idempotency_key=idempotency_key,
    )
    return _created_response(request, created)


async def _create_streamed(request: web.Request, content_type: str, idempotency_key: str | None) -> web.Response:
    """A multipart create: spooled within the body limit and time, checked, then forwarded as it came."""
    gateway = request.app[GATEWAY]
    limits = gateway.config.limits
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):
            body = await SpooledBody.read(request.content, content_type, limits.max_body_bytes, request.content_length)
    except TimeoutError:
        raise body_timeout(limits.body_read_timeout_s) from None
    try:
        await multipart_create_body(body, content_type)
        created = await gateway.create(body, content_type, request[CLIENT], idempotency_key=idempotency_key)
    finally:
        body.close()
    return _created_response(request, created)


def _created_response(request: web.Request, created: Created) -> web.Response:
    request[KEY_NAME] = created.task.key_name
    response = answer_response(created.answer)
    if created.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return response


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
        await gateway.pool.refresh(now)
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


@routes.get("/openapi.yaml")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3 description of this API (no token needed)."""
    return web.Response(body=openapi_document(), content_type="application/yaml")


_OPENAPI: list[bytes] = []


def openapi_document() -> bytes:
    """`openapi.yaml` as shipped in the package, read once."""
    if not _OPENAPI:
        _OPENAPI.append(resources.files(__package__).joinpath("openapi.yaml").read_bytes())
    return _OPENAPI[0]
