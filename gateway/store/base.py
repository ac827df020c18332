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


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task the gateway made: which key owns it, for whom, and what was last seen of it."""

    task_id: str
    key_name: str
    client: str
    created_at: float
    status: str | None = None
    progress: int | None = None
    updated_at: float | None = None
    #: The final answer once the task is completed or failed: it never changes, so it is served from here.
    terminal_body: bytes | None = None
    #: The client's `Idempotency-Key`, if it sent one: a repeated create gets this task back.
    idempotency_key: str | None = None
    #: What the create asked for (JSON text), for surfaces that echo it back (prompt, size, ...).
    request_meta: str | None = None

    def row(self) -> tuple[object, ...]:
        """The fields in column order, for an INSERT."""
        return (
            self.task_id,
            self.key_name,
            self.client,
            self.created_at,
            self.status,
            self.progress,
            self.updated_at,
            self.terminal_body,
            self.idempotency_key,
            self.request_meta,
        )

    @property
    def terminal(self) -> bool:
        return self.terminal_body is not None


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

    async def reset_usage(self, key_name: str, day: str) -> None:
        """Zero `key_name`'s count for `day` (an operator's reset)."""
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

    async def set_terminal(self, task_id: str, status: str, body: bytes, updated_at: float) -> None:
        """Keep a task's final answer (completed or failed) so it is served without upstream."""
        ...

    async def find_idempotent(self, client: str, idempotency_key: str) -> TaskRecord | None:
        """The task `client` created with `idempotency_key`, if any."""
        ...

    async def claim_idempotency(self, client: str, idempotency_key: str, now: float, stale_before: float) -> bool:
        """Take the right to create `client`'s task for `idempotency_key`, for every process sharing the store.

        False while another holds it; a claim made before `stale_before` (its holder died) is taken over.
        """
        ...

    async def release_idempotency(self, client: str, idempotency_key: str) -> None:
        """Give the claim up: the task's route is recorded (later creates find it), or the create failed."""
        ...

    async def list_tasks(
        self, client: str | None, limit: int, before: tuple[float, str] | None = None
    ) -> list[TaskRecord]:
        """Tasks newest first (of one client, or all), strictly older than `before` = (created_at, task_id)."""
        ...

    async def delete_task(self, task_id: str) -> bool:
        """Forget a task's route; True if there was one."""
        ...

    async def prune_tasks(self, older_than: float, batch: int) -> int:
        """Delete up to `batch` tasks created before `older_than`; returns how many went."""
        ...

    async def task_counts(self) -> dict[str, int]:
        """Number of tasks by last seen status (`unknown` when never polled)."""
        ...

    async def reserve_client(self, client: str, day: str, limit: int | None) -> int | None:
        """Count one create for `client` on `day`, atomically; None when it reached `limit`."""
        ...

    async def release_client(self, client: str, day: str) -> int:
        """Undo `reserve_client` for a create that made no task."""
        ...

    async def client_usage(self, day: str) -> dict[str, int]:
        """Creates per client on `day`."""
        ...
