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

# The rq transport supports RQ 2 and RQ 3. The suite above ran on the newest RQ that pip chose; the
# full run also runs the rq tests on RQ 2, put in front of it on the path.
if [ $# -eq 0 ]; then
    rq2=.venv/rq2
    if [ ! -d "$rq2/rq" ]; then
        .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target "$rq2" "rq>=2,<3"
    fi
    PYTHONPATH="$rq2" .venv/bin/python -c 'import rq; print("the rq tests again on RQ", rq.__version__)'
    PYTHONPATH="$rq2" .venv/bin/python -m pytest -q -k rq
fi
