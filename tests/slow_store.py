"""An order store that stops in the middle of a batch, for crash tests that SIGKILL a worker there.

Point ORDER_TIMEOUTS_ORDER_STORE at `tests.slow_store:after_cancel` and set
ORDER_TIMEOUTS_TEST_MARKER to a file path: after the conditional cancel has run inside the batch
transaction (not committed), the store creates the marker file and sleeps, so the test can kill the
worker at exactly that point (ORDER_TIMEOUTS_TEST_PAUSE_S shortens the pause for SIGTERM tests).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection

from consumers.orders.sql import SqlOrderStore
from scheduler.config import Settings


class PausingStore(SqlOrderStore):
    def __init__(self, settings: Settings, marker: Path) -> None:
        super().__init__(settings.orders)
        self._marker = marker

    def cancel_unpaid(self, conn: Connection, order_ids: Sequence[str], now: datetime) -> set[str]:
        cancelled = super().cancel_unpaid(conn, order_ids, now)
        self._marker.write_text(",".join(sorted(cancelled)))
        time.sleep(float(os.environ.get("ORDER_TIMEOUTS_TEST_PAUSE_S", "3600")))
        return cancelled


def after_cancel(settings: Settings) -> PausingStore:
    return PausingStore(settings, Path(os.environ["ORDER_TIMEOUTS_TEST_MARKER"]))


def pausing_after_cancel(marker: Path) -> dict[str, str]:
    """The environment of a worker whose first batch stops after its cancel, announced at `marker`."""
    return {"ORDER_TIMEOUTS_ORDER_STORE": "tests.slow_store:after_cancel", "ORDER_TIMEOUTS_TEST_MARKER": str(marker)}
