"""`agnes-gateway generate "prompt"`: one command from a prompt to an MP4 on disk, with a live progress bar.

Creates the task through a gateway (or straight at the upstream with `--upstream`), polls it, downloads the
video, prints its path. Ctrl-C leaves the task id on screen so `--resume TASK_ID` can pick it up again.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import mimetypes
import os
import sys
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, TextIO

import aiohttp

DEFAULT_GATEWAY = "http://localhost:8080"
DEFAULT_UPSTREAM = "https://apihub.agnes-ai.com"
DEFAULT_MODEL = "agnes-video-v2.0"
URL_ENV, TOKEN_ENV, KEY_ENV = "AGNES_GATEWAY_URL", "AGNES_GATEWAY_TOKEN", "AGNES_API_KEY"
KEY_FILE = "~/.agnes_api_key"
POLL_FAILURES_ALLOWED = 5
CHUNK_BYTES = 256 * 1024
BAR_WIDTH = 30


class Exit(IntEnum):
    """What `generate` exits with: scripts can tell a failed video from a spent quota from a network fault."""

    OK = 0
    FAILED = 1  # the video generation itself failed
    USAGE = 2  # bad arguments
    QUOTA = 3  # quota exhausted / rate limited (HTTP 429)
    NETWORK = 4  # could not reach the gateway or upstream, it failed (5xx), or time ran out
    REFUSED = 5  # the request was refused (bad token, bad request, unknown task)
    INTERRUPTED = 130  # Ctrl-C


class Stop(Exception):
    """Ends the command with an exit code and a message for stderr."""

    def __init__(self, code: Exit, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def add_parser(sub: Any) -> None:
    """Register `generate` on the CLI's sub-command parsers."""
    p = sub.add_parser(
        "generate",
        help="make one video from a prompt: create, wait with a progress bar, download",
        description=(
            "Create a video through a gateway (or the upstream with --upstream), show its progress, download the "
            "MP4 and print its path. Exit codes: 0 done, 1 generation failed, 2 usage, 3 quota exhausted or rate "
            "limited, 4 network error, upstream failure or timeout, 5 request refused, 130 interrupted."
        ),
    )
    p.add_argument("prompt", nargs="?", help="what the video shows")
    p.add_argument("-o", "--output", help="file (or directory) to write the MP4 to (default ./TASK_ID.mp4)")
    p.add_argument("--url", help=f"gateway base URL (default ${URL_ENV}, else {DEFAULT_GATEWAY})")
    p.add_argument("--token", help=f"gateway client token (default ${TOKEN_ENV})")
    p.add_argument(
        "--upstream",
        action="store_true",
        help=f"talk to the upstream API directly (--url defaults to {DEFAULT_UPSTREAM}; key from --key, "
        f"${KEY_ENV} or {KEY_FILE})",
    )
    p.add_argument("--key", help="upstream API key, with --upstream")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    p.add_argument("--width", type=int, help="pixels (upstream default 1152)")
    p.add_argument("--height", type=int, help="pixels (upstream default 768)")
    p.add_argument("--frames", type=int, help="number of frames (upstream default 121, about 5 s)")
    p.add_argument("--fps", type=int, help="frame rate (upstream default 24)")
    p.add_argument("--image", help="reference image for image-to-video: a file (sent as a data URL) or an http(s) URL")
    p.add_argument("--image-field", default="image", help="the upstream's field for the image (default image)")
    p.add_argument("--resume", metavar="TASK_ID", help="wait for and download a task created earlier")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5, as the guide says)")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds (default 1800)")
    p.set_defaults(run=run)


@dataclass
class Options:
    base_url: str
    credential: str | None
    upstream: bool
    body: dict[str, Any] | None
    resume: str | None
    output: str | None
    interval: float
    timeout: float

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"} if self.credential else {}


