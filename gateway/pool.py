"""The key pool: each key's state, today's counts, and which key takes the next create.

No HTTP in here: the pool is told what upstream answered and persists what must survive.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from .clock import QuotaSchedule
from .config import KeyConfig
from .store import KeyMark, KeyState, Store

log = logging.getLogger("agnes_gateway.pool")

#: How stale the pool's view of counts and key marks may be when it chooses a key. A database that
#: several replicas share is read before every choice; one file, written by this process alone (or by
#: a few on one host, or `agnes-gateway keys`), is caught up with once a second.
SHARED_REFRESH_S = 0.0
LOCAL_REFRESH_S = 1.0


def fingerprint(key: KeyConfig) -> str:
    """A short one-way digest of the secret: tells whether a disabled key was replaced in the config."""
    return hashlib.sha256(key.secret.reveal().encode()).hexdigest()[:16]


@dataclass
class KeyStatus:
    """What the pool knows of one key right now."""

    config: KeyConfig
    used: int = 0
    mark: KeyMark | None = None
    last_error: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def remaining(self) -> float:
        limit = self.config.daily_limit
        return math.inf if limit is None else max(limit - self.used, 0)

    def state(self, now: float) -> KeyState:
        """The effective state at `now` (epoch seconds); expired marks count as active."""
        mark = self.mark
        if mark is not None and (mark.until is None or mark.until > now):
            return mark.state
        if self.remaining <= 0:
            return KeyState.SPENT
        return KeyState.ACTIVE


class KeyPool:
    """Chooses keys for creates and keeps their states, mirrored to the store."""

    def __init__(
        self, keys: Iterable[KeyConfig], store: Store, schedule: QuotaSchedule, *, refresh_s: float = SHARED_REFRESH_S
    ) -> None:
        self.store = store
        self.schedule = schedule
        self.refresh_s = refresh_s
        self._keys: dict[str, KeyStatus] = {}
        self._retired: dict[str, KeyConfig] = {}
        self._day = ""
        self._turn = 0
        self._reading = asyncio.Lock()
        self._reads_started = 0
        self._reads_done = 0
        self._read_at = 0.0
        self._marks_written = 0
        self._marks_writing = 0
        #: Marks whose time ran out and were said to be over: a re-read of the store does not bring them back.
        self._expired: dict[str, KeyMark] = {}
        self.configure(keys)

    # --- configuration ------------------------------------------------------------------

    def configure(self, keys: Iterable[KeyConfig]) -> None:
        """Take a (new) key list; removed keys are retired: no creates, but their tasks still poll."""
        new = {k.name: k for k in keys}
        for name, status in list(self._keys.items()):
            if name not in new:
                self._retired[name] = status.config
                del self._keys[name]
        for name, key in new.items():
            self._retired.pop(name, None)
            old = self._keys.get(name)
            self._keys[name] = KeyStatus(key, old.used, old.mark, old.last_error) if old else KeyStatus(key)

    async def load(self, now: datetime) -> None:
        """Read today's counts and persisted states from the store, at start (or after a reload).

        A key disabled under a secret that has since changed in the config is a new key: its mark goes.
        """
        marks = await self.store.key_marks()
        for status in self._keys.values():
            mark = marks.get(status.name)
            if mark is not None and self._applicable(status, mark) is None:
                log.info(
                    "key %s was disabled but its secret has changed: enabling it",
                    status.name,
                    extra={"key": status.name, "state": KeyState.ACTIVE.value},
                )
                await self._write_mark(status.name, None)
        await self.refresh(now, force=True)

    async def roll_day(self, now: datetime) -> None:
        """Start a new quota day when `now` has passed into one."""
        if self.schedule.day_key(now) != self._day:
            await self.refresh(now)

    async def refresh(self, now: datetime, *, force: bool = False) -> None:
        """Catch up with the store: today's counts and every key's mark, as every replica left them.

        Called before each choice of key, so a key that another gateway sharing the database marked
        spent, cooling or disabled is skipped at once (or within `refresh_s`). Callers that arrive
        together share one read: each waits for a read that started after it asked.
        """
        day, ts = self.schedule.day_key(now), now.timestamp()
        if not force and day == self._day and 0.0 <= ts - self._read_at < self.refresh_s:
            return
        asked = self._reads_started
        async with self._reading:
            if self._reads_done > asked and self._day == day and not force:
                return
            self._reads_started += 1
            started = self._reads_started
            await self._read(day)
            self._reads_done, self._read_at = started, ts

    async def _read(self, day: str) -> None:
        if day != self._day and self._day:
            log.info("new quota day %s: counts start again", day)
        marks_written, marks_writing = self._marks_written, self._marks_writing
        usage = await self.store.usage(day)
        marks = await self.store.key_marks()
        self._day = day
        # A mark this process was writing while the read was under way is newer than what was read.
        fresh = marks_writing == 0 and self._marks_writing == 0 and self._marks_written == marks_written
        for status in self._keys.values():
            status.used = usage.get(status.name, 0)
            if fresh:
                mark = self._applicable(status, marks.get(status.name))
                status.mark = None if mark is not None and mark == self._expired.get(status.name) else mark

    @staticmethod
    def _applicable(status: KeyStatus, mark: KeyMark | None) -> KeyMark | None:
        """A disabled mark names the secret it refused: a gateway holding another secret under the name ignores it."""
        if (
            mark is not None
            and mark.state is KeyState.DISABLED
            and mark.fingerprint is not None
            and mark.fingerprint != fingerprint(status.config)
        ):
            return None
        return mark

    # --- lookup -------------------------------------------------------------------------

    @property
    def day(self) -> str:
        return self._day

    def statuses(self) -> list[KeyStatus]:
        return list(self._keys.values())

    def retired(self) -> list[KeyConfig]:
        """Keys removed from the config while running: they take no creates but still poll their tasks."""
        return list(self._retired.values())

    def key(self, name: str) -> KeyConfig | None:
        """A key by name, retired ones included (they still poll their tasks)."""
        status = self._keys.get(name)
        return status.config if status else self._retired.get(name)

    def poll_keys(self) -> list[KeyConfig]:
        """Keys to try for a task the gateway never saw, in priority order."""
        return [s.config for s in sorted(self._keys.values(), key=lambda s: s.config.priority)]

    def candidates(self, now: datetime) -> list[KeyConfig]:
        """Usable keys in the order to try them for one create.

        Lowest priority number first; within it the most quota left; ties take turns.
        """
        ts = now.timestamp()
        self._expire_marks(ts)
        usable = [s for s in self._keys.values() if s.state(ts) is KeyState.ACTIVE]
        self._turn += 1
        n = len(self._keys) or 1
        order = {name: i for i, name in enumerate(self._keys)}
        usable.sort(key=lambda s: (s.config.priority, -s.remaining, (order[s.name] - self._turn) % n))
        return [s.config for s in usable]

    def ready(self, now: datetime) -> list[KeyStatus]:
        """The keys that could take a create at `now`."""
        ts = now.timestamp()
        self._expire_marks(ts)
        return [s for s in self._keys.values() if s.state(ts) is KeyState.ACTIVE]

    def usable(self, key: KeyConfig, now: datetime) -> bool:
        status = self._keys.get(key.name)
        return status is not None and status.state(now.timestamp()) is KeyState.ACTIVE

    def retry_after(self, now: datetime) -> int:
        """Whole seconds until the earliest key may take a create again."""
        ts = now.timestamp()
        to_reset = self.schedule.seconds_to_reset(now)
        waits = []
        for status in self._keys.values():
            mark = status.mark
            if mark is not None and mark.state is KeyState.DISABLED:
                continue
            if mark is not None and mark.state is KeyState.COOLING and mark.until and mark.until > ts:
                waits.append(mark.until - ts if status.remaining > 0 else to_reset)
            else:
                waits.append(to_reset)
        return max(1, math.ceil(min(waits, default=to_reset)))

    # --- quota --------------------------------------------------------------------------

    async def reserve(self, key: KeyConfig) -> bool:
        """Take one unit of today's quota for `key`; False when it has none left."""
        used = await self.store.reserve(key.name, self._day, key.daily_limit)
        status = self._keys.get(key.name)
        limit = key.daily_limit
        reached = used is None or (limit is not None and used >= limit)
        if status is not None and limit is not None and reached and status.used < limit:
            log.info(
                "key %s reached its daily limit of %d: spent until the next quota day",
                key.name,
                limit,
                extra={"key": key.name, "state": KeyState.SPENT.value},
            )
        if used is None:
            if status is not None and limit is not None:
                status.used = limit
            return False
        if status is not None:
            status.used = used
        return True

    async def release(self, key: KeyConfig) -> None:
        """Give back a unit that upstream refused, so it was never spent."""
        used = await self.store.release(key.name, self._day)
        status = self._keys.get(key.name)
        if status is not None:
            status.used = used

    # --- state changes ------------------------------------------------------------------

    async def mark_spent(self, key: KeyConfig, now: datetime, why: str) -> None:
        """Upstream says the key's daily quota is gone: skip it until the next quota day."""
        until = self.schedule.next_reset(now).timestamp()
        await self._mark(key, KeyMark(KeyState.SPENT, why, until), logging.WARNING)

    async def mark_cooling(self, key: KeyConfig, now: datetime, seconds: float, why: str) -> None:
        """Upstream rate-limited the key: rest it for `seconds`."""
        await self._mark(key, KeyMark(KeyState.COOLING, why, now.timestamp() + seconds), logging.WARNING)

    async def mark_disabled(self, key: KeyConfig, why: str) -> None:
        """Upstream refused the key itself: keep it out until the config changes or an admin enables it."""
        await self._mark(key, KeyMark(KeyState.DISABLED, why, None, fingerprint(key)), logging.ERROR)

    async def enable(self, key: KeyConfig) -> None:
        """Clear any mark: the key takes creates again (if it has quota left)."""
        status = self._keys.get(key.name)
        if status is not None:
            status.mark = None
        await self._write_mark(key.name, None)
        log.info("key %s enabled", key.name, extra={"key": key.name, "state": KeyState.ACTIVE.value})

    async def reset(self, key: KeyConfig, *, counts: bool = False) -> None:
        """Clear a spent or cooling mark (a disabled key stays disabled); `counts` also zeroes today's count."""
        status = self._keys.get(key.name)
        if status is not None and status.mark is not None and status.mark.state is not KeyState.DISABLED:
            status.mark = None
            await self._write_mark(key.name, None)
        if counts:
            await self.store.reset_usage(key.name, self._day)
            if status is not None:
                status.used = 0
        log.info("key %s reset%s", key.name, " (today's count zeroed)" if counts else "", extra={"key": key.name})

    async def _mark(self, key: KeyConfig, mark: KeyMark, level: int) -> None:
        status = self._keys.get(key.name)
        if status is not None:
            status.mark = mark
            status.last_error = mark.reason
        await self._write_mark(key.name, mark)
        log.log(
            level,
            "key %s is now %s: %s",
            key.name,
            mark.state.value,
            mark.reason,
            extra={"key": key.name, "state": mark.state.value},
        )

    def _expire_marks(self, ts: float) -> None:
        """Drop marks whose time is up (a cooldown ended, a spent day passed), saying so once."""
        for status in self._keys.values():
            mark = status.mark
            if mark is not None and mark.until is not None and mark.until <= ts:
                status.mark = None
                self._expired[status.name] = mark
                state = status.state(ts)
                log.info(
                    "key %s is %s again (it was %s: %s)",
                    status.name,
                    state.value,
                    mark.state.value,
                    mark.reason,
                    extra={"key": status.name, "state": state.value},
                )

    async def _write_mark(self, key_name: str, mark: KeyMark | None) -> None:
        self._marks_writing += 1
        try:
            await self.store.set_key_mark(key_name, mark)
        finally:
            self._marks_writing -= 1
            self._marks_written += 1
