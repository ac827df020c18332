"""The embedded default store: one SQLite file in WAL mode, through aiosqlite."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import aiosqlite

from .base import KeyMark, KeyState, TaskRecord

SCHEMA_VERSION = 1
#: How long a write waits for another process (a worker, a replica) to finish its own.
BUSY_TIMEOUT_S = 5.0

TASK_COLUMNS = (
    "task_id, key_name, client, created_at, status, progress, updated_at, terminal_body, idempotency_key, request_meta"
)

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
CREATE TABLE IF NOT EXISTS client_usage (
    client TEXT NOT NULL,
    day TEXT NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (client, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    key_name TEXT NOT NULL,
    client TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT,
    progress INTEGER,
    updated_at REAL,
    terminal_body BLOB,
    idempotency_key TEXT,
    request_meta TEXT
);
CREATE INDEX IF NOT EXISTS tasks_created_at ON tasks (created_at, task_id);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (client, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS idempotency_claims (
    client TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    claimed_at REAL NOT NULL,
    PRIMARY KEY (client, idempotency_key)
) WITHOUT ROWID;
"""


_UPSERT_TASK = (
    f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (task_id) DO UPDATE SET key_name = excluded.key_name, client = excluded.client, "
    "created_at = excluded.created_at, status = excluded.status, progress = excluded.progress, "
    "updated_at = excluded.updated_at, terminal_body = excluded.terminal_body, "
    "idempotency_key = excluded.idempotency_key, request_meta = excluded.request_meta"
)


Statement = tuple[str, Sequence[object]]


def _run_together(
    conn: sqlite3.Connection, statements: list[Statement], lock_fd: int | None
) -> list[list[Any] | Exception]:
    """In the database thread: the statements in one transaction, so they share one commit.

    A statement that fails is undone on its own (its error is its result); the others still commit.
    `lock_fd` is the store's lock file, held for the transaction (see `SQLiteStore`).
    """
    results: list[list[Any] | Exception] = []
    if lock_fd is not None:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # blocks this thread only; released if the process dies
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                try:
                    results.append(conn.execute(sql, params).fetchall())
                except sqlite3.Error as exc:
                    results.append(exc)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        if lock_fd is not None:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
    return results


