"""Logging: plain text or JSON lines, with every configured secret scrubbed as a last guard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import sys
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TextIO

from aiohttp.http_exceptions import HttpProcessingError

from .config import Config, Secret
from .store.urls import passwords

REDACTED = "[REDACTED]"

#: The id of the request being handled, for every log line written while handling it.
request_id: ContextVar[str | None] = ContextVar("agnes_request_id", default=None)

#: Structured fields a log call may pass in `extra=`; JSON lines carry them as their own members.
FIELDS = (
    "upstream_status",
    "upstream_ms",
    "request_id",
    "method",
    "route",
    "status",
    "client",
    "key",
    "operation",
    "outcome",
    "state",
    "duration_ms",
)

upstream_log = logging.getLogger("agnes_gateway.upstream")


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """One upstream call, as its log line tells it."""

    operation: str
    key: str
    outcome: str
    status: int | None
    duration_ms: float

    def log(self) -> None:
        """Its own line on `agnes_gateway.upstream`."""
        upstream_log.info(
            "%s key=%s %s %s %.1fms",
            self.operation,
            self.key,
            self.outcome,
            "-" if self.status is None else self.status,
            self.duration_ms,
            extra={
                "operation": self.operation,
                "key": self.key,
                "outcome": self.outcome,
                "status": self.status,
                "duration_ms": round(self.duration_ms, 1),
            },
        )


class HeldCalls:
    """A request's successful upstream calls, held for its access line (see `upstream_calls`)."""

    __slots__ = ("calls", "open")

    def __init__(self) -> None:
        self.calls: list[UpstreamCall] = []
        self.open = True


#: While a request is handled: where its successful upstream calls wait for the access line. A request
#: whose one upstream call succeeded gets one line, with that call's outcome, status and time on it (as
#: nginx's $upstream_status); every other call (a failure, a failover, a retry) gets its own line too.
upstream_calls: ContextVar[HeldCalls | None] = ContextVar("agnes_upstream_calls", default=None)


def log_upstream_call(call: UpstreamCall) -> None:
    """Log a finished upstream call: on its request's access line if it can go there, else its own line."""
    held = upstream_calls.get()
    if call.outcome == "ok":
        if held is not None and held.open:
            held.calls.append(call)
        else:
            asyncio.get_running_loop().call_soon(call.log)  # mostly after the answer has left
    else:
        call.log()


_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def accept_request_id(value: str | None) -> str:
    """The client's `X-Request-ID` when it is short and plain, else a fresh random one."""
    if value is not None and _SANE_REQUEST_ID.match(value):
        return value
    # 128 random bits as 32 hex digits, like uuid4().hex but without a system call per request.
    return f"{random.getrandbits(128):032x}"


class RedactSecrets(logging.Filter):
    """Replaces any configured secret in a record's final message, whatever put it there."""

    def __init__(self, secrets: Iterable[Secret]) -> None:
        super().__init__()
        self._set_values({s.reveal() for s in secrets if s.reveal()})

    def add(self, secrets: Iterable[Secret]) -> None:
        """Scrub these too (a reloaded config's new keys and tokens); the old ones stay scrubbed."""
        self._set_values(set(self.values) | {s.reveal() for s in secrets if s.reveal()})

    def _set_values(self, values: set[str]) -> None:
        self.values = sorted(values, key=len, reverse=True)
        # One regular expression finds any of them in a single pass: this runs for every line logged.
        self._find = re.compile("|".join(map(re.escape, self.values))).search if self.values else None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = message, None  # formatted once, here: the formatter reuses it
        find = self._find
        if find is None:
            return True
        if record.exc_info and not record.exc_text:
            # A traceback can quote request bytes (a bad header line with a token in it): scrub it too.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        fields = record.__dict__
        texts = [message, record.exc_text or ""]
        texts += [value for name in FIELDS if isinstance(value := fields.get(name), str)]
        # One search over everything (no secret holds a NUL): the common line has nothing to scrub.
        if not find("\0".join(texts)):
            return True
        record.msg = self._scrub(message)
        for name in FIELDS:
            value = fields.get(name)
            if isinstance(value, str) and find(value):
                fields[name] = self._scrub(value)
        if record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        return True

    def _scrub(self, text: str) -> str:
        for value in self.values:
            text = text.replace(value, REDACTED)
        return text


class RequestIdFilter(logging.Filter):
    """Stamps every record written while a request is handled with that request's id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            current = request_id.get()
            if current is not None:
                record.request_id = current
        return True


class MalformedRequests(logging.Filter):
    """aiohttp logs every unparsable request as an ERROR with a traceback quoting the request's bytes.

    That is the client's mistake, not the gateway's, and a hostile client could fill the log with it:
    keep one INFO line naming the problem, without the bytes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed HTTP request refused (%s %s)", (exc.code, type(exc).__name__)
            record.exc_info, record.exc_text = None, None
        return record.levelno >= logging.getLogger().getEffectiveLevel()


class SecondStamp:
    """`time.strftime(fmt)` of a record's time, computed once per second rather than once per line."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, time.strftime(self.fmt, time.localtime(created))
        return self._text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the structured fields, any exception."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = SecondStamp("%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": self._stamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        for name in FIELDS:
            value = fields.get(name)
            if value is not None:
                doc[name] = value
        if record.exc_text:
            doc["exception"] = record.exc_text
        elif record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, with ` request_id=...` on lines written for a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._stamp = SecondStamp("%Y-%m-%d %H:%M:%S")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._stamp(record.created)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        if rid is None:
            return line
        first, newline, rest = line.partition("\n")  # keep a traceback below the line it belongs to
        return f"{first} request_id={rid}{newline}{rest}"


class TurnFlushingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that flushes once per turn of the event loop instead of once per line.

    Under load many requests finish in one turn: their lines leave in one write instead of one each.
    Outside a running loop (startup, other threads) every line is flushed at once, as usual.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flush_pending = False

    def flush(self) -> None:
        if self._flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()
            return
        self._flush_pending = True
        loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._flush_pending = False
            super().flush()

    def close(self) -> None:
        with self.lock or contextlib.nullcontext():
            self._flush_pending = False
            super().flush()
        super().close()


def setup_logging(config: Config, stream: TextIO | None = None) -> None:
    """Send the gateway's logs to stderr (or `stream`) in the configured format, secrets scrubbed."""
    handler = TurnFlushingHandler(stream or _buffered_stderr())
    if config.log.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler.addFilter(secrets_filter(config))
    # No format here uses the caller's file and line, thread or process: skip looking them up per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())


def _buffered_stderr() -> TextIO:
    """stderr, buffered: sys.stderr is line-buffered, a write per line; this copy writes when flushed."""
    return open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8", errors="backslashreplace", closefd=False)


def secrets_filter(config: Config) -> RedactSecrets:
    return RedactSecrets(config_secrets(config))


def config_secrets(config: Config) -> list[Secret]:
    """Every credential in `config`: upstream keys, client tokens, the admin token."""
    secrets: list[Secret] = [k.secret for k in config.keys] + [c.token for c in config.clients]
    secrets += [Secret(p) for p in passwords(config.database)]
    for extra in (config.admin_token, config.metrics.token):
        if extra is not None:
            secrets.append(extra)
    return secrets


def redact_more(config: Config) -> None:
    """Teach the installed log filters the secrets of a reloaded config."""
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, RedactSecrets):
                f.add(config_secrets(config))
