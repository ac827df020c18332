"""The app factory: wires config, store, pool and upstream into an aiohttp application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import logs
from .admin import create_admin_app
from .appkeys import GATEWAY, METRICS, RELOADER, RETENTION
from .auth import identify
from .clock import Clock, SystemClock
from .config import Config
from .download import routes as download_routes
from .download import video_files
from .errors import GatewayError, error_response
from .fastpath import GatewayRunner
from .metrics import UNMATCHED_ROUTE, GatewayMetrics, create_metrics_app, metrics_handler
from .observe import CLIENT_CLOSED, answered
from .openai_api import PREFIX as OPENAI_PREFIX
from .openai_api import create_openai_app
from .pool import LOCAL_REFRESH_S, SHARED_REFRESH_S, KeyPool
from .proxy import CLIENT, KEY_NAME, REQUEST_ID, REQUEST_ID_HEADER, answer_response, routes, send_request_id
from .reload import ConfigLoader, Reloader, reload_on_hangup
from .retention import Retention
from .service import Gateway, PassThrough
from .store import Store, is_postgres, mask_password, open_store
from .upstream import UpstreamClient

log = logging.getLogger("agnes_gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AUTHENTICATED_PREFIXES = ("/v1/",)
#: Errors about a request body that was not (fully) read: answered, then the connection is closed.
HANG_UP_STATUSES = frozenset({408, 413})


def create_app(
    config: Config,
    *,
    clock: Clock | None = None,
    store: Store | None = None,
    reload_config: ConfigLoader | None = None,
) -> web.Application:
    """A ready-to-run gateway; the store and upstream session open and close with the app.

    `reload_config` reads the config again for a reload (SIGHUP, `POST /admin/reload`); without it
    reloads are refused.
    """
    clock = clock or SystemClock()
    store = store or open_store(config.database)
    metrics = GatewayMetrics()
    app = web.Application(
        client_max_size=config.limits.max_body_bytes,
        middlewares=[observe(metrics)],
    )
    app[METRICS] = metrics
    app.router.add_routes(routes)
    if config.metrics.port is None:
        app.router.add_get("/metrics", metrics_handler(metrics, config.metrics.token))
    app[RELOADER] = Reloader(reload_config)
    app.add_subapp("/admin", create_admin_app())

    async def resources(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        session = UpstreamClient.new_session(config.upstream)
        shared = is_postgres(config.database)
        pool = KeyPool(config.keys, store, config.schedule, refresh_s=SHARED_REFRESH_S if shared else LOCAL_REFRESH_S)
        await pool.load(clock.now())
        app[GATEWAY] = Gateway(config, store, pool, UpstreamClient(config.upstream, session), clock, events=metrics)
        metrics.bind(app[GATEWAY])
        gateway = app[GATEWAY]
        app[RETENTION] = retention = Retention(lambda: gateway.config.retention, store, gateway.tasks, clock)
        pruning = asyncio.create_task(retention.run())
        try:
            yield
        finally:
            pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pruning
            await app[GATEWAY].upstream.close()
            await session.close()
            await store.close()

    app.cleanup_ctx.append(resources)
    # Client-facing extras: video downloads (native and OpenAI) and the OpenAI Videos dialect.
    app.router.add_routes(download_routes)
    app.cleanup_ctx.append(video_files)
    app.add_subapp(OPENAI_PREFIX, create_openai_app())
    return app


def route_label(request: web.Request) -> str:
    """The route template (`/v1/videos/{task_id}`), never the raw path, so labels stay few."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


def observe(metrics: GatewayMetrics) -> Middleware:
    """The gateway's one middleware (each layer costs every request a few microseconds)."""

    @web.middleware
    async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Per request: its id (on the answer too), one access line, its metrics."""
        rid = logs.accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_ID] = rid
        token = logs.request_id.set(rid)
        held = logs.HeldCalls()
        held_token = logs.upstream_calls.set(held)
        started = time.perf_counter()
        status = 500
        try:
            response = await _answer(request, handler)
            status = response.status
            if not response.prepared:  # one streamed by its handler sent the id itself (`send_request_id`)
                response.headers[REQUEST_ID_HEADER] = rid
            return response
        except web.HTTPException as exc:  # redirects and the like, passed on by `_answer`
            status = exc.status
            exc.headers[REQUEST_ID_HEADER] = rid
            raise
        except asyncio.CancelledError:
            status = CLIENT_CLOSED
            raise
        finally:
            held.open = False  # calls still running for it (a shared poll, a fetch) log on their own
            answered(
                metrics,
                rid=rid,
                method=request.method,
                route=route_label(request),
                status=status,
                client=request.get(CLIENT),
                key=request.get(KEY_NAME),
                seconds=time.perf_counter() - started,
                calls=held.calls,
            )
            logs.upstream_calls.reset(held_token)
            logs.request_id.reset(token)

    return _observe


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's answer for an authenticated caller; every error the gateway makes leaves as JSON.

    Upstream's own answers pass unchanged. (Part of the one middleware, `_observe`: each middleware
    layer costs every request a few microseconds.)
    """
    try:
        if request.path.startswith(AUTHENTICATED_PREFIXES):
            _authenticate(request)
        return await handler(request)
    except GatewayError as exc:
        if exc.status in HANG_UP_STATUSES:
            return await _answer_and_hang_up(request, error_response(exc))
        return error_response(exc)
    except PassThrough as exc:
        return answer_response(exc.answer)
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.config_dict[GATEWAY].config.limits.max_body_bytes
        error = GatewayError(exc.status, "body_too_large", f"the request body is over the limit of {limit} bytes")
        return await _answer_and_hang_up(request, error_response(error))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        response = error_response(GatewayError(exc.status, code, exc.reason))
        if "Allow" in exc.headers:  # a 405 says which methods the path takes
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.match_info.route.resource or request.path)
        return error_response(GatewayError(500, "internal_error", "the gateway failed to handle this request"))


