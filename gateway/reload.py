"""Hot reload: re-read the config and apply it to the running gateway; counts and task routes stay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from .config import Config, ConfigError, LimitsConfig
from .logs import redact_more
from .service import Gateway
from .upstream import UpstreamClient

log = logging.getLogger("agnes_gateway.reload")
#: Set by `serve --workers` in each worker's environment: a reload through the admin API reloads them all.
WORKER_ENV = "AGNES_GATEWAY_WORKER"

ConfigLoader = Callable[[], Config]


class ReloadRefused(Exception):
    """The new config cannot be used; the running one stays."""


@dataclass(frozen=True)
class ReloadReport:
    """What a reload changed, and what waits for a restart."""

    source: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    needs_restart: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "reloaded",
            "source": self.source,
            "keys_added": list(self.added),
            "keys_removed": list(self.removed),
            "keys_changed": list(self.changed),
            "needs_restart": list(self.needs_restart),
        }


def restart_only(old: Config, new: Config) -> tuple[str, ...]:
    """Options whose change a running gateway cannot take: they keep their running values."""
    pairs: dict[str, tuple[object, object]] = {
        "listen": (old.listen, new.listen),
        "database": (old.database, new.database),
        "upstream.max_connections": (old.upstream.max_connections, new.upstream.max_connections),
        **{
            f"limits.{f.name}": (getattr(old.limits, f.name), getattr(new.limits, f.name)) for f in fields(LimitsConfig)
        },
        "log.format": (old.log.format, new.log.format),
        "shutdown.drain_s": (old.shutdown.drain_s, new.shutdown.drain_s),
        "metrics": (old.metrics, new.metrics),
    }
    return tuple(name for name, (was, now) in pairs.items() if was != now)


def effective(old: Config, new: Config) -> Config:
    """`new`, with the restart-only options kept at their running values."""
    return replace(
        new,
        listen=old.listen,
        database=old.database,
        upstream=replace(new.upstream, max_connections=old.upstream.max_connections),
        limits=old.limits,
        log=replace(new.log, format=old.log.format),
        shutdown=old.shutdown,
        metrics=old.metrics,
    )


class Reloader:
    """Applies a freshly read config to a gateway, one reload at a time."""

    def __init__(self, load: ConfigLoader | None) -> None:
        self.load = load
        self._lock = asyncio.Lock()

    async def reload(self, gateway: Gateway) -> ReloadReport:
        """Read the config again and apply it; raise `ReloadRefused` (logged) and keep running as before."""
        async with self._lock:
            try:
                new = await self._read(gateway.config)
            except ReloadRefused as exc:
                log.error("config reload refused, keeping the running config: %s", exc)
                raise
            return await self._apply(gateway, new)

    async def _read(self, running: Config) -> Config:
        if self.load is None:
            raise ReloadRefused("this gateway was started without a config file to re-read")
        try:
            new = await asyncio.to_thread(self.load)
        except ConfigError as exc:
            raise ReloadRefused(str(exc)) from None
        if not new.clients and not running.listen.is_loopback:
            raise ReloadRefused(
                f"clients: the new config has none, but the gateway listens on {running.listen.host}; "
                "anyone could use the pool"
            )
        return new

    async def _apply(self, gateway: Gateway, new: Config) -> ReloadReport:
        old = gateway.config
        config = effective(old, new)
        old_keys = {k.name: k for k in old.keys}
        new_keys = {k.name: k for k in config.keys}
        report = ReloadReport(
            source=new.source,
            added=tuple(n for n in new_keys if n not in old_keys),
            removed=tuple(n for n in old_keys if n not in new_keys),
            changed=tuple(n for n in new_keys if n in old_keys and new_keys[n] != old_keys[n]),
            needs_restart=restart_only(old, new),
        )
        # Everything up to pool.load() happens without yielding: no request sees half a config.
        redact_more(config)
        gateway.config = config
        gateway.polls.freshness_s = config.poll.freshness_s
        replaced = gateway.upstream
        if config.upstream != old.upstream:
            gateway.upstream = UpstreamClient(config.upstream, gateway.upstream.session)
        gateway.breakers.threshold = config.resilience.breaker_failures
        gateway.breakers.open_s = config.resilience.breaker_open_s
        gateway.pool.schedule = config.schedule
        gateway.pool.configure(config.keys)
        await gateway.pool.load(gateway.clock.now())
        if gateway.upstream is not replaced:
            await replaced.close()  # its idle connections now, those in use when their call ends
        if config.log.level != old.log.level:
            logging.getLogger().setLevel(config.log.level)
        log.info(
            "config reloaded from %s: keys added %s, removed %s, changed %s",
            report.source,
            list(report.added) or "none",
            list(report.removed) or "none",
            list(report.changed) or "none",
        )
        if report.needs_restart:
            log.warning(
                "changes to %s take effect only after a restart; the running values stay",
                ", ".join(report.needs_restart),
            )
        return report


def reload_on_hangup(reloader: Reloader, gateway: Callable[[], Gateway]) -> Callable[[], None]:
    """Reload on SIGHUP; returns the function that stops listening for it."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[Any]] = set()

    async def run() -> None:
        log.info("SIGHUP: reloading the config")
        with contextlib.suppress(ReloadRefused):  # already logged with its reason
            await reloader.reload(gateway())

    def hangup() -> None:
        task = loop.create_task(run())
        running.add(task)
        task.add_done_callback(running.discard)

    def stop() -> None:
        loop.remove_signal_handler(signal.SIGHUP)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    return stop
