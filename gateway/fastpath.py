"""Polls answered on the connection: `GET /v1/videos/{task_id}` without aiohttp's request machinery.

aiohttp spends about 140,000 instructions on every request before and after its handler (a request
object, a task, the router, the middleware, a response object); its HTTP parser alone takes a tenth
of that. Polls are most of the traffic, so the gateway's connection handler takes them straight
from the parser: a poll from a client whose token is good is answered at once when its answer is at
hand (a completed or failed task in memory, a fresh shared answer), and otherwise from one task
that does what the route does (`Gateway.poll`: the store, upstream). Everything else (other routes
and methods, a malformed task id, a body, `Connection: close`, HTTP/1.0, a refused token) goes on to
aiohttp as it came, and answers leave in the order their requests arrived. The answer, its headers,
its metrics and its access line are the ones the route and the middleware would have made.
`poll.fast_path: false` turns it off.

It rests on aiohttp's `RequestHandler` internals (its parser, `finish_response`, its keep-alive
timer, `shutdown`), so `FAST_PATH_AIOHTTP` names the aiohttp versions it is written for; on any
other the gateway logs it and serves every request through aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpProcessingError, HttpVersion11, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from . import logs
from .appkeys import GATEWAY, METRICS
from .auth import identify
from .errors import GatewayError, error_response
from .observe import CLIENT_CLOSED, answered
from .proxy import REQUEST_ID_HEADER, answer_response
from .service import TASK_ID_RE, Gateway, PassThrough
from .store import TaskRecord

log = logging.getLogger("agnes_gateway.fastpath")

PREFIX = "/v1/videos/"
ROUTE = "/v1/videos/{task_id}"
#: aiohttp versions whose RequestHandler internals this module was written (and tested) against.
FAST_PATH_AIOHTTP = re.compile(r"3\.14\.")

REASONS = {status.value: status.phrase for status in HTTPStatus}

Answer = bytes | Coroutine[Any, Any, bytes | None]
_NOTHING: tuple[tuple[()], bool, bytes] = ((), False, b"")


class HttpDate:
    """The `Date` header's value, computed once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self) -> str:
        now = time.time()
        if int(now) != self._second:
            self._second, self._text = int(now), formatdate(now, usegmt=True)
        return self._text


