"""Hot reload through `POST /admin/reload`: keys join and leave, limits change, counts and routes stay."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.config import load_config
from gateway.fastpath import FAST_PATH_AIOHTTP
from gateway.logs import REDACTED, RedactSecrets
from gateway.simulator import Fault

from .conftest import KEY_A, KEY_B, KEY_C, TOKEN, GatewayServer, Running, Upstream, gateway_config

ADMIN = "adm-0123456789abcdef-secret"
AUTH = {"Authorization": f"Bearer {ADMIN}"}

Start = Callable[[], Awaitable[Running]]


class ConfigFile:
    """The gateway's YAML file, rewritten by the tests as an operator would."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc
        self.write()

    def write(self, text: str | None = None) -> None:
        self.path.write_text(text if text is not None else yaml.safe_dump(self.doc, allow_unicode=True))


@pytest.fixture
def config_file(upstream: Upstream, tmp_path: Path) -> ConfigFile:
    doc = gateway_config(upstream.url, tmp_path / "g.db", admin_token=ADMIN)
    doc["keys"] = [{"name": "a", "key": KEY_A, "daily_limit": 5}]
    return ConfigFile(tmp_path / "gateway.yaml", doc)


@pytest.fixture
def start(aiohttp_client: Any, config_file: ConfigFile, clock: ManualClock) -> Start:
    async def make() -> Running:
        config = load_config(config_file.path)
        app = create_app(config, clock=clock, reload_config=lambda: load_config(config_file.path))
        return Running(await aiohttp_client(GatewayServer(app)), app, config)

    return make


async def reload(gw: Running) -> tuple[int, dict[str, Any]]:
    resp = await gw.client.post("/admin/reload", headers=AUTH)
    return resp.status, await resp.json()


