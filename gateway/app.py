"""The app factory: wires config, store, pool and upstream into an aiohttp application."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from .appkeys import GATEWAY
from .auth import identify
from .clock import Clock, SystemClock
from .config import Config
from .errors import GatewayError, error_response
from .pool import KeyPool
from .proxy import CLIENT, KEY_NAME, answer_response, routes
from .service import Gateway, PassThrough
from .store import Store, open_store
from .upstream import UpstreamClient

log = logging.getLogger("agnes_gateway")
access_log = logging.getLogger("agnes_gateway.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AUTHENTICATED_PREFIXES = ("/v1/",)


def create_app(config: Config, *, clock: Clock | None = None, store: Store | None = None) -> web.Application:
    """A ready-to-run gateway; the store and upstream session open and close with the app."""
    clock = clock or SystemClock()
    store = store or open_store(config.database)
    app = web.Application(
        client_max_size=config.limits.max_body_bytes,
        middlewares=[_access_log, _errors, _authenticate],
    )
    app.router.add_routes(routes)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        session = UpstreamClient.new_session(config.upstream)
        pool = KeyPool(config.keys, store, config.schedule)
        await pool.load(clock.now())
        app[GATEWAY] = Gateway(config, store, pool, UpstreamClient(config.upstream, session), clock)
        try:
            yield
        finally:
            await session.close()
            await store.close()

    app.cleanup_ctx.append(resources)
    return app


@web.middleware
async def _access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request: method, route, status, client, key, duration; never a token."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        if access_log.isEnabledFor(logging.INFO):
            route = request.match_info.route.resource
            access_log.info(
                "%s %s %d client=%s key=%s %.1fms",
                request.method,
                route.canonical if route is not None else "<unmatched>",
                status,
                request.get(CLIENT, "-"),
                request.get(KEY_NAME, "-"),
                (time.perf_counter() - started) * 1000,
            )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error the gateway makes leaves as JSON; upstream's own answers pass unchanged."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc)
    except PassThrough as exc:
        return answer_response(exc.answer)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(
            GatewayError(
                exc.status,
                "body_too_large",
                f"the request body is over the limit of {request.app[GATEWAY].config.limits.max_body_bytes} bytes",
            )
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error_response(GatewayError(exc.status, code, exc.reason))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.match_info.route.resource or request.path)
        return error_response(GatewayError(500, "internal_error", "the gateway failed to handle this request"))


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(AUTHENTICATED_PREFIXES):
        client = identify(request.app[GATEWAY].config.clients, request.headers.get("Authorization"))
        if client is None:
            raise GatewayError(401, "invalid_token", "send Authorization: Bearer <gateway client token>")
        request[CLIENT] = client
    return await handler(request)


async def serve(config: Config, *, clock: Clock | None = None) -> None:
    """Run the gateway until SIGINT or SIGTERM, then finish in-flight requests and close."""
    if not config.clients and not config.listen.is_loopback:
        raise SystemExit(
            f"refusing to listen on {config.listen.host}: no clients are configured, so anyone could use the pool; "
            "add `clients:` with tokens, or listen on 127.0.0.1"
        )
    app = create_app(config, clock=clock)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=30.0)
    await runner.setup()
    site = web.TCPSite(runner, config.listen.host, config.listen.port)
    await site.start()
    if not config.clients:
        log.warning("no clients configured: accepting anonymous requests, on loopback only")
    log.info(
        "agnes-gateway listening on http://%s:%d with %d key(s), upstream %s, database %s",
        config.listen.host,
        config.listen.port,
        len(config.keys),
        config.upstream.base_url,
        config.database,
    )
    await wait_for_signal()
    log.info("shutting down")
    await runner.cleanup()


async def wait_for_signal() -> None:
    """Return when SIGINT or SIGTERM arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
