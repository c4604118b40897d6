"""The producer API: bad input raises InvalidTimeout and changes nothing.

The registry row follows the caller's transaction (the outbox).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session

from scheduler import AsyncOrderTimeouts, InvalidTimeout, OrderTimeouts, ScheduleResult, Settings, TimeoutState
from tests.async_client import BlockingAsyncClient
from tests.conftest import Stack

hypothesis_settings = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

bad_ids = st.one_of(
    st.just(""),
    st.text(min_size=256, max_size=400),
    st.integers(),
    st.binary(min_size=1, max_size=10),
    st.none(),
    st.floats(allow_nan=False),
    st.text(min_size=1).map(lambda s: f" {s}"),
    st.text(min_size=1, max_size=10).map(lambda s: f"a\n{s}"),
    st.text(alphabet=st.characters(categories=["Cc"]), min_size=1, max_size=5),
    st.just("order-\ud800"),  # a lone surrogate cannot be stored as text
)


@pytest.fixture
def client(db_stack: Stack, api: str) -> OrderTimeouts:
    """Each producer API (OrderTimeouts, AsyncOrderTimeouts) with a maximum delay of 7 days."""
    db_stack.timeouts()  # the stack's own client, which set it up
    if api == "sync":
        return db_stack.timeouts(max_delay=timedelta(days=7))
    settings = Settings(database_url=db_stack.database_url, broker_url=db_stack.broker_url, max_delay=timedelta(days=7))
    db_stack.clients[api] = BlockingAsyncClient(AsyncOrderTimeouts(settings=settings))
    return db_stack.clients[api]  # type: ignore[no-any-return]


@hypothesis_settings
@given(order_id=bad_ids)
def test_malformed_order_ids_are_refused(client: OrderTimeouts, order_id: object) -> None:
    with pytest.raises(InvalidTimeout):
        client.schedule(order_id, delay=timedelta(minutes=1))  # type: ignore[arg-type]
    with pytest.raises(InvalidTimeout):
        client.schedule_many(["fine-1", order_id, "fine-2"], delay=timedelta(minutes=1))  # type: ignore[list-item]
    assert client.get("fine-1") is None and client.get("fine-2") is None, "one bad id in a batch changes nothing"


@hypothesis_settings
@given(
    delay=st.one_of(
        st.timedeltas(max_value=timedelta(0)),  # not positive (1 µs is: it is rounded up to 1 ms)
        st.timedeltas(min_value=timedelta(days=7, milliseconds=1)),
    )
)
def test_delays_not_positive_or_above_the_maximum_are_refused(client: OrderTimeouts, delay: timedelta) -> None:
    with pytest.raises(InvalidTimeout):
        client.schedule("o-1", delay=delay)
    assert client.get("o-1") is None


@hypothesis_settings
@given(moment=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
def test_naive_datetimes_are_refused(client: OrderTimeouts, moment: datetime) -> None:
    with pytest.raises(InvalidTimeout, match="timezone-aware"):
        client.schedule("o-1", due_at=moment)
    assert client.get("o-1") is None


def test_other_bad_combinations(client: OrderTimeouts) -> None:
    with pytest.raises(InvalidTimeout, match="either"):
        client.schedule("o-1", delay=timedelta(minutes=1), due_at=datetime.now(UTC))
    with pytest.raises(InvalidTimeout, match="maximum"):
        client.schedule("o-1", due_at=datetime.now(UTC) + timedelta(days=8))
    with pytest.raises(InvalidTimeout):
        client.schedule("o-1", delay=60)  # type: ignore[arg-type]
    assert client.get("o-1") is None


@hypothesis_settings
@given(order_id=st.text(min_size=1, max_size=255).filter(lambda s: s == s.strip() and s.isprintable()))
def test_any_printable_id_round_trips(client: OrderTimeouts, order_id: str) -> None:
    try:
        order_id.encode()
    except UnicodeEncodeError:
        return
    result = client.schedule(order_id, delay=timedelta(minutes=5))
    assert result in (ScheduleResult.CREATED, ScheduleResult.EXISTS)
    record = client.get(order_id)
    assert record is not None and record.order_id == order_id


def test_due_at_keeps_the_instant_whatever_the_offset(client: OrderTimeouts) -> None:
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
    client.schedule("tz", due_at=due.astimezone(timezone(timedelta(hours=-5))))
    record = client.get("tz")
    assert record is not None and record.due_ms == int(due.timestamp() * 1000)


def test_default_delay_is_thirty_minutes(client: OrderTimeouts) -> None:
    before = client.clock.now_ms()
    client.schedule("default")
    record = client.get("default")
    assert record is not None
    assert before + 30 * 60_000 <= record.due_ms <= client.clock.now_ms() + 30 * 60_000


def test_the_timeout_commits_and_rolls_back_with_the_order(db_stack: Stack) -> None:
    client = db_stack.timeouts()
    engine = db_stack.engine
    with pytest.raises(RuntimeError), engine.begin() as conn:
        conn.execute(text("INSERT INTO orders (id, status) VALUES ('rolled-back', 'PENDING')"))
        client.schedule("rolled-back", connection=conn)
        raise RuntimeError("the order service fails after scheduling")
    assert client.get("rolled-back") is None

    with Session(engine) as session, session.begin():
        session.execute(text("INSERT INTO orders (id, status) VALUES ('kept', 'PENDING')"))
        client.schedule("kept", connection=session)
        client.schedule_many(["kept-2", "kept-3"], connection=session)
    assert [client.get(oid) is not None for oid in ("kept", "kept-2", "kept-3")] == [True, True, True]


def test_cancel_in_the_payment_transaction(db_stack: Stack) -> None:
    client = db_stack.timeouts()
    client.schedule("pay-me")
    with pytest.raises(RuntimeError), db_stack.engine.begin() as conn:
        assert client.cancel("pay-me", connection=conn)
        raise RuntimeError("payment failed")
    record = client.get("pay-me")
    assert record is not None and record.state is TimeoutState.PENDING, "the revoke rolled back with the payment"
    assert client.cancel("pay-me") is True
    record = client.get("pay-me")
    assert record is not None and record.state is TimeoutState.REVOKED
    assert record.finished_ms is not None


def test_schedule_many_mixes_per_order_due_times_and_reports_duplicates(client: OrderTimeouts) -> None:
    now = datetime.now(UTC)
    client.schedule("existing", delay=timedelta(hours=1))
    summary = client.schedule_many(
        [("a", timedelta(minutes=1)), ("b", now + timedelta(minutes=2)), "c", "existing"],
        delay=timedelta(minutes=3),
    )
    assert (summary.created, summary.existing, summary.replaced) == (3, 1, 0)
    due = {oid: client.get(oid).due_ms for oid in ("a", "b", "c")}  # type: ignore[union-attr]
    assert due["a"] < due["b"] < due["c"]
    summary = client.schedule_many(["existing", "a"], delay=timedelta(minutes=10), replace=True)
    assert (summary.created, summary.existing, summary.replaced) == (0, 0, 2)
    record = client.get("existing")
    assert record is not None and record.version == 2
