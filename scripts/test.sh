#!/usr/bin/env bash
# The whole test suite, as CI runs it: services, install, ruff, mypy, pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k contract).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
