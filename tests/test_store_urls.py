"""Database settings: SQLite paths and PostgreSQL URLs, and a password that never shows."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import parse_config
from gateway.logs import secrets_filter
from gateway.store import SQLiteStore, is_postgres, mask_password, open_store
from gateway.store.postgres import PostgresStore
from gateway.store.urls import passwords

from .conftest import KEY_A, POSTGRES_URL_ENV, postgres_url

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(
    ("database", "shown"),
    [
        ("postgresql://gw:s3cret@db.internal:5432/agnes", "postgresql://gw:***@db.internal:5432/agnes"),
        ("postgres://gw:p%40ss@[::1]/agnes?sslmode=require", "postgres://gw:***@[::1]/agnes?sslmode=require"),
        ("postgresql://db/agnes?user=gw&password=s3cret&x=1", "postgresql://db/agnes?user=gw&password=***&x=1"),
        ("postgresql://gw@db/agnes", "postgresql://gw@db/agnes"),
        ("/var/lib/agnes/gateway.db", "/var/lib/agnes/gateway.db"),
    ],
)
def test_a_database_is_shown_without_its_password(database: str, shown: str) -> None:
    assert mask_password(database) == shown


def test_the_backend_follows_the_url_scheme() -> None:
    assert isinstance(open_store("postgresql://gw@db/agnes"), PostgresStore)
    assert isinstance(open_store("postgres://gw@db/agnes"), PostgresStore)
    assert isinstance(open_store("/tmp/gateway.db"), SQLiteStore)
    assert not is_postgres("./postgresql.db")
    assert "s3cret" not in repr(open_store("postgresql://gw:s3cret@db/agnes"))


def test_the_log_filter_redacts_the_database_password_in_every_form() -> None:
    config = parse_config({"database": "postgresql://gw:p%40ss-word@db/agnes", "keys": [{"name": "a", "key": KEY_A}]})
    assert passwords(config.database) == ["p%40ss-word", "p@ss-word"]
    args = ("p@ss-word", "p%40ss-word")
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "auth as %s failed (%s)", args, None)
    secrets_filter(config).filter(record)
    assert "ss-word" not in record.getMessage()


def test_check_config_shows_the_database_without_its_password(tmp_path: Path) -> None:
    config = tmp_path / "g.yaml"
    config.write_text(f"database: postgresql://gw:s3cret-pw@db.internal/agnes\nkeys: [{{name: a, key: {KEY_A}}}]\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "postgresql://gw:***@db.internal/agnes" in result.stdout
    assert "s3cret-pw" not in result.stdout + result.stderr


async def test_an_unreachable_server_is_named_without_its_password() -> None:
    store = open_store("postgresql://gw:s3cret-pw@127.0.0.1:1/agnes")  # nothing listens on port 1
    with pytest.raises(RuntimeError) as caught:
        await store.open()
    assert "postgresql://gw:***@127.0.0.1:1/agnes" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)


def test_without_a_test_server_postgresql_tests_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(POSTGRES_URL_ENV, raising=False)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        postgres_url()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=POSTGRES_URL_ENV):
        postgres_url()
