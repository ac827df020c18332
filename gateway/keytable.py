"""The key table operators see, and their actions on keys: shared by the admin API and the `keys` command."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from .pool import KeyPool, KeyStatus
from .store import KeyState

#: How an operator's disable is worded; an upstream refusal (HTTP 401) reads differently.
OPERATOR_DISABLE = "disabled by an operator"


class UnknownKey(LookupError):
    """No key of that name is in the pool."""


@dataclass(frozen=True)
class KeyRow:
    """One key as an operator sees it; never the secret itself."""

    name: str
    secret: str
    priority: int
    daily_limit: int | None
    used: int
    remaining: int | None
    state: str
    reason: str | None
    until: str | None
    disabled_by: str | None
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def iso(ts: float | None) -> str | None:
    """Epoch seconds as an ISO 8601 UTC time."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def key_row(status: KeyStatus, pool: KeyPool, now: datetime) -> KeyRow:
    """The row of one key at `now`: its effective state, and why and until when."""
    ts = now.timestamp()
    state = status.state(ts)
    limit = status.config.daily_limit
    reason: str | None = None
    until: float | None = None
    mark = status.mark
    if state is not KeyState.ACTIVE and mark is not None and (mark.until is None or mark.until > ts):
        reason, until = mark.reason, mark.until
    elif state is KeyState.SPENT:
        reason, until = f"daily limit of {limit} reached", pool.schedule.next_reset(now).timestamp()
    disabled_by = None
    if state is KeyState.DISABLED and reason is not None:
        disabled_by = "operator" if reason.startswith(OPERATOR_DISABLE) else "upstream"
    return KeyRow(
        name=status.name,
        secret=status.config.secret.masked(),
        priority=status.config.priority,
        daily_limit=limit,
        used=status.used,
        remaining=None if limit is None else max(limit - status.used, 0),
        state=state.value,
        reason=reason,
        until=iso(until),
        disabled_by=disabled_by,
        last_error=status.last_error,
    )


def key_table(pool: KeyPool, now: datetime) -> dict[str, Any]:
    """Every key of the pool (in config order) and the retired ones: the body of `GET /admin/keys`."""
    return {
        "day": pool.day,
        "keys": [key_row(s, pool, now).to_json() for s in pool.statuses()],
        "retired": [k.name for k in pool.retired()],
    }


def _status(pool: KeyPool, name: str) -> KeyStatus:
    for status in pool.statuses():
        if status.name == name:
            return status
    raise UnknownKey(name)


async def disable(pool: KeyPool, name: str, now: datetime, note: str | None = None) -> KeyRow:
    """An operator takes a key out of the pool until enabled again (persisted)."""
    status = _status(pool, name)
    last_error = status.last_error  # an operator's decision is not an upstream error
    await pool.mark_disabled(status.config, f"{OPERATOR_DISABLE}: {note}" if note else OPERATOR_DISABLE)
    status.last_error = last_error
    return key_row(status, pool, now)


async def enable(pool: KeyPool, name: str, now: datetime) -> KeyRow:
    """Clear any mark: the key takes creates again if it has quota left."""
    status = _status(pool, name)
    await pool.enable(status.config)
    return key_row(status, pool, now)


async def reset(pool: KeyPool, name: str, now: datetime, *, counts: bool = False) -> KeyRow:
    """Clear today's spent or cooling mark; with `counts`, today's count too."""
    status = _status(pool, name)
    await pool.reset(status.config, counts=counts)
    return key_row(status, pool, now)
