#!/usr/bin/env bash
# Install the test dependencies and run the whole suite: the README's test command.
#
# The suite runs against SQLite and PostgreSQL. Unless AGNES_TEST_POSTGRES_URL is already set, this
# starts a throw-away PostgreSQL cluster (Debian's `postgresql`, installed when missing and we are
# root) in a temporary directory, on a free loopback port, as an unprivileged user, and stops it on
# exit. Without PostgreSQL its tests skip, except when `CI` is set, where they fail.
set -euo pipefail
cd "$(dirname "$0")/.."

postgres_bindir() {
    # Debian puts the server in /usr/lib/postgresql/<version>/bin: take the newest; else initdb on PATH.
    local dir
    dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
        echo "$dir"
    elif command -v initdb >/dev/null; then
        dirname "$(readlink -f "$(command -v initdb)")"
    fi
}

# Debian packages the tests need, installed only when missing and only as root (apt-get update once).
APT_PACKAGES=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || APT_PACKAGES+=(prometheus)
[ -n "${AGNES_TEST_POSTGRES_URL:-}" ] || [ -n "$(postgres_bindir)" ] || APT_PACKAGES+=(postgresql)
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}"
    else
        echo "missing ${APT_PACKAGES[*]} (not root, or no apt-get): the tests that need them skip, or fail under CI" >&2
    fi
fi

PG_DIR=""
PG_AS=()
PG_BIN=""
stop_postgres() {
    if [ -n "$PG_DIR" ]; then
        "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
}

start_postgres() {
    PG_BIN=$(postgres_bindir)
    if [ -z "$PG_BIN" ]; then
        echo "PostgreSQL is not installed: its tests skip, or fail under CI" >&2
        return 0
    fi
    PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/agnes-pg.XXXXXX")
    trap stop_postgres EXIT
    if [ "$(id -u)" = 0 ]; then
        # initdb refuses to run as root: use the package's `postgres` user, creating it if needed.
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
        chown postgres "$PG_DIR"
        PG_AS=(runuser -u postgres --)
    fi
    local port
    port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    (
        cd "$PG_DIR"
        "${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -A trust -E UTF8 --no-sync >"$PG_DIR/initdb.log"
        # A disposable cluster: durability off for speed, loopback only, the socket in the temp dir.
        "${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 30 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
            start >/dev/null
    )
    export AGNES_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$port/postgres"
    echo "throw-away PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port"
}

python -m pip install --quiet --disable-pip-version-check -e '.[test]'

python -m ruff check gateway tests $(test -d benchmarks && echo benchmarks)
python -m mypy

[ -n "${AGNES_TEST_POSTGRES_URL:-}" ] || start_postgres
python -m pytest "$@"
