"""The upstream client: one shared `ClientSession`, and what each answer means for the pool."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Final

import aiohttp

from .bodies import SpooledBody
from .config import KeyConfig, UpstreamConfig

MAX_ANSWER_BYTES: Final = 1024 * 1024


class Outcome(StrEnum):
    """What an upstream answer means for the key that got it."""

    OK = "ok"
    QUOTA = "quota"  # the key's daily quota is spent
    RATE_LIMIT = "rate_limit"  # slow down, the key is fine
    AUTH = "auth"  # the key itself was refused
    NOT_FOUND = "not_found"
    CLIENT_ERROR = "client_error"  # the request was wrong: the client's to fix
    SERVER_ERROR = "server_error"


@dataclass(frozen=True)
class Answer:
    """An upstream answer, kept byte for byte so it can be passed on unchanged."""

    status: int
    body: bytes
    content_type: str
    outcome: Outcome
    retry_after: float | None = None


class UpstreamError(Exception):
    """No usable answer came back."""

    #: True when the request provably never reached upstream, so a retry cannot double it.
    not_sent: bool = False


class UpstreamUnreachable(UpstreamError):
    """The connection could not be made: nothing was sent."""

    not_sent = True


class UpstreamTimeout(UpstreamError):
    """Sent, but no answer in time: the outcome is unknown."""


class UpstreamBroken(UpstreamError):
    """The connection broke after sending: the outcome is unknown."""


class UpstreamClient:
    """Creates and polls tasks upstream with a given key, and classifies the answers."""

    def __init__(self, config: UpstreamConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self._quota_re = re.compile(config.quota_pattern)
        self._videos_url = config.base_url + "/v1/videos"
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s, connect=config.connect_timeout_s)

    @staticmethod
    def new_session(config: UpstreamConfig) -> aiohttp.ClientSession:
        """The one session for all upstream calls, with a connection pool sized by the config."""
        # Idle connections live 30 s, so clients polling every 5-10 s reuse them instead of reconnecting.
        connector = aiohttp.TCPConnector(limit=config.max_connections, ttl_dns_cache=300, keepalive_timeout=30)
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            # Answers are small JSON documents: no compression to negotiate and undo on every call.
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            # Cookies one key's answer might set must never ride along with another key's calls.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def create(self, key: KeyConfig, body: bytes | SpooledBody, content_type: str) -> Answer:
        """POST /v1/videos with `key`; `body` goes out exactly as the client sent it (streamed when spooled)."""
        headers = {"Authorization": f"Bearer {key.secret.reveal()}", "Content-Type": content_type}
        if isinstance(body, SpooledBody):
            headers["Content-Length"] = str(body.size)
            return await self._call("POST", self._videos_url, headers, body.chunks())
        return await self._call("POST", self._videos_url, headers, body)

    async def poll(self, key: KeyConfig, task_id: str) -> Answer:
        """GET /v1/videos/{task_id} with `key`; `task_id` must already be validated."""
        headers = {"Authorization": f"Bearer {key.secret.reveal()}"}
        return await self._call("GET", f"{self._videos_url}/{task_id}", headers, None)

    async def _call(
        self, method: str, url: str, headers: dict[str, str], body: bytes | AsyncIterator[bytes] | None
    ) -> Answer:
        try:
            async with self.session.request(
                method, url, headers=headers, data=body, timeout=self._timeout, allow_redirects=False
            ) as resp:
                data = await resp.content.read(MAX_ANSWER_BYTES)
                return self.classify(resp.status, data, resp.headers)
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(f"cannot connect to upstream ({type(exc).__name__})") from None
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamUnreachable("timed out connecting to upstream") from None
        except TimeoutError:
            raise UpstreamTimeout(f"no answer from upstream within {self.config.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(f"upstream connection failed ({type(exc).__name__})") from None

    def classify(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Answer:
        """Tell a spent quota from a rate limit from a refused key from a bad request."""
        headers = headers or {}
        content_type = headers.get("Content-Type", "application/json")
        retry_after = parse_retry_after(headers.get("Retry-After"))
        if status < 300:
            outcome = Outcome.OK
        elif status in self.config.quota_statuses and self._quota_re.search(body.decode("utf-8", "replace")):
            outcome = Outcome.QUOTA
        elif status == 429:
            outcome = Outcome.RATE_LIMIT
        elif status == 401:
            outcome = Outcome.AUTH
        elif status == 404:
            outcome = Outcome.NOT_FOUND
        elif status < 500:
            outcome = Outcome.CLIENT_ERROR
        else:
            outcome = Outcome.SERVER_ERROR
        return Answer(status, body, content_type, outcome, retry_after)


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number or an HTTP date (RFC 9110); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)
