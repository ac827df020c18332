"""Several gateways sharing one database: quota, key states and task routes seen alike by all."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from gateway.clock import ManualClock
from gateway.config import load_config, parse_config
from gateway.pool import LOCAL_REFRESH_S, KeyPool
from gateway.simulator import Fault
from gateway.store import KeyState, SQLiteStore, mask_password, open_store

from .conftest import BODY, KEY_A, KEY_B, Running, Upstream, both_backends
from .procs import free_port, start, stop, wait_ready

MakeGateway = Callable[..., Awaitable[Running]]
on_postgresql = pytest.mark.parametrize("database", ["postgresql"], indirect=True)

ADMIN_TOKEN = "admin-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

#: a first, b only when a cannot take the create: which key a create lands on is never a matter of turns.
A_THEN_B = [
    {"name": "a", "key": KEY_A, "daily_limit": 10, "priority": 0},
    {"name": "b", "key": KEY_B, "daily_limit": 10, "priority": 1},
]


async def states(gw: Running) -> dict[str, KeyState]:
    pool, now = gw.gateway.pool, gw.gateway.clock.now()
    await pool.refresh(now)
    return {s.name: s.state(now.timestamp()) for s in pool.statuses()}


async def pair(make_gateway: MakeGateway, **overrides: object) -> tuple[Running, Running]:
    """Two gateways on the same database, as two replicas behind a load balancer."""
    return await make_gateway(**overrides), await make_gateway(**overrides)


@on_postgresql
async def test_a_key_disabled_through_one_gateway_is_skipped_by_the_other(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    one, two = await pair(make_gateway, keys=A_THEN_B)
    upstream.state.add_fault(Fault(kind="status", status=401, key=KEY_A, times=1))
    assert (await one.create()).status == 200  # a refused (401) and disabled, b answered
    assert upstream.state.requests == 2
    for _ in range(3):
        assert (await two.create()).status == 200
    # The other gateway never tried a: one request per create, all on b.
    assert upstream.state.requests == 5
    assert (upstream.state.creates[KEY_A], upstream.state.creates[KEY_B]) == (0, 4)
    assert (await states(two))["a"] is KeyState.DISABLED

    # Enabled again through the second gateway: the first one uses it at once.
    await two.gateway.pool.enable(two.config.keys[0])
    assert (await one.create()).status == 200
    assert upstream.state.creates[KEY_A] == 1


@on_postgresql
async def test_spent_and_cooling_keys_are_skipped_by_every_gateway(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    one, two = await pair(make_gateway, keys=A_THEN_B)
    upstream.state.add_fault(Fault(kind="rate_limit", retry_after=30, key=KEY_A, times=1))
    assert (await one.create()).status == 200
    assert (await two.create()).status == 200
    assert (upstream.state.creates[KEY_A], upstream.state.requests) == (0, 3)
    assert (await states(two))["a"] is KeyState.COOLING
    clock.advance(30)
    assert (await two.create()).status == 200
    assert upstream.state.creates[KEY_A] == 1

    upstream.state.add_fault(Fault(kind="quota", key=KEY_A, times=1))
    assert (await two.create()).status == 200
    requests = upstream.state.requests
    assert (await one.create()).status == 200
    assert upstream.state.requests == requests + 1
    assert upstream.state.creates[KEY_A] == 1
    assert (await states(one))["a"] is KeyState.SPENT


@both_backends
async def test_counts_are_shared_and_never_overshot_together(make_gateway: MakeGateway, upstream: Upstream) -> None:
    one, two = await pair(make_gateway, keys=[{"name": "a", "key": KEY_A, "daily_limit": 12}])
    for _ in range(3):
        assert (await one.create()).status == 200
    # The second gateway knows of the first one's creates before it chooses.
    await two.gateway.pool.refresh(two.gateway.clock.now(), force=True)
    assert two.gateway.pool.statuses()[0].used == 3
    answers = await asyncio.gather(*(gw.create() for gw in (one, two) * 10))
    assert sorted(r.status for r in answers) == [200] * 9 + [429] * 11
    assert upstream.state.creates[KEY_A] == 12


@both_backends
async def test_one_idempotency_key_makes_one_task_across_gateways(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    one, two = await pair(make_gateway)
    upstream.state.add_fault(Fault(kind="hold", operation="create", times=1))
    same_key = {"Idempotency-Key": "order-42"}
    first = asyncio.ensure_future(one.create(**same_key))
    await asyncio.wait_for(upstream.state.until_held(1), 5)  # the first create is upstream, its key claimed
    second = asyncio.ensure_future(two.create(**same_key))
    await asyncio.sleep(0.2)  # the second gateway finds the key claimed and waits
    assert not second.done()
    assert await upstream.state.release_held() == 1
    answers = await asyncio.gather(first, second)
    assert [r.status for r in answers] == [200, 200]
    ids = [(await r.json())["task_id"] for r in answers]
    assert ids[0] == ids[1]
    assert answers[1].headers.get("Idempotent-Replayed") == "true"
    assert sum(upstream.state.creates.values()) == 1
    # The claim is given up once the route is recorded: a later create with the key is answered at once.
    again = await two.create(**same_key)
    assert (await again.json())["task_id"] == ids[0]
    assert sum(upstream.state.creates.values()) == 1


async def test_a_stale_idempotency_claim_is_taken_over(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "claims.db"))
    await store.open()
    try:
        assert await store.claim_idempotency("team", "k", 1000.0, 900.0)
        assert not await store.claim_idempotency("team", "k", 1010.0, 910.0)  # held, and fresh
        assert await store.claim_idempotency("other-team", "k", 1010.0, 910.0)  # keys are per client
        assert await store.claim_idempotency("team", "k", 1200.0, 1100.0)  # its holder died long ago
        await store.release_idempotency("team", "k")
        assert await store.claim_idempotency("team", "k", 1201.0, 1101.0)
    finally:
        await store.close()


@both_backends
async def test_a_task_made_through_one_gateway_polls_through_the_other(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    one, two = await pair(make_gateway)
    ids = [(await (await one.create()).json())["task_id"] for _ in range(4)]
    for task_id in ids:
        resp = await two.poll(task_id)
        assert resp.status == 200
        assert (await resp.json())["status"] in {"queued", "in_progress"}
    # Straight to each task's key: no other key was asked.
    assert sum(upstream.state.polls.values()) == len(ids)


async def test_gateways_on_one_sqlite_file_catch_up_with_each_other_within_a_second(
    make_gateway: MakeGateway, upstream: Upstream, clock: ManualClock
) -> None:
    one, two = await pair(make_gateway, keys=A_THEN_B)
    assert (await two.create()).status == 200  # two has just read the file
    upstream.state.add_fault(Fault(kind="status", status=401, key=KEY_A, times=1))
    assert (await one.create()).status == 200  # a disabled through one
    clock.advance(LOCAL_REFRESH_S)
    requests = upstream.state.requests
    assert (await two.create()).status == 200
    assert upstream.state.requests == requests + 1  # straight to b: two has caught up
    assert (upstream.state.creates[KEY_A], upstream.state.creates[KEY_B]) == (1, 2)


# --- real replicas: three processes on one PostgreSQL ------------------------------------------


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_three_replicas_share_quota_key_states_and_tasks(
    upstream: Upstream, database: str, tmp_path: Path
) -> None:
    # A password in the URL (the test server trusts loopback, so it is never checked) must never be shown.
    url = with_password(database, "pw-never-shown-7")
    secret = urlsplit(url).password
    assert secret
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "upstream": {"base_url": upstream.url, "timeout_s": 5},
                "database": url,
                "admin_token": ADMIN_TOKEN,
                "keys": [
                    {"name": "a", "key": KEY_A, "daily_limit": 10, "priority": 0},
                    {"name": "b", "key": KEY_B, "daily_limit": 13, "priority": 1},
                ],
            }
        )
    )
    ports = [free_port() for _ in range(3)]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    procs = await asyncio.gather(*(start(["serve", "--config", str(config), "--port", str(p)]) for p in ports))
    outputs: list[bytes] = []
    store = open_store(database)
    await store.open()
    try:
        await asyncio.gather(*(wait_ready(f"{base}/healthz", proc) for base, proc in zip(bases, procs, strict=True)))
        async with aiohttp.ClientSession() as session:

            async def create(replica: int) -> tuple[int, str | None]:
                async with session.post(f"{bases[replica]}/v1/videos", json=BODY) as resp:
                    doc = await resp.json()
                    return resp.status, doc.get("task_id")

            async def poll(replica: int, task_id: str) -> int:
                async with session.get(f"{bases[replica]}/v1/videos/{task_id}") as resp:
                    return resp.status

            async def admin(replica: int, method: str, path: str) -> dict[str, Any]:
                async with session.request(method, f"{bases[replica]}/admin{path}", headers=ADMIN) as resp:
                    assert resp.status == 200, await resp.text()
                    doc: dict[str, Any] = await resp.json()
                    return doc

            # Key a disabled through replica 0's admin API: every replica skips it from then on.
            await admin(0, "POST", "/keys/a/disable")
            made: list[tuple[int, str]] = []
            for replica in (1, 2, 0):
                status, task_id = await create(replica)
                assert status == 200 and task_id
                made.append((replica, task_id))
            assert (upstream.state.creates[KEY_A], upstream.state.creates[KEY_B], upstream.state.requests) == (0, 3, 3)
            table = await admin(1, "GET", "/keys")
            assert {k["name"]: (k["state"], k["used"]) for k in table["keys"]} == {
                "a": ("disabled", 0),
                "b": ("active", 3),
            }

            # Enabled again through replica 2: 10 units of a and 10 of b are left, for 60 creates at once.
            await admin(2, "POST", "/keys/a/enable")
            answers = await asyncio.gather(*(create(i % 3) for i in range(60)))
            assert sorted(status for status, _ in answers) == [200] * 20 + [429] * 40
            assert (upstream.state.creates[KEY_A], upstream.state.creates[KEY_B]) == (10, 13)
            made += [(i % 3, task_id) for i, (status, task_id) in enumerate(answers) if task_id]
            assert len(made) == 23

            # Every task polls through another replica, straight on its own key.
            polls = sum(upstream.state.polls.values())
            codes = await asyncio.gather(*(poll((replica + 1) % 3, task_id) for replica, task_id in made))
            assert codes == [200] * 23
            assert sum(upstream.state.polls.values()) == polls + 23

            # Replica 0 dies without a goodbye: its tasks and counts live on in the database.
            outputs.append(await stop(procs[0], signal.SIGKILL))
            codes = await asyncio.gather(*(poll(1 + i % 2, task_id) for i, (_, task_id) in enumerate(made)))
            assert codes == [200] * 23
            assert [(await create(1))[0], (await create(2))[0]] == [429, 429]
            today = load_config(str(config)).schedule.day_key(datetime.now(UTC))
            assert await store.usage(today) == {"a": 10, "b": 13}
    finally:
        await store.close()
        outputs += [await stop(proc) for proc in procs[1:]]
    text = b"".join(outputs).decode(errors="replace")
    assert mask_password(url) in text  # the startup line names the database...
    assert secret not in text  # ...never with its password
    for secret_value in (KEY_A, KEY_B, ADMIN_TOKEN):
        assert secret_value not in text


def with_password(url: str, password: str) -> str:
    """`url` with a password, unless it has one already."""
    parts = urlsplit(url)
    if parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or 'postgres'}:{password}@{host}").geturl()


class CountingStore(SQLiteStore):
    """A real SQLite store that counts how often the pool reads its state."""

    reads = 0

    async def usage(self, day: str) -> dict[str, int]:
        self.reads += 1
        return await super().usage(day)


async def test_creates_arriving_together_share_one_read_of_the_pool_state(tmp_path: Path, clock: ManualClock) -> None:
    store = CountingStore(str(tmp_path / "g.db"))
    await store.open()
    try:
        config = parse_config({"database": store.path, "keys": A_THEN_B})
        pool = KeyPool(config.keys, store, config.schedule)
        await pool.load(clock.now())
        store.reads = 0
        await asyncio.gather(*(pool.refresh(clock.now()) for _ in range(50)))
        # One read for the first caller, one more for those that arrived while it ran.
        assert 1 <= store.reads <= 2
        await pool.refresh(clock.now())
        assert store.reads <= 3
    finally:
        await store.close()
