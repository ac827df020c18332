"""`/metrics`: the exposition read back with prometheus-client's own parser, against a real gateway."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.appkeys import METRICS
from gateway.clock import ManualClock
from gateway.config import ConfigError, parse_config
from gateway.metrics import TASK_COUNTS_MAX_AGE_S, UNMATCHED_ROUTE, create_metrics_app
from gateway.simulator import Fault

from .conftest import KEY_A, KEY_B, KEY_C, TOKEN, Running, Upstream, gateway_config
from .test_deploy import EXPORTED_METRICS

MakeGateway = Callable[..., Awaitable[Running]]
METRICS_TOKEN = "scrape-token-0123456789"


async def scrape(client: TestClient[Any, Any], **headers: str) -> list[Sample]:
    """Every sample of one scrape, parsed the way Prometheus' own client library parses it."""
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = await resp.text()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample named `name` whose labels include `labels`, or None."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


def per_key(samples: list[Sample], name: str) -> dict[str, float]:
    return {s.labels["key"]: s.value for s in samples if s.name == name}


async def test_every_exported_metric_is_in_the_exposition_after_traffic(gw: Running, upstream: Upstream) -> None:
    created = await gw.create()
    assert created.status == 200
    assert (await gw.poll((await created.json())["task_id"])).status == 200
    upstream.state.add_fault(Fault(kind="status", status=500, key=KEY_A, operation="create", times=1))
    upstream.state.add_fault(Fault(kind="status", status=500, key=KEY_B, operation="create", times=1))
    assert (await gw.create()).status == 200  # a and b fail, c takes it: two failovers

    samples = await scrape(gw.client)
    names = {s.name for s in samples}
    for metric in EXPORTED_METRICS:
        assert names & {metric, f"{metric}_bucket", f"{metric}_count"}, f"{metric} is not exported"
    assert value(samples, "agnes_gateway_failovers_total", reason="error") == 2
    assert value(samples, "agnes_gateway_upstream_requests_total", key="a", operation="create", outcome="server_error")
    assert value(samples, "agnes_gateway_upstream_request_duration_seconds_count", operation="poll") == 1
    assert value(samples, "agnes_gateway_requests_total", route="/v1/videos", code="200") == 2
    assert value(samples, "agnes_gateway_request_duration_seconds_count", route="/v1/videos") == 2
    assert value(samples, "agnes_gateway_tasks_created_total", key="c", client="anonymous") == 1
    assert value(samples, "process_resident_memory_bytes") is not None
    assert not [s for s in samples if s.name.endswith("_created")], "no _created series"


async def test_quota_gauges_follow_creates_and_survive_a_restart(
    make_gateway: MakeGateway, upstream: Upstream, tmp_path: Path
) -> None:
    gw = await make_gateway()
    for _ in range(5):
        assert (await gw.create()).status == 200
    samples = await scrape(gw.client)
    used = per_key(samples, "agnes_gateway_key_quota_used")
    assert sum(used.values()) == 5
    assert used["c"] == 0  # the backup is not touched while a and b have quota
    assert per_key(samples, "agnes_gateway_key_quota_limit") == {"a": 10, "b": 10, "c": 10}
    remaining = per_key(samples, "agnes_gateway_key_quota_remaining")
    assert remaining == {k: 10 - n for k, n in used.items()}

    restarted = await make_gateway()  # a new app on the same database file
    assert per_key(await scrape(restarted.client), "agnes_gateway_key_quota_used") == used