async def key_table(gw: Running) -> dict[str, Any]:
    resp = await gw.client.get("/admin/keys", headers=AUTH)
    assert resp.status == 200
    doc: dict[str, Any] = await resp.json()
    return doc


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Yield to the event loop until `condition` holds (bounded: 2 s)."""
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


async def test_reload_adds_a_key_while_creates_are_running(
    start: Start, config_file: ConfigFile, upstream: Upstream
) -> None:
    gw = await start()
    upstream.state.add_fault(Fault(kind="slow", delay_s=0.5, key=KEY_A, operation="create", times=-1))
    in_flight = [asyncio.ensure_future(gw.create()) for _ in range(4)]
    await wait_for(lambda: upstream.state.requests == 4, "four creates to reach upstream")

    config_file.doc["keys"].append({"name": "b", "key": KEY_B, "daily_limit": 3})
    config_file.doc["keys"][0]["daily_limit"] = 6
    config_file.write()
    status, report = await reload(gw)
    assert status == 200
    assert (report["keys_added"], report["keys_removed"], report["keys_changed"]) == (["b"], [], ["a"])
    assert report["needs_restart"] == []
    assert not any(t.done() for t in in_flight)  # the reload happened while they were upstream

    # While the first four are still upstream, more creates arrive: the new key and a share them.
    later = await asyncio.gather(*(gw.create() for _ in range(5)))
    answers = [await t for t in in_flight] + list(later)
    assert [r.status for r in answers] == [200] * 9
    assert (upstream.state.creates[KEY_A], upstream.state.creates[KEY_B]) == (6, 3)
    assert (await gw.create()).status == 429  # 6 + 3 used: the limits from the new file hold

    keys = {k["name"]: k for k in (await key_table(gw))["keys"]}
    assert (keys["a"]["used"], keys["b"]["used"]) == (6, 3)
    assert await gw.gateway.store.usage(gw.gateway.pool.day) == {"a": 6, "b": 3}
    for resp in answers:  # every route, in flight during the reload or not, was kept
        task_id = (await resp.json())["task_id"]
        assert (await gw.poll(task_id)).status == 200


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("keys: [{name: a, key: sk-test-alpha-0000000001\n", "not valid YAML"),
        ("keys: []\n", "keys: must be a non-empty list"),
        ("keys:\n  - {name: a, key_env: NOT_SET_ANYWHERE_4711}\n", "keys[0].key_env"),
        ("keys:\n  - {name: a, key: sk-x-000000000001}\nlisten: {colour: red}\n", "listen.colour"),
    ],
)
async def test_reload_with_a_broken_file_keeps_the_running_config(
    start: Start, config_file: ConfigFile, upstream: Upstream, caplog: pytest.LogCaptureFixture, text: str, reason: str
) -> None:
    gw = await start()
    assert (await gw.create()).status == 200
    before = gw.gateway.config
    config_file.write(text)
    status, doc = await reload(gw)
    assert status == 400
    assert doc["error"]["code"] == "reload_refused"
    assert reason in doc["error"]["message"]
    refused = [r for r in caplog.records if r.levelno == logging.ERROR and "reload refused" in r.getMessage()]
    assert len(refused) == 1 and reason in refused[0].getMessage()
    assert KEY_A not in doc["error"]["message"] and KEY_A not in refused[0].getMessage()
    # Still the running config: the same keys, the same count, creates and the admin token still work.
    assert gw.gateway.config is before
    assert (await gw.create()).status == 200
    assert (await key_table(gw))["keys"][0]["used"] == 2


async def test_removed_key_takes_no_creates_but_its_tasks_still_poll(
    start: Start, config_file: ConfigFile, upstream: Upstream
) -> None:
    config_file.doc["keys"].append({"name": "b", "key": KEY_B, "daily_limit": 5})
    config_file.write()
    gw = await start()
    ids = [(await (await gw.create()).json())["task_id"] for _ in range(4)]
    on_b = [t for t in ids if upstream.state.tasks[t].key == KEY_B]
    assert len(on_b) == 2

    del config_file.doc["keys"][1]
    config_file.write()
    status, report = await reload(gw)
    assert (status, report["keys_removed"]) == (200, ["b"])
    table = await key_table(gw)
    assert [k["name"] for k in table["keys"]] == ["a"] and table["retired"] == ["b"]

    for _ in range(3):
        assert (await gw.create()).status == 200
    assert upstream.state.creates[KEY_B] == 2  # no new creates on b
    polls_on_b = upstream.state.polls[KEY_B]
    for task_id in on_b:
        resp = await gw.poll(task_id)
        assert resp.status == 200
        assert (await resp.json())["status"] in {"queued", "in_progress"}
    assert upstream.state.polls[KEY_B] == polls_on_b + 2  # straight to b, the key that made them
    resp = await gw.client.get(f"/admin/tasks/{on_b[0]}", headers=AUTH)
    assert (await resp.json())["key"] == "b"

    # Put back, b keeps the count it had: nothing was lost while it was out.
    config_file.doc["keys"].append({"name": "b", "key": KEY_B, "daily_limit": 5})
    config_file.write()
    assert (await reload(gw))[0] == 200
    keys = {k["name"]: k for k in (await key_table(gw))["keys"]}
    assert keys["b"]["used"] == 2 and (await key_table(gw))["retired"] == []


async def test_changed_limits_apply_at_once(start: Start, config_file: ConfigFile, upstream: Upstream) -> None:
    config_file.doc["clients"] = [{"name": "team-a", "token": TOKEN, "daily_limit": 10}]
    config_file.write()
    gw = await start()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for _ in range(3):
        assert (await gw.create(**auth)).status == 200

    config_file.doc["keys"][0]["daily_limit"] = 3
    config_file.write()
    assert (await reload(gw))[0] == 200
    resp = await gw.create(**auth)
    assert (await resp.json())["error"]["code"] == "all_keys_exhausted"

    config_file.doc["keys"][0]["daily_limit"] = 10
    config_file.doc["clients"][0]["daily_limit"] = 4
    config_file.write()
    assert (await reload(gw))[0] == 200
    assert (await gw.create(**auth)).status == 200
    resp = await gw.create(**auth)
    assert (await resp.json())["error"]["code"] == "client_quota_exceeded"
    assert upstream.state.creates[KEY_A] == 4


async def test_key_states_and_last_errors_survive_a_reload(
    start: Start, config_file: ConfigFile, upstream: Upstream
) -> None:
    config_file.doc["keys"].append({"name": "b", "key": KEY_B, "daily_limit": 5, "priority": 1})
    config_file.write()
    gw = await start()
    upstream.state.add_fault(Fault(kind="rate_limit", retry_after=60, key=KEY_A, times=1))
    assert (await gw.create()).status == 200  # a cools down, b answers
    before = {k["name"]: k for k in (await key_table(gw))["keys"]}
    assert before["a"]["state"] == "cooling" and before["a"]["last_error"]
    config_file.doc["keys"][1]["daily_limit"] = 6
    config_file.write()
    assert (await reload(gw))[0] == 200
    after = {k["name"]: k for k in (await key_table(gw))["keys"]}
    assert after["a"] == before["a"]
    assert (after["b"]["used"], after["b"]["remaining"]) == (1, 5)


async def test_options_that_need_a_restart_are_reported_and_kept(
    start: Start, config_file: ConfigFile, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start()
    running = gw.gateway.config
    config_file.doc["listen"] = {"port": 9999}
    config_file.doc["database"] = str(config_file.path.parent / "other.db")
    config_file.doc["shutdown"] = {"drain_s": 5}
    config_file.doc["upstream"]["timeout_s"] = 7
    config_file.write()
    status, report = await reload(gw)
    assert status == 200
    assert report["needs_restart"] == ["listen", "database", "shutdown.drain_s"]
    config = gw.gateway.config
    assert (config.listen, config.database, config.shutdown) == (running.listen, running.database, running.shutdown)
    assert config.upstream.timeout_s == 7 and gw.gateway.upstream.config.timeout_s == 7
    assert any("only after a restart" in r.getMessage() for r in caplog.records)


async def test_reload_refuses_to_drop_clients_on_a_public_listener(
    start: Start, config_file: ConfigFile, upstream: Upstream
) -> None:
    config_file.doc["listen"] = {"host": "0.0.0.0"}
    config_file.doc["clients"] = [{"name": "team-a", "token": TOKEN}]
    config_file.write()
    gw = await start()
    del config_file.doc["clients"]
    config_file.write()
    status, doc = await reload(gw)
    assert status == 400 and "clients" in doc["error"]["message"]
    assert (await gw.create()).status == 401  # still only known clients


async def test_reload_needs_a_config_file(make_gateway: Callable[..., Awaitable[Running]]) -> None:
    gw = await make_gateway(admin_token=ADMIN)  # built in memory, with nothing to re-read
    status, doc = await reload(gw)
    assert status == 400 and "without a config file" in doc["error"]["message"]


@pytest.fixture
def redacting_handler() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactSecrets([]))
    logging.getLogger().addHandler(handler)
    yield out
    logging.getLogger().removeHandler(handler)


async def test_log_redaction_learns_the_secrets_of_a_reloaded_config(
    start: Start, config_file: ConfigFile, redacting_handler: io.StringIO
) -> None:
    gw = await start()
    config_file.doc["keys"].append({"name": "c", "key": KEY_C})
    config_file.write()
    assert (await reload(gw))[0] == 200
    logging.getLogger("agnes_gateway.test").warning("leaked %s and %s", KEY_C, ADMIN)
    assert KEY_C not in redacting_handler.getvalue() and ADMIN not in redacting_handler.getvalue()
    assert redacting_handler.getvalue().count(REDACTED) == 2


@pytest.mark.skipif(not FAST_PATH_AIOHTTP.match(aiohttp.__version__), reason="no fast path on this aiohttp")
async def test_a_reload_turns_the_poll_fast_path_off_and_on(start: Start, config_file: ConfigFile) -> None:
    gw = await start()
    task_id = (await (await gw.create()).json())["task_id"]

    async def poll_taken_by_aiohttp() -> bool:
        before = gw.handled_by_aiohttp
        assert (await gw.poll(task_id)).status == 200
        return gw.handled_by_aiohttp == before + 1

    assert not await poll_taken_by_aiohttp()
    config_file.doc["poll"] = {"fast_path": False}
    config_file.write()
    assert (await reload(gw))[0] == 200
    assert await poll_taken_by_aiohttp()
    config_file.doc["poll"] = {"fast_path": True}
    config_file.write()
    assert (await reload(gw))[0] == 200
    assert not await poll_taken_by_aiohttp()
