"""The OpenAPI document: served, complete, and true to a live gateway under schemathesis."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import KEY_A, KEY_B, TOKEN, Running, Upstream
from .procs import free_port, start, stop, wait_ready

MakeUpstream = Callable[..., Awaitable[Upstream]]


async def spec(gw: Running) -> dict[str, Any]:
    resp = await gw.client.get("/openapi.yaml")
    assert resp.status == 200
    assert resp.content_type == "application/yaml"
    doc = yaml.safe_load(await resp.text())
    assert isinstance(doc, dict)
    return doc


async def test_openapi_document_is_served_without_a_token(make_gateway: Callable[..., Awaitable[Running]]) -> None:
    gw = await make_gateway(clients=[{"name": "team-a", "token": TOKEN}])
    doc = await spec(gw)
    assert str(doc["openapi"]).startswith("3.")
    assert {"/v1/videos", "/v1/videos/{task_id}", "/healthz"} <= set(doc["paths"])


async def test_every_route_is_documented(gw: Running) -> None:
    paths = (await spec(gw))["paths"]
    for route in gw.app.router.routes():
        if route.method in ("HEAD", "*") or route.resource is None:
            continue
        path = route.resource.canonical
        assert path in paths, f"{path} is served but not in openapi.yaml"
        assert route.method.lower() in paths[path], f"{route.method} {path} is not in openapi.yaml"


def schemathesis_available() -> bool:
    if importlib.util.find_spec("schemathesis") is not None:
        return True
    if os.environ.get("CI"):
        pytest.fail("schemathesis is not installed (pip install -e '.[test]')")
    return False


@pytest.mark.skipif(not schemathesis_available(), reason="schemathesis is not installed")
async def test_schemathesis_finds_no_server_errors_and_no_answer_off_the_spec(
    make_upstream: MakeUpstream, tmp_path: Path
) -> None:
    upstream = await make_upstream(keys={KEY_A: None, KEY_B: None})
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": port},
                "upstream": {"base_url": upstream.url, "timeout_s": 5},
                "database": str(tmp_path / "gateway.db"),
                "keys": [{"name": "a", "key": KEY_A}, {"name": "b", "key": KEY_B}],
                "clients": [{"name": "fuzz", "token": TOKEN}],
                "admin_token": "admin-token-0123456789-fuzz",  # the admin API is on; the fuzzer holds no admin token
                "limits": {"max_body_bytes": 256 * 1024},
            }
        )
    )
    base = f"http://127.0.0.1:{port}"
    proc = await start(["serve", "--config", str(config)])
    try:
        await wait_ready(f"{base}/healthz", proc)
        fuzz = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{base}/openapi.yaml",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--checks",
            "all",
            # Those two judge upstream's validation of create fields, which the gateway forwards untouched.
            "--exclude-checks",
            "negative_data_rejection,positive_data_acceptance",
            "--max-examples",
            "15",
            "--seed",
            "20260302",
            "--request-timeout",
            "10",
            "--no-color",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        out, _ = await asyncio.wait_for(fuzz.communicate(), 120)
    finally:
        log = (await stop(proc)).decode(errors="replace")
    report = out.decode(errors="replace")
    assert fuzz.returncode == 0, report
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    assert counts is not None and counts[1] == counts[2] and int(counts[1]) > 100, report
    assert "Traceback" not in log and "unexpected error" not in log, log
    assert upstream.state.requests > 0  # the fuzzing did reach through to upstream
