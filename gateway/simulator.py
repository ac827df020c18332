"""A fast local simulator of the Agnes Video v2.0 upstream, with quota days and fault injection."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, cast

from aiohttp import web

from gateway.clock import Clock, QuotaSchedule, SystemClock

__all__ = [
    "SIMULATOR_STATE",
    "Fault",
    "FaultKind",
    "Operation",
    "SimTask",
    "SimulatorConfig",
    "SimulatorState",
    "create_simulator_app",
    "run_simulator",
]

Operation = Literal["create", "poll"]

_OPERATIONS: frozenset[str] = frozenset({"create", "poll"})
_JSON = "application/json"
_HTML = "text/html"
_FAIL_MARK = "[fail]"
_FAIL_ERROR = "content moderation rejected the prompt"
_CHUNK = 64 * 1024
_CACHE_LIMIT = 16 * 1024 * 1024
_MP4_HEAD = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00\x00\x00\x00mdat"
_PATTERN = bytes(range(256)) * (_CHUNK // 256)
_DEFAULT_HTML = (
    "<html><head><title>{status} Bad Gateway</title></head><body>"
    "<center><h1>{status} Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
)


def _error_body(message: str, type_: str, code: str) -> bytes:
    """The upstream's JSON error envelope, encoded."""
    error = {"message": message, "type": type_, "code": code}
    return json.dumps({"error": error}, ensure_ascii=False).encode()


_UNAUTHORIZED = _error_body("Invalid API key", "authentication_error", "invalid_api_key")
_NOT_FOUND = _error_body("Task not found", "not_found_error", "task_not_found")
_RATE_LIMITED = json.dumps({"error": {"message": "Too many requests", "code": "rate_limited"}}).encode()
_SIMULATED = _error_body("Simulated upstream error", "server_error", "simulated_error")


class FaultKind(StrEnum):
    """What an injected fault does to the request it hits."""

    STATUS = "status"
    QUOTA = "quota"
    RATE_LIMIT = "rate_limit"
    NOT_JSON = "not_json"
    SLOW = "slow"
    RESET = "reset"
    HTML_ERROR = "html_error"
    HOLD = "hold"  # wait until the test calls `release_held()`, then answer normally


