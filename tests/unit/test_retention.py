"""Retention without servers: the cutoff to the millisecond, what a purge leaves, the setting, the
maintenance job and its lease. The registry is a SQLite file and time a ManualClock."""

from __future__ import annotations

from datetime import timedelta

import pytest

from scheduler import Settings, TimeoutState, retention
from scheduler.errors import ConfigurationError
from scheduler.maintenance import Maintenance
from scheduler.registry import PURGED_STATES, purged_states
from tests.support import registry_records
from tests.unit.conftest import Shop

WEEK = timedelta(days=7)


def finish_one_each(shop: Shop, *ids: str) -> dict[str, int]:
    """Revoke one timeout per id, a millisecond apart; return when each finished."""
    finished = {}
    for order_id in ids:
        shop.timeouts.schedule(order_id, delay=timedelta(minutes=30))
        shop.timeouts.cancel(order_id)
        finished[order_id] = shop.clock.now_ms()
        shop.later(milliseconds=1)
    return finished


def states(shop: Shop) -> dict[str, TimeoutState]:
    return {order_id: record.state for order_id, record in registry_records(shop.timeouts.engine).items()}


def test_the_cutoff_is_now_minus_the_retention_and_a_row_finished_exactly_then_stays(shop: Shop) -> None:
    finished = finish_one_each(shop, "older", "at-cutoff", "younger")
    cutoff = retention.cutoff_ms(finished["at-cutoff"] + WEEK // timedelta(milliseconds=1), WEEK)
    assert cutoff == finished["at-cutoff"]

    deleted = retention.purge(shop.timeouts.engine, before_ms=cutoff, states=PURGED_STATES)

    assert deleted == 1
    assert set(states(shop)) == {"at-cutoff", "younger"}


def test_a_purge_takes_done_and_revoked_rows_and_leaves_pending_and_dead_ones(shop: Shop) -> None:
    shop.add_orders("unpaid")
    shop.timeouts.schedule_many(["unpaid", "no-such-order"], delay=timedelta(minutes=1))
    shop.timeouts.schedule("later", delay=timedelta(days=20))
    finish_one_each(shop, "paid")
    shop.later(minutes=1)
    shop.drain()  # unpaid: done; no-such-order: one unknown answer, and max_attempts is 5
    for _ in range(4):
        shop.later(minutes=10)
        shop.drain()
    assert states(shop) == {
        "unpaid": TimeoutState.DONE,
        "no-such-order": TimeoutState.DEAD,
        "later": TimeoutState.PENDING,
        "paid": TimeoutState.REVOKED,
    }
    now = shop.clock.now_ms()

    assert retention.count(shop.timeouts.engine, before_ms=now + 1, states=PURGED_STATES) == 2
    assert retention.purge(shop.timeouts.engine, before_ms=now + 1, states=PURGED_STATES) == 2
    assert states(shop) == {"no-such-order": TimeoutState.DEAD, "later": TimeoutState.PENDING}

    dead_too = purged_states(include_dead=True)
    assert retention.purge(shop.timeouts.engine, before_ms=now + 1, states=dead_too) == 1
    assert states(shop) == {"later": TimeoutState.PENDING}


def test_a_bounded_purge_deletes_the_oldest_first_in_batches(shop: Shop) -> None:
    finish_one_each(shop, *(f"R-{i}" for i in range(7)))
    batches: list[int] = []

    deleted = retention.purge(
        shop.timeouts.engine,
        before_ms=shop.clock.now_ms(),
        states=PURGED_STATES,
        batch=2,
        max_rows=5,
        deleted=batches.append,
    )

    assert deleted == 5 and batches == [2, 2, 1]
    assert set(states(shop)) == {"R-5", "R-6"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, WEEK), ("off", None), ("OFF", None), ("12h", timedelta(hours=12)), ("90d", timedelta(days=90))],
)
def test_the_retention_setting_reads_durations_and_off(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: timedelta | None
) -> None:
    if value is None:
        monkeypatch.delenv("ORDER_TIMEOUTS_RETENTION", raising=False)
    else:
        monkeypatch.setenv("ORDER_TIMEOUTS_RETENTION", value)
    assert Settings.from_env().retention == expected


@pytest.mark.parametrize("value", ["0", "0s", "soon", "7 days", "-1d", "never"])
def test_a_bad_retention_is_a_configuration_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ORDER_TIMEOUTS_RETENTION", value)
    with pytest.raises(ConfigurationError, match=r"^ORDER_TIMEOUTS_RETENTION must be"):
        Settings.from_env()


def test_maintenance_purges_what_finished_longer_ago_than_the_retention(shop: Shop) -> None:
    finished = finish_one_each(shop, "older", "at-cutoff")
    shop.timeouts.schedule("pending", delay=timedelta(days=20))
    shop.clock.advance(WEEK - timedelta(milliseconds=shop.clock.now_ms() - finished["at-cutoff"]))

    run = Maintenance(shop.timeouts).purge()

    assert (run.rows, run.skipped, run.error) == (1, False, None)
    assert set(states(shop)) == {"at-cutoff", "pending"}
    assert [job for job, _, _ in Maintenance(shop.timeouts).jobs] == ["relay", "reconciler", "purge"]


def test_maintenance_keeps_everything_when_the_retention_is_off(shop: Shop) -> None:
    finish_one_each(shop, "old")
    shop.later(days=400)
    shop.timeouts.settings = Settings(database_url=shop.timeouts.settings.database_url, retention=None)
    jobs = Maintenance(shop.timeouts)

    assert jobs.purge().skipped
    assert [run.job for run in jobs.run_once()] == ["relay", "reconciler"]
    assert set(states(shop)) == {"old"}


def test_one_maintainer_purges_at_a_time_and_another_takes_over_when_its_lease_runs_out(shop: Shop) -> None:
    first, second = Maintenance(shop.timeouts), Maintenance(shop.timeouts)
    finish_one_each(shop, "A")
    shop.later(minutes=1)
    finish_one_each(shop, "B")
    shop.later(days=7, seconds=-30)  # A is older than a week, B not yet
    assert first.purge().rows == 1
    assert second.purge().skipped, "the first holder's lease (3 purge intervals) is still live"
    shop.later(minutes=3, seconds=1)  # the first one "died": its lease runs out; B is old now
    assert second.purge().rows == 1
    assert first.purge().skipped, "the lease moved to the second one"
    assert states(shop) == {}