@dataclass
class Progress:
    """A live bar on a terminal; one plain line per change otherwise (logs, pipes, CI)."""

    out: TextIO
    tty: bool
    started: float = field(default_factory=time.monotonic)
    _last: tuple[str, int] | None = None
    _drawn: bool = False

    def update(self, status: str, percent: int) -> None:
        elapsed = int(time.monotonic() - self.started)
        clock = f"{elapsed // 60}:{elapsed % 60:02d}"
        percent = max(0, min(100, percent))
        if self.tty:
            filled = BAR_WIDTH * percent // 100
            bar = "█" * filled + "░" * (BAR_WIDTH - filled)
            self.out.write(f"\r[{bar}] {percent:3d}% {status:<11} {clock}\x1b[K")
            self._drawn = True
        elif self._last != (status, percent):
            self.out.write(f"{status} {percent}% ({clock})\n")
        self._last = (status, percent)
        self.out.flush()

    def end(self) -> None:
        if self.tty and self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False

    def say(self, line: str) -> None:
        self.end()
        self.out.write(line + "\n")
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    """The `generate` sub-command."""
    try:
        options = _options(args)
    except Stop as stop:
        print(f"agnes-gateway generate: {stop.message}", file=sys.stderr)
        return int(stop.code)
    progress = Progress(sys.stdout, sys.stdout.isatty())
    state: dict[str, str] = {}
    try:
        path = asyncio.run(generate(options, progress, state))
    except KeyboardInterrupt:
        progress.end()
        task_id = state.get("task_id")
        if task_id:
            print(f"interrupted; task {task_id} goes on. Resume with:", file=sys.stderr)
            print(f"  agnes-gateway generate --resume {task_id}{_resume_flags(args)}", file=sys.stderr)
        else:
            print("interrupted before a task was created", file=sys.stderr)
        return int(Exit.INTERRUPTED)
    except Stop as stop:
        progress.end()
        print(f"agnes-gateway generate: {stop.message}", file=sys.stderr)
        if state.get("task_id") and stop.code in (Exit.NETWORK, Exit.QUOTA):
            print(f"  resume with: agnes-gateway generate --resume {state['task_id']}", file=sys.stderr)
        return int(stop.code)
    print(path)
    return int(Exit.OK)


def _resume_flags(args: argparse.Namespace) -> str:
    flags = ""
    if args.url:
        flags += f" --url {args.url}"
    if args.upstream:
        flags += " --upstream"
    if args.output:
        flags += f" -o {args.output}"
    return flags


def _options(args: argparse.Namespace) -> Options:
    if not args.resume and not args.prompt:
        raise Stop(Exit.USAGE, 'give a prompt (agnes-gateway generate "a cat playing piano") or --resume TASK_ID')
    if args.interval <= 0 or args.timeout <= 0:
        raise Stop(Exit.USAGE, "--interval and --timeout must be positive")
    if args.upstream:
        base_url = args.url or DEFAULT_UPSTREAM
        credential = args.key or os.environ.get(KEY_ENV) or _read_key_file()
        if not credential:
            raise Stop(Exit.USAGE, f"--upstream needs a key: --key, ${KEY_ENV} or {KEY_FILE}")
    else:
        base_url = args.url or os.environ.get(URL_ENV) or DEFAULT_GATEWAY
        credential = args.token or os.environ.get(TOKEN_ENV) or None
    if not base_url.startswith(("http://", "https://")):
        raise Stop(Exit.USAGE, f"--url must be an http(s) URL, got {base_url!r}")
    body = None if args.resume else _create_body(args)
    return Options(
        base_url.rstrip("/"), credential, args.upstream, body, args.resume, args.output, args.interval, args.timeout
    )


def _read_key_file() -> str | None:
    try:
        return Path(KEY_FILE).expanduser().read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _create_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"model": args.model, "prompt": args.prompt}
    for name, value in (
        ("width", args.width),
        ("height", args.height),
        ("num_frames", args.frames),
        ("frame_rate", args.fps),
    ):
        if value is not None:
            if value <= 0:
                raise Stop(Exit.USAGE, f"{name} must be positive")
            body[name] = value
    if args.image:
        body[args.image_field] = _image(args.image)
    return body


def _image(value: str) -> str:
    if value.startswith(("http://", "https://", "data:")):
        return value
    path = Path(value).expanduser()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Stop(Exit.USAGE, f"cannot read --image {path}: {exc.strerror}") from None
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


