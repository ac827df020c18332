"""Durable state behind an interface: SQLite (the default) or PostgreSQL (shared by several replicas)."""

from __future__ import annotations

from .base import KeyMark, KeyState, Store, TaskRecord
from .sqlite import SQLiteStore
from .urls import is_postgres, mask_password

__all__ = ["KeyMark", "KeyState", "SQLiteStore", "Store", "TaskRecord", "is_postgres", "mask_password", "open_store"]


def open_store(database: str) -> Store:
    """The store for a `database` setting: a `postgresql://` URL, or a SQLite file path (or `:memory:`)."""
    if is_postgres(database):
        from .postgres import PostgresStore

        return PostgresStore(database)
    return SQLiteStore(database)
