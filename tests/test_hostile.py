"""Hostile input: nothing reaches upstream that is not a well-formed create or poll, and nothing is a 5xx."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml

from gateway import auth
from gateway.auth import identify
from gateway.config import ClientConfig, Secret
from gateway.logs import REDACTED, JsonFormatter, RedactSecrets

from .conftest import BODY, KEY_A, TOKEN, Running, Upstream
from .procs import free_port, start, stop, wait_ready

MakeGateway = Callable[..., Awaitable[Running]]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def locked(make_gateway: MakeGateway) -> Running:
    """A gateway with one client token, a small body limit and a short body deadline."""
    return await make_gateway(
        clients=[{"name": "team-a", "token": TOKEN}], limits={"max_body_bytes": 64 * 1024, "body_read_timeout_s": 2}
    )


async def raw(gw: Running, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (no client-side URL or header clean-up); the status and body of the answer."""
    server = gw.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def nothing_spent(gw: Running, upstream: Upstream) -> None:
    assert upstream.state.requests == 0
    assert sum((await gw.gateway.store.usage(gw.gateway.pool.day)).values()) == 0


# --- bodies --------------------------------------------------------------------------------------------------


async def test_bodies_over_the_limit_are_413_however_they_are_sent(locked: Running, upstream: Upstream) -> None:
    big = json.dumps({**BODY, "prompt": "x" * 70_000}).encode()
    resp = await locked.client.post("/v1/videos", data=big, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status == 413

    async def chunks() -> object:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    resp = await locked.client.post(
        "/v1/videos", data=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    )  # chunked: no Content-Length to refuse up front
    assert resp.status == 413
    status, body = await raw(
        locked,
        b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 99999999999\r\nConnection: close\r\n\r\n{",
    )
    assert status == 413 and b"body_too_large" in body
    await nothing_spent(locked, upstream)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/xml", "image/png", "application/octet-stream"],
)
async def test_wrong_content_types_are_415(locked: Running, upstream: Upstream, content_type: str) -> None:
    resp = await locked.client.post("/v1/videos", data=json.dumps(BODY), headers={**AUTH, "Content-Type": content_type})
    assert resp.status == 415
    assert (await resp.json())["error"]["code"] == "unsupported_media_type"
    await nothing_spent(locked, upstream)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n'),
        ("multipart/form-data; boundary=b", b"not multipart at all"),
        ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx'),
        ("application/vnd.agnes+json", b"{not json"),
        ("application/json; charset=utf-8", b'{"a": 1e999999, "b": ' + b"9" * 5000 + b"}"),
    ],
    ids=["no-boundary", "not-multipart", "unterminated", "plus-json-invalid", "huge-number"],
)
async def test_malformed_bodies_of_accepted_types_are_400(
    locked: Running, upstream: Upstream, content_type: str, body: bytes
) -> None:
    resp = await locked.client.post("/v1/videos", data=body, headers={**AUTH, "Content-Type": content_type})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] in {"invalid_multipart", "invalid_json"}
    await nothing_spent(locked, upstream)