class FastPolls:
    """Answers the polls it can take for one application (see the module's docstring)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.metrics = app[METRICS]
        self._gateway: Gateway | None = None
        self._date = HttpDate()

    def answer(self, message: RawRequestMessage, payload: object, connection: PollConnection) -> Answer | None:
        """The answer's bytes, or a coroutine that makes them; None: aiohttp handles this request."""
        path = message.path
        if (
            message.method != "GET"
            or not path.startswith(PREFIX)
            or payload is not EMPTY_PAYLOAD
            or message.version != HttpVersion11
            or message.should_close
            or message.upgrade
        ):
            return None
        task_id = path[len(PREFIX) :]
        gateway = self._gateway or self._find_gateway()
        if gateway is None or not gateway.config.poll.fast_path or not TASK_ID_RE.match(task_id):
            return None
        headers = message.headers
        client = identify(gateway.config.clients, headers.get("Authorization"))
        if client is None:
            return None  # refused: aiohttp's way gives the 401
        started = time.perf_counter()
        rid = logs.accept_request_id(headers.get(REQUEST_ID_HEADER))
        task = gateway.tasks.cached(task_id)
        polled = gateway.at_hand(task) if task is not None else None
        if polled is None or task is None:
            return self._ask(gateway, task_id, task, client, rid, started, connection)
        answer = polled.answer
        reply = self._reply(answer.status, [("Content-Type", answer.content_type)], answer.body, rid)
        if reply is not None:
            self._done(rid, answer.status, client, task.key_name, time.perf_counter() - started)
        return reply

    async def _ask(
        self,
        gateway: Gateway,
        task_id: str,
        task: TaskRecord | None,
        client: str,
        rid: str,
        started: float,
        connection: PollConnection,
    ) -> bytes | None:
        """The answer of a poll that needs the store or upstream, as the route and the middleware would give it.

        `task`: the route, when it was found in memory.
        """
        logs.request_id.set(rid)  # this task's own context: its log lines carry the request's id
        held = logs.HeldCalls()
        logs.upstream_calls.set(held)
        key: str | None = None
        try:
            polled = await (gateway.poll_known(task) if task is not None else gateway.poll(task_id))
            answer, key = polled.answer, polled.task.key_name
            status = answer.status
            reply = self._reply(status, (("Content-Type", answer.content_type),), answer.body, rid)
            if reply is None:
                log.error("upstream's answer to a poll had a header aiohttp would refuse to send")
                raise GatewayError(502, "upstream_bad_answer", "upstream's answer could not be sent on")
        except Exception as exc:
            response = self._failure(exc)
            status = response.status
            reply = self._reply(status, response.headers.items(), response.body, rid)
        held.open = False
        transport = connection.transport
        if transport is None or transport.is_closing():
            status = CLIENT_CLOSED
        self._done(rid, status, client, key, time.perf_counter() - started, held.calls)
        return reply

    @staticmethod
    def _failure(exc: Exception) -> web.Response:
        """The answer the middleware gives for what a poll raised."""
        if isinstance(exc, GatewayError):
            return error_response(exc)
        if isinstance(exc, PassThrough):
            return answer_response(exc.answer)
        log.exception("unexpected error on GET %s", ROUTE, exc_info=exc)
        return error_response(GatewayError(500, "internal_error", "the gateway failed to handle this request"))

    def _reply(self, status: int, headers: Iterable[tuple[str, str]], body: Any, rid: str) -> bytes | None:
        """The bytes aiohttp would have sent for this answer (the same headers, in the same order).

        None if a header value holds a line break: aiohttp refuses to send those, and so does this.
        """
        data = bytes(body or b"")
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers)
        if lines.count("\n") != lines.count("\r\n") or lines.count("\r") != lines.count("\r\n"):
            return None
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\n{lines}{REQUEST_ID_HEADER}: {rid}\r\n"
            f"Content-Length: {len(data)}\r\nDate: {self._date()}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n"
        )
        return head.encode("utf-8", "surrogateescape") + data  # as aiohttp encodes headers

    def _done(
        self,
        rid: str,
        status: int,
        client: str | None,
        key: str | None,
        seconds: float,
        calls: list[logs.UpstreamCall] | None = None,
    ) -> None:
        answered(
            self.metrics,
            rid=rid,
            method="GET",
            route=ROUTE,
            status=status,
            client=client,
            key=key,
            seconds=seconds,
            calls=calls or (),
        )

    def _find_gateway(self) -> Gateway | None:
        self._gateway = self.app.get(GATEWAY)
        return self._gateway


class _Parser:
    """A connection's aiohttp parser, handing on only the requests the fast path did not answer."""

    __slots__ = ("_connection", "_held", "inner")

    def __init__(self, inner: Any, connection: PollConnection) -> None:
        self.inner = inner
        self._connection = connection
        self._held: list[Any] = []  # parsed while an answer was in flight: for after it

    def feed_data(self, data: bytes) -> tuple[Any, bool, bytes]:
        connection = self._connection
        if connection.in_flight is not None:
            connection.hold(data)
            return _NOTHING
        try:
            messages, upgraded, tail = self.inner.feed_data(data)
        except HttpProcessingError:
            connection.owed += 1  # aiohttp answers it with a 400
            raise
        if self._held:
            messages, self._held = [*self._held, *messages], []
        taken = connection.take(messages) if messages and not upgraded else 0
        if connection.in_flight is not None:
            self._held = list(messages[taken:])
            return _NOTHING
        rest = messages[taken:] if taken else messages
        connection.owed += len(rest)
        return rest, upgraded, tail

    def message_consumed(self) -> None:
        self.inner.message_consumed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def holding(self) -> bool:
        return bool(self._held)


