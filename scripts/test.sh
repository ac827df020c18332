#!/usr/bin/env bash
# Install the test dependencies and run the whole suite: the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --disable-pip-version-check -e '.[test]'

python -m ruff check gateway tests benchmarks 2>/dev/null || python -m ruff check gateway tests
python -m mypy
python -m pytest "$@"
