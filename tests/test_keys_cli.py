"""`agnes-gateway keys`: the key table and key actions, from the database or through a running gateway."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from gateway.clock import ManualClock
from gateway.store import KeyState

from .conftest import KEY_A, KEY_B, Running, Upstream, gateway_config
from .procs import start, wait_exit

MakeGateway = Callable[..., Awaitable[Running]]
ADMIN = "adm-0123456789abcdef-secret"


async def keys_command(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `agnes-gateway keys ARGS` without blocking the event loop the test gateway runs on."""
    proc = await start(["keys", *args], env=env)
    out = (await wait_exit(proc, within_s=30)).decode()
    assert proc.returncode is not None
    return proc.returncode, out


async def test_keys_from_the_database_without_a_running_gateway(
    make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path, clock: ManualClock
) -> None:
    clock.set(datetime.now(UTC))  # the command reads today's counts by the real clock
    doc = gateway_config(upstream.url, tmp_path / "g.db")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(doc))
    gw = await make_gateway(doc)
    for _ in range(3):
        assert (await gw.create()).status == 200
    await gw.client.close()  # the gateway stops; the database stays

    code, out = await keys_command("--config", str(config))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("quota day ")
    assert lines[1].split() == [
        "NAME",
        "SECRET",
        "PRIO",
        "LIMIT",
        "USED",
        "LEFT",
        "STATE",
        "UNTIL",
        "REASON",
        "LAST",
        "ERROR",
    ]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"a", "b", "c"}
    assert rows["c"][1:7] == ["…" + doc["keys"][2]["key"][-4:], "1", "10", "0", "10", "active"]
    assert sum(int(rows[name][4]) for name in rows) == 3  # the USED column: today's counts from the database
    assert KEY_A not in out and KEY_B not in out

    code, out = await keys_command("disable", "b", "--reason", "rotating", "--config", str(config), "--json")
    assert code == 0, out
    b = json.loads(out)
    assert (b["state"], b["disabled_by"], b["reason"]) == ("disabled", "operator", "disabled by an operator: rotating")

    # A gateway started on that database keeps b out of the pool.
    on_b = upstream.state.creates[KEY_B]
    again = await make_gateway(doc)
    ts = again.gateway.clock.now().timestamp()
    assert {s.name: s.state(ts) for s in again.gateway.pool.statuses()}["b"] is KeyState.DISABLED
    for _ in range(2):
        assert (await again.create()).status == 200
    assert upstream.state.creates[KEY_B] == on_b
    await again.client.close()

    code, out = await keys_command("enable", "b", "-c", str(config), "--json")
    assert (code, json.loads(out)["state"]) == (0, "active")
    code, out = await keys_command("enable", "nope", "-c", str(config))
    assert code == 1 and "no key named 'nope'" in out


async def test_keys_through_a_running_gateways_admin_api(
    make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path
) -> None:
    doc = gateway_config(upstream.url, tmp_path / "g.db", admin_token=ADMIN)
    gw = await make_gateway(doc)
    assert (await gw.create()).status == 200
    url = str(gw.client.make_url("")).rstrip("/")
    env = {"AGNES_GATEWAY_ADMIN_TOKEN": ADMIN}

    code, out = await keys_command("--url", url, "--json", env=env)
    assert code == 0, out
    resp = await gw.client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"})
    assert json.loads(out) == await resp.json()

    # The token can also come from the config file.
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(doc))
    code, out = await keys_command("disable", "a", "--url", url, "--config", str(config))
    assert code == 0, out
    header, row = out.splitlines()
    assert header.split()[:7] == ["NAME", "SECRET", "PRIO", "LIMIT", "USED", "LEFT", "STATE"]
    assert row.split()[:4] == ["a", "…" + KEY_A[-4:], "0", "10"] and row.split()[6] == "disabled"
    status = {s.name: s for s in gw.gateway.pool.statuses()}["a"]
    assert status.mark is not None and status.mark.state is KeyState.DISABLED  # the running gateway's own pool

    code, out = await keys_command("reset", "a", "--counts", "--url", url, "--json", env=env)
    assert (code, json.loads(out)["used"], json.loads(out)["state"]) == (0, 0, "disabled")


async def test_keys_url_reports_refusals_without_a_traceback(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = await make_gateway(admin_token=ADMIN)
    url = str(gw.client.make_url("")).rstrip("/")
    code, out = await keys_command("--url", url, env={"AGNES_GATEWAY_ADMIN_TOKEN": "wrong-token-0000000000"})
    assert code == 1
    assert "HTTP 401" in out and "Traceback" not in out
    code, out = await keys_command("--url", "http://127.0.0.1:9", env={"AGNES_GATEWAY_ADMIN_TOKEN": ADMIN})
    assert code == 1 and "cannot reach" in out
