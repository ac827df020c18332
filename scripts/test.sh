#!/usr/bin/env bash
# Install the test dependencies and run the whole suite: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need, installed only when missing and only as root (apt-get update once).
APT_PACKAGES=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || APT_PACKAGES+=(prometheus)
if [ "${#APT_PACKAGES[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}"
    else
        echo "missing ${APT_PACKAGES[*]} (not root, or no apt-get): the tests that need them skip, or fail under CI" >&2
    fi
fi

python -m pip install --quiet --disable-pip-version-check -e '.[test]'

python -m ruff check gateway tests benchmarks 2>/dev/null || python -m ruff check gateway tests
python -m mypy
python -m pytest "$@"
