"""The admin API under `/admin/`: the key table, key actions, task and client lookups, reload.

Open only with `Authorization: Bearer <admin_token>`; a client token is not an admin token.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import keytable
from .appkeys import GATEWAY, RELOADER
from .auth import ANONYMOUS, bearer, identify, matches
from .config import Config
from .errors import GatewayError
from .proxy import CLIENT
from .reload import WORKER_ENV, ReloadRefused
from .service import TASK_ID_RE, Gateway

routes = web.RouteTableDef()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_NOTE = 200


def create_admin_app() -> web.Application:
    """The admin routes as a sub-application, mounted at `/admin` by `create_app`."""
    app = web.Application(middlewares=[_require_admin])
    app.router.add_routes(routes)
    return app


def check_admin(config: Config, header: str | None) -> None:
    """Let the admin token through; refuse anything else with 404 (admin off), 401 or 403."""
    if config.admin_token is None:
        raise GatewayError(404, "admin_disabled", "the admin API is off: set admin_token in the config")
    token = bearer(header)
    # Both comparisons always run, in constant time, whichever token was sent.
    is_admin = token is not None and matches(token, config.admin_token)
    client = identify(config.clients, header)
    if is_admin:
        return
    if client is not None and client != ANONYMOUS:
        raise GatewayError(403, "not_admin", "a client token cannot use the admin API; send the admin token")
    raise GatewayError(401, "invalid_admin_token", "send Authorization: Bearer <admin token>")


@web.middleware
async def _require_admin(request: web.Request, handler: Handler) -> web.StreamResponse:
    check_admin(request.config_dict[GATEWAY].config, request.headers.get("Authorization"))
    request[CLIENT] = "admin"  # for the access log
    return await handler(request)


async def _gateway(request: web.Request) -> Gateway:
    """The gateway, with counts and key states brought up to now (as every replica left them)."""
    gateway = request.config_dict[GATEWAY]
    await gateway.pool.refresh(gateway.clock.now())
    return gateway


# --- keys -------------------------------------------------------------------------------


@routes.get("/keys")
async def list_keys(request: web.Request) -> web.Response:
    gateway = await _gateway(request)
    return web.json_response(keytable.key_table(gateway.pool, gateway.clock.now()))


@routes.post("/keys/{name}/disable")
async def disable_key(request: web.Request) -> web.Response:
    gateway = await _gateway(request)
    note = await _note(request)
    row = await _on_key(keytable.disable(gateway.pool, request.match_info["name"], gateway.clock.now(), note))
    return web.json_response(row.to_json())


@routes.post("/keys/{name}/enable")
async def enable_key(request: web.Request) -> web.Response:
    gateway = await _gateway(request)
    row = await _on_key(keytable.enable(gateway.pool, request.match_info["name"], gateway.clock.now()))
    return web.json_response(row.to_json())


@routes.post("/keys/{name}/reset")
async def reset_key(request: web.Request) -> web.Response:
    gateway = await _gateway(request)
    counts = _flag(request, "counts")
    row = await _on_key(keytable.reset(gateway.pool, request.match_info["name"], gateway.clock.now(), counts=counts))
    return web.json_response(row.to_json())


async def _on_key(action: Awaitable[keytable.KeyRow]) -> keytable.KeyRow:
    try:
        return await action
    except keytable.UnknownKey as exc:
        raise GatewayError(404, "key_not_found", f"no key named {exc.args[0]!r} is in the pool") from None


async def _note(request: web.Request) -> str | None:
    """The optional `{"reason": "..."}` body of a disable."""
    body = await request.read()
    if not body.strip():
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        raise GatewayError(400, "invalid_json", 'the body must be a JSON object: {"reason": "..."}') from None
    if not isinstance(doc, dict) or set(doc) - {"reason"}:
        raise GatewayError(400, "invalid_json", 'the body may only hold {"reason": "..."}')
    note = doc.get("reason")
    if note is None:
        return None
    if not isinstance(note, str) or len(note) > MAX_NOTE or not note.isprintable():
        raise GatewayError(400, "invalid_reason", f"reason must be a single line of at most {MAX_NOTE} characters")
    return note.strip() or None


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in {"true", "1", "false", "0"}:
        raise GatewayError(400, "invalid_query", f"{name} must be true or false")
    return value in {"true", "1"}


# --- tasks and clients ------------------------------------------------------------------


@routes.get("/tasks/{task_id}")
async def show_task(request: web.Request) -> web.Response:
    gateway = request.config_dict[GATEWAY]
    task_id = request.match_info["task_id"]
    if not TASK_ID_RE.match(task_id):
        raise GatewayError(400, "invalid_task_id", "task ids are 1-128 letters, digits, '-' or '_'")
    task = await gateway.tasks.get(task_id)
    if task is None:
        raise GatewayError(404, "task_not_found", f"the gateway has no route for task {task_id}")
    return web.json_response(
        {
            "task_id": task.task_id,
            "key": task.key_name,
            "key_configured": gateway.pool.key(task.key_name) is not None,
            "client": task.client,
            "created_at": keytable.iso(task.created_at),
            "status": task.status,
            "progress": task.progress,
            "updated_at": keytable.iso(task.updated_at),
        }
    )


@routes.get("/clients")
async def list_clients(request: web.Request) -> web.Response:
    gateway = await _gateway(request)
    usage = await gateway.store.client_usage(gateway.pool.day)
    rows: list[dict[str, Any]] = []
    for client in gateway.config.clients:
        used = usage.pop(client.name, 0)
        limit = client.daily_limit
        remaining = None if limit is None else max(limit - used, 0)
        rows.append(
            {"name": client.name, "daily_limit": limit, "used": used, "remaining": remaining, "configured": True}
        )
    # Callers no longer (or never) in the config that created today: anonymous ones, removed clients.
    for name, used in sorted(usage.items()):
        rows.append({"name": name, "daily_limit": None, "used": used, "remaining": None, "configured": False})
    return web.json_response({"day": gateway.pool.day, "clients": rows})


# --- reload -----------------------------------------------------------------------------


@routes.post("/reload")
async def reload_config(request: web.Request) -> web.Response:
    try:
        report = await request.config_dict[RELOADER].reload(request.config_dict[GATEWAY])
    except ReloadRefused as exc:
        raise GatewayError(400, "reload_refused", f"the running config stays: {exc}") from None
    if os.environ.get(WORKER_ENV):
        # One of several workers: the supervisor passes a SIGHUP to all of them (this one reloads again,
        # finding nothing new), so every worker runs the new config.
        os.kill(os.getppid(), signal.SIGHUP)
    return web.json_response(report.to_json())
