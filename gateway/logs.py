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
from collections.abc import Iterable, Mapping
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
        status = "-" if self.status is None else self.status
        log_line(
            upstream_log,
            logging.INFO,
            f"{self.operation} key={self.key} {self.outcome} {status} {self.duration_ms:.1f}ms",
            {
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

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = message, None  # formatted once, here: the formatter reuses it
        if not self.values:
            return True
        if record.exc_info and not record.exc_text:
            # A traceback can quote request bytes (a bad header line with a token in it): scrub it too.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        fields = record.__dict__
        texts = [message, record.exc_text or ""]
        texts += [value for name in FIELDS if isinstance(value := fields.get(name), str)]
        # One look over everything (no secret holds a NUL): the common line has nothing to scrub.
        if self.clean("\0".join(texts)):
            return True
        record.msg = self._scrub(message)
        for name in FIELDS:
            value = fields.get(name)
            if isinstance(value, str) and not self.clean(value):
                fields[name] = self._scrub(value)
        if record.exc_text:
            record.exc_text = self._scrub(record.exc_text)
        return True

    def clean(self, text: str) -> bool:
        """True when `text` holds no secret.

        A substring test per secret: for the few secrets of a config, several times faster than one
        regular expression of alternatives, which tries every one at every position.
        """
        for value in self.values:  # noqa: SIM110 - a loop: all() over a generator takes twice as long here
            if value in text:
                return False
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
        exception = record.exc_text
        if not exception and record.exc_info:
            exception = self.formatException(record.exc_info)
        return self.line(
            record.created, record.levelname, record.name, record.getMessage(), record.__dict__, exception or None
        )

    def line(
        self,
        created: float,
        level: str,
        logger: str,
        message: str,
        fields: Mapping[str, object],
        exception: str | None = None,
    ) -> str:
        """The line for these parts (`fields`: any mapping holding some of FIELDS)."""
        doc: dict[str, object] = {"time": self._stamp(created), "level": level, "logger": logger, "message": message}
        for name in FIELDS:
            value = fields.get(name)
            if value is not None:
                doc[name] = value
        if exception:
            doc["exception"] = exception
        return json.dumps(doc, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, with ` request_id=...` on lines written for a request."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = SecondStamp("%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = self.line(record.created, record.levelname, record.name, record.getMessage(), record.__dict__)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line

    def line(self, created: float, level: str, logger: str, message: str, fields: Mapping[str, object]) -> str:
        """The line for these parts (of `fields`, only `request_id` is shown)."""
        millis = int((created - int(created)) * 1000)
        line = f"{self._stamp(created)},{millis:03d} {level} {logger}: {message}"
        rid = fields.get("request_id")
        if rid is None:
            return line
        first, newline, rest = line.partition("\n")  # keep a many-line message below the line it belongs to
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

    def write_line(self, line: str) -> None:
        """Write a line formatted and scrubbed already (see `log_line`)."""
        with self.lock or contextlib.nullcontext():
            self.stream.write(line + self.terminator)
        self.flush()


class _Installed:
    """The handler `setup_logging` installed, with its formatter and secret filter: `log_line`'s shortcut."""

    __slots__ = ("formatter", "handler", "redact")

    def __init__(
        self, handler: TurnFlushingHandler, formatter: TextFormatter | JsonFormatter, redact: RedactSecrets
    ) -> None:
        self.handler, self.formatter, self.redact = handler, formatter, redact

    def alone_on(self, logger: logging.Logger, level: int) -> bool:
        """True while a line of `logger` at `level` goes to this handler only, through its own filters only."""
        handler = self.handler
        if handler.formatter is not self.formatter or len(handler.filters) != 2 or level < handler.level:
            return False
        node: logging.Logger | None = logger
        while node is not None:
            if node.filters:
                return False
            if node.parent is None:  # the root
                return node.handlers == [handler]
            if node.handlers or not node.propagate:
                return False
            node = node.parent
        return False


_installed: _Installed | None = None


def log_line(logger: logging.Logger, level: int, message: str, fields: dict[str, object]) -> None:
    """`logger.log(level, message, extra=fields)` for a message with nothing left to format.

    While logging is as `setup_logging` left it, the line is formatted here and written straight to the
    handler's stream: a LogRecord and its way through the logging machinery cost about 15 µs, a sixth of
    a poll answered from the gateway's own state. The line reads the same either way; a line holding a
    secret, or any other set-up (a handler added by a test or an embedding program), takes the usual way.
    """
    if not logger.isEnabledFor(level):
        return
    if "request_id" not in fields and (current := request_id.get()) is not None:
        fields["request_id"] = current  # as RequestIdFilter would
    direct = _installed
    if direct is not None and direct.alone_on(logger, level):
        line = direct.formatter.line(time.time(), logging.getLevelName(level), logger.name, message, fields)
        if direct.redact.clean(line):
            with contextlib.suppress(Exception):  # a failed write takes the usual way, which reports it
                direct.handler.write_line(line)
                return
    logger.log(level, message, extra=fields)


def setup_logging(config: Config, stream: TextIO | None = None) -> None:
    """Send the gateway's logs to stderr (or `stream`) in the configured format, secrets scrubbed."""
    global _installed
    handler = TurnFlushingHandler(stream or _buffered_stderr())
    formatter = JsonFormatter() if config.log.format == "json" else TextFormatter()
    handler.setFormatter(formatter)
    redact = secrets_filter(config)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(redact)
    _installed = _Installed(handler, formatter, redact)
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
