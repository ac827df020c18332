"""Database settings: which backend a `database` value names, and how to show it without its password."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_QUERY_PASSWORD = re.compile(r"(?i)(^|&)(password|sslpassword)=[^&]*")


def is_postgres(database: str) -> bool:
    """Whether `database` is a PostgreSQL URL rather than a SQLite file."""
    return database.startswith(POSTGRES_SCHEMES)


def passwords(database: str) -> list[str]:
    """Every form of the password(s) inside a PostgreSQL URL, for log redaction."""
    if not is_postgres(database):
        return []
    try:
        parts = urlsplit(database)
        found = [parts.password or ""]
        found += [v for k, v in parse_qsl(parts.query) if k.lower() in ("password", "sslpassword")]
    except ValueError:
        return []
    return sorted({form for value in found if value for form in (value, unquote(value))})


def mask_password(database: str) -> str:
    """`database` fit for logs and errors: a URL's password becomes `***`; a file path is unchanged."""
    if not is_postgres(database):
        return database
    try:
        parts = urlsplit(database)
        secret = parts.password
    except ValueError:
        return database.split("://", 1)[0] + "://***"
    netloc = parts.netloc
    if secret:
        userinfo, _, hostinfo = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostinfo}"
    query = _QUERY_PASSWORD.sub(lambda m: f"{m[1]}{m[2]}=***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))