@dataclass
class Fault:
    """A queued fault; applies to the next `times` matching requests (-1 = until removed)."""

    kind: FaultKind
    status: int | None = None
    body: str | None = None
    message: str | None = None
    retry_after: int | None = None
    delay_s: float = 0.0
    key: str | None = None
    operation: Operation | None = None
    times: int = 1

    def __post_init__(self) -> None:
        self.kind = FaultKind(self.kind)
        if self.operation is not None and self.operation not in _OPERATIONS:
            raise ValueError(f"operation must be 'create', 'poll' or null, not {self.operation!r}")
        if self.times == 0 or self.times < -1:
            raise ValueError("times must be >= 1, or -1 for 'until removed'")
        if self.delay_s < 0:
            raise ValueError("delay_s must be >= 0")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        """Build a fault from its JSON form, checking field names and types."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        if "kind" not in data:
            raise ValueError("field 'kind' is required")
        for name in ("status", "retry_after", "times"):
            value = data.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"field {name!r} must be an integer")
        for name in ("kind", "body", "message", "key", "operation"):
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"field {name!r} must be a string")
        delay = data.get("delay_s", 0.0)
        if isinstance(delay, bool) or not isinstance(delay, (int, float)):
            raise TypeError("field 'delay_s' must be a number")
        if data.get("times", 1) is None:
            raise TypeError("field 'times' must be an integer")
        args = dict(data)
        args["delay_s"] = float(delay)
        return cls(**args)

    def to_dict(self) -> dict[str, Any]:
        """The fault's JSON form."""
        return {**dataclasses.asdict(self), "kind": str(self.kind)}

    def matches(self, operation: Operation, key: str | None) -> bool:
        """Whether this fault applies to a request of `operation` made with `key`."""
        return (
            self.times != 0
            and (self.key is None or self.key == key)
            and (self.operation is None or self.operation == operation)
        )


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated upstream behaves for one run."""

    keys: Mapping[str, int | None]
    task_seconds: float = 30.0
    quota_status: int = 429
    quota_message: str = "Daily quota exceeded: request limit reached for today"
    schedule: QuotaSchedule = field(default_factory=QuotaSchedule)
    video_bytes: int = 1_400_000
    public_base_url: str | None = None
    faults: tuple[Fault, ...] = ()
    dead_every: int = 0


@dataclass
class SimTask:
    """One video task as the simulator remembers it."""

    task_id: str
    key: str
    created: float
    prompt: str
    fail: bool
    body: bytes


class SimulatorState:
    """Everything the simulator counts and remembers; tests inspect and steer it."""

    def __init__(self, config: SimulatorConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.creates: Counter[str] = Counter()
        self.used: dict[tuple[str, str], int] = {}
        self.polls: Counter[str] = Counter()
        self.downloads: Counter[str] = Counter()  # video downloads per task id
        self.tasks: dict[str, SimTask] = {}
        self.faults: list[Fault] = [dataclasses.replace(f) for f in config.faults]
        self.requests = 0
        #: Requests per (key, operation) that reached the simulator, faults and refusals included.
        self.calls: Counter[tuple[str, str]] = Counter()
        self.last_create_body = b""
        self.last_create_headers: dict[str, str] = {}
        self.holding = 0
        self._video: bytes | None = None
        self._hold = asyncio.Condition()
        self._releases = 0

    def add_fault(self, fault: Fault) -> None:
        """Queue `fault` behind the ones already queued."""
        self.faults.append(fault)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self.faults.clear()

    def take_fault(self, operation: Operation, key: str | None) -> Fault | None:
        """Consume one use of the first fault matching the request; exhausted faults leave the queue."""
        for index, fault in enumerate(self.faults):
            if fault.matches(operation, key):
                if fault.times > 0:
                    fault.times -= 1
                    if fault.times == 0:
                        del self.faults[index]
                return fault
        return None

    async def hold(self) -> None:
        """Keep a request waiting until the next `release_held()`."""
        async with self._hold:
            generation = self._releases
            self.holding += 1
            self._hold.notify_all()
            try:
                await self._hold.wait_for(lambda: self._releases > generation)
            finally:
                self.holding -= 1

    async def until_held(self, count: int) -> None:
        """Return once `count` requests are held (bound it with a timeout)."""
        async with self._hold:
            await self._hold.wait_for(lambda: self.holding >= count)

    async def release_held(self) -> int:
        """Let every held request go on; returns how many there were."""
        async with self._hold:
            released = self.holding
            self._releases += 1
            self._hold.notify_all()
        return released

    def used_today(self, key: str) -> int:
        """Accepted creates by `key` in the current quota day."""
        day = self.config.schedule.day_key(self.clock.now())
        return self.used.get((key, day), 0)

    def progress(self, task: SimTask) -> int:
        """How far `task` is, 0..100, by the monotonic clock."""
        seconds = self.config.task_seconds
        if seconds <= 0:
            return 100
        elapsed = self.clock.monotonic() - task.created
        return max(0, min(100, int(100 * elapsed / seconds)))

    def stats(self) -> dict[str, Any]:
        """Counts per configured key, as `GET /_sim/stats` reports them."""
        keys = list(self.config.keys)
        return {
            "creates": {k: self.creates[k] for k in keys},
            "used_today": {k: self.used_today(k) for k in keys},
            "polls": {k: self.polls[k] for k in keys},
            "tasks": len(self.tasks),
            "faults": len(self.faults),
        }

    def video(self) -> bytes:
        """The whole fake MP4, built once (only for sizes up to the cache limit)."""
        if self._video is None:
            self._video = b"".join(_iter_video(0, self.config.video_bytes))
        return self._video


SIMULATOR_STATE: web.AppKey[SimulatorState] = web.AppKey("simulator_state", SimulatorState)

_DOUBLE_PATTERN = memoryview(_PATTERN * 2)


def _iter_video(start: int, end: int) -> Iterator[memoryview]:
    """Bytes `start`..`end` (exclusive) of the fake MP4: ftyp and mdat headers, then a pattern."""
    pos = start
    head = len(_MP4_HEAD)
    if pos < head and pos < end:
        stop = min(head, end)
        yield memoryview(_MP4_HEAD)[pos:stop]
        pos = stop
    while pos < end:
        offset = pos % _CHUNK
        n = min(_CHUNK, end - pos)
        yield _DOUBLE_PATTERN[offset : offset + n]
        pos += n


def _bearer(request: web.Request) -> str | None:
    """The bearer token of the request, if any."""
    auth = request.headers.get("Authorization")
    if auth is None or auth[:7].lower() != "bearer ":
        return None
    return auth[7:].strip() or None


def _json(body: bytes, status: int = 200) -> web.Response:
    """A JSON answer from pre-encoded bytes."""
    return web.Response(body=body, status=status, content_type=_JSON)


def _quota_refusal(state: SimulatorState, fault: Fault | None = None) -> web.Response:
    """The daily-quota refusal, optionally with a fault's status and message."""
    config = state.config
    status = config.quota_status
    message = config.quota_message
    if fault is not None:
        status = fault.status or status
        message = fault.message or message
        if fault.body is not None:
            return web.Response(text=fault.body, status=status, content_type=_JSON)
    return _json(_error_body(message, "quota_exceeded", "quota_exceeded"), status)


