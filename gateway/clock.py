"""Time, injected: the clock protocol and the quota day computed from it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from typing import Protocol
from zoneinfo import ZoneInfo


class Clock(Protocol):
    """Where the gateway reads time from; tests pass a `ManualClock`."""

    def now(self) -> datetime:
        """The current wall-clock time, timezone-aware."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, for durations and deadlines."""
        ...


class SystemClock:
    """The real time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass
class ManualClock:
    """A clock that moves only when told to, so quota days are tested without waiting."""

    current: datetime = field(default_factory=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    mono: float = 1000.0

    def now(self) -> datetime:
        return self.current

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)
        self.mono += seconds

    def set(self, when: datetime) -> None:
        """Jump the wall clock (the monotonic clock moves forward by the same amount, never back)."""
        delta = (when - self.current).total_seconds()
        self.current = when
        self.mono += max(delta, 0.0)


@dataclass(frozen=True)
class QuotaSchedule:
    """When a quota day starts: `reset` o'clock in `tz`."""

    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("Asia/Shanghai"))
    reset: dtime = dtime(0, 0)

    def day(self, now: datetime) -> date:
        """The quota day `now` falls in, named by the local date on which it started."""
        local = now.astimezone(self.tz)
        if local.time() < self.reset:
            return local.date() - timedelta(days=1)
        return local.date()

    def day_key(self, now: datetime) -> str:
        """`day(now)` as the ISO string the store keys counts by."""
        return self.day(now).isoformat()

    def next_reset(self, now: datetime) -> datetime:
        """The instant the next quota day starts, timezone-aware."""
        start = datetime.combine(self.day(now) + timedelta(days=1), self.reset, tzinfo=self.tz)
        return start

    def seconds_to_reset(self, now: datetime) -> float:
        return max((self.next_reset(now) - now).total_seconds(), 0.0)
