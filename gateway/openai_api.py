"""The OpenAI Videos dialect under `/openai/v1`: what the official `openai` SDK sends, translated to the upstream.

Creates, polls and downloads go through the same `Gateway` (pool, quota, routing) as the native surface; only
the shapes differ: OpenAI's Video object in, the upstream's fields out, and errors in OpenAI's envelope with
the status codes the SDK maps to its exception classes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from .appkeys import GATEWAY
from .auth import identify
from .bodies import CHUNK_BYTES, too_large
from .config import OpenAIConfig
from .download import VIDEOS
from .errors import GatewayError
from .meta import DEFAULT_FRAME_RATE, DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH, RequestMeta
from .proxy import CLIENT, KEY_NAME
from .service import TASK_ID_RE, Gateway, PassThrough
from .store import TaskRecord
from .upstream import Answer, Outcome

PREFIX: Final = "/openai/v1"
POLL_AFTER_HEADER: Final = "openai-poll-after-ms"
STATUSES: Final = ("queued", "in_progress", "completed", "failed")
SIZE_RE: Final = re.compile(r"^(\d{2,5})x(\d{2,5})$")
MIN_SIDE, MAX_SIDE = 64, 4096
MAX_SECONDS: Final = 60
DEFAULT_SIZE: Final = f"{DEFAULT_WIDTH}x{DEFAULT_HEIGHT}"
DEFAULT_SECONDS: Final = str(round((DEFAULT_FRAMES - 1) / DEFAULT_FRAME_RATE))
LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 20, 100
# What the SDK may send that this module translates; any other form field is passed to upstream as it is.
OPENAI_FIELDS: Final = {"prompt", "model", "seconds", "size", "input_reference"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
routes = web.RouteTableDef()


class OpenAIError(GatewayError):
    """A gateway error worded for OpenAI clients: it also names the request parameter at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        kind: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(status, code, message, retry_after=retry_after)
        self.param = param
        self.kind = kind

    @property
    def type(self) -> str:
        return self.kind or super().type


def error_response(error: GatewayError) -> web.Response:
    """`{"error": {"message", "type", "param", "code"}}`, with `Retry-After` on a 429."""
    param = error.param if isinstance(error, OpenAIError) else None
    body = {"error": {"message": error.message, "type": error.type, "param": param, "code": error.code}}
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if error.status == 409:
        # The SDK retries 409s by default; a video that is not ready will not be ready in a second.
        headers["x-should-retry"] = "false"
    return web.json_response(body, status=error.status, headers=headers)