def _reset(request: web.Request) -> web.Response:
    """Drop the connection without answering; the returned response is never written."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=599)


def _fault_response(state: SimulatorState, request: web.Request, fault: Fault) -> web.Response:
    """The answer a fault gives instead of the normal one."""
    kind = fault.kind
    if kind is FaultKind.QUOTA:
        return _quota_refusal(state, fault)
    if kind is FaultKind.RATE_LIMIT:
        headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        if fault.body is not None:
            body = fault.body.encode()
        elif fault.message is not None:
            body = json.dumps(
                {"error": {"message": fault.message, "code": "rate_limited"}}, ensure_ascii=False
            ).encode()
        else:
            body = _RATE_LIMITED
        return web.Response(body=body, status=fault.status or 429, content_type=_JSON, headers=headers)
    if kind is FaultKind.NOT_JSON:
        text = "<html>oops</html>" if fault.body is None else fault.body
        return web.Response(text=text, status=fault.status or 200, content_type=_HTML)
    if kind is FaultKind.HTML_ERROR:
        status = fault.status or 502
        text = _DEFAULT_HTML.format(status=status) if fault.body is None else fault.body
        return web.Response(text=text, status=status, content_type=_HTML)
    if kind is FaultKind.RESET:
        return _reset(request)
    # FaultKind.STATUS
    status = fault.status or 500
    if fault.body is not None:
        stripped = fault.body.lstrip()
        ctype = _JSON if stripped.startswith(("{", "[")) else "text/plain"
        return web.Response(text=fault.body, status=status, content_type=ctype)
    if fault.message is not None:
        return _json(_error_body(fault.message, "server_error", "simulated_error"), status)
    return _json(_SIMULATED, status)


async def _intercept(
    state: SimulatorState, request: web.Request, operation: Operation, key: str | None
) -> web.Response | None:
    """Apply `dead_every` and the fault queue; a response means the request is answered."""
    state.requests += 1
    state.calls[(key or "", operation)] += 1
    dead_every = state.config.dead_every
    if dead_every > 0 and state.requests % dead_every == 0:
        return _reset(request)
    if not state.faults:
        return None
    fault = state.take_fault(operation, key)
    if fault is None:
        return None
    if fault.delay_s > 0:
        await asyncio.sleep(fault.delay_s)
    if fault.kind is FaultKind.HOLD:
        await state.hold()
        return None
    if fault.kind is FaultKind.SLOW:
        return None
    return _fault_response(state, request, fault)


def _bad_request(message: str) -> web.Response:
    """A 400 answer for a create body that does not validate."""
    return _json(_error_body(message, "invalid_request_error", "invalid_request"), 400)


def _multipart_prompt(body: bytes) -> str:
    """The `prompt` field of a multipart body, found without parsing the whole body."""
    at = body.find(b'name="prompt"')
    if at < 0:
        return ""
    start = body.find(b"\r\n\r\n", at)
    if start < 0:
        return ""
    start += 4
    end = body.find(b"\r\n--", start)
    return body[start : end if end >= 0 else len(body)].decode("utf-8", "replace")


async def _create(request: web.Request) -> web.Response:
    """`POST /v1/videos`: check key, quota and body, then start a task."""
    state = request.app[SIMULATOR_STATE]
    body = await request.read()
    state.last_create_body = body
    state.last_create_headers = dict(request.headers)
    key = _bearer(request)
    intercepted = await _intercept(state, request, "create", key)
    if intercepted is not None:
        return intercepted
    config = state.config
    if key is None or key not in config.keys:
        return _json(_UNAUTHORIZED, 401)
    limit = config.keys[key]
    day_slot = (key, config.schedule.day_key(state.clock.now()))
    used = state.used.get(day_slot, 0)
    if limit is not None and used >= limit:
        return _quota_refusal(state)
    ctype = request.content_type
    if ctype == _JSON or ctype.endswith("+json"):
        try:
            data = json.loads(body)
        except ValueError:
            return _bad_request("Request body is not valid JSON")
        if not isinstance(data, dict):
            return _bad_request("Request body must be a JSON object")
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return _bad_request("Field 'prompt' is required and must be a non-empty string")
        model = data.get("model")
        if not isinstance(model, str) or not model:
            return _bad_request("Field 'model' is required and must be a non-empty string")
        fail = _FAIL_MARK in prompt
    else:
        prompt = _multipart_prompt(body)
        fail = _FAIL_MARK.encode() in body
    state.used[day_slot] = used + 1
    state.creates[key] += 1
    task_id = str(uuid.uuid4())
    state.tasks[task_id] = SimTask(task_id, key, state.clock.monotonic(), prompt, fail, body)
    return _json(b'{"task_id": "' + task_id.encode() + b'"}')


async def _poll(request: web.Request) -> web.Response:
    """`GET /v1/videos/{task_id}`: the task's status by elapsed time, for its owner only."""
    state = request.app[SIMULATOR_STATE]
    key = _bearer(request)
    intercepted = await _intercept(state, request, "poll", key)
    if intercepted is not None:
        return intercepted
    if key is None or key not in state.config.keys:
        return _json(_UNAUTHORIZED, 401)
    state.polls[key] += 1
    task = state.tasks.get(request.match_info["task_id"])
    if task is None or task.key != key:
        return _json(_NOT_FOUND, 404)
    progress = state.progress(task)
    answer: dict[str, Any]
    if progress >= 100:
        if task.fail:
            answer = {"status": "failed", "progress": 0, "error": _FAIL_ERROR}
        else:
            base = state.config.public_base_url
            base = base.rstrip("/") if base else f"{request.scheme}://{request.host}"
            answer = {
                "status": "completed",
                "progress": 100,
                "remixed_from_video_id": f"{base}/files/{task.task_id}.mp4",
            }
    elif progress == 0:
        answer = {"status": "queued", "progress": 0}
    else:
        answer = {"status": "in_progress", "progress": progress}
    return _json(json.dumps(answer).encode())