class SQLiteStore:
    """`Store` on one SQLite file; each write is committed before its call returns.

    Every read runs to its end in one trip to the database thread (`execute_fetchall`): a SELECT
    left open between trips would hold an old snapshot, and a write transaction started meanwhile
    on the connection fails at once with "database is locked" once another process has written.

    Writes that arrive while others are being committed are committed together, in one
    transaction (group commit): a commit is most of a write's cost, so under load many creates
    share one instead of queueing behind each other's.

    Processes sharing the file (`serve --workers`) take turns through a lock file beside it
    (`<file>.lock`, flock): SQLite's own busy handler polls with growing sleeps, and under load one
    process committing batch after batch could starve another past any timeout.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        #: The same file, read-only, for long scans on a connection of their own.
        self._read_only_uri = None if path == ":memory:" else Path(path).resolve().as_uri() + "?mode=ro"
        self._db: aiosqlite.Connection | None = None
        self._lock_fd: int | None = None
        self._waiting: list[tuple[Statement, asyncio.Future[list[Any]]]] = []
        self._committing: asyncio.Future[None] | None = None
        #: Transactions committed by group commit (for tests and benchmarks).
        self.group_commits = 0

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
        if self.path != ":memory:":
            self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        await self.db.execute(f"PRAGMA busy_timeout = {round(BUSY_TIMEOUT_S * 1000)}")
        await self._use_wal()
        # NORMAL in WAL mode survives a killed process; only an OS crash can lose the last commits.
        await self.db.execute("PRAGMA synchronous = NORMAL")
        await self.db.executescript(_SCHEMA)
        async with self.db.execute("SELECT version FROM schema_version") as cur:
            row = await cur.fetchone()
        if row is None:
            await self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            await self.close()
            raise RuntimeError(f"{self.path} has schema version {row[0]}, newer than this gateway ({SCHEMA_VERSION})")

    async def _use_wal(self) -> None:
        """Switch to WAL; on a new file opened by several processes at once, the switch skips the busy
        timeout and may find the file locked for a moment: try again, for at most about five seconds."""
        for attempt in range(50):
            try:
                await self.db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _write(self, sql: str, params: Sequence[object]) -> list[Any]:
        """Run a write and return its rows once it is committed, together with the writes waiting with it."""
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append(((sql, params), done))
        if self._committing is None:
            self._committing = asyncio.ensure_future(self._commit_waiting())
        return await done

    async def _commit_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    # aiosqlite's own queue to its thread, with our function: one trip for the whole batch.
                    db = cast(Any, self.db)  # aiosqlite's `_execute` is untyped
                    statements = [s for s, _ in batch]
                    results = await db._execute(_run_together, db._conn, statements, self._lock_fd)
                except BaseException as exc:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self.group_commits += 1
                for (_, done), result in zip(batch, results, strict=True):
                    if done.done():
                        continue
                    if isinstance(result, Exception):
                        done.set_exception(result)
                    else:
                        done.set_result(result)
        finally:
            self._committing = None

    async def ping(self) -> None:
        await self.db.execute_fetchall("SELECT 1")

    async def reserve(self, key_name: str, day: str, limit: int | None) -> int | None:
        return await self._count_up("quota_usage", "key_name", key_name, day, limit)

    async def release(self, key_name: str, day: str) -> int:
        return await self._count_down("quota_usage", "key_name", key_name, day)

    async def reserve_client(self, client: str, day: str, limit: int | None) -> int | None:
        return await self._count_up("client_usage", "client", client, day, limit)

    async def release_client(self, client: str, day: str) -> int:
        return await self._count_down("client_usage", "client", client, day)

    async def client_usage(self, day: str) -> dict[str, int]:
        rows = await self.db.execute_fetchall("SELECT client, used FROM client_usage WHERE day = ?", (day,))
        return {str(name): int(used) for name, used in rows}

    async def _count_up(self, table: str, column: str, name: str, day: str, limit: int | None) -> int | None:
        """One conditional upsert: atomic even across processes sharing the file."""
        if limit is not None and limit <= 0:
            return None
        sql = (
            f"INSERT INTO {table} ({column}, day, used) VALUES (?, ?, 1) "
            f"ON CONFLICT ({column}, day) DO UPDATE SET used = used + 1"
        )
        params: tuple[object, ...] = (name, day)
        if limit is not None:
            sql += " WHERE used < ?"
            params += (limit,)
        rows = await self._write(sql + " RETURNING used", params)
        return int(rows[0][0]) if rows else None

    async def _count_down(self, table: str, column: str, name: str, day: str) -> int:
        rows = await self._write(
            f"UPDATE {table} SET used = used - 1 WHERE {column} = ? AND day = ? AND used > 0 RETURNING used",
            (name, day),
        )
        return int(rows[0][0]) if rows else 0

    async def _write_returning(self, sql: str, params: tuple[object, ...]) -> list[tuple[Any, ...]]:
        """A write whose RETURNING rows are wanted: committed, like every write, by `_write`.

        (Stepped to its end within its transaction: a RETURNING statement left half-read would keep
        SQLite's transaction open, and writes joining it would not be durable when they return.)
        """
        return [tuple(row) for row in await self._write(sql, params)]

    async def usage(self, day: str) -> dict[str, int]:
        rows = await self.db.execute_fetchall("SELECT key_name, used FROM quota_usage WHERE day = ?", (day,))
        return {str(name): int(used) for name, used in rows}

    async def reset_usage(self, key_name: str, day: str) -> None:
        await self._write("DELETE FROM quota_usage WHERE key_name = ? AND day = ?", (key_name, day))

    async def key_marks(self) -> dict[str, KeyMark]:
        rows = await self.db.execute_fetchall("SELECT key_name, state, reason, until, fingerprint FROM key_marks")
        return {
            str(name): KeyMark(KeyState(state), str(reason), until, fingerprint)
            for name, state, reason, until, fingerprint in rows
        }

    async def set_key_mark(self, key_name: str, mark: KeyMark | None) -> None:
        if mark is None:
            await self._write("DELETE FROM key_marks WHERE key_name = ?", (key_name,))
            return
        await self._write(
            "INSERT INTO key_marks (key_name, state, reason, until, fingerprint) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key_name) DO UPDATE SET state = excluded.state, reason = excluded.reason, "
            "until = excluded.until, fingerprint = excluded.fingerprint",
            (key_name, mark.state.value, mark.reason, mark.until, mark.fingerprint),
        )

    async def add_task(self, task: TaskRecord) -> None:
        row = task.row()
        try:
            await self._write(_UPSERT_TASK, row)
        except sqlite3.IntegrityError:
            # Another task already holds this client's Idempotency-Key: keep both routes, the key stays with it.
            await self._write(_UPSERT_TASK, (*row[:8], None, row[9]))

    async def get_task(self, task_id: str) -> TaskRecord | None:
        return await self._one_task("task_id = ?", (task_id,))

    async def find_idempotent(self, client: str, idempotency_key: str) -> TaskRecord | None:
        return await self._one_task("client = ? AND idempotency_key = ?", (client, idempotency_key))

    async def claim_idempotency(self, client: str, idempotency_key: str, now: float, stale_before: float) -> bool:
        rows = await self._write(
            "INSERT INTO idempotency_claims (client, idempotency_key, claimed_at) VALUES (?, ?, ?) "
            "ON CONFLICT (client, idempotency_key) DO UPDATE SET claimed_at = excluded.claimed_at "
            "WHERE idempotency_claims.claimed_at < ? RETURNING claimed_at",
            (client, idempotency_key, now, stale_before),
        )
        return bool(rows)

    async def release_idempotency(self, client: str, idempotency_key: str) -> None:
        await self._write(
            "DELETE FROM idempotency_claims WHERE client = ? AND idempotency_key = ?", (client, idempotency_key)
        )

    async def _one_task(self, where: str, params: tuple[object, ...]) -> TaskRecord | None:
        rows = await self.db.execute_fetchall(f"SELECT {TASK_COLUMNS} FROM tasks WHERE {where}", params)
        row = next(iter(rows), None)
        if row is None:
            return None
        # Key and client names repeat across many cached routes: share one string for each.
        return TaskRecord(row[0], sys.intern(row[1]), sys.intern(row[2]), *row[3:])

    async def update_task(self, task_id: str, status: str, progress: int | None, updated_at: float) -> None:
        await self._write(
            "UPDATE tasks SET status = ?, progress = ?, updated_at = ? WHERE task_id = ?",
            (status, progress, updated_at, task_id),
        )

    async def set_terminal(self, task_id: str, status: str, body: bytes, updated_at: float) -> None:
        await self._write(
            "UPDATE tasks SET status = ?, progress = NULL, updated_at = ?, terminal_body = ? WHERE task_id = ?",
            (status, updated_at, body, task_id),
        )

    async def list_tasks(
        self, client: str | None, limit: int, before: tuple[float, str] | None = None
    ) -> list[TaskRecord]:
        where: list[str] = ["1 = 1"]
        params: list[object] = []
        if client is not None:
            where.append("client = ?")
            params.append(client)
        if before is not None:
            where.append("(created_at, task_id) < (?, ?)")
            params.extend(before)
        sql = (
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE {' AND '.join(where)} "
            "ORDER BY created_at DESC, task_id DESC LIMIT ?"
        )
        return [TaskRecord(*row) for row in await self.db.execute_fetchall(sql, (*params, limit))]

    async def delete_task(self, task_id: str) -> bool:
        return bool(await self._write_returning("DELETE FROM tasks WHERE task_id = ? RETURNING task_id", (task_id,)))

    async def prune_tasks(self, older_than: float, batch: int) -> int:
        rows = await self._write_returning(
            "DELETE FROM tasks WHERE task_id IN (SELECT task_id FROM tasks WHERE created_at < ? LIMIT ?) RETURNING 1",
            (older_than, batch),
        )
        return len(rows)

    async def task_counts(self) -> dict[str, int]:
        sql = "SELECT COALESCE(status, 'unknown'), COUNT(*) FROM tasks GROUP BY 1"
        if self._read_only_uri is None:
            rows = await self.db.execute_fetchall(sql)
        else:
            # A full scan (about a second at 1,000,000 tasks): on a connection of its own, so that creates
            # and polls, which share the main connection's thread, do not wait behind it (WAL lets both run).
            async with aiosqlite.connect(self._read_only_uri, uri=True) as reader:
                rows = await reader.execute_fetchall(sql)
        return {str(status): int(n) for status, n in rows}
