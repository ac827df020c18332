"""The lean upstream HTTP/1.1 client, against small real servers on 127.0.0.1 that answer as scripted."""

from __future__ import annotations

import asyncio
import gzip
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.http1 import ConnectFailed, ConnectionBroken, Http1Pool

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]
Serve = Callable[..., Awaitable[tuple["Server", Http1Pool]]]  # (script, **pool options)


class Server:
    """A TCP server on loopback: `script` answers each request; returning False closes the connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                self.requests.append(head + await reader.readexactly(length))
                if not await self.script(reader, writer, len(self.requests)):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def answer(body: bytes, *, status: str = "200 OK", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    made: list[tuple[Server, Http1Pool]] = []

    async def make(script: Script, **options: Any) -> tuple[Server, Http1Pool]:
        server = Server(script)
        port = await server.start()
        options = {"max_connections": 4, "connect_timeout_s": 2, "max_answer_bytes": 1000, **options}
        pool = Http1Pool(f"http://127.0.0.1:{port}/api", **options)
        made.append((server, pool))
        return server, pool

    yield make
    for server, pool in made:
        await pool.close()
        await server.close()


async def test_keeps_the_connection_for_the_next_request(
    serve: Serve,
) -> None:
    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(answer(b'{"n": %d}' % n, headers="Content-Type: application/json\r\nRetry-After: 7\r\n"))
        return True

    server, pool = await serve(ok)
    first = await pool.request("GET", "/v1/videos/a", [("Authorization", "Bearer k")])
    second = await pool.request("POST", "/v1/videos", [("Content-Type", "application/json")], b'{"x": 1}')
    assert (first.status, first.body, second.body) == (200, b'{"n": 1}', b'{"n": 2}')
    assert first.headers["content-type"] == "application/json" and first.headers["retry-after"] == "7"
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /api/v1/videos/a HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"Authorization: Bearer k\r\n" in server.requests[0]
    assert server.requests[1].endswith(b'Content-Length: 8\r\n\r\n{"x": 1}')


async def test_reads_chunked_and_gzip_answers(serve: Serve) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:
            writer.write(
                b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\n{"a"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n'
            )
        else:
            writer.write(answer(gzip.compress(b'{"zipped": true}'), headers="Content-Encoding: gzip\r\n"))
        return True

    server, pool = await serve(chunked)
    assert (await pool.request("GET", "/x")).body == b'{"a": 1}'
    assert (await pool.request("GET", "/x")).body == b'{"zipped": true}'
    assert server.connections == 1


async def test_an_answer_over_the_limit_is_refused(serve: Serve) -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(answer(b"x" * 1001) if n == 1 else b"HTTP/1.0 200 OK\r\n\r\n" + b"y" * 1001)
        return n == 1

    _, pool = await serve(big)
    with pytest.raises(ConnectionBroken, match="over 1000 bytes"):
        await pool.request("GET", "/x")
    with pytest.raises(ConnectionBroken, match="over 1000 bytes"):  # no length: read until close
        await pool.request("GET", "/x")


async def test_a_get_on_a_connection_the_server_dropped_goes_again(
    serve: Serve,
) -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n in (1, 3, 4):
            writer.write(answer(b"ok"))
            await writer.drain()
        return n in (1, 3)  # the server closes after requests 2 and 4 without a word

    server, pool = await serve(once)
    assert (await pool.request("GET", "/x")).body == b"ok"  # 1: kept open
    assert (await pool.request("GET", "/x")).body == b"ok"  # 2: dropped, so sent again (3) on a new one
    assert server.connections == 2
    assert (await pool.request("GET", "/x")).body == b"ok"  # 4, then the server closes
    with pytest.raises(ConnectionBroken):  # a create is never sent twice: it may have been read
        await pool.request("POST", "/v1/videos", [], b"{}")


async def test_a_request_given_up_leaves_no_answer_behind(
    serve: Serve,
) -> None:
    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:
            await asyncio.sleep(0.5)
        writer.write(answer(b"answer %d" % n))
        return True

    server, pool = await serve(slow_first)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await pool.request("GET", "/x")
    # The late answer to the first request is never read as the second's: that goes on a new connection.
    assert (await pool.request("GET", "/x")).body == b"answer 2"
    assert server.connections == 2


async def test_the_pool_bounds_each_request_waiting_for_a_connection_included(serve: Serve) -> None:
    async def stuck_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n == 1:
            await asyncio.sleep(10)
        writer.write(answer(b"answer %d" % n))
        return True

    server, pool = await serve(stuck_first, max_connections=1, timeout_s=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # The second request waits for the only connection, which the first holds until its time is up.
    first, second = await asyncio.gather(pool.request("GET", "/x"), pool.request("GET", "/y"), return_exceptions=True)
    assert isinstance(first, TimeoutError) and isinstance(second, TimeoutError)
    assert 0.3 <= loop.time() - started < 1.5
    assert (await pool.request("GET", "/z")).body == b"answer 2"  # a new connection, no late answer
    assert server.connections == 2


async def test_a_request_in_flight_when_the_pool_closes_still_times_out(serve: Serve) -> None:
    """A reload closes the replaced client while its calls run: they keep their time limit."""

    arrived = asyncio.Event()

    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        arrived.set()
        await asyncio.sleep(10)
        return False

    _, pool = await serve(stuck, max_connections=1, timeout_s=0.3)
    call = asyncio.create_task(pool.request("GET", "/x"))
    await arrived.wait()
    await pool.close()
    with pytest.raises(TimeoutError, match=r"no answer within 0\.3 s"):  # the pool's, not the test's own
        async with asyncio.timeout(2):
            await call


async def test_a_body_nobody_reads_times_out_too() -> None:
    async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool(
        f"http://127.0.0.1:{port}", max_connections=1, connect_timeout_s=2, max_answer_bytes=100, timeout_s=0.3
    )

    async def body() -> AsyncIterator[bytes]:
        for _ in range(256):  # 256 MiB: far more than the socket buffers hold
            yield bytes(1 << 20)

    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await pool.request("POST", "/v1/videos", [("Content-Length", str(256 << 20))], body())
        assert asyncio.get_running_loop().time() - started < 1.5
    finally:
        await pool.close()
        server.close()


async def test_connection_close_is_honoured(serve: Serve) -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(answer(b"bye", headers="Connection: close\r\n"))
        return False

    server, pool = await serve(closing)
    for _ in range(2):
        assert (await pool.request("GET", "/x")).body == b"bye"
    assert server.connections == 2


async def test_bad_answers_and_bad_headers(serve: Serve) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        return False

    _, pool = await serve(garbage)
    with pytest.raises(ConnectionBroken, match="not HTTP"):
        await pool.request("GET", "/x")
    with pytest.raises(ValueError, match="line break"):
        await pool.request("POST", "/x", [("Content-Type", "text/plain\r\nX-Injected: 1")], b"")


async def test_nothing_listening_is_a_failed_connect() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = Http1Pool(f"http://127.0.0.1:{port}", max_connections=1, connect_timeout_s=1, max_answer_bytes=100)
    with pytest.raises(ConnectFailed):
        await pool.request("GET", "/x")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for `localhost` and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_with_the_host_name_checked(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(b"secure"))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(ok, "127.0.0.1", 0, ssl=server_side)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = Http1Pool(
            f"https://localhost:{port}",
            max_connections=1,
            connect_timeout_s=2,
            max_answer_bytes=100,
            ssl_context=trusting,
        )
        assert (await pool.request("GET", "/x")).body == b"secure"
        await pool.close()
        # The system's CAs do not know this certificate: no answer is read from an unverified server.
        untrusting = Http1Pool(
            f"https://localhost:{port}", max_connections=1, connect_timeout_s=2, max_answer_bytes=100
        )
        with pytest.raises(ConnectFailed):
            await untrusting.request("GET", "/x")
    finally:
        server.close()
        await server.wait_closed()