async def test_well_formed_multipart_is_forwarded_untouched(locked: Running, upstream: Upstream) -> None:
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nagnes-video-v2.0\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\xff\x00\r\n--xyz--\r\n"
    )
    resp = await locked.client.post(
        "/v1/videos", data=body, headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert resp.status == 200
    assert upstream.state.last_create_body == body


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":' * 8_000 + b"1" + b"}" * 8_000,
        b"[" * 30_000 + b"]" * 30_000,
        b'{"prompt": "\xc3\x28"}',
        b"\xef\xbb\xbf\xff\xfe",
        b'{"prompt": "\\ud800"}' + b"\x80",
    ],
    ids=["deep-objects", "deep-arrays", "bad-utf8", "bom-garbage", "trailing-byte"],
)
async def test_deep_or_undecodable_json_is_400(locked: Running, upstream: Upstream, body: bytes) -> None:
    resp = await locked.client.post("/v1/videos", data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_json"
    await nothing_spent(locked, upstream)


# --- paths and ids -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/videos/../../_sim/stats",
        b"/v1/videos/..%2f..%2f_sim%2fstats",
        b"/v1/videos/%2e%2e/%2e%2e/_sim/stats",
        b"/v1/videos/%252e%252e%252f_sim",
        b"/v1/videos/..\\..\\_sim",
        b"/v1/videos/abc%0d%0aX-Injected:%201",
        b"/v1/videos/abc%00def",
        b"/v1/videos/%ff%fe",
        b"/v1/videos/" + b"a" * 129,
        b"/v1/videos/" + b"a" * 7000,
        b"/v1/videos/abc/def",
        b"/v1/videos/",
        b"//v1/videos/abc",
    ],
)
async def test_bad_task_paths_never_reach_upstream(locked: Running, upstream: Upstream, path: bytes) -> None:
    status, body = await raw(
        locked,
        b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert 400 <= status < 500, (status, body)
    assert b"X-Injected" not in body.split(b"\r\n\r\n")[0]
    assert upstream.state.requests == 0


async def test_crlf_in_the_request_line_is_refused(locked: Running, upstream: Upstream) -> None:
    status, _ = await raw(
        locked, b"GET /v1/videos/abc\r\nX-Injected: 1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert 400 <= status < 500
    assert upstream.state.requests == 0


# --- headers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Long: " + b"a" * 20_000 + b"\r\n",
        b"".join(b"X-Many-%d: 1\r\n" % i for i in range(500)),
        b"Authorization: Bearer " + b"t" * 20_000 + b"\r\n",
    ],
    ids=["long-header", "many-headers", "long-token"],
)
async def test_oversized_headers_are_4xx(locked: Running, upstream: Upstream, headers: bytes) -> None:
    status, _ = await raw(
        locked, b"GET /v1/videos/abc HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"
    )
    assert 400 <= status < 500
    assert upstream.state.requests == 0


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        b"",
        b"Bearer",
        b"Bearer ",
        b"Bearer  " + TOKEN.encode() + b"x",
        b"Token " + TOKEN.encode(),
        b"Basic " + TOKEN.encode(),
        TOKEN.encode(),
        b"Bearer " + TOKEN.encode()[:-1],
        b"Bearer " + TOKEN.encode() + b"\xff",
        b"Bearer \xff\xfe\xc3\x28",
        b"Bearer " + KEY_A.encode(),
    ],
)
async def test_absent_or_malformed_authorization_is_401_json(
    locked: Running, upstream: Upstream, authorization: bytes | None
) -> None:
    header = b"" if authorization is None else b"Authorization: " + authorization + b"\r\n"
    for request_line, body in (
        (b"POST /v1/videos", json.dumps(BODY).encode()),
        (b"GET /v1/videos/abc", b""),
    ):
        status, answer = await raw(
            locked,
            request_line + b" HTTP/1.1\r\nHost: x\r\n" + header + b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body,
        )
        assert status == 401, answer
        assert json.loads(answer)["error"]["code"] == "invalid_token"
    await nothing_spent(locked, upstream)


async def test_bearer_scheme_is_case_insensitive(locked: Running, upstream: Upstream) -> None:
    resp = await locked.create(Authorization=f"bEaReR {TOKEN}")
    assert resp.status == 200


def test_tokens_are_compared_in_constant_time_against_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    clients = tuple(ClientConfig(f"c{i}", Secret(f"token-number-{i:04d}-abcdef")) for i in range(3))
    # A match on the first client still compares the others: the time does not depend on which matched.
    assert identify(clients, "Bearer token-number-0000-abcdef") == "c0"
    assert [b for _, b in compared] == [c.token.reveal().encode() for c in clients]
    compared.clear()
    assert identify(clients, "Bearer nope") is None
    assert len(compared) == 3
    assert identify(clients, "Bearer \udcff") is None  # undecodable bytes are compared, not an error


# --- admin paths and methods -------------------------------------------------------------------------------


