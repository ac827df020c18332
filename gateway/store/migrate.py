"""Moving from one gateway to several: copy a SQLite file's state into an empty PostgreSQL database."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .postgres import PostgresStore
from .sqlite import TASK_COLUMNS, SQLiteStore
from .urls import is_postgres, mask_password

BATCH = 5_000

Row = tuple[Any, ...]


class MigrationError(Exception):
    """A migration that cannot start; nothing was written."""


@dataclass(frozen=True)
class Table:
    """One table to copy, and how to make its SQLite values fit PostgreSQL's stricter types."""

    name: str
    columns: tuple[str, ...]
    convert: Callable[[Row], Row]


def _blob(value: Any) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _real(value: Any) -> float | None:
    return None if value is None else float(value)


def _task(row: Row) -> Row:
    task_id, key, client, created, status, progress, updated, body, idem, meta = row
    return (task_id, key, client, float(created), status, progress, _real(updated), _blob(body), idem, meta)


def _mark(row: Row) -> Row:
    name, state, reason, until, fingerprint = row
    return (name, state, reason, _real(until), fingerprint)


TABLES = (
    Table("quota_usage", ("key_name", "day", "used"), tuple),
    Table("client_usage", ("client", "day", "used"), tuple),
    Table("key_marks", ("key_name", "state", "reason", "until", "fingerprint"), _mark),
    Table("tasks", tuple(c.strip() for c in TASK_COLUMNS.split(",")), _task),
)


@dataclass(frozen=True)
class Migrated:
    """How many rows of each table went across."""

    rows: dict[str, int]

    def summary(self) -> str:
        n = self.rows
        return (
            f"{n['tasks']} task route(s), {n['quota_usage']} key count(s), {n['key_marks']} key mark(s), "
            f"{n['client_usage']} client count(s)"
        )


async def sqlite_to_postgres(source: str, target: str) -> Migrated:
    """Copy every count, key mark and task route (all columns) from `source` into the empty `target`.

    One PostgreSQL transaction: either everything arrives or nothing does.
    """
    if is_postgres(source) or not os.path.isfile(source):  # noqa: ASYNC240 - one stat, before any I/O
        raise MigrationError(f"--from: {source} is not a SQLite file")
    if not is_postgres(target):
        raise MigrationError(f"--to: {mask_password(target)} is not a postgresql:// URL")
    sqlite = SQLiteStore(source)
    try:
        await sqlite.open()  # checks (and if need be completes) the file's schema
    except sqlite3.Error as exc:
        raise MigrationError(f"--from: {source}: {exc}") from None
    postgres = PostgresStore(target)
    try:
        await postgres.open()
        async with postgres.pool.acquire() as conn, conn.transaction():
            # Other gateways must not write while the copy runs; a gateway starting now waits.
            await conn.execute(f"LOCK TABLE {', '.join(t.name for t in TABLES)} IN EXCLUSIVE MODE")
            for table in TABLES:
                if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table.name})"):
                    raise MigrationError(
                        f"--to: {mask_password(target)} already holds gateway state ({table.name} is not empty); "
                        "migrate into an empty database"
                    )
            rows: dict[str, int] = {}
            for table in TABLES:
                rows[table.name] = 0
                async with sqlite.db.execute(f"SELECT {', '.join(table.columns)} FROM {table.name}") as cur:
                    while batch := await cur.fetchmany(BATCH):
                        records: Sequence[Row] = [table.convert(tuple(r)) for r in batch]
                        await conn.copy_records_to_table(table.name, records=records, columns=list(table.columns))
                        rows[table.name] += len(records)
        return Migrated(rows)
    finally:
        await postgres.close()
        await sqlite.close()