def upstream_error(answer: Answer) -> GatewayError:
    """An upstream refusal, its status kept and its message reworded into OpenAI's envelope."""
    doc = _json(answer.body) or {}
    error = doc.get("error")
    message = code = kind = None
    if isinstance(error, dict):
        message, code, kind = error.get("message"), error.get("code"), error.get("type")
    elif isinstance(error, str):
        message = error
    message = message if isinstance(message, str) and message else doc.get("message")
    if not isinstance(message, str) or not message:
        message = answer.body[:200].decode("utf-8", "replace").strip() or f"upstream answered HTTP {answer.status}"
    retry = round(answer.retry_after) if answer.retry_after is not None and answer.status == 429 else None
    return OpenAIError(
        answer.status,
        code if isinstance(code, str) else "upstream_error",
        message,
        kind=kind if isinstance(kind, str) else None,
        retry_after=retry,
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Everything the OpenAI surface refuses leaves in OpenAI's error shape."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc)
    except PassThrough as exc:
        return error_response(upstream_error(exc.answer))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(GatewayError(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason))


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    client = identify(request.config_dict[GATEWAY].config.clients, request.headers.get("Authorization"))
    if client is None:
        raise OpenAIError(401, "invalid_api_key", "send Authorization: Bearer <gateway client token> as the api_key")
    request[CLIENT] = client
    return await handler(request)


def create_openai_app() -> web.Application:
    """The dialect as a sub-application, mounted at `/openai/v1` by `create_app`."""
    app = web.Application(middlewares=[_errors, _authenticate])
    app.router.add_routes(routes)
    return app


# --- the Video object ----------------------------------------------------------------------


def video_object(task: TaskRecord, config: OpenAIConfig, polled: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAI's Video object for `task`, from a fresh poll answer when there is one, else from the record."""
    doc = polled if polled is not None else (_json(task.terminal_body) if task.terminal_body else None) or {}
    meta = RequestMeta.from_json(task.request_meta)
    status = doc.get("status", task.status)
    status = status if status in STATUSES else ("queued" if status is None else "in_progress")
    progress = doc.get("progress", task.progress)
    if status == "completed":
        progress = 100
    elif not isinstance(progress, int) or isinstance(progress, bool):
        progress = 0
    progress = max(0, min(100, progress))
    finished = status in ("completed", "failed")
    video: dict[str, Any] = {
        "id": task.task_id,
        "object": "video",
        "created_at": int(task.created_at),
        "status": status,
        "progress": progress,
        "model": meta.model or config.default_model,
        "seconds": meta.seconds or DEFAULT_SECONDS,
        "size": meta.size or DEFAULT_SIZE,
        "prompt": meta.prompt,
        "completed_at": int(task.updated_at or task.created_at) if finished else None,
        "expires_at": None,
        "remixed_from_video_id": None,  # OpenAI's meaning (the source of a remix), not the upstream's URL
        "error": None,
    }
    if status == "failed":
        reason = doc.get("error")
        message = reason if isinstance(reason, str) and reason else "the video could not be generated"
        video["error"] = {"code": "video_generation_failed", "message": message}
    return video


def _answer(video: dict[str, Any], config: OpenAIConfig) -> web.Response:
    return web.json_response(video, headers={POLL_AFTER_HEADER: str(config.poll_after_ms)})


# --- create ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """The `input_reference` image as uploaded."""

    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class CreateRequest:
    """An OpenAI create, checked: what to ask upstream for and what to echo back."""

    prompt: str
    model: str | None
    width: int | None
    height: int | None
    seconds: int | None
    image_url: str | None
    upload: Upload | None
    extra: dict[str, Any]

    @classmethod
    def parse(cls, fields: dict[str, Any], upload: Upload | None) -> CreateRequest:
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise OpenAIError(400, "missing_required_parameter", "`prompt` is required", param="prompt")
        model = fields.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise OpenAIError(400, "invalid_value", "`model` must be a model name", param="model")
        width = height = seconds = None
        size = fields.get("size")
        if size is not None:
            match = SIZE_RE.match(str(size))
            if not match or not all(MIN_SIDE <= int(side) <= MAX_SIDE for side in match.groups()):
                raise OpenAIError(
                    400,
                    "invalid_value",
                    f"`size` must be WIDTHxHEIGHT with sides of {MIN_SIDE}-{MAX_SIDE} pixels, got {size!r}",
                    param="size",
                )
            width, height = int(match[1]), int(match[2])
        raw_seconds = fields.get("seconds")
        if raw_seconds is not None:
            text = str(raw_seconds).strip()
            if isinstance(raw_seconds, bool) or not text.isdigit() or not 1 <= int(text) <= MAX_SECONDS:
                raise OpenAIError(
                    400,
                    "invalid_value",
                    f"`seconds` must be a whole number from 1 to {MAX_SECONDS}, got {raw_seconds!r}",
                    param="seconds",
                )
            seconds = int(text)
        image_url = None
        reference = fields.get("input_reference")
        if isinstance(reference, dict):
            if "file_id" in reference:
                raise OpenAIError(
                    400,
                    "unsupported_parameter",
                    "`input_reference.file_id` is not supported: upload the image or give an image_url",
                    param="input_reference",
                )
            image_url = reference.get("image_url")
            if not isinstance(image_url, str) or not image_url:
                raise OpenAIError(
                    400, "invalid_value", "`input_reference.image_url` must be a URL", param="input_reference"
                )
        elif reference is not None:
            raise OpenAIError(
                400,
                "invalid_value",
                "`input_reference` must be an uploaded image file or {image_url}",
                param="input_reference",
            )
        extra = {k: v for k, v in fields.items() if k not in OPENAI_FIELDS}
        return cls(prompt, model, width, height, seconds, image_url, upload, extra)

    def meta(self, config: OpenAIConfig) -> RequestMeta:
        return RequestMeta(
            prompt=self.prompt,
            model=self.model or config.default_model,
            size=f"{self.width}x{self.height}" if self.width else DEFAULT_SIZE,
            seconds=str(self.seconds) if self.seconds else DEFAULT_SECONDS,
        )

    def upstream_fields(self, config: OpenAIConfig) -> dict[str, Any]:
        """The upstream's create fields, without the uploaded image."""
        doc: dict[str, Any] = {**self.extra, "model": config.upstream_model(self.model), "prompt": self.prompt}
        if self.width is not None:
            doc["width"], doc["height"] = self.width, self.height
        if self.seconds is not None:
            # Frame counts of the form k*fps + 1, as the upstream's own default (121 = 5 s at 24 fps).
            doc["num_frames"] = self.seconds * config.frame_rate + 1
            doc["frame_rate"] = config.frame_rate
        if self.image_url is not None:
            doc[config.image_field] = self.image_url
        return doc

    def upstream_body(self, config: OpenAIConfig) -> tuple[bytes, str]:
        """The body and content type of the upstream create."""
        doc = self.upstream_fields(config)
        if self.upload is not None and config.image_format == "multipart":
            return _multipart(doc, config.image_field, self.upload)
        if self.upload is not None:
            encoded = base64.b64encode(self.upload.data).decode("ascii")
            doc[config.image_field] = f"data:{self.upload.content_type};base64,{encoded}"
        return json.dumps(doc, ensure_ascii=False).encode(), "application/json"


@routes.post("/videos")
async def create_video(request: web.Request) -> web.Response:
    gateway = request.config_dict[GATEWAY]
    config = gateway.config.openai
    limits = gateway.config.limits
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):
            fields, upload = await _read_create(request, limits.max_body_bytes)
    except TimeoutError:
        raise OpenAIError(
            408, "body_timeout", f"the request body did not arrive within {limits.body_read_timeout_s:g} s"
        ) from None
    create = CreateRequest.parse(fields, upload)
    body, content_type = create.upstream_body(config)
    meta = create.meta(config)
    created = await gateway.create(
        body,
        content_type,
        request[CLIENT],
        request_meta=meta.to_json(),
        idempotency_key=request.headers.get("Idempotency-Key"),
    )
    request[KEY_NAME] = created.task.key_name
    return _answer(video_object(created.task, config, {"status": "queued", "progress": 0}), config)


async def _read_create(request: web.Request, limit: int) -> tuple[dict[str, Any], Upload | None]:
    """The create's fields from multipart/form-data (what the SDK sends) or JSON, within the body limit."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    if request.content_type == "multipart/form-data":
        return await _read_form(request, limit)
    if request.content_type == "application/json" or "Content-Type" not in request.headers:
        raw = await request.read()
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise OpenAIError(400, "invalid_json", "the request body is not valid JSON") from None
        if not isinstance(doc, dict):
            raise OpenAIError(400, "invalid_json", "the request body must be a JSON object")
        return doc, None
    raise OpenAIError(
        415 if request.content_type else 400,
        "unsupported_media_type",
        f"send multipart/form-data or application/json, not {request.content_type}",
    )


async def _read_form(request: web.Request, limit: int) -> tuple[dict[str, Any], Upload | None]:
    fields: dict[str, Any] = {}
    upload: Upload | None = None
    total = 0
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader) or not part.name:
                raise OpenAIError(400, "invalid_request", "every form part needs a name (no nested multipart)")
            data = bytearray()
            while chunk := await part.read_chunk(CHUNK_BYTES):
                total += len(chunk)
                if total > limit:
                    raise too_large(limit)
                data += chunk
            name = part.name
            if part.filename is not None:
                if name != "input_reference":
                    raise OpenAIError(400, "invalid_value", f"unexpected file field {name!r}", param=name)
                upload = _upload(part, bytes(data))
            elif name.startswith("input_reference[") and name.endswith("]"):
                fields.setdefault("input_reference", {})[name[16:-1]] = _text(data, name)
            else:
                fields[name] = _text(data, name)
    except (ValueError, HttpProcessingError) as exc:
        # HttpProcessingError: a part's headers are malformed (control characters and the like).
        reason = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
        raise OpenAIError(400, "invalid_request", f"the multipart body cannot be read ({reason})") from None
    return fields, upload


def _upload(part: BodyPartReader, data: bytes) -> Upload:
    if not data:
        raise OpenAIError(400, "invalid_value", "the uploaded input_reference is empty", param="input_reference")
    filename = part.filename or "input_reference"
    content_type = part.headers.get("Content-Type", "")
    if not content_type or content_type == "application/octet-stream":
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    return Upload(filename, content_type, data)


def _text(data: bytearray, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise OpenAIError(400, "invalid_value", f"form field {name!r} is not UTF-8 text", param=name) from None


def _multipart(fields: dict[str, Any], file_field: str, upload: Upload) -> tuple[bytes, str]:
    """A multipart/form-data body: every field as text, then the image under `file_field`."""
    boundary = f"agnes-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for name, value in fields.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"\r\n\r\n{text}\r\n'.encode()
        )
    parts.append(
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(file_field)}"; '
            f'filename="{_quote(upload.filename)}"\r\nContent-Type: {upload.content_type}\r\n\r\n'
        ).encode()
        + upload.data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


# --- retrieve, list, delete, content -------------------------------------------------------


@routes.get("/videos/{video_id}")
async def retrieve_video(request: web.Request) -> web.Response:
    gateway = request.config_dict[GATEWAY]
    polled = await gateway.poll(request.match_info["video_id"])
    request[KEY_NAME] = polled.task.key_name
    if polled.answer.outcome is not Outcome.OK:
        raise PassThrough(polled.answer)
    doc = _json(polled.answer.body)
    if doc is None:
        raise OpenAIError(502, "upstream_bad_answer", "upstream's answer to the poll was not a JSON object")
    return _answer(video_object(polled.task, gateway.config.openai, doc), gateway.config.openai)


@routes.get("/videos")
async def list_videos(request: web.Request) -> web.Response:
    """The caller's own videos, newest first, from the gateway's records (no upstream calls)."""
    gateway = request.config_dict[GATEWAY]
    query = request.query
    order = query.get("order", "desc")
    if order != "desc":
        raise OpenAIError(400, "unsupported_value", "only order=desc (newest first) is supported", param="order")
    limit_text = query.get("limit", str(LIST_LIMIT_DEFAULT))
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= LIST_LIMIT_MAX:
        raise OpenAIError(400, "invalid_value", f"`limit` must be 1-{LIST_LIMIT_MAX}", param="limit")
    limit = int(limit_text)
    before = None
    if "after" in query:
        cursor = await _own_task(gateway, request[CLIENT], query["after"])
        if cursor is None:
            raise OpenAIError(400, "invalid_value", "`after` is not one of your videos", param="after")
        before = (cursor.created_at, cursor.task_id)
    tasks = await gateway.store.list_tasks(request[CLIENT], limit + 1, before)
    page = [video_object(task, gateway.config.openai) for task in tasks[:limit]]
    return web.json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(tasks) > limit,
        }
    )


@routes.delete("/videos/{video_id}")
async def delete_video(request: web.Request) -> web.Response:
    """Forget one of the caller's videos here (its route and archived file); upstream keeps its copy."""
    gateway = request.config_dict[GATEWAY]
    video_id = request.match_info["video_id"]
    task = await _own_task(gateway, request[CLIENT], video_id)
    if task is None:
        raise OpenAIError(404, "video_not_found", f"no video {video_id} of yours is known here")
    await gateway.tasks.delete(video_id)
    await request.config_dict[VIDEOS].forget(video_id)
    return web.json_response({"id": video_id, "object": "video.deleted", "deleted": True})


@routes.get("/videos/{video_id}/content")
async def download_video(request: web.Request) -> web.StreamResponse:
    variant = request.query.get("variant", "video")
    if variant != "video":
        raise OpenAIError(
            400, "unsupported_value", f"variant {variant!r} is not available: only the MP4 video", param="variant"
        )
    return await request.config_dict[VIDEOS].respond(request, request.match_info["video_id"])


@routes.route("*", "/{tail:.*}")
async def unknown_route(request: web.Request) -> web.Response:
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:  # a known path with another method
        error = OpenAIError(405, "method_not_allowed", f"{request.path} takes {', '.join(sorted(allowed))}")
        response = error_response(error)
        response.headers["Allow"] = ", ".join(sorted(allowed))
        return response
    raise OpenAIError(404, "unknown_route", f"{request.method} {request.path} is not supported by this gateway")


async def _own_task(gateway: Gateway, client: str, task_id: str) -> TaskRecord | None:
    if not TASK_ID_RE.match(task_id):
        return None
    task = await gateway.tasks.get(task_id)
    return task if task is not None and task.client == client else None


def _json(body: bytes | None) -> dict[str, Any] | None:
    try:
        doc = json.loads(body or b"")
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
