"""A real Prometheus scrapes a real `agnes-gateway serve` and sees the creates made through it.

Skips when the `prometheus` binary is missing, except in CI (env `CI` set), where it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from . import procs
from .conftest import BODY, KEY_A, KEY_B, Upstream

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_TOKEN = "scrape-token-for-tests-0001"
WAIT_S = 20.0


def find_prometheus() -> str:
    """The prometheus binary; skips the calling test when missing, or fails it when `CI` is set."""
    path = shutil.which("prometheus")
    if path is not None:
        return path
    reason = "prometheus is not on PATH (install Debian's `prometheus` package or a Prometheus release)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the Prometheus integration test must run", pytrace=False)
    pytest.skip(reason)


@dataclass
class Stack:
    gateway: str  # base URL of the gateway's main port
    metrics: str  # base URL of its metrics port
    prometheus: str  # base URL of Prometheus
    process: asyncio.subprocess.Process  # the gateway's

    async def stop_gateway(self) -> str:
        """Stop the gateway (SIGTERM) and return its log."""
        return (await procs.stop(self.process)).decode(errors="replace")


@pytest.fixture
async def stack(upstream: Upstream, tmp_path: Path) -> AsyncIterator[Stack]:
    """`agnes-gateway serve` with a separate, token-protected metrics port, and a Prometheus scraping it."""
    binary = find_prometheus()
    port, metrics_port, prom_port = procs.free_port(), procs.free_port(), procs.free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": port},
                "upstream": {"base_url": upstream.url, "timeout_s": 5},
                "database": str(tmp_path / "gateway.db"),
                "keys": [
                    {"name": "a", "key": KEY_A, "daily_limit": 10},
                    {"name": "b", "key": KEY_B, "daily_limit": 10},
                ],
                "metrics": {"port": metrics_port, "token": "${SCRAPE_TOKEN}"},
                "log": {"format": "json"},
            }
        ),
        encoding="utf-8",
    )
    token_file = tmp_path / "scrape.token"
    token_file.write_text(SCRAPE_TOKEN, encoding="utf-8")
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "agnes-gateway",
                        "scrape_timeout": "1s",
                        "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    gateway = await procs.start(["serve", "--config", str(config)], env={"SCRAPE_TOKEN": SCRAPE_TOKEN})
    with (tmp_path / "prometheus.log").open("wb") as prom_log:
        prometheus = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={prom_config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
            stdout=prom_log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        await procs.wait_ready(f"http://127.0.0.1:{port}/healthz", gateway)
        try:
            await procs.wait_ready(f"http://127.0.0.1:{prom_port}/-/ready", prometheus, within_s=WAIT_S)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{(tmp_path / 'prometheus.log').read_text(errors='replace')}") from None
        yield Stack(
            f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", f"http://127.0.0.1:{prom_port}", gateway
        )
    finally:
        await procs.stop(prometheus)
        await procs.stop(gateway)


async def query(session: aiohttp.ClientSession, prometheus: str, promql: str) -> list[dict[str, Any]]:
    """The instant vector Prometheus answers for `promql`."""
    async with session.get(f"{prometheus}/api/v1/query", params={"query": promql}) as resp:
        doc = await resp.json()
    assert doc["status"] == "success", doc
    result: list[dict[str, Any]] = doc["data"]["result"]
    return result


async def until(session: aiohttp.ClientSession, prometheus: str, promql: str, expected: dict[str, float]) -> None:
    """Poll Prometheus (bounded) until `promql` gives exactly `expected`, by the `key` label or `""`."""
    seen: dict[str, float] = {}
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        seen = {r["metric"].get("key", ""): float(r["value"][1]) for r in await query(session, prometheus, promql)}
        if seen == expected:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"{promql}: expected {expected} within {WAIT_S} s, Prometheus last had {seen}")


async def test_prometheus_sees_the_quota_used_by_creates(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"{stack.gateway}/v1/videos", json=BODY) as resp:
                assert resp.status == 200
        async with session.get(f"{stack.gateway}/metrics") as resp:
            assert resp.status == 404  # only the metrics port serves it
        async with session.get(f"{stack.metrics}/metrics") as resp:
            assert resp.status == 401  # and only with the token

        await until(session, stack.prometheus, 'up{job="agnes-gateway"}', {"": 1})
        await until(session, stack.prometheus, "sum(agnes_gateway_key_quota_used)", {"": 3})
        used = {
            r["metric"]["key"]: float(r["value"][1])
            for r in await query(session, stack.prometheus, "agnes_gateway_key_quota_used")
        }
        assert set(used) == {"a", "b"} and sum(used.values()) == 3
        await until(
            session, stack.prometheus, "agnes_gateway_key_quota_remaining", {k: 10 - n for k, n in used.items()}
        )
        await until(session, stack.prometheus, 'sum(agnes_gateway_tasks_created_total{client="anonymous"})', {"": 3})
        # The deploy/ recording rules, evaluated by this Prometheus over the gateway's real series.
        await until(session, stack.prometheus, "agnes_gateway:pool_quota_remaining:sum", {"": 17})
        await until(session, stack.prometheus, 'agnes_gateway:keys:count_by_state{state="active"}', {"": 2})

    log = await stack.stop_gateway()
    access = [json.loads(line) for line in log.splitlines() if '"agnes_gateway.access"' in line]
    assert [line["status"] for line in access if line["route"] == "/v1/videos"] == [200, 200, 200]
    assert SCRAPE_TOKEN not in log and KEY_A not in log and KEY_B not in log


def test_missing_prometheus_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        find_prometheus()


def test_missing_prometheus_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="prometheus is not on PATH"):
        find_prometheus()
