"""The `agnes-gateway` command: serve, check-config, simulate, demo, generate, keys, migrate."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from . import __version__, keytable
from .app import create_app, serve, wait_for_signal
from .clock import SystemClock
from .config import Config, ConfigError, load_config, parse_config, replace_listen
from .fastpath import GatewayRunner
from .generate import add_parser as add_generate_parser
from .logs import setup_logging
from .pool import KeyPool
from .simulator import Fault, SimulatorConfig, create_simulator_app
from .store import mask_password, open_store
from .workers import supervise

CONFIG_ENV = "AGNES_GATEWAY_CONFIG"
ADMIN_TOKEN_ENV = "AGNES_GATEWAY_ADMIN_TOKEN"

# The demo's keys: what the simulator accepts, and how the gateway's config names them.
DEMO_KEYS: tuple[dict[str, Any], ...] = (
    {"name": "demo-a", "key": "sk-demo-aaaa-0001", "daily_limit": 5, "priority": 0, "upstream_limit": 5},
    # No limit in the gateway's config: the simulator's own quota refusal makes it fail over.
    {"name": "demo-b", "key": "sk-demo-bbbb-0002", "priority": 0, "upstream_limit": 3},
    {"name": "demo-backup", "key": "sk-demo-cccc-0003", "daily_limit": 10, "priority": 1, "upstream_limit": 10},
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"agnes-gateway: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agnes-gateway",
        description="A drop-in gateway for the Agnes video API: one base URL over a pool of keys.",
    )
    parser.add_argument("--version", action="version", version=f"agnes-gateway {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the gateway", description="Run the gateway until SIGINT/SIGTERM.")
    _config_arg(p)
    p.add_argument("--host", help="listen address (overrides listen.host)")
    p.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    p.add_argument("--workers", type=int, help="gateway processes sharing the port (overrides listen.workers)")
    p.add_argument("--uvloop", action="store_true", help="run on uvloop if it is installed (a faster event loop)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of the workers of a supervisor
    p.set_defaults(run=_serve)

    p = sub.add_parser("check-config", help="validate a config file without starting")
    p.add_argument("file", nargs="?", help=f"the YAML file (default: ${CONFIG_ENV}, else the zero-config key files)")
    p.set_defaults(run=_check_config)

    p = sub.add_parser(
        "simulate",
        help="run a local simulator of the upstream API",
        description="A local stand-in for the Agnes video API: per-key daily quotas, task progress, MP4 downloads.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument(
        "--key",
        action="append",
        metavar="KEY[:LIMIT]",
        help="an accepted upstream key and its daily limit (repeatable; default: the demo keys)",
    )
    p.add_argument("--task-seconds", type=float, default=30.0, help="how long a video takes (default 30)")
    p.add_argument("--quota-status", type=int, default=429, help="HTTP status of the quota refusal (default 429)")
    p.add_argument(
        "--fault",
        action="append",
        metavar="JSON",
        help='a fault for the whole run, e.g. \'{"kind": "status", "status": 503, "times": -1}\' (repeatable; '
        "kinds: status, quota, rate_limit, not_json, slow, reset, html_error, hold)",
    )
    p.add_argument("--dead-every", type=int, default=0, metavar="N", help="drop every Nth request's connection")
    p.add_argument("--uvloop", action="store_true", help="use uvloop if installed (for benchmarks)")
    p.set_defaults(run=_simulate)

    p = sub.add_parser(
        "demo",
        help="run the simulator and a gateway with demo keys, no account needed",
        description="Start a simulated upstream and a gateway in front of it, print curl commands, run until Ctrl-C.",
    )
    p.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    p.add_argument("--upstream-port", type=int, default=8090, help="simulator port (default 8090)")
    p.add_argument(
        "--database", default="./agnes-gateway-demo.db", help="SQLite file (default ./agnes-gateway-demo.db)"
    )
    p.add_argument("--task-seconds", type=float, default=20.0, help="how long a simulated video takes (default 20)")
    p.set_defaults(run=_demo)

    add_generate_parser(sub)
    _keys_parser(sub)

    p = sub.add_parser(
        "migrate",
        help="copy a SQLite file's counts, key states and task routes into PostgreSQL",
        description=(
            "Copy everything a gateway keeps in its SQLite file (quota counts, key states, task routes with "
            "their answers) into an empty PostgreSQL database, in one transaction, so several gateways can "
            "share it without losing running tasks. Stop the gateway that uses the file first."
        ),
    )
    p.add_argument("--from", dest="source", required=True, metavar="SQLITE_FILE", help="the gateway's SQLite file")
    p.add_argument(
        "--to", dest="target", required=True, metavar="POSTGRESQL_URL", help="postgresql://user[:pass]@host[:port]/db"
    )
    p.set_defaults(run=_migrate)
    return parser


def _keys_parser(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    _config_arg(common)
    common.add_argument(
        "--url",
        help=f"a running gateway's base URL: act through its admin API (token from ${ADMIN_TOKEN_ENV} or the config)",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    # The same options after the action; SUPPRESS keeps them from overwriting ones given before it.
    late = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _config_arg(late)
    late.add_argument("--url", help=argparse.SUPPRESS)
    late.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser(
        "keys",
        parents=[common],
        help="show the key table; disable, enable or reset a key",
        description=(
            "Show every key with its state and today's count, or change one key. Without --url this reads and "
            "writes the database directly (a running gateway picks changes up at its next reload or restart); "
            "with --url it goes through the running gateway's admin API."
        ),
    )
    p.set_defaults(run=_keys)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", parents=[late], help="the key table (the default)")
    a = actions.add_parser("disable", parents=[late], help="take a key out of the pool until enabled (persisted)")
    a.add_argument("name")
    a.add_argument("--reason", help="a note kept with the disable")
    a = actions.add_parser("enable", parents=[late], help="let a disabled, spent or cooling key take creates again")
    a.add_argument("name")
    a = actions.add_parser("reset", parents=[late], help="clear a key's spent or cooling mark for today")
    a.add_argument("name")
    a.add_argument("--counts", action="store_true", help="also zero the key's count for today")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help=f"YAML config file (default: ${CONFIG_ENV}, else ~/.agnes_api_key)")


def _config_path(given: str | None) -> str | None:
    return given or os.environ.get(CONFIG_ENV) or None


def _serve(args: argparse.Namespace) -> int:
    path = _config_path(args.config)

    def read() -> Config:
        return replace_listen(load_config(path), args.host, args.port, args.workers)

    config = read()
    setup_logging(config)
    if config.listen.workers > 1 and not args.worker:
        return supervise(config, path, uvloop=args.uvloop)
    if args.uvloop:
        _install_uvloop()
    asyncio.run(serve(config, reload_config=read, reuse_port=args.worker))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    path = _config_path(args.file)
    config = load_config(path)
    print(f"{config.source}: OK")
    workers = f" ({config.listen.workers} workers)" if config.listen.workers > 1 else ""
    print(f"  listen    {config.listen.host}:{config.listen.port}{workers}")
    print(f"  upstream  {config.upstream.base_url}")
    print(f"  database  {mask_password(config.database)}")
    print(f"  quota day starts {config.schedule.reset:%H:%M} {config.schedule.tz.key}")
    for key in config.keys:
        limit = "unlimited" if key.daily_limit is None else f"{key.daily_limit}/day"
        print(f"  key {key.name:<16} {key.secret.masked():<8} priority {key.priority}  {limit}")
    print(f"  clients   {', '.join(c.name for c in config.clients) or 'none (anonymous, loopback only)'}")
    m = config.metrics
    where = "listen port" if m.port is None else f"{m.host or config.listen.host}:{m.port}"
    print(f"  metrics   /metrics on {where}, {'bearer token required' if m.token else 'no token'}")
    if not config.clients and not config.listen.is_loopback:
        print("  warning: no clients configured, so the gateway will refuse to listen on a non-loopback host")
        return 1
    return 0


def _parse_sim_keys(values: list[str] | None) -> dict[str, int | None]:
    if not values:
        return {k["key"]: k["upstream_limit"] for k in DEMO_KEYS}
    keys: dict[str, int | None] = {}
    for value in values:
        key, _, limit = value.partition(":")
        keys[key] = int(limit) if limit else None
    return keys


def _simulate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        faults = tuple(Fault.from_dict(_json_object(text)) for text in args.fault or ())
    except (ValueError, TypeError) as exc:
        print(f"agnes-gateway simulate: --fault: {exc}", file=sys.stderr)
        return 2
    sim = SimulatorConfig(
        keys=_parse_sim_keys(args.key),
        task_seconds=args.task_seconds,
        quota_status=args.quota_status,
        faults=faults,
        dead_every=max(args.dead_every, 0),
    )
    if args.uvloop:
        _install_uvloop()
    web.run_app(create_simulator_app(sim), host=args.host, port=args.port, access_log=None, print=None)
    return 0


def _json_object(text: str) -> dict[str, Any]:
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("a fault must be a JSON object")
    return doc


def _install_uvloop() -> None:
    """Make uvloop the event loop policy, or say why not and carry on with asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        print("uvloop is not installed (pip install uvloop); using asyncio's loop", file=sys.stderr)
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def demo_config(port: int, upstream_port: int, database: str) -> Config:
    """The gateway config of `agnes-gateway demo`: three demo keys, anonymous clients, loopback."""
    keys = [{k: v for k, v in key.items() if k != "upstream_limit"} for key in DEMO_KEYS]
    return parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            "upstream": {"base_url": f"http://127.0.0.1:{upstream_port}", "timeout_s": 10},
            "database": database,
            "keys": keys,
        },
        source="demo",
    )


