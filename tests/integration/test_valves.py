"""Safety valves on every transport: a pause that hands timers back untouched, shadow mode, the
cancel circuit breaker, and how `stats`, `check`, `pending` and the metrics show them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from consumers.worker import Worker, WorkerTotals
from scheduler import OrderTimeouts, Outcome, TimeoutState
from scheduler.config import BreakerLimits, Mode
from scheduler.observability import RegistryCollector, WorkerMetrics
from scheduler.registry.control import PausedBy
from tests.conftest import Stack, open_stack
from tests.integration.test_cli import Cli
from tests.stacks import DATABASES
from tests.support import add_orders, cancel_counts, order_status, pay, registry_records

#: rounds of the whole batch handed back while paused: with max_deliveries=1, any delivery counted
#: towards the poison limit would dead-letter its timer at the second round
ROUNDS = 3


@pytest.fixture
def sqlite_stack(tmp_path: Path) -> Iterator[Stack]:
    yield from open_stack("sqlite", DATABASES, tmp_path)


@pytest.fixture
def cli(db_stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(db_stack, capsys, monkeypatch)


@pytest.fixture
def sqlite_cli(sqlite_stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(sqlite_stack, capsys, monkeypatch)


def all_done(stack: Stack) -> bool:
    return all(r.state is TimeoutState.DONE for r in registry_records(stack.engine).values())


def drain_paused(stack: Stack, client: OrderTimeouts, rounds: int, timeout: float = 30.0) -> WorkerTotals:
    """Burst workers until `rounds` batches were handed back because the fleet is paused."""
    totals = WorkerTotals()
    deadline = time.monotonic() + timeout
    while totals.paused < rounds:
        run = stack.drain(client, batch_size=100)
        totals.add(run)
        assert time.monotonic() < deadline, f"fewer than {rounds} batches handed back: {totals}"
        time.sleep(0.05)
    return totals


def test_a_paused_fleet_hands_every_timer_back_untouched_and_resume_drains_each_once(stack: Stack) -> None:
    ids = [f"p-{i:02d}" for i in range(20)]
    paid = set(ids[::4])
    add_orders(stack.engine, ids)
    for order_id in paid:
        assert pay(stack.engine, order_id)
    client = stack.timeouts(max_deliveries=1)
    pause, started = client.pause("payment provider answers wrongly")
    assert started and pause.by is PausedBy.OPERATOR
    client.schedule_many(ids, due_at=datetime.now(UTC))

    totals = drain_paused(stack, client, ROUNDS)
    assert (totals.claimed, totals.cancelled, totals.dead, totals.stale) == (0, 0, 0, 0)
    assert cancel_counts(stack.engine) == {}
    records = registry_records(stack.engine)
    assert {(r.state, r.attempts, r.error) for r in records.values()} == {(TimeoutState.PENDING, 0, None)}

    assert client.resume() == pause
    assert client.paused() is None
    stack.drain_until(lambda: all_done(stack), client=client)
    records = registry_records(stack.engine)
    assert {oid: r.outcome for oid, r in records.items()} == {
        oid: Outcome.PAID if oid in paid else Outcome.CANCELLED for oid in ids
    }
    assert {r.attempts for r in records.values()} == {1}, "the pause spent no attempt"
    assert cancel_counts(stack.engine) == {oid: 1 for oid in ids if oid not in paid}


def test_shadow_mode_records_would_cancel_and_cancels_nothing(stack: Stack) -> None:
    ids = [f"s-{i:02d}" for i in range(12)]
    paid = set(ids[::3])
    add_orders(stack.engine, ids)
    for order_id in paid:
        assert pay(stack.engine, order_id)
    shadow = stack.timeouts(mode=Mode.SHADOW)
    shadow.schedule_many(ids, due_at=datetime.now(UTC))

    totals = stack.drain_until(lambda: all_done(stack), client=shadow)
    assert totals.cancelled == 0
    records = registry_records(stack.engine)
    assert {oid: r.outcome for oid, r in records.items()} == {
        oid: Outcome.PAID if oid in paid else Outcome.WOULD_CANCEL for oid in ids
    }
    assert cancel_counts(stack.engine) == {}
    assert order_status(stack.engine) == {oid: "PAID" if oid in paid else "PENDING" for oid in ids}


def breaker_worker(client: OrderTimeouts) -> tuple[Worker, WorkerMetrics]:
    metrics = WorkerMetrics(CollectorRegistry())
    return Worker(client, burst=True, batch_size=10, metrics=metrics), metrics


def trips(metrics: WorkerMetrics) -> float:
    return metrics.breaker_trips._value.get()


def test_the_breaker_pauses_the_fleet_when_the_order_store_answers_unpaid_for_everything(
    db_stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    ids = [f"u-{i:02d}" for i in range(60)]
    add_orders(db_stack.engine, ids)  # every order unpaid
    client = db_stack.timeouts(breaker=BreakerLimits(max_unpaid_ratio=0.5, min_orders=20))
    client.schedule_many(ids, due_at=datetime.now(UTC))

    worker, metrics = breaker_worker(client)
    with caplog.at_level(logging.ERROR, logger="order_timeouts.breaker"):
        totals = worker.run()
    # 20 decided orders, all unpaid: the second batch of 10 trips it, the third is handed back.
    assert (totals.cancelled, totals.paused) == (20, 1)
    pause = client.paused()
    assert pause is not None and pause.by is PausedBy.BREAKER
    assert (
        "unpaid answers for 20 of 20 orders" in pause.reason and "ORDER_TIMEOUTS_MAX_UNPAID_RATIO=0.5" in pause.reason
    )
    assert "circuit breaker tripped" in caplog.text
    assert trips(metrics) == 1
    pending = [r for r in registry_records(db_stack.engine).values() if r.state is TimeoutState.PENDING]
    assert len(pending) == 40 and {r.attempts for r in pending} == {0}

    # Resume clears it, and the window starts again at the resume: another 20 before it trips again.
    assert client.resume() == pause
    worker, metrics = breaker_worker(client)
    assert worker.run().cancelled == 20
    assert trips(metrics) == 1

    client.resume()
    db_stack.drain(db_stack.timeouts())  # no breaker configured: the rest drains
    assert cancel_counts(db_stack.engine) == dict.fromkeys(ids, 1)


def test_a_burst_of_cancels_above_the_bound_pauses_the_fleet_and_resume_clears_it(db_stack: Stack) -> None:
    ids = [f"b-{i:03d}" for i in range(100)]
    add_orders(db_stack.engine, ids)
    paid = set(ids[::2])
    for order_id in paid:
        assert pay(db_stack.engine, order_id)
    client = db_stack.timeouts(breaker=BreakerLimits(max_cancels_per_minute=12))
    client.schedule_many(ids, due_at=datetime.now(UTC))

    worker, metrics = breaker_worker(client)
    totals = worker.run()
    # 5 cancels per batch of 10: the third batch takes the minute to 15, above 12.
    assert totals.cancelled == 15 and trips(metrics) == 1
    pause = client.paused()
    assert pause is not None and pause.by is PausedBy.BREAKER
    assert pause.reason == "15 cancels in the last minute, above ORDER_TIMEOUTS_MAX_CANCELS_PER_MINUTE=12"

    client.resume()
    worker, _ = breaker_worker(client)
    assert worker.run().cancelled == 15, "cancelling again after resume, until the bound is passed again"
    client.resume()
    db_stack.drain(db_stack.timeouts())
    assert cancel_counts(db_stack.engine) == {oid: 1 for oid in ids if oid not in paid}


def test_stats_check_pending_and_the_metrics_show_the_pause_and_shadow_outcomes(cli: Cli, db_stack: Stack) -> None:
    db_stack.timeouts().schedule("x-1", delay=timedelta(minutes=5))
    code, out, _ = cli("pause", "--reason", "provider incident [INC-42]")
    assert code == 0 and "paused: by operator since " in out and "provider incident [INC-42]" in out
    code, out, _ = cli("pause", "--reason", "another")
    assert code == 0 and "already paused, kept as it is" in out and "INC-42" in out

    stats = cli.json("stats")
    assert isinstance(stats, dict)
    assert stats["paused"]["by"] == "operator" and stats["paused"]["reason"] == "provider incident [INC-42]"
    assert stats["paused"]["since"].endswith("Z")
    check = cli.json("check")
    assert isinstance(check, dict) and check["ok"] is True, "a paused fleet is healthy: it works as asked"
    assert [c["paused"]["reason"] for c in check["checks"] if c["component"] == "pause"] == [
        "provider incident [INC-42]"
    ]
    code, out, _ = cli("pending")
    assert code == 0 and "PAUSED by operator since" in out and "[INC-42]" in out
    code, out, _ = cli("stats")
    assert code == 0 and "PAUSED by operator" in out

    collector = RegistryCollector(db_stack.engine, db_stack.timeouts().clock)
    samples = {s.name: s for family in collector.collect() for s in family.samples}
    assert samples["order_timeouts_paused"].value == 1
    assert samples["order_timeouts_paused"].labels == {"by": "operator", "reason": "provider incident [INC-42]"}
    assert samples["order_timeouts_paused_seconds"].value >= 0

    code, out, _ = cli("resume")
    assert code == 0 and "resumed" in out
    assert cli.json("stats")["paused"] is None  # type: ignore[index]
    samples = {s.name: s for family in collector.collect() for s in family.samples}
    assert samples["order_timeouts_paused"].value == 0

    add_orders(db_stack.engine, ["x-2"])
    shadow = db_stack.timeouts(mode=Mode.SHADOW)
    shadow.schedule("x-2", due_at=datetime.now(UTC))
    db_stack.drain(shadow)
    stats = cli.json("stats")
    assert isinstance(stats, dict)
    assert stats["shadow_5m"] == {"would_cancel": 1}
    assert "done:would_cancel" not in stats["finished_5m"], "shadow outcomes are shown apart"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["pause", "--reason", "   "], {}, "the pause reason is empty"),
        (["pause", "--reason", "x" * 201], {}, "at most 200"),
        (["worker", "--mode", "dry"], {}, "--mode must be live or shadow"),
        (["stats"], {"ORDER_TIMEOUTS_MODE": "dry"}, "ORDER_TIMEOUTS_MODE must be live or shadow"),
        (["stats"], {"ORDER_TIMEOUTS_MAX_CANCELS_PER_MINUTE": "0"}, "MAX_CANCELS_PER_MINUTE must be a positive"),
        (["stats"], {"ORDER_TIMEOUTS_MAX_CANCELS_PER_MINUTE": "lots"}, "MAX_CANCELS_PER_MINUTE must be a positive"),
        (["stats"], {"ORDER_TIMEOUTS_MAX_UNPAID_RATIO": "1.5"}, "MAX_UNPAID_RATIO must be a share above 0"),
        (["stats"], {"ORDER_TIMEOUTS_MAX_UNPAID_RATIO": "half"}, "MAX_UNPAID_RATIO must be a share above 0"),
        (["stats"], {"ORDER_TIMEOUTS_UNPAID_RATIO_MIN_ORDERS": "-1"}, "MIN_ORDERS must be a positive"),
    ],
)
def test_bad_valve_values_exit_2_with_one_line_and_change_nothing(
    sqlite_cli: Cli, monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = sqlite_cli(*args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err
    for name in env:
        monkeypatch.delenv(name)
    assert sqlite_cli.json("stats")["paused"] is None  # type: ignore[index]


def test_ratio_settings_take_a_share_or_a_percentage(monkeypatch: pytest.MonkeyPatch) -> None:
    from scheduler import Settings

    monkeypatch.setenv("ORDER_TIMEOUTS_MAX_UNPAID_RATIO", "90%")
    monkeypatch.setenv("ORDER_TIMEOUTS_MAX_CANCELS_PER_MINUTE", "500")
    monkeypatch.setenv("ORDER_TIMEOUTS_MODE", "Shadow")
    settings = Settings.from_env()
    assert settings.breaker == BreakerLimits(max_cancels_per_minute=500, max_unpaid_ratio=0.9, min_orders=100)
    assert settings.mode is Mode.SHADOW
