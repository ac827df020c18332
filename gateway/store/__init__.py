"""Durable state behind an interface: SQLite (the default)."""

from __future__ import annotations

from .base import KeyMark, KeyState, Store, TaskRecord
from .sqlite import SQLiteStore

__all__ = ["KeyMark", "KeyState", "SQLiteStore", "Store", "TaskRecord", "open_store"]


def open_store(database: str) -> Store:
    """The store for a `database` setting: a SQLite file path (or `:memory:`)."""
    return SQLiteStore(database)