def _migrate(args: argparse.Namespace) -> int:
    from .store.migrate import MigrationError, sqlite_to_postgres

    try:
        migrated = asyncio.run(sqlite_to_postgres(args.source, args.target))
    except (MigrationError, RuntimeError) as exc:
        print(f"agnes-gateway migrate: {exc}", file=sys.stderr)
        return 2
    print(f"copied {migrated.summary()} from {args.source} to {mask_password(args.target)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    config = demo_config(args.port, args.upstream_port, str(Path(args.database).resolve()))
    setup_logging(config)
    asyncio.run(_run_demo(config, args.upstream_port, args.task_seconds))
    return 0


async def _run_demo(config: Config, upstream_port: int, task_seconds: float) -> None:
    sim = SimulatorConfig(keys={k["key"]: k["upstream_limit"] for k in DEMO_KEYS}, task_seconds=task_seconds)
    runners = [
        web.AppRunner(create_simulator_app(sim), access_log=None),
        GatewayRunner(create_app(config), access_log=None),
    ]
    for runner, port in zip(runners, (upstream_port, config.listen.port), strict=True):
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{config.listen.port}"
    print(
        f"""
agnes-gateway demo: gateway on {base}, simulated upstream on http://127.0.0.1:{upstream_port}
database: {config.database}; keys: demo-a (5/day), demo-b (upstream refuses after 3), demo-backup (priority 1, 10/day)

Create a video (copy the task_id from the answer):
  curl -s {base}/v1/videos -H 'Content-Type: application/json' \\
       -d '{{"model": "agnes-video-v2.0", "prompt": "A cat playing piano in a jazz bar"}}'
Poll it (done after {task_seconds:g} s):
  curl -s {base}/v1/videos/TASK_ID
Download it: curl -so video.mp4 {base}/v1/videos/TASK_ID/content
Or all in one: agnes-gateway generate "A cat playing piano" --url {base}
OpenAI SDK: OpenAI(base_url="{base}/openai/v1", api_key="demo").videos.create_and_poll(prompt="A cat")
Run the create 18 times to watch keys fail over and the pool run dry (429 all_keys_exhausted).
Health: curl -s {base}/healthz
Press Ctrl-C to stop.
""",
        flush=True,
    )
    try:
        await wait_for_signal()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


# --- keys -------------------------------------------------------------------------------


class CommandFailed(Exception):
    """A `keys` action that could not be done; the message says why."""


def _keys(args: argparse.Namespace) -> int:
    args.action = args.action or "list"
    try:
        doc = asyncio.run(_keys_remote(args) if args.url else _keys_local(args))
    except CommandFailed as exc:
        print(f"agnes-gateway keys: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    elif args.action == "list":
        print(format_key_table(doc))
    else:
        print(format_key_table({"keys": [doc]}))
    return 0


async def _keys_local(args: argparse.Namespace) -> dict[str, Any]:
    """Act on the database directly, as a gateway starting with this config would see it."""
    config = load_config(_config_path(args.config))
    logging.getLogger("agnes_gateway").addHandler(logging.NullHandler())  # the command prints its own result
    store = open_store(config.database)
    await store.open()
    try:
        now = SystemClock().now()
        pool = KeyPool(config.keys, store, config.schedule)
        await pool.load(now)
        try:
            if args.action == "disable":
                return (await keytable.disable(pool, args.name, now, args.reason)).to_json()
            if args.action == "enable":
                return (await keytable.enable(pool, args.name, now)).to_json()
            if args.action == "reset":
                return (await keytable.reset(pool, args.name, now, counts=args.counts)).to_json()
        except keytable.UnknownKey:
            raise CommandFailed(f"no key named {args.name!r} in {config.source}") from None
        return keytable.key_table(pool, now)
    finally:
        await store.close()


async def _keys_remote(args: argparse.Namespace) -> dict[str, Any]:
    """Act through a running gateway's admin API."""
    base = args.url.rstrip("/") + "/admin/keys"
    headers = {"Authorization": f"Bearer {_admin_token(args)}"}
    if args.action == "list":
        method, url, body = "GET", base, None
    else:
        url = f"{base}/{quote(args.name, safe='')}/{args.action}"
        if args.action == "reset" and args.counts:
            url += "?counts=true"
        reason = getattr(args, "reason", None)
        method, body = "POST", ({"reason": reason} if reason else None)
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, headers=headers, json=body) as resp,
        ):
            text = await resp.text()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CommandFailed(f"cannot reach {args.url}: {type(exc).__name__}") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise CommandFailed(f"{url} answered HTTP {status} with no JSON; is it an agnes-gateway?") from None
    if status != 200:
        message = doc.get("error", {}).get("message") if isinstance(doc, dict) else None
        raise CommandFailed(f"HTTP {status}: {message or text[:200]}")
    if not isinstance(doc, dict):
        raise CommandFailed(f"{url} answered an unexpected document")
    return doc