async def test_unlimited_key_has_usage_but_no_limit_or_remaining(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(keys=[{"name": "free", "key": KEY_A}])
    assert (await gw.create()).status == 200
    samples = await scrape(gw.client)
    assert per_key(samples, "agnes_gateway_key_quota_used") == {"free": 1}
    assert per_key(samples, "agnes_gateway_key_quota_limit") == {}
    assert per_key(samples, "agnes_gateway_key_quota_remaining") == {}


async def test_key_states_failovers_and_exhaustion(gw: Running, upstream: Upstream) -> None:
    upstream.state.add_fault(Fault(kind="quota", key=KEY_A, times=-1))
    upstream.state.add_fault(Fault(kind="rate_limit", retry_after=120, key=KEY_B, times=-1))
    upstream.state.add_fault(Fault(kind="status", status=401, key=KEY_C, times=-1))
    resp = await gw.create()
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "all_keys_exhausted"

    samples = await scrape(gw.client)
    states = {
        (s.labels["key"], s.labels["state"]) for s in samples if s.name == "agnes_gateway_key_state" and s.value == 1
    }
    assert states == {("a", "spent"), ("b", "cooling"), ("c", "disabled")}
    assert len([s for s in samples if s.name == "agnes_gateway_key_state"]) == 3 * 4  # every state, 0 or 1
    for reason in ("quota", "rate_limit", "auth"):
        assert value(samples, "agnes_gateway_failovers_total", reason=reason) == 1
    assert value(samples, "agnes_gateway_exhausted_rejections_total") == 1
    requests = upstream.state.requests
    assert (await gw.create()).status == 429  # now no key is even tried
    assert upstream.state.requests == requests
    assert value(await scrape(gw.client), "agnes_gateway_exhausted_rejections_total") == 2
    assert value(samples, "agnes_gateway_upstream_requests_total", key="b", operation="create", outcome="rate_limit")


async def test_a_new_quota_day_shows_without_any_create(gw: Running, clock: ManualClock) -> None:
    for _ in range(20):
        assert (await gw.create()).status == 200  # a and b spent by the gateway's own count
    samples = await scrape(gw.client)
    assert value(samples, "agnes_gateway_key_state", key="a", state="spent") == 1
    reset = value(samples, "agnes_gateway_quota_reset_timestamp_seconds")
    assert reset == gw.gateway.pool.schedule.next_reset(clock.now()).timestamp()
    assert reset == (clock.now() + timedelta(hours=12)).timestamp()  # fixture: noon in Shanghai

    clock.advance(12 * 3600 + 1)
    samples = await scrape(gw.client)
    assert per_key(samples, "agnes_gateway_key_quota_used") == {"a": 0, "b": 0, "c": 0}
    assert value(samples, "agnes_gateway_key_state", key="a", state="active") == 1
    assert value(samples, "agnes_gateway_quota_reset_timestamp_seconds") == reset + 86400


async def test_task_counts_by_status_are_recounted_at_most_once_a_minute(
    gw: Running, upstream: Upstream, clock: ManualClock
) -> None:
    ids = [(await (await gw.create()).json())["task_id"] for _ in range(3)]
    samples = await scrape(gw.client)
    assert value(samples, "agnes_gateway_tasks", status="unknown") == 3  # never polled
    assert value(samples, "agnes_gateway_tasks", status="completed") == 0

    clock.advance(11)  # the simulator's videos take 10 s
    assert (await gw.poll(ids[0])).status == 200
    assert value(await scrape(gw.client), "agnes_gateway_tasks", status="completed") == 0  # the cached count
    clock.advance(TASK_COUNTS_MAX_AGE_S)
    samples = await scrape(gw.client)
    assert value(samples, "agnes_gateway_tasks", status="completed") == 1
    assert value(samples, "agnes_gateway_tasks", status="unknown") == 2


async def test_route_labels_are_templates_never_raw_ids(gw: Running) -> None:
    for i in range(5):
        assert (await gw.poll(f"no-such-task-{i}")).status == 404
    assert (await gw.client.get("/some/random/path-123")).status == 404
    resp = await gw.client.get("/metrics")
    text = await resp.text()
    assert "no-such-task" not in text
    assert "path-123" not in text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert value(samples, "agnes_gateway_requests_total", route="/v1/videos/{task_id}", code="404") == 5
    assert value(samples, "agnes_gateway_requests_total", route=UNMATCHED_ROUTE, code="404") == 1


async def test_no_secret_appears_in_the_exposition(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        clients=[{"name": "team-a", "token": TOKEN}], metrics={"token": METRICS_TOKEN}, admin_token="admin-0123456789ab"
    )
    assert (await gw.create(Authorization=f"Bearer {TOKEN}")).status == 200
    assert (await gw.create(Authorization="Bearer wrong-token-0000000000")).status == 401
    resp = await gw.client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    text = await resp.text()
    for secret in (KEY_A, KEY_B, KEY_C, TOKEN, METRICS_TOKEN, "admin-0123456789ab", "wrong-token"):
        assert secret not in text
    assert 'client="team-a"' in text


async def test_metrics_token_is_required_when_configured(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(metrics={"token": METRICS_TOKEN})
    for headers in ({}, {"Authorization": "Bearer not-the-token-000000"}, {"Authorization": METRICS_TOKEN}):
        resp = await gw.client.get("/metrics", headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_token"
    samples = await scrape(gw.client, Authorization=f"Bearer {METRICS_TOKEN}")
    assert value(samples, "agnes_gateway_key_quota_limit", key="a") == 10


async def test_with_a_metrics_port_the_main_port_does_not_serve_metrics(
    make_gateway: MakeGateway, aiohttp_client: Any
) -> None:
    gw = await make_gateway(metrics={"port": 9464})
    assert (await gw.client.get("/metrics")).status == 404
    assert (await gw.create()).status == 200
    # What `serve()` puts on metrics.port: the same metrics, read from the running gateway.
    side = await aiohttp_client(create_metrics_app(gw.app[METRICS], None))
    samples = await scrape(side)
    assert sum(per_key(samples, "agnes_gateway_key_quota_used").values()) == 1
    assert (await side.get("/v1/videos/abc")).status == 404


async def test_a_broken_store_leaves_the_counters_and_in_memory_quota(gw: Running) -> None:
    assert (await gw.create()).status == 200
    await gw.gateway.store.close()
    samples = await scrape(gw.client)
    assert sum(per_key(samples, "agnes_gateway_key_quota_used").values()) == 1
    assert value(samples, "agnes_gateway_tasks", status="unknown") is None
    assert value(samples, "agnes_gateway_requests_total", route="/v1/videos", code="200") == 1


async def test_several_apps_in_one_process_keep_their_own_metrics(make_gateway: MakeGateway) -> None:
    first, second = await make_gateway(), await make_gateway()
    assert (await first.create()).status == 200
    assert value(await scrape(second.client), "agnes_gateway_requests_total", route="/v1/videos", code="200") is None
    assert value(await scrape(first.client), "agnes_gateway_requests_total", route="/v1/videos", code="200") == 1


# --- config -----------------------------------------------------------------------------


def config(tmp_path: Path, **metrics: Any) -> dict[str, Any]:
    return gateway_config("http://127.0.0.1:1", tmp_path / "g.db", metrics=metrics)


def test_metrics_config_defaults_and_env_token(tmp_path: Path) -> None:
    assert parse_config(gateway_config("http://127.0.0.1:1", tmp_path / "g.db")).metrics.port is None
    parsed = parse_config(
        config(tmp_path, port=9464, host="0.0.0.0", token="${SCRAPE}"), env={"SCRAPE": METRICS_TOKEN}
    ).metrics
    assert (parsed.port, parsed.host) == (9464, "0.0.0.0")
    assert parsed.token is not None and parsed.token.reveal() == METRICS_TOKEN
    assert METRICS_TOKEN not in repr(parsed)
    assert parse_config(config(tmp_path, token="${SCRAPE:-}"), env={}).metrics.token is None


@pytest.mark.parametrize(
    ("metrics", "field"),
    [
        ({"port": 8080}, "metrics.port"),
        ({"port": 0}, "metrics.port"),
        ({"port": "9464"}, "metrics.port"),
        ({"host": "0.0.0.0"}, "metrics.host"),
        ({"token": "short"}, "metrics.token"),
        ({"token": KEY_A}, "metrics.token"),
        ({"path": "/m"}, "metrics.path"),
    ],
)
def test_bad_metrics_config_names_the_field(tmp_path: Path, metrics: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config(tmp_path, **metrics))
    assert str(err.value).startswith(field)