def _byte_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """The (start, end-exclusive) span asked for; the whole file when there is no usable Range."""
    if "Range" not in request.headers:
        return 0, size
    try:
        rng = request.http_range
    except ValueError:
        return 0, size  # a server may ignore a Range it does not understand
    start = cast(int, rng.start)
    if start < 0:
        return max(size + start, 0), size
    end = size if rng.stop is None else min(cast(int, rng.stop), size)
    if start >= end:
        return None
    return start, end


async def _download(request: web.Request) -> web.StreamResponse:
    """`GET /files/{task_id}.mp4`: the finished video, like a CDN URL (no auth, Range supported)."""
    state = request.app[SIMULATOR_STATE]
    task = state.tasks.get(request.match_info["task_id"])
    if task is None or task.fail or state.progress(task) < 100:
        return web.Response(status=404, text="Not Found")
    state.downloads[task.task_id] += 1
    size = state.config.video_bytes
    span = _byte_range(request, size)
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{task.task_id}"'}
    if span is None:
        headers["Content-Range"] = f"bytes */{size}"
        return web.Response(status=416, headers=headers)
    start, end = span
    status = 200
    if (start, end) != (0, size):
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if size <= _CACHE_LIMIT:
        video = state.video()
        body = video if status == 200 else memoryview(video)[start:end]
        return web.Response(body=body, status=status, headers=headers, content_type="video/mp4")
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = "video/mp4"
    response.content_length = end - start
    await response.prepare(request)
    if request.method != "HEAD":
        for chunk in _iter_video(start, end):
            await response.write(chunk)
    await response.write_eof()
    return response


