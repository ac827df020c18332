"""Shared fixtures: a real simulator and a real gateway, both aiohttp servers on loopback."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.appkeys import GATEWAY
from gateway.clock import ManualClock
from gateway.config import Config, parse_config
from gateway.fastpath import GatewayRunner
from gateway.service import Gateway
from gateway.simulator import SIMULATOR_STATE, SimulatorConfig, SimulatorState, create_simulator_app

KEY_A = "sk-test-alpha-0000000001"
KEY_B = "sk-test-bravo-0000000002"
KEY_C = "sk-test-charlie-00000003"
TOKEN = "tok-team-a-0123456789abcdef"
BODY = {"model": "agnes-video-v2.0", "prompt": "A cat playing piano in a jazz bar"}

Client = TestClient[web.Request, web.Application]

POSTGRES_URL_ENV = "AGNES_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")
#: Runs a test once per backend: its `database` fixture is a SQLite file, then a fresh PostgreSQL schema.
both_backends = pytest.mark.parametrize("database", BACKENDS, indirect=True)


def postgres_url() -> str:
    """The test PostgreSQL server; skips the calling test without one, or fails it when `CI` is set."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        return url
    reason = f"{POSTGRES_URL_ENV} is not set (bash scripts/test.sh starts a throw-away PostgreSQL)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the PostgreSQL tests must run", pytrace=False)
    pytest.skip(reason)


def with_search_path(url: str, schema: str) -> str:
    """`url` with its tables in `schema` (asyncpg passes unknown URL parameters on as server settings)."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, f"search_path={schema}") if q)
    return parts._replace(query=query).geturl()


@asynccontextmanager
async def postgres_schema(url: str) -> AsyncIterator[str]:
    """A fresh, empty schema on the test server, as a database URL of its own; dropped afterwards."""
    import asyncpg

    name = f"test_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    try:
        yield with_search_path(url, name)
    finally:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"DROP SCHEMA {name} CASCADE")
        finally:
            await conn.close()


@dataclass
class Upstream:
    """The running simulator: its base URL and its state, for asserting what reached it."""

    server: TestServer
    state: SimulatorState

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@dataclass
class Running:
    """A running gateway: a client for it, its app and its config."""

    client: Client
    app: web.Application
    config: Config

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def handled_by_aiohttp(self) -> int:
        """Requests aiohttp's own request handling has taken so far (not those of the poll fast path)."""
        runner = self.client.server.runner
        assert runner is not None and runner.server is not None
        return runner.server.requests_count

    async def create(self, body: dict[str, Any] | None = None, **headers: str) -> aiohttp.ClientResponse:
        return await self.client.post("/v1/videos", json=body or BODY, headers=headers)

    async def poll(self, task_id: str, **headers: str) -> aiohttp.ClientResponse:
        return await self.client.get(f"/v1/videos/{task_id}", headers=headers)


class GatewayServer(TestServer):
    """A test server running the app as `serve` does: with the fast path for polls.

    `runner_options` go to its runner as `serve` passes its own (e.g. `keepalive_timeout`).
    """

    def __init__(self, app: web.Application, **runner_options: Any) -> None:
        super().__init__(app)
        self.runner_options = runner_options

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return GatewayRunner(self.app, **kwargs, **self.runner_options)


@pytest.fixture
def clock() -> ManualClock:
    # 12:00 in Shanghai: the quota day started at midnight there.
    return ManualClock(current=datetime(2026, 3, 2, 4, 0, tzinfo=UTC))


@pytest.fixture
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Where the test's gateway keeps its state: a SQLite file, or a fresh PostgreSQL schema (`both_backends`)."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield str(tmp_path / "gateway.db")
        return
    async with postgres_schema(postgres_url()) as url:
        yield url


@pytest.fixture
async def make_upstream(aiohttp_server: Any, clock: ManualClock) -> Callable[..., Awaitable[Upstream]]:
    async def make(keys: dict[str, int | None] | None = None, **settings: Any) -> Upstream:
        config = SimulatorConfig(keys=keys or {KEY_A: 100, KEY_B: 100, KEY_C: 100}, task_seconds=10, **settings)
        app = create_simulator_app(config, clock=clock)
        server = await aiohttp_server(app)
        return Upstream(server, app[SIMULATOR_STATE])

    return make


@pytest.fixture
async def upstream(make_upstream: Callable[..., Awaitable[Upstream]]) -> Upstream:
    return await make_upstream()


SECONDS_PER_POLL = 4.0


@pytest.fixture
async def ticking_upstream(aiohttp_server: Any, clock: ManualClock) -> Upstream:
    """A simulator whose clock moves on SECONDS_PER_POLL after each poll: a 10 s video is done by the 4th poll,
    so polling loops (the openai SDK's, `generate`'s) finish without waiting for time to pass."""
    app = create_simulator_app(SimulatorConfig(keys={KEY_A: 100, KEY_B: 100, KEY_C: 100}, task_seconds=10), clock=clock)

    async def advance_on_poll(request: web.Request, response: web.StreamResponse) -> None:
        if request.method == "GET" and request.path.startswith("/v1/videos/"):
            clock.advance(SECONDS_PER_POLL)

    app.on_response_prepare.append(advance_on_poll)
    server = await aiohttp_server(app)
    return Upstream(server, app[SIMULATOR_STATE])


def gateway_config(upstream_url: str, database: Path | str, **overrides: Any) -> dict[str, Any]:
    """A config document with three keys (a, b at priority 0; c a backup) and no clients."""
    doc: dict[str, Any] = {
        "upstream": {"base_url": upstream_url, "timeout_s": 2},
        "database": str(database),
        "keys": [
            {"name": "a", "key": KEY_A, "daily_limit": 10},
            {"name": "b", "key": KEY_B, "daily_limit": 10},
            {"name": "c", "key": KEY_C, "daily_limit": 10, "priority": 1},
        ],
    }
    doc.update(overrides)
    return doc


@pytest.fixture
async def make_gateway(
    database: str, aiohttp_client: Any, upstream: Upstream, clock: ManualClock
) -> Callable[..., Awaitable[Running]]:
    """Start a gateway in front of `upstream` on `database`; keyword arguments override parts of the config."""

    async def make(doc: dict[str, Any] | None = None, **overrides: Any) -> Running:
        config = parse_config(doc or gateway_config(upstream.url, database, **overrides))
        app = create_app(config, clock=clock)
        client: Client = await aiohttp_client(GatewayServer(app))
        return Running(client, app, config)

    return make


@pytest.fixture
async def gw(make_gateway: Callable[..., Awaitable[Running]]) -> Running:
    return await make_gateway()


async def direct_poll(upstream: Upstream, key: str, task_id: str) -> tuple[int, bytes]:
    """Poll the simulator directly, to compare with what the gateway passed on."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{upstream.url}/v1/videos/{task_id}", headers={"Authorization": f"Bearer {key}"}) as resp,
    ):
        return resp.status, await resp.read()
