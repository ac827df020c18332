"""The shared store for several replicas: PostgreSQL through an asyncpg connection pool.

asyncpg is imported when a store opens, so SQLite users need not install it (`pip install .[postgres]`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import KeyMark, KeyState, TaskRecord
from .urls import mask_password

if TYPE_CHECKING:
    import asyncpg

#: Serialises schema changes of replicas starting together (any constant; one per application).
SCHEMA_LOCK = 0x61676E6573  # "agnes"
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 10
CONNECT_TIMEOUT_S = 10.0
#: A statement not done by then fails (and its request with it) instead of hanging on a stuck server.
COMMAND_TIMEOUT_S = 15.0

TASK_COLUMNS = (
    "task_id, key_name, client, created_at, status, progress, updated_at, terminal_body, idempotency_key, request_meta"
)

#: MIGRATIONS[n] takes the schema from version n to n + 1; append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE quota_usage (
        key_name TEXT NOT NULL,
        day TEXT NOT NULL,
        used INTEGER NOT NULL,
        PRIMARY KEY (key_name, day)
    );
    CREATE TABLE key_marks (
        key_name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        until DOUBLE PRECISION,
        fingerprint TEXT
    );
    CREATE TABLE client_usage (
        client TEXT NOT NULL,
        day TEXT NOT NULL,
        used INTEGER NOT NULL,
        PRIMARY KEY (client, day)
    );
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        key_name TEXT NOT NULL,
        client TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        status TEXT,
        progress INTEGER,
        updated_at DOUBLE PRECISION,
        terminal_body BYTEA,
        idempotency_key TEXT,
        request_meta TEXT
    );
    CREATE INDEX tasks_created_at ON tasks (created_at, task_id);
    CREATE UNIQUE INDEX tasks_idempotency ON tasks (client, idempotency_key) WHERE idempotency_key IS NOT NULL;
    """,
    """
    CREATE TABLE idempotency_claims (
        client TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        claimed_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (client, idempotency_key)
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

_UPSERT_TASK = (
    f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
    "ON CONFLICT (task_id) DO UPDATE SET key_name = EXCLUDED.key_name, client = EXCLUDED.client, "
    "created_at = EXCLUDED.created_at, status = EXCLUDED.status, progress = EXCLUDED.progress, "
    "updated_at = EXCLUDED.updated_at, terminal_body = EXCLUDED.terminal_body, "
    "idempotency_key = EXCLUDED.idempotency_key, request_meta = EXCLUDED.request_meta"
)


class PostgresStore:
    """`Store` on a PostgreSQL database; every statement is atomic, so replicas can share it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        return f"PostgresStore({mask_password(self.url)!r})"

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    async def open(self) -> None:
        import asyncpg

        try:
            pool = await asyncpg.create_pool(
                self.url,
                min_size=POOL_MIN_SIZE,
                max_size=POOL_MAX_SIZE,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
            )
        except (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Never let the URL's password reach a log through the driver's message.
            message = str(exc).replace(self.url, mask_password(self.url))
            raise RuntimeError(
                f"cannot open PostgreSQL database {mask_password(self.url)}: {type(exc).__name__}: {message}"
            ) from None
        try:
            await self._migrate(pool)
        except asyncpg.PostgresError as exc:
            await pool.close()
            raise RuntimeError(
                f"cannot prepare PostgreSQL database {mask_password(self.url)}: {type(exc).__name__}: {exc}"
            ) from None
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def _migrate(self, pool: asyncpg.Pool) -> None:
        """Create or bring the schema up to date, one replica at a time."""
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = await conn.fetchval("SELECT max(version) FROM schema_version")
            if version is None:
                version = 0
                await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            if version > SCHEMA_VERSION:
                where = mask_password(self.url)
                raise RuntimeError(f"{where} has schema version {version}, newer than this gateway ({SCHEMA_VERSION})")
            for migration in MIGRATIONS[version:]:
                await conn.execute(migration)
            await conn.execute("UPDATE schema_version SET version = $1", SCHEMA_VERSION)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    # --- counts -----------------------------------------------------------------------

    async def reserve(self, key_name: str, day: str, limit: int | None) -> int | None:
        return await self._count_up("quota_usage", "key_name", key_name, day, limit)

    async def release(self, key_name: str, day: str) -> int:
        return await self._count_down("quota_usage", "key_name", key_name, day)

    async def reserve_client(self, client: str, day: str, limit: int | None) -> int | None:
        return await self._count_up("client_usage", "client", client, day, limit)

    async def release_client(self, client: str, day: str) -> int:
        return await self._count_down("client_usage", "client", client, day)

    async def usage(self, day: str) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT key_name, used FROM quota_usage WHERE day = $1", day)
        return {str(r[0]): int(r[1]) for r in rows}

    async def reset_usage(self, key_name: str, day: str) -> None:
        await self.pool.execute("DELETE FROM quota_usage WHERE key_name = $1 AND day = $2", key_name, day)

    async def client_usage(self, day: str) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT client, used FROM client_usage WHERE day = $1", day)
        return {str(r[0]): int(r[1]) for r in rows}

    async def _count_up(self, table: str, column: str, name: str, day: str, limit: int | None) -> int | None:
        """One conditional upsert: the row lock makes it atomic across every replica."""
        if limit is not None and limit <= 0:
            return None
        sql = (
            f"INSERT INTO {table} AS t ({column}, day, used) VALUES ($1, $2, 1) "
            f"ON CONFLICT ({column}, day) DO UPDATE SET used = t.used + 1"
        )
        args: tuple[Any, ...] = (name, day)
        if limit is not None:
            sql += " WHERE t.used < $3"
            args += (limit,)
        used = await self.pool.fetchval(sql + " RETURNING used", *args)
        return None if used is None else int(used)

    async def _count_down(self, table: str, column: str, name: str, day: str) -> int:
        used = await self.pool.fetchval(
            f"UPDATE {table} SET used = used - 1 WHERE {column} = $1 AND day = $2 AND used > 0 RETURNING used",
            name,
            day,
        )
        return 0 if used is None else int(used)

    # --- key marks --------------------------------------------------------------------

    async def key_marks(self) -> dict[str, KeyMark]:
        rows = await self.pool.fetch("SELECT key_name, state, reason, until, fingerprint FROM key_marks")
        return {str(r[0]): KeyMark(KeyState(r[1]), str(r[2]), r[3], r[4]) for r in rows}

    async def set_key_mark(self, key_name: str, mark: KeyMark | None) -> None:
        if mark is None:
            await self.pool.execute("DELETE FROM key_marks WHERE key_name = $1", key_name)
            return
        await self.pool.execute(
            "INSERT INTO key_marks (key_name, state, reason, until, fingerprint) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (key_name) DO UPDATE SET state = EXCLUDED.state, reason = EXCLUDED.reason, "
            "until = EXCLUDED.until, fingerprint = EXCLUDED.fingerprint",
            key_name,
            mark.state.value,
            mark.reason,
            mark.until,
            mark.fingerprint,
        )

    # --- tasks ------------------------------------------------------------------------

    async def add_task(self, task: TaskRecord) -> None:
        from asyncpg import UniqueViolationError

        args = task.row()
        try:
            await self.pool.execute(_UPSERT_TASK, *args)
        except UniqueViolationError:
            # Another task (made through another replica at the same moment) already holds this client's
            # Idempotency-Key: keep both routes, the key stays with the first.
            await self.pool.execute(_UPSERT_TASK, *args[:8], None, args[9])

    async def get_task(self, task_id: str) -> TaskRecord | None:
        return await self._one_task("task_id = $1", task_id)

    async def find_idempotent(self, client: str, idempotency_key: str) -> TaskRecord | None:
        return await self._one_task("client = $1 AND idempotency_key = $2", client, idempotency_key)

    async def claim_idempotency(self, client: str, idempotency_key: str, now: float, stale_before: float) -> bool:
        row = await self.pool.fetchrow(
            "INSERT INTO idempotency_claims (client, idempotency_key, claimed_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (client, idempotency_key) DO UPDATE SET claimed_at = EXCLUDED.claimed_at "
            "WHERE idempotency_claims.claimed_at < $4 RETURNING claimed_at",
            client,
            idempotency_key,
            now,
            stale_before,
        )
        return row is not None

    async def release_idempotency(self, client: str, idempotency_key: str) -> None:
        await self.pool.execute(
            "DELETE FROM idempotency_claims WHERE client = $1 AND idempotency_key = $2", client, idempotency_key
        )

    async def _one_task(self, where: str, *args: Any) -> TaskRecord | None:
        row = await self.pool.fetchrow(f"SELECT {TASK_COLUMNS} FROM tasks WHERE {where}", *args)
        return None if row is None else TaskRecord(*row)

    async def update_task(self, task_id: str, status: str, progress: int | None, updated_at: float) -> None:
        await self.pool.execute(
            "UPDATE tasks SET status = $1, progress = $2, updated_at = $3 WHERE task_id = $4",
            status,
            progress,
            updated_at,
            task_id,
        )

    async def set_terminal(self, task_id: str, status: str, body: bytes, updated_at: float) -> None:
        await self.pool.execute(
            "UPDATE tasks SET status = $1, progress = NULL, updated_at = $2, terminal_body = $3 WHERE task_id = $4",
            status,
            updated_at,
            body,
            task_id,
        )

    async def list_tasks(
        self, client: str | None, limit: int, before: tuple[float, str] | None = None
    ) -> list[TaskRecord]:
        where: list[str] = ["TRUE"]
        args: list[Any] = []
        if client is not None:
            args.append(client)
            where.append(f"client = ${len(args)}")
        if before is not None:
            args.extend(before)
            where.append(f"(created_at, task_id) < (${len(args) - 1}::double precision, ${len(args)}::text)")
        args.append(limit)
        rows = await self.pool.fetch(
            f"SELECT {TASK_COLUMNS} FROM tasks WHERE {' AND '.join(where)} "
            f"ORDER BY created_at DESC, task_id DESC LIMIT ${len(args)}",
            *args,
        )
        return [TaskRecord(*row) for row in rows]

    async def delete_task(self, task_id: str) -> bool:
        return await self.pool.fetchval("DELETE FROM tasks WHERE task_id = $1 RETURNING task_id", task_id) is not None

    async def prune_tasks(self, older_than: float, batch: int) -> int:
        # PostgreSQL's DELETE has no LIMIT: take the batch in a subquery.
        deleted = await self.pool.fetchval(
            "WITH gone AS (DELETE FROM tasks WHERE task_id IN "
            "(SELECT task_id FROM tasks WHERE created_at < $1 LIMIT $2) RETURNING 1) "
            "SELECT count(*) FROM gone",
            older_than,
            batch,
        )
        return int(deleted)

    async def task_counts(self) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT COALESCE(status, 'unknown'), count(*) FROM tasks GROUP BY 1")
        return {str(r[0]): int(r[1]) for r in rows}
