"""Logging: plain text or JSON lines, with every configured secret scrubbed as a last guard."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable

from .config import Config, Secret

REDACTED = "[REDACTED]"


class RedactSecrets(logging.Filter):
    """Replaces any configured secret in a record's final message, whatever put it there."""

    def __init__(self, secrets: Iterable[Secret]) -> None:
        super().__init__()
        self.values = sorted({s.reveal() for s in secrets if s.reveal()}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(v in message for v in self.values):
            for value in self.values:
                message = message.replace(value, REDACTED)
            record.msg, record.args = message, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(config: Config) -> None:
    """Send the gateway's logs to stderr in the configured format, secrets scrubbed."""
    handler = logging.StreamHandler(sys.stderr)
    if config.log.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(secrets_filter(config))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def secrets_filter(config: Config) -> RedactSecrets:
    secrets: list[Secret] = [k.secret for k in config.keys] + [c.token for c in config.clients]
    if config.admin_token is not None:
        secrets.append(config.admin_token)
    return RedactSecrets(secrets)