async def generate(options: Options, progress: Progress, state: dict[str, str]) -> Path:
    """Create (or resume), wait, download; returns the MP4's path."""
    timeout = aiohttp.ClientTimeout(total=60, connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        if options.resume:
            task_id = options.resume
        else:
            task_id = await _create(session, options)
        state["task_id"] = task_id
        progress.say(f"task {task_id}")
        answer = await _wait(session, options, task_id, progress)
        progress.end()
        return await _download(session, options, task_id, answer, progress)


async def _create(session: aiohttp.ClientSession, options: Options) -> str:
    try:
        async with session.post(f"{options.base_url}/v1/videos", json=options.body, headers=options.auth) as resp:
            doc = await _answer(resp, "create")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _network(exc, options) from None
    for name in ("task_id", "id"):
        if isinstance(doc.get(name), str) and doc[name]:
            return str(doc[name])
    raise Stop(Exit.NETWORK, "the create answer had no task id")


async def _wait(session: aiohttp.ClientSession, options: Options, task_id: str, progress: Progress) -> dict[str, Any]:
    """Poll until the task is completed (its answer) or failed (exit 1); brief faults are retried."""
    deadline = time.monotonic() + options.timeout
    failures = 0
    while True:
        try:
            async with session.get(f"{options.base_url}/v1/videos/{task_id}", headers=options.auth) as resp:
                doc = await _answer(resp, "poll")
            failures = 0
        except (aiohttp.ClientError, TimeoutError) as exc:
            failures += 1
            if failures >= POLL_FAILURES_ALLOWED:
                raise _network(exc, options) from None
            doc = None
        except Stop as stop:
            failures += 1
            if stop.code not in (Exit.NETWORK, Exit.QUOTA) or failures >= POLL_FAILURES_ALLOWED:
                raise
            doc = None
        if doc is not None:
            status = str(doc.get("status", "unknown"))
            percent = doc.get("progress")
            progress.update(status, percent if isinstance(percent, int) else 0)
            if status == "completed":
                progress.update(status, 100)
                return doc
            if status == "failed":
                progress.end()
                raise Stop(Exit.FAILED, f"task {task_id} failed: {doc.get('error') or 'no reason given'}")
        if time.monotonic() + options.interval > deadline:
            raise Stop(Exit.NETWORK, f"task {task_id} did not finish within {options.timeout:g} s")
        await asyncio.sleep(options.interval)


async def _download(
    session: aiohttp.ClientSession, options: Options, task_id: str, answer: dict[str, Any], progress: Progress
) -> Path:
    """Stream the MP4 to a temporary file beside the target, then rename it into place."""
    if options.upstream:
        url = answer.get("remixed_from_video_id") or answer.get("video_url")
        if not isinstance(url, str) or not url:
            raise Stop(Exit.NETWORK, "upstream says the task is completed but gives no video URL")
        headers: dict[str, str] = {}  # the video URL is not the API: it never gets the key
    else:
        url = f"{options.base_url}/v1/videos/{task_id}/content"
        headers = options.auth
    target = _target(options.output, task_id)
    partial = target.with_name(f".{target.name}.part")
    try:
        async with session.get(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
        ) as resp:
            if resp.status != 200:
                await _answer(resp, "download")
            size = resp.content_length
            got = 0
            with partial.open("wb") as file:
                async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                    file.write(chunk)
                    got += len(chunk)
                    if size and progress.tty:
                        progress.update("downloading", 100 * got // size)
        progress.say(f"downloaded {got} bytes")
        partial.replace(target)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _network(exc, options) from None
    finally:
        partial.unlink(missing_ok=True)
    return target.resolve()


def _target(output: str | None, task_id: str) -> Path:
    if not output:
        return Path(f"{task_id}.mp4")
    path = Path(output).expanduser()
    return path / f"{task_id}.mp4" if path.is_dir() else path


async def _answer(resp: aiohttp.ClientResponse, what: str) -> dict[str, Any]:
    """The JSON of a 2xx answer; a `Stop` with the right exit code otherwise."""
    text = await resp.text(errors="replace")
    if resp.status < 300:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise Stop(Exit.NETWORK, f"{what}: the answer was not a JSON object")
        return doc
    message = _error_message(text) or f"HTTP {resp.status}"
    if resp.status == 429:
        retry = resp.headers.get("Retry-After")
        hint = f"; retry in {retry} s" if retry else ""
        raise Stop(Exit.QUOTA, f"{what}: quota exhausted or rate limited: {message}{hint}")
    if resp.status >= 500:
        raise Stop(Exit.NETWORK, f"{what}: HTTP {resp.status}: {message}")
    raise Stop(Exit.REFUSED, f"{what}: HTTP {resp.status}: {message}")


def _error_message(text: str) -> str | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip()[:200] or None
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return error if isinstance(error, str) else text.strip()[:200] or None


def _network(exc: BaseException, options: Options) -> Stop:
    kind = "timed out" if isinstance(exc, TimeoutError) else f"failed ({type(exc).__name__})"
    return Stop(Exit.NETWORK, f"talking to {options.base_url} {kind}")