def _admin_token(args: argparse.Namespace) -> str:
    token = os.environ.get(ADMIN_TOKEN_ENV)
    if token:
        return token
    path = _config_path(args.config)
    if path is not None:
        config = load_config(path)
        if config.admin_token is not None:
            return config.admin_token.reveal()
    raise CommandFailed(f"--url needs the admin token: set ${ADMIN_TOKEN_ENV} or give --config with admin_token")


def format_key_table(doc: Mapping[str, Any]) -> str:
    """The key table for people: one line per key, counts and state with reason and until when."""
    header = ("NAME", "SECRET", "PRIO", "LIMIT", "USED", "LEFT", "STATE", "UNTIL", "REASON", "LAST ERROR")
    rows: list[tuple[str, ...]] = [header]
    for key in doc.get("keys", []):
        rows.append(
            tuple(
                "-" if value is None else str(value)
                for value in (
                    key["name"],
                    key["secret"],
                    key["priority"],
                    key["daily_limit"],
                    key["used"],
                    key["remaining"],
                    key["state"],
                    key["until"],
                    key["reason"],
                    key["last_error"],
                )
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    numeric = {2, 3, 4, 5}
    lines = [
        "  ".join(
            cell.rjust(w) if i in numeric else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    if doc.get("day"):
        lines.insert(0, f"quota day {doc['day']}")
    if doc.get("retired"):
        lines.append(f"removed from the config, still polling their tasks: {', '.join(doc['retired'])}")
    return "\n".join(lines)