async def _add_fault(request: web.Request) -> web.Response:
    """`POST /_sim/faults`: queue a fault given as JSON."""
    state = request.app[SIMULATOR_STATE]
    try:
        data = await request.json()
        if not isinstance(data, dict):
            raise TypeError("a fault must be a JSON object")
        fault = Fault.from_dict(data)
    except (ValueError, TypeError) as exc:
        return _bad_request(f"Invalid fault: {exc}")
    state.add_fault(fault)
    return web.json_response(fault.to_dict(), status=201)


async def _release(request: web.Request) -> web.Response:
    """`POST /_sim/release`: let every request held by a `hold` fault go on."""
    return web.json_response({"released": await request.app[SIMULATOR_STATE].release_held()})


async def _list_faults(request: web.Request) -> web.Response:
    """`GET /_sim/faults`: the queued faults."""
    state = request.app[SIMULATOR_STATE]
    return web.json_response({"faults": [f.to_dict() for f in state.faults]})


async def _clear_faults(request: web.Request) -> web.Response:
    """`DELETE /_sim/faults`: drop every queued fault."""
    state = request.app[SIMULATOR_STATE]
    cleared = len(state.faults)
    state.clear_faults()
    return web.json_response({"cleared": cleared})


async def _stats(request: web.Request) -> web.Response:
    """`GET /_sim/stats`: counts per configured key secret."""
    return web.json_response(request.app[SIMULATOR_STATE].stats(), dumps=_dumps_unicode)


def _dumps_unicode(obj: Any) -> str:
    """JSON without escaping non-ASCII key names."""
    return json.dumps(obj, ensure_ascii=False)


def create_simulator_app(config: SimulatorConfig, *, clock: Clock | None = None) -> web.Application:
    """The simulator as an aiohttp application; its state is `app[SIMULATOR_STATE]`."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIMULATOR_STATE] = SimulatorState(config, clock or SystemClock())
    app.router.add_post("/v1/videos", _create)
    app.router.add_get("/v1/videos/{task_id}", _poll, allow_head=False)
    app.router.add_get("/files/{task_id}.mp4", _download)
    app.router.add_post("/_sim/faults", _add_fault)
    app.router.add_get("/_sim/faults", _list_faults, allow_head=False)
    app.router.add_delete("/_sim/faults", _clear_faults)
    app.router.add_post("/_sim/release", _release)
    app.router.add_get("/_sim/stats", _stats, allow_head=False)
    return app


async def run_simulator(config: SimulatorConfig, host: str, port: int) -> None:
    """Serve the simulator on `host:port` until cancelled, without an access log."""
    runner = web.AppRunner(create_simulator_app(config), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
