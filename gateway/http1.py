"""A lean HTTP/1.1 client for the upstream API: keep-alive connections to one origin, small answers.

The API's creates and polls are small requests with small JSON answers, made many times a second on a
few long-lived connections. aiohttp's client spent more CPU per poll than the rest of the gateway put
together on generality this path never uses (cookies, redirects, proxies, tracing, per-request URL
building). This client does one thing: write a request on an idle connection to the one upstream
origin and read back status, headers and a bounded body. Video downloads, from any host and large,
still go through aiohttp.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

#: Longest status line plus headers accepted from upstream.
MAX_HEAD_BYTES = 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}
UNTIL_CLOSE = -1  # body framing: read until the server closes the connection
CHUNKED = -2  # body framing: Transfer-Encoding: chunked
#: Longest interval between two looks for answers that are late (see Http1Pool).
MAX_TICK_S = 0.25


class HttpError(Exception):
    """No usable answer came back."""


class ConnectFailed(HttpError):
    """No connection could be made: nothing was sent."""


class ConnectionBroken(HttpError):
    """The connection failed after the request was (perhaps) sent, or the answer was not HTTP."""

    def __init__(self, message: str, *, silent_reuse: bool = False) -> None:
        super().__init__(message)
        #: A reused keep-alive connection closed before a byte of the answer: the server had likely
        #: dropped it while idle. Safe to retry an idempotent request on a new connection.
        self.silent_reuse = silent_reuse


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    #: Header names lower-cased; repeated headers joined with ", ".
    headers: dict[str, str]
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time, its answer parsed as bytes arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_body: int) -> None:
        self._loop = loop
        self._max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.used = 0  # answers read on this connection
        self.idle_since = 0.0
        self.reusable = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._head_only = False
        self._status = 0
        self._headers: dict[str, str] | None = None
        self._length = 0
        self._body = bytearray()
        self._keep_alive = False
        self._drained: asyncio.Future[None] | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.close()  # bytes nobody asked for: this connection's framing cannot be trusted
            return
        self._buf += data
        try:
            self._parse()
        except HttpError as exc:
            self.close()
            if not waiter.done():
                waiter.set_exception(exc)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost finishes what was read

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._headers is not None and self._length == UNTIL_CLOSE:
                self._finish(bytes(self._body))
            else:
                silent = self.used > 0 and self._headers is None and not self._buf
                waiter.set_exception(ConnectionBroken("upstream closed the connection", silent_reuse=silent))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # --- one exchange ---------------------------------------------------------------------

    async def exchange(self, head: bytes, body: bytes | AsyncIterator[bytes] | None, head_only: bool) -> Response:
        """Send one request and return its answer; the caller closes the connection on any error."""
        transport = self.transport
        assert transport is not None
        waiter: asyncio.Future[Response] = self._loop.create_future()
        self._waiter = waiter
        self._head_only = head_only
        self._headers, self._body, self.reusable = None, bytearray(), False
        if body is None:
            transport.write(head)
        elif isinstance(body, bytes):
            transport.write(head + body)
        else:
            transport.write(head)
            async for chunk in body:
                if self.lost:
                    break
                transport.write(chunk)
                if self._drained is not None:
                    await self._drained
            if waiter.done():
                self.reusable = False  # answered before the whole body was sent: the rest is unread
        answer = await waiter
        self.used += 1
        return answer

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def time_out(self, seconds: float) -> None:
        """The request ran out of time: fail it, and drop the connection its late answer would arrive on."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError(f"no answer within {seconds:g} s"))
        self.lost = True
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)  # a body being sent stops at once
        if self.transport is not None:
            self.transport.abort()  # nothing left to flush to a server that is not answering

    # --- parsing --------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        while self._headers is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise ConnectionBroken("upstream's answer headers are too large")
                return
            head = buf[:end].decode("latin-1")
            del buf[: end + 4]
            self._read_head(head)
        if self._length >= 0:
            if len(buf) < self._length:
                return
            if len(buf) > self._length:
                self._keep_alive = False  # more than was announced: do not trust the rest
            self._finish(bytes(buf[: self._length]))
        elif self._length == CHUNKED:
            self._read_chunks()
        else:
            self._body += buf
            buf.clear()
            if len(self._body) > self._max_body:
                raise ConnectionBroken(f"upstream's answer is over {self._max_body} bytes")

    def _read_head(self, head: str) -> None:
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise ConnectionBroken("upstream's answer is not HTTP/1.x")
        status = int(code)
        if 100 <= status < 200:
            return  # an interim answer (100 Continue): the real one follows
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ConnectionBroken("upstream sent a malformed header")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self._status, self._headers = status, headers
        self._keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        encoding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if self._head_only or status in (204, 304):
            self._length = 0
        elif encoding is not None:
            self._length = CHUNKED if encoding.lower().endswith("chunked") else UNTIL_CLOSE
        elif length is not None:
            if not length.isdigit():
                raise ConnectionBroken("upstream sent a malformed Content-Length")
            self._length = int(length)
            if self._length > self._max_body:
                raise ConnectionBroken(f"upstream's answer is over {self._max_body} bytes")
        else:
            self._length = UNTIL_CLOSE
        if self._length == UNTIL_CLOSE:
            self._keep_alive = False

    def _read_chunks(self) -> None:
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > 1024:
                    raise ConnectionBroken("upstream sent a malformed chunk")
                return
            try:
                size = int(bytes(buf[:line_end]).split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ConnectionBroken("upstream sent a malformed chunk") from None
            if size == 0:
                # The last chunk, then optional trailers, then an empty line.
                if buf[line_end : line_end + 4] == b"\r\n\r\n":
                    del buf[: line_end + 4]
                else:
                    trailers_end = buf.find(b"\r\n\r\n", line_end)
                    if trailers_end < 0:
                        return
                    del buf[: trailers_end + 4]
                if buf:
                    self._keep_alive = False
                self._finish(bytes(self._body))
                return
            if len(buf) < line_end + 2 + size + 2:
                return
            self._body += buf[line_end + 2 : line_end + 2 + size]
            del buf[: line_end + 2 + size + 2]
            if len(self._body) > self._max_body:
                raise ConnectionBroken(f"upstream's answer is over {self._max_body} bytes")

    def _finish(self, body: bytes) -> None:
        headers, waiter = self._headers, self._waiter
        assert headers is not None and waiter is not None
        self._buf.clear()
        encoding = headers.get("content-encoding", "").lower()
        if encoding in ("gzip", "deflate") and body:
            try:
                body = self._inflate(body)
            except ConnectionBroken as exc:
                waiter.set_exception(exc)
                return
        self.reusable = self._keep_alive and not self.lost
        waiter.set_result(Response(self._status, headers, body))

    def _inflate(self, body: bytes) -> bytes:
        inflater = zlib.decompressobj(wbits=47)  # gzip or zlib framing, told apart by the header
        try:
            data = inflater.decompress(body, self._max_body + 1)
        except zlib.error:
            raise ConnectionBroken("upstream sent a body that does not decompress") from None
        if len(data) > self._max_body:
            raise ConnectionBroken(f"upstream's answer is over {self._max_body} bytes")
        return data


class Http1Pool:
    """Requests to one origin over at most `max_connections` keep-alive connections.

    Idle connections are reused newest first and dropped after `idle_s` (before a typical server's own
    keep-alive timeout, so a reused connection is rarely one the server is closing). A request that
    fails, times out or is cancelled closes its connection, so a late answer can never be read as the
    next request's.

    Each request's whole time (waiting for a connection, connecting, the exchange) is bounded by
    `timeout_s`. While answers are awaited, one timer for the whole pool looks for late ones every
    tenth of the timeout (at most every `MAX_TICK_S`) instead of a timer per request: on uvloop an
    `asyncio.timeout` costs about 11 µs, near a tenth of a proxied poll. A late answer fails within
    that tick after its time is up.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int,
        connect_timeout_s: float,
        max_answer_bytes: int,
        timeout_s: float | None = None,
        idle_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`timeout_s`: each request's limit (None: none); `ssl_context` for https (default: the system's
        trusted CAs, hostname checked)."""
        url = urlsplit(base_url)
        if url.scheme not in DEFAULT_PORTS or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.port = url.port or DEFAULT_PORTS[url.scheme]
        self.prefix = url.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self.idle_s = idle_s
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == DEFAULT_PORTS[url.scheme] else f"{host}:{self.port}"
        self._ssl = (ssl_context or ssl.create_default_context()) if url.scheme == "https" else None
        self.timeout_s = timeout_s
        self._tick_s = MAX_TICK_S if timeout_s is None else min(MAX_TICK_S, timeout_s / 10)
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._closed = False
        self._awaiting: dict[_Connection, float] = {}  # connections awaiting an answer, with its deadline
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | AsyncIterator[bytes] | None = None,
    ) -> Response:
        """One request; `headers` are (name, value) pairs besides Host.

        A bytes `body` gets its Content-Length here; a streamed one must come with its own header.
        """
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
        for name, value in headers:
            if "\r" in value or "\n" in value:
                raise ValueError(f"the {name} header's value has a line break")
            head += f"{name}: {value}\r\n"
        if isinstance(body, bytes):
            head += f"Content-Length: {len(body)}\r\n"
        elif body is None and method in ("POST", "PUT", "PATCH"):
            head += "Content-Length: 0\r\n"
        data = (head + "\r\n").encode("latin-1")
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        slots = self._slots
        if slots.locked():  # only then can waiting take time
            async with asyncio.timeout_at(deadline):
                await slots.acquire()
        else:
            await slots.acquire()
        try:
            conn = self._take_idle()
            if conn is None:
                return await self._exchange(await self._connect(deadline), data, body, method, deadline)
            try:
                return await self._exchange(conn, data, body, method, deadline)
            except ConnectionBroken as exc:
                # The server dropped the idle connection as we picked it: nothing was read, and a
                # request without side effects can go again on a fresh connection.
                if not exc.silent_reuse or method not in ("GET", "HEAD"):
                    raise
            return await self._exchange(await self._connect(deadline), data, body, method, deadline)
        finally:
            slots.release()

    async def _exchange(
        self,
        conn: _Connection,
        data: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        method: str,
        deadline: float | None,
    ) -> Response:
        reused = False
        if deadline is not None:
            self._watch(conn, deadline)
        try:
            answer = await conn.exchange(data, body, method == "HEAD")
            if conn.reusable and not self._closed:
                conn.idle_since = asyncio.get_running_loop().time()
                self._idle.append(conn)
                reused = True
            return answer
        finally:
            self._awaiting.pop(conn, None)
            if not reused:
                conn.close()

    def _watch(self, conn: _Connection, deadline: float) -> None:
        self._awaiting[conn] = deadline
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._tick_s, self._sweep)

    def _sweep(self) -> None:
        """Fail the exchanges whose time is up; look again in a tick while any are left."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = [conn for conn, deadline in self._awaiting.items() if deadline <= now]
        for conn in late:
            del self._awaiting[conn]
            conn.time_out(cast(float, self.timeout_s))
        self._sweeper = loop.call_later(self._tick_s, self._sweep) if self._awaiting else None

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        expired = asyncio.get_running_loop().time() - self.idle_s
        # The oldest connections are at the front: drop the ones idle too long.
        while idle and idle[0].idle_since < expired:
            idle.pop(0).close()
        while idle:
            conn = idle.pop()
            if not conn.lost:
                return conn
        return None

    async def _connect(self, deadline: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        limit = loop.time() + self.connect_timeout_s
        overall = deadline is not None and deadline < limit  # the request's own time runs out first
        try:
            async with asyncio.timeout_at(deadline if overall else limit):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self.max_answer_bytes),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            if overall:
                raise
            raise ConnectFailed("timed out connecting to upstream") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to upstream ({type(exc).__name__})") from None
        return conn

    async def close(self) -> None:
        """Close the idle connections; connections in use close when their request ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        # Requests still awaiting answers keep their time limit: the sweeper stops once they are done.
        if self._sweeper is not None and not self._awaiting:
            self._sweeper.cancel()
            self._sweeper = None