class PollConnection(RequestHandler):
    """aiohttp's connection handler, with the polls `FastPolls` can answer taken out first."""

    def __init__(self, manager: web.Server, *, polls: FastPolls, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._polls = polls
        self._fast = _Parser(self._parser, self)
        self._parser = self._fast  # type: ignore[assignment] # it stands in for aiohttp's parser
        #: Requests handed on to aiohttp and not yet answered: while there are any, polls queue behind them.
        self.owed = 0
        #: The task answering a poll that went to upstream; requests after it wait (see `hold`).
        self.in_flight: asyncio.Task[None] | None = None
        self._last = False  # aiohttp's last answer closes the connection
        self._waiting = b""
        self._paused_here = False

    def take(self, messages: list[Any]) -> int:
        """Answer the leading messages the fast path can; how many it took (the last may be in flight)."""
        taken = 0
        transport = self.transport
        for message, payload in messages:
            if self.owed or self.in_flight is not None or self._last or transport is None or self.writing_paused:
                break
            try:
                answer = self._polls.answer(message, payload, self)
            except Exception:  # a bug here must not cost the connection: aiohttp's way still works
                log.exception("the fast path failed on a poll; aiohttp answers it")
                answer = None
            if answer is None:
                break
            self._fast.inner.message_consumed()
            taken += 1
            if isinstance(answer, bytes):
                transport.write(answer)
                continue
            self.in_flight = asyncio.get_running_loop().create_task(self._later(answer))
            break
        if taken:
            self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        return taken

    def hold(self, data: bytes) -> None:
        """Keep bytes that arrived while an answer is in flight, and stop reading until it has left."""
        if not data:
            return
        self._waiting += data
        if not self._paused_here and self.transport is not None:
            self._paused_here = True
            self.transport.pause_reading()

    async def _later(self, answer: Coroutine[Any, Any, bytes | None]) -> None:
        """Await an answer that needs upstream, then send it (no turn of the loop in between)."""
        reply: bytes | None = None
        try:
            reply = await answer
        finally:
            self._sent(reply)

    def _sent(self, reply: bytes | None) -> None:
        self.in_flight = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reply is None:  # cancelled, or no answer could be made: no more on this connection
            transport.close()
            return
        transport.write(reply)
        if self._close or self._force_close:
            transport.close()  # shutting down: this connection takes no more requests
            return
        loop = self._loop
        self._next_keepalive_close_time = loop.time() + self._keepalive_timeout
        if self._keepalive_handle is None and self._keepalive_timeout > 0:
            self._keepalive_handle = loop.call_at(self._next_keepalive_close_time, self._process_keepalive)
        if self._paused_here:
            self._paused_here = False
            transport.resume_reading()
        if self._waiting or self._fast.holding:
            data, self._waiting = self._waiting, b""
            self.data_received(data)

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """aiohttp answers one of the requests it was handed (its last step for each)."""
        try:
            answer = await super().finish_response(request, resp, start_time)
        finally:
            self.owed -= 1
        self._last = self._last or not answer[0].keep_alive
        return answer

    def _process_keepalive(self) -> None:
        if self.in_flight is not None:
            self._keepalive_handle = None  # not idle: `_sent` sets the timer again
            return
        super()._process_keepalive()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 - aiohttp's signature
        """Let an answer in flight leave (within `timeout`), then shut down as aiohttp does."""
        if self.in_flight is not None:
            await asyncio.wait([self.in_flight], timeout=timeout)
        await super().shutdown(timeout)


class PollServer(web.Server):
    """aiohttp's server, making `PollConnection`s."""

    def __init__(self, handler: Any, *, polls: FastPolls, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._polls = polls

    def __call__(self) -> RequestHandler:
        return PollConnection(self, loop=self._loop, polls=self._polls, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` for the gateway's app: its connections answer polls on the fast path."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if not FAST_PATH_AIOHTTP.match(aiohttp.__version__):
            log.warning("aiohttp %s: polls take aiohttp's own way (no fast path)", aiohttp.__version__)
            return server
        return PollServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            polls=FastPolls(self.app),
            **server._kwargs,  # what aiohttp's server would have given its connections
        )
