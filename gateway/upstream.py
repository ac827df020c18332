"""The upstream client: creates and polls with a key over pooled keep-alive connections, and what each answer means."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Final

import aiohttp

from .bodies import SpooledBody
from .config import KeyConfig, UpstreamConfig
from .http1 import ConnectFailed, ConnectionBroken, Http1Pool

MAX_ANSWER_BYTES: Final = 1024 * 1024
#: Idle upstream connections are kept this long, so clients polling every 5-10 s reuse them.
IDLE_S: Final = 30.0


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
    """Creates and polls tasks upstream with a given key, and classifies the answers.

    API calls go over `http` (a lean keep-alive client for small JSON answers); `session` is the
    aiohttp session for everything else (video downloads from any host).
    """

    def __init__(self, config: UpstreamConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self.http = Http1Pool(
            config.base_url,
            max_connections=config.max_connections,
            connect_timeout_s=config.connect_timeout_s,
            max_answer_bytes=MAX_ANSWER_BYTES,
            timeout_s=config.timeout_s,
            idle_s=IDLE_S,
        )
        self._quota_re = re.compile(config.quota_pattern)
        self._auth: dict[str, tuple[str, tuple[str, str]]] = {}

    @staticmethod
    def new_session(config: UpstreamConfig) -> aiohttp.ClientSession:
        """The session for video downloads, with a connection pool sized by the config."""
        connector = aiohttp.TCPConnector(limit=config.max_connections, ttl_dns_cache=300, keepalive_timeout=IDLE_S)
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            # Cookies one answer might set must never ride along with another call.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        """Close the API connections (the session is closed by its owner)."""
        await self.http.close()

    async def create(self, key: KeyConfig, body: bytes | SpooledBody, content_type: str) -> Answer:
        """POST /v1/videos with `key`; `body` goes out exactly as the client sent it (streamed when spooled)."""
        headers = [self._authorization(key), ("Content-Type", content_type)]
        if isinstance(body, SpooledBody):
            headers.append(("Content-Length", str(body.size)))
            return await self._call("POST", "/v1/videos", headers, body.chunks())
        return await self._call("POST", "/v1/videos", headers, body)

    async def poll(self, key: KeyConfig, task_id: str) -> Answer:
        """GET /v1/videos/{task_id} with `key`; `task_id` must already be validated."""
        return await self._call("GET", f"/v1/videos/{task_id}", (self._authorization(key),), None)

    def _authorization(self, key: KeyConfig) -> tuple[str, str]:
        """The key's Authorization header, built once per key and secret."""
        secret = key.secret.reveal()
        known = self._auth.get(key.name)
        if known is None or known[0] != secret:
            known = (secret, ("Authorization", f"Bearer {secret}"))
            self._auth[key.name] = known
        return known[1]

    async def _call(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> Answer:
        try:
            answer = await self.http.request(method, path, headers, body)
        except ConnectFailed as exc:
            raise UpstreamUnreachable(str(exc)) from None
        except TimeoutError:
            raise UpstreamTimeout(f"no answer from upstream within {self.config.timeout_s:g} s") from None
        except (ConnectionBroken, OSError) as exc:
            raise UpstreamBroken(f"upstream connection failed ({exc})") from None
        return self.classify(answer.status, answer.body, answer.headers)

    def classify(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> Answer:
        """Tell a spent quota from a rate limit from a refused key from a bad request (header names lower-case)."""
        headers = headers or {}
        content_type = headers.get("content-type", "application/json")
        retry_after = parse_retry_after(headers.get("retry-after"))
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
