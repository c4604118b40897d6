"""The transport table and the in-memory transport's rules (the real brokers keep the same rules in
tests/contract)."""

from __future__ import annotations

import importlib
from datetime import timedelta
from importlib.metadata import EntryPoint

import pytest

from scheduler import ConfigurationError, transports
from scheduler.errors import MalformedMessage
from scheduler.testing import InMemoryTransport, ManualClock
from scheduler.transports import SCHEMES, Transport, open_transport
from scheduler.transports.base import FAILED_REDELIVERY_MS, Settlement
from scheduler.transports.message import TimerMessage


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_scheme_names_a_transport_class(scheme: str) -> None:
    module, _, name = SCHEMES[scheme].partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, Transport) and cls.name


def test_an_unknown_scheme_is_refused_with_the_known_ones_and_no_password(tmp_path: object) -> None:
    with pytest.raises(ConfigurationError) as refused:
        open_transport("kafka://user:secret@127.0.0.1:9092", None, ManualClock())  # type: ignore[arg-type]
    assert "secret" not in str(refused.value)
    assert "redis://" in str(refused.value) and "rq+rediss://" in str(refused.value)


def test_a_transport_from_another_package_plugs_in_by_its_url_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = EntryPoint("memory", "scheduler.testing.transport:InMemoryTransport", transports.PLUGIN_GROUP)
    monkeypatch.setattr(transports, "entry_points", lambda group: [plugin] if group == plugin.group else [])
    clock = ManualClock()
    opened = open_transport("memory://", None, clock)  # type: ignore[arg-type]
    assert isinstance(opened, InMemoryTransport)
    with pytest.raises(ConfigurationError, match="memory://"):
        open_transport("nats://127.0.0.1", None, clock)  # type: ignore[arg-type]


def test_a_timer_is_delivered_when_its_due_time_comes_and_not_before() -> None:
    clock = ManualClock()
    transport = InMemoryTransport(clock)
    now = clock.now_ms()
    transport.publish([TimerMessage("a", now + 1000, 1), TimerMessage("b", now + 500, 1)])
    clock.advance(timedelta(milliseconds=499))
    assert not transport.receive(10, 0)
    clock.advance(timedelta(milliseconds=501))
    assert [d.message.order_id for d in transport.receive(10, 0).deliveries] == ["b", "a"], "due order"


def test_publishing_again_replaces_the_timer_and_revoke_removes_it() -> None:
    clock = ManualClock()
    transport = InMemoryTransport(clock)
    now = clock.now_ms()
    transport.publish([TimerMessage("a", now + 1000, 1)])
    transport.publish([TimerMessage("a", now + 5000, 2)])
    assert transport.armed() == {"a": now + 5000}
    transport.revoke(["a"])
    assert transport.armed() == {}


def test_a_failed_delivery_comes_back_soon_unless_a_later_timer_was_armed_meanwhile() -> None:
    clock = ManualClock()
    transport = InMemoryTransport(clock)
    now = clock.now_ms()
    transport.publish([TimerMessage("a", now, 1), TimerMessage("b", now, 1)])
    a, b = transport.receive(10, 0).deliveries
    transport.publish([TimerMessage("b", now + 60_000, 2)])  # rescheduled while its batch ran
    transport.settle(Settlement(failed=[a, b], rolled_back=True))
    assert transport.armed() == {"a": now + FAILED_REDELIVERY_MS, "b": now + 60_000}
    clock.advance(timedelta(milliseconds=FAILED_REDELIVERY_MS))
    (again,) = transport.receive(10, 0).deliveries
    assert again.message.order_id == "a" and again.deliveries == 1, "a fresh delivery, not counted"


def test_a_message_carries_its_deployment_and_one_without_it_is_read_as_ours() -> None:
    stamped = TimerMessage("A-1", 5, 2, "3f9a1c2b9d0e")
    assert TimerMessage.decode(stamped.encode()) == stamped
    legacy = TimerMessage.decode(b'{"order_id": "A-1", "due_ms": 5, "version": 2}')
    assert legacy.deployment is None
    assert not legacy.foreign_to("3f9a1c2b9d0e") and not stamped.foreign_to("3f9a1c2b9d0e")
    assert stamped.foreign_to("0123456789ab") and not stamped.foreign_to(None)


@pytest.mark.parametrize("deployment", ['""', "7", "null", '"' + "x" * 65 + '"', "[]"])
def test_a_message_whose_deployment_is_not_a_short_string_is_malformed(deployment: str) -> None:
    body = f'{{"order_id": "A-1", "due_ms": 5, "version": 2, "deployment": {deployment}}}'.encode()
    if deployment == "null":  # an explicit null is the same as no identity
        assert TimerMessage.decode(body).deployment is None
        return
    with pytest.raises(MalformedMessage, match="deployment must be a non-empty string"):
        TimerMessage.decode(body)