ADMIN_PATHS = [
    "/admin",
    "/admin/",
    "/admin/keys",
    "/admin/keys/a",
    "/admin/keys/a/enable",
    "/admin/keys/a/disable",
    "/admin/tasks",
    "/admin/tasks/abc",
    "/admin/reload",
    "/admin/usage",
    "/admin/clients",
    "/v1/../admin/keys",
]


async def test_admin_paths_with_a_client_token_are_refused_and_reach_nothing(
    make_gateway: MakeGateway, upstream: Upstream
) -> None:
    gw = await make_gateway(clients=[{"name": "team-a", "token": TOKEN}], admin_token="admin-token-0123456789-x")
    for path in ADMIN_PATHS:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            resp = await gw.client.request(method, path, headers=AUTH, json={"key": "a", "daily_limit": 1000})
            assert resp.status in {401, 403, 404, 405}, (method, path, resp.status)
            assert "error" in await resp.json()
    assert upstream.state.requests == 0
    assert all(s.mark is None for s in gw.gateway.pool.statuses())
    assert await gw.gateway.store.usage(gw.gateway.pool.day) == {}


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
async def test_other_methods_on_the_api_are_405_json_with_allow(
    locked: Running, upstream: Upstream, method: str
) -> None:
    for path in ("/v1/videos", "/v1/videos/abc"):
        resp = await locked.client.request(method, path, headers=AUTH, json=BODY)
        assert resp.status == 405
        assert "error" in await resp.json()
        assert "Allow" in resp.headers
    assert upstream.state.requests == 0


# --- what hostile requests leave in the log -------------------------------------------------------------------


def test_secrets_are_scrubbed_from_tracebacks_too() -> None:
    secret = Secret("sk-traceback-secret-0001")
    scrub = RedactSecrets([secret])
    try:
        raise ValueError(f"bad header line: b'Authorization: Bearer {secret.reveal()}\\x00'")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    assert scrub.filter(record)
    for formatter in (logging.Formatter(), JsonFormatter()):
        text = formatter.format(record)
        assert "bad header line" in text and REDACTED in text
        assert secret.reveal() not in text


async def test_malformed_requests_log_one_line_and_no_bytes(upstream: Upstream, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"port": port},
                "upstream": {"base_url": upstream.url},
                "database": str(tmp_path / "gateway.db"),
                "keys": [{"name": "a", "key": KEY_A}],
                "clients": [{"name": "team-a", "token": TOKEN}],
            }
        )
    )
    proc = await start(["serve", "--config", str(config)])
    try:
        await wait_ready(f"http://127.0.0.1:{port}/healthz", proc)
        for request in (
            b"GET /v1/videos/abc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\x00\r\n\r\n",
            b"GET /v1/videos/abc HTTP/1.1\r\nHost: x\r\nX-" + TOKEN.encode() + b"\x01: 1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + TOKEN.encode(),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert answer.split(b" ", 2)[1] == b"400"
    finally:
        out = (await stop(proc)).decode()
    assert TOKEN not in out
    assert "Traceback" not in out
    assert out.count("malformed HTTP request refused") >= 2
    assert upstream.state.requests == 0


async def test_openai_multipart_with_control_characters_in_a_part_header_is_400(
    locked: Running, upstream: Upstream
) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="x\x02y"\r\n\r\n1\r\n--b--\r\n'
    resp = await locked.client.post(
        "/openai/v1/videos", data=body, headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_request"
    await nothing_spent(locked, upstream)


async def test_openai_paths_with_another_method_are_405_with_allow(locked: Running, upstream: Upstream) -> None:
    for method, path in (("TRACE", "/openai/v1/videos"), ("PUT", "/openai/v1/videos/abc")):
        resp = await locked.client.request(method, path, headers=AUTH)
        assert resp.status == 405
        assert "GET" in resp.headers["Allow"]
    assert (await locked.client.get("/openai/v1/nothing", headers=AUTH)).status == 404
    assert upstream.state.requests == 0