async def _answer_and_hang_up(request: web.Request, response: web.Response) -> web.Response:
    """Send `response`, then close the connection: the rest of a slow or oversized body is not worth reading."""
    response.force_close()
    send_request_id(request, response)
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()
    return response


def _authenticate(request: web.Request) -> None:
    """Note the calling client on the request, or refuse it with 401."""
    client = identify(request.app[GATEWAY].config.clients, request.headers.get("Authorization"))
    if client is None:
        raise GatewayError(401, "invalid_token", "send Authorization: Bearer <gateway client token>")
    request[CLIENT] = client


async def _parent_gone(stop: asyncio.Event) -> None:
    """A worker whose supervisor was killed stops too, rather than hold the port alone."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            break
    log.warning("the supervisor is gone: stopping")
    stop.set()


def refuse_open_listener(config: Config) -> None:
    """Stop here if the gateway would serve anyone on the network without a token."""
    if not config.clients and not config.listen.is_loopback:
        raise SystemExit(
            f"refusing to listen on {config.listen.host}: no clients are configured, so anyone could use the pool; "
            "add `clients:` with tokens, or listen on 127.0.0.1"
        )


async def serve(
    config: Config,
    *,
    clock: Clock | None = None,
    reload_config: ConfigLoader | None = None,
    reuse_port: bool = False,
) -> None:
    """Run the gateway until SIGINT or SIGTERM, reloading on SIGHUP; then drain in-flight requests and close.

    `reuse_port`: share the port with other processes (SO_REUSEPORT), as the workers of one `serve` do.
    """
    refuse_open_listener(config)
    app = create_app(config, clock=clock, reload_config=reload_config)
    # On shutdown aiohttp stops listening, closes idle connections and gives running requests this long.
    # keepalive_timeout also closes a connection that never completes its request headers (slowloris).
    runner = GatewayRunner(
        app,
        access_log=None,
        shutdown_timeout=config.shutdown.drain_s,
        keepalive_timeout=config.limits.idle_timeout_s,
    )
    await runner.setup()
    stop_reloading = reload_on_hangup(app[RELOADER], lambda: app[GATEWAY])
    runners: list[web.AppRunner] = [runner]
    try:
        await web.TCPSite(
            runner, config.listen.host, config.listen.port, backlog=4096, reuse_port=reuse_port or None
        ).start()
        if config.metrics.port is not None:
            metrics_runner = web.AppRunner(create_metrics_app(app[METRICS], config.metrics.token), access_log=None)
            await metrics_runner.setup()
            runners.insert(0, metrics_runner)
            host = config.metrics.host or config.listen.host
            await web.TCPSite(metrics_runner, host, config.metrics.port, reuse_port=reuse_port or None).start()
            log.info("metrics on http://%s:%d/metrics", host, config.metrics.port)
    except BaseException:
        stop_reloading()
        for each in runners:
            await each.cleanup()
        raise
    if not config.clients:
        log.warning("no clients configured: accepting anonymous requests, on loopback only")
    log.info(
        "agnes-gateway listening on http://%s:%d with %d key(s), upstream %s, database %s",
        config.listen.host,
        config.listen.port,
        len(config.keys),
        config.upstream.base_url,
        mask_password(config.database),
    )
    await wait_for_signal(leave_with_parent=reuse_port)
    stop_reloading()
    log.info("shutting down: no new connections; requests in flight have up to %g s to finish", config.shutdown.drain_s)
    for each in runners:
        await each.cleanup()
    log.info("stopped; database closed")


async def wait_for_signal(*, leave_with_parent: bool = False) -> None:
    """Return when SIGINT or SIGTERM arrives (or, with `leave_with_parent`, when the parent process is gone)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_parent_gone(stop)) if leave_with_parent else None
    try:
        await stop.wait()
    finally:
        if watch is not None:
            watch.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
