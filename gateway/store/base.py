"""What the gateway keeps durably, and the `Store` interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class KeyState(StrEnum):
    """Where a key stands; only `ACTIVE` keys take creates."""

    ACTIVE = "active"
    SPENT = "spent"
    COOLING = "cooling"
    DISABLED = "disabled"


@dataclass(frozen=True)
class KeyMark:
    """A persisted state of a key other than active: why, and until when (epoch seconds)."""

    state: KeyState
    reason: str
    until: float | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class TaskRecord:
    """A task the gateway made: which key owns it, for whom, and what was last seen of it."""

    task_id: str
    key_name: str
    client: str
    created_at: float
    status: str | None = None
    progress: int | None = None
    updated_at: float | None = None


class Store(Protocol):
    """Durable state shared by everything that serves the same pool."""

    async def open(self) -> None:
        """Connect and create or migrate the schema."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the database cannot be used."""
        ...

    async def reserve(self, key_name: str, day: str, limit: int | None) -> int | None:
        """Take one unit of `key_name`'s quota for `day`, atomically.

        Returns the new count, or None when the key already reached `limit`.
        """
        ...

    async def release(self, key_name: str, day: str) -> int:
        """Give back one unit taken by `reserve`; returns the new count."""
        ...

    async def usage(self, day: str) -> dict[str, int]:
        """Units used per key name on `day`."""
        ...

    async def key_marks(self) -> dict[str, KeyMark]:
        """Every persisted key state, by key name."""
        ...

    async def set_key_mark(self, key_name: str, mark: KeyMark | None) -> None:
        """Persist a key's state; None clears it (the key is active again)."""
        ...

    async def add_task(self, task: TaskRecord) -> None:
        """Record a new task durably; returns only once it is committed."""
        ...

    async def get_task(self, task_id: str) -> TaskRecord | None: ...

    async def update_task(self, task_id: str, status: str, progress: int | None, updated_at: float) -> None:
        """Remember the last status seen for a task."""
        ...
