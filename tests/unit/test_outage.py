"""Riding over an outage: one warning when it starts, one when it ends, waits that grow to a cap."""

from __future__ import annotations

import logging

import pytest

from scheduler.outage import Outage

log = logging.getLogger("order_timeouts.test_outage")


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    outage = Outage(log)
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(20):
            outage.failed("the registry database", "connection refused")
        assert outage.ongoing
        outage.recovered()
        outage.recovered()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "the registry database unavailable",
        "the registry database back after 0.0s",
    ]
    assert not outage.ongoing


def test_an_outage_moving_between_components_logs_each_down_once_and_back_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = Outage(log)
    with caplog.at_level(logging.WARNING, logger=log.name):
        outage.failed("the registry database", "refused")
        outage.failed("the order store", "refused")
        outage.failed("the registry database", "refused")
        outage.failed("the order store", "HTTP 503")
        outage.recovered()
    assert [r.getMessage().split(",")[0].split(" after")[0] for r in caplog.records] == [
        "the registry database unavailable",
        "the order store unavailable",
        "the registry database back",
        "the order store back",
    ]


def test_waits_double_with_jitter_up_to_the_cap_and_start_again_after_a_recovery() -> None:
    outage = Outage(log, base_s=0.2, cap_s=5.0)
    waits = [outage.failed("the broker", "down") for _ in range(12)]
    assert 0.1 <= waits[0] <= 0.2
    assert 0.2 <= waits[1] <= 0.4
    assert all(2.5 <= wait <= 5.0 for wait in waits[6:]), "capped: work resumes at most 5 s after the return"
    outage.recovered()
    assert outage.failed("the broker", "down again") <= 0.2
