"""The embedded default store: one SQLite file in WAL mode, through aiosqlite."""

from __future__ import annotations

from pathlib import Path

import aiosqlite

from .base import KeyMark, KeyState, TaskRecord

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS quota_usage (
    key_name TEXT NOT NULL,
    day TEXT NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (key_name, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_marks (
    key_name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    until REAL,
    fingerprint TEXT
);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    key_name TEXT NOT NULL,
    client TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT,
    progress INTEGER,
    updated_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_created_at ON tasks (created_at);
"""


class SQLiteStore:
    """`Store` on one SQLite file; each statement commits on its own (autocommit)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, so a row is durable when its statement returns.
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await self.db.execute("PRAGMA busy_timeout = 5000")
        await self.db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a killed process; only an OS crash can lose the last commits.
        await self.db.execute("PRAGMA synchronous = NORMAL")
        await self.db.executescript(_SCHEMA)
        async with self.db.execute("SELECT version FROM schema_version") as cur:
            row = await cur.fetchone()
        if row is None:
            await self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema version {row[0]}, newer than this gateway ({SCHEMA_VERSION})")

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def ping(self) -> None:
        async with self.db.execute("SELECT 1") as cur:
            await cur.fetchone()

    async def reserve(self, key_name: str, day: str, limit: int | None) -> int | None:
        if limit is not None and limit <= 0:
            return None
        sql = (
            "INSERT INTO quota_usage (key_name, day, used) VALUES (?, ?, 1) "
            "ON CONFLICT (key_name, day) DO UPDATE SET used = used + 1"
        )
        params: tuple[object, ...] = (key_name, day)
        if limit is not None:
            sql += " WHERE used < ?"
            params += (limit,)
        async with self.db.execute(sql + " RETURNING used", params) as cur:
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def release(self, key_name: str, day: str) -> int:
        async with self.db.execute(
            "UPDATE quota_usage SET used = used - 1 WHERE key_name = ? AND day = ? AND used > 0 RETURNING used",
            (key_name, day),
        ) as cur:
            row = await cur.fetchone()
        return 0 if row is None else int(row[0])

    async def usage(self, day: str) -> dict[str, int]:
        async with self.db.execute("SELECT key_name, used FROM quota_usage WHERE day = ?", (day,)) as cur:
            return {str(name): int(used) async for name, used in cur}

    async def key_marks(self) -> dict[str, KeyMark]:
        async with self.db.execute("SELECT key_name, state, reason, until, fingerprint FROM key_marks") as cur:
            return {
                str(name): KeyMark(KeyState(state), str(reason), until, fingerprint)
                async for name, state, reason, until, fingerprint in cur
            }

    async def set_key_mark(self, key_name: str, mark: KeyMark | None) -> None:
        if mark is None:
            await self.db.execute("DELETE FROM key_marks WHERE key_name = ?", (key_name,))
            return
        await self.db.execute(
            "INSERT INTO key_marks (key_name, state, reason, until, fingerprint) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key_name) DO UPDATE SET state = excluded.state, reason = excluded.reason, "
            "until = excluded.until, fingerprint = excluded.fingerprint",
            (key_name, mark.state.value, mark.reason, mark.until, mark.fingerprint),
        )

    async def add_task(self, task: TaskRecord) -> None:
        await self.db.execute(
            "INSERT OR REPLACE INTO tasks (task_id, key_name, client, created_at, status, progress, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (task.task_id, task.key_name, task.client, task.created_at, task.status, task.progress, task.updated_at),
        )

    async def get_task(self, task_id: str) -> TaskRecord | None:
        async with self.db.execute(
            "SELECT task_id, key_name, client, created_at, status, progress, updated_at FROM tasks WHERE task_id = ?",
            (task_id,),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else TaskRecord(*row)

    async def update_task(self, task_id: str, status: str, progress: int | None, updated_at: float) -> None:
        await self.db.execute(
            "UPDATE tasks SET status = ?, progress = ?, updated_at = ? WHERE task_id = ?",
            (status, progress, updated_at, task_id),
        )
