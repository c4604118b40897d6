"""The outbox: a timeout reaches the broker after its row commits, and whatever fails on the way the
relay or the reconciler publishes it later."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from scheduler import InvalidTimeout, ScheduleResult, TimeoutNotFound, TimeoutState, outbox
from scheduler.errors import TransportUnavailable
from scheduler.maintenance import Maintenance, MaintenancePlan
from scheduler.transports.base import TimerMessage
from tests.unit.conftest import Shop


def published_ids(shop: Shop) -> list[str]:
    return [m.order_id for m in shop.transport.published]


def test_a_timeout_is_published_with_its_due_time_once_its_row_commits(shop: Shop) -> None:
    assert shop.timeouts.schedule("A-1", delay=timedelta(minutes=30)) is ScheduleResult.CREATED
    record = shop.timeouts.get("A-1")
    assert record is not None and record.published_ms is not None
    assert shop.transport.armed() == {"A-1": record.due_ms}
    assert record.due_ms == shop.clock.now_ms() + 30 * 60_000


def test_scheduling_again_changes_nothing_unless_replaced(shop: Shop) -> None:
    shop.timeouts.schedule("A-1", delay=timedelta(minutes=30))
    assert shop.timeouts.schedule("A-1", delay=timedelta(minutes=5)) is ScheduleResult.EXISTS
    assert published_ids(shop) == ["A-1"]
    assert shop.timeouts.schedule("A-1", delay=timedelta(minutes=5), replace=True) is ScheduleResult.REPLACED
    assert [m.version for m in shop.transport.published] == [1, 2]
    assert shop.transport.armed() == {"A-1": shop.clock.now_ms() + 5 * 60_000}


def test_with_a_session_the_broker_sees_the_timeout_only_after_the_commit(shop: Shop) -> None:
    with Session(shop.timeouts.engine) as session, session.begin():
        shop.timeouts.schedule("S-1", connection=session)
        assert shop.transport.published == [], "nothing reaches the broker before the commit"
    assert published_ids(shop) == ["S-1"]


def test_a_rolled_back_session_leaves_no_row_and_no_timer(shop: Shop) -> None:
    with Session(shop.timeouts.engine) as session:
        session.begin()
        shop.timeouts.schedule("S-2", connection=session)
        session.rollback()
    assert shop.timeouts.get("S-2") is None
    assert shop.transport.published == []


def test_a_bare_connection_leaves_the_publish_to_the_relay(shop: Shop) -> None:
    with shop.timeouts.engine.begin() as conn:
        shop.timeouts.schedule("C-1", connection=conn)
    assert shop.transport.published == []
    record = shop.timeouts.get("C-1")
    assert record is not None and record.published_ms is None
    assert Maintenance(shop.timeouts).relay().rows == 1
    assert published_ids(shop) == ["C-1"]


def test_a_broker_outage_never_fails_the_order_and_the_relay_publishes_in_due_order(shop: Shop) -> None:
    shop.transport.available = False
    shop.timeouts.schedule("late", delay=timedelta(minutes=9))
    shop.timeouts.schedule("soon", delay=timedelta(minutes=1))
    run = Maintenance(shop.timeouts).relay()
    assert run.error is not None and run.rows == 0
    shop.transport.available = True
    shop.later(seconds=4)  # that process backs off; once its lease has expired another one relays
    assert Maintenance(shop.timeouts).relay().rows == 2
    assert published_ids(shop) == ["soon", "late"]
    assert all(r.published_ms is not None for r in map(shop.timeouts.get, ["soon", "late"]) if r)


def test_during_a_broker_outage_writes_stop_trying_it_for_a_while_and_log_it_once(
    shop: Shop, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []
    publish = shop.transport.publish

    def counted(messages: Sequence[TimerMessage]) -> None:
        attempts.append(len(messages))
        publish(messages)

    monkeypatch.setattr(shop.transport, "publish", counted)
    shop.transport.available = False
    with caplog.at_level(logging.WARNING, logger="order_timeouts.outbox"):
        for i in range(20):
            shop.timeouts.schedule(f"O-{i}", delay=timedelta(minutes=5))
        assert len(attempts) == 1, "the first write found the broker down; the next ones leave it to the relay"
        shop.transport.available = True
        later = outbox.monotonic() + 1  # past the first backoff (at most 0.2 s)
        monkeypatch.setattr(outbox, "monotonic", lambda: later)
        shop.timeouts.schedule("O-back", delay=timedelta(minutes=5))
    assert len(attempts) == 2 and list(shop.transport.armed()) == ["O-back"]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "unavailable" in said[0] and "back after" in said[1]
    assert Maintenance(shop.timeouts).relay().rows == 20


def test_the_reconciler_republishes_what_the_broker_lost_once_the_grace_has_passed(shop: Shop) -> None:
    shop.add_orders("L-1")
    shop.timeouts.schedule("L-1", delay=timedelta(seconds=10))
    shop.transport.revoke(["L-1"])  # the broker lost it
    maintenance = Maintenance(shop.timeouts, MaintenancePlan(grace=timedelta(seconds=60)))

    shop.later(seconds=10 + 59)
    assert maintenance.reconcile().rows == 0, "within the grace: maybe only slow"
    shop.later(seconds=2)
    assert maintenance.reconcile().rows == 1
    assert shop.drain().cancelled == 1


def test_a_broker_back_empty_gets_every_pending_timeout_again_from_the_next_relay_run(shop: Shop) -> None:
    shop.add_orders("E-1", "E-2")
    shop.timeouts.schedule("E-1", delay=timedelta(minutes=5))
    shop.timeouts.schedule("E-2", delay=timedelta(hours=2))
    shop.timeouts.schedule("E-done", delay=timedelta(minutes=1))
    shop.timeouts.cancel("E-done")
    shop.transport.lose_everything()

    maintenance = Maintenance(shop.timeouts)
    assert maintenance.relay().rows == 2, "not after the reconciler's grace: at once, and only what is pending"
    assert sorted(shop.transport.armed()) == ["E-1", "E-2"]
    assert maintenance.relay().rows == 0, "once restored, the broker counts as whole again"


def test_a_relay_that_fails_after_taking_the_timeouts_back_publishes_them_next_time(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    shop.timeouts.schedule("F-1", delay=timedelta(minutes=5))
    shop.transport.lose_everything()

    def broker_gone_again() -> None:
        raise TransportUnavailable("memory: gone again")

    monkeypatch.setattr(shop.transport, "timers_restored", broker_gone_again)
    first = Maintenance(shop.timeouts)
    assert first.relay().error == "memory: gone again"
    assert shop.transport.armed() == {}
    monkeypatch.undo()
    shop.later(seconds=4)  # that process backs off; once its lease has expired another one relays
    assert Maintenance(shop.timeouts).relay().rows == 1
    assert list(shop.transport.armed()) == ["F-1"]


def test_one_maintenance_process_works_a_job_at_a_time_and_another_takes_over_when_its_lease_expires(
    shop: Shop,
) -> None:
    first, second = Maintenance(shop.timeouts), Maintenance(shop.timeouts)
    assert not first.relay().skipped
    assert second.relay().skipped
    shop.later(seconds=4)  # the lease outlives a few runs (3 s), then its holder counts as dead
    assert not second.relay().skipped
    assert first.relay().skipped


def test_cancel_revokes_the_timeout_and_removes_its_timer(shop: Shop) -> None:
    shop.timeouts.schedule("P-1", delay=timedelta(minutes=30))
    assert shop.timeouts.cancel("P-1") is True
    assert shop.transport.armed() == {}
    assert shop.timeouts.cancel("P-1") is False
    record = shop.timeouts.get("P-1")
    assert record is not None and record.state is TimeoutState.REVOKED
    with pytest.raises(TimeoutNotFound):
        shop.timeouts.cancel("never-scheduled")


def test_reschedule_and_fire_publish_the_new_due_time(shop: Shop) -> None:
    shop.timeouts.schedule("M-1", delay=timedelta(minutes=30))
    moved = shop.timeouts.reschedule("M-1", delay=timedelta(hours=1))
    assert moved.version == 2 and shop.transport.armed() == {"M-1": moved.due_ms}
    fired = shop.timeouts.fire("M-1")
    assert fired.due_ms == shop.clock.now_ms() and shop.transport.armed() == {"M-1": fired.due_ms}


def test_schedule_many_in_chunks_publishes_and_marks_every_chunk(shop: Shop, monkeypatch: pytest.MonkeyPatch) -> None:
    from scheduler import api

    monkeypatch.setattr(api, "SCHEDULE_CHUNK", 7)
    ids = [f"B-{i:02d}" for i in range(30)]
    summary = shop.timeouts.schedule_many(ids, delay=timedelta(minutes=1))
    assert (summary.created, summary.existing) == (30, 0)
    assert sorted(published_ids(shop)) == ids
    assert all(r is not None and r.published_ms is not None for r in map(shop.timeouts.get, ids))


def test_replay_of_dead_timeouts_is_all_or_nothing(shop: Shop) -> None:
    shop.timeouts.schedule("ghost", delay=timedelta(seconds=1))
    shop.later(seconds=1)
    for _ in range(shop.timeouts.settings.max_attempts):
        shop.drain()
        shop.later(minutes=10)
    with pytest.raises(InvalidTimeout, match="not dead-lettered"):
        shop.timeouts.replay_dead(["ghost", "unknown"])
    record = shop.timeouts.get("ghost")
    assert record is not None and record.state is TimeoutState.DEAD
    assert shop.timeouts.replay_dead(["ghost"]) == ["ghost"]
    assert shop.transport.armed() == {"ghost": shop.clock.now_ms()}
