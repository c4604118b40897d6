"""The bench: the product's transports against RQ and APScheduler, in one run on this machine.

    python scripts/bench.py --quick
    python scripts/bench.py --systems sql-postgresql,redis,baseline-rq --json

The logic lives in scripts/benchmarks/ (see its README), outside the installed package.
"""

import sys
from pathlib import Path

# The benchmarks package sits beside this file; Python puts a script's folder on the path itself,
# but not under -P / PYTHONSAFEPATH, so the folder goes first here whatever the working directory.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from benchmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
