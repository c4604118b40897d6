"""The bench: the product's transports against RQ and APScheduler, in one run on this machine.

    python scripts/bench.py --quick
    python scripts/bench.py --systems sql-postgresql,redis,baseline-rq --json

Same as `order-timeouts bench`; the logic lives in scheduler/bench/.
"""

import sys

from scheduler.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["bench"]
    main()
