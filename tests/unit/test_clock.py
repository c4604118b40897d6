"""One clock for the fleet: the registry's, read now and then, advanced by the monotonic clock."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest

from scheduler.clock import RegistryClock


class Machine:
    """A process's two clocks and the registry's, moved by the test."""

    def __init__(self) -> None:
        self.monotonic = 100.0
        self.wall_ms = 1_000_000
        self.registry_ms = 1_000_000
        self.reads = 0
        self.round_trip_s = 0.0
        self.down = False

    def read(self) -> int:
        if self.down:
            raise ConnectionError("the database is away")
        self.reads += 1
        answer = self.registry_ms
        self.monotonic += self.round_trip_s  # the answer was read somewhere during the round trip
        return answer

    def clock(self, **options: timedelta) -> RegistryClock:
        return RegistryClock(self.read, monotonic=lambda: self.monotonic, wall=lambda: self.wall_ms, **options)

    def wait(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall_ms += int(seconds * 1000)
        self.registry_ms += int(seconds * 1000)


def test_it_tells_the_registrys_time_whatever_this_process_wall_clock_says() -> None:
    machine = Machine()
    machine.wall_ms += 300_000  # this process's clock is five minutes fast
    clock = machine.clock()
    assert clock.now_ms() == machine.registry_ms
    assert clock.offset_ms == -300_000
    machine.wait(2.5)
    machine.wall_ms -= 3_600_000  # and then jumps an hour back (NTP, a resumed VM)
    assert clock.now_ms() == machine.registry_ms, "between readings the monotonic clock carries it"
    assert machine.reads == 1


def test_it_reads_the_registry_again_after_the_refresh_period() -> None:
    machine = Machine()
    clock = machine.clock(refresh=timedelta(seconds=5))
    clock.now_ms()
    machine.wait(4.9)
    clock.now_ms()
    assert machine.reads == 1
    machine.wait(0.2)
    machine.registry_ms += 40  # the monotonic clock ran a little slow against the registry's
    assert clock.now_ms() == machine.registry_ms
    assert machine.reads == 2


def test_it_is_never_ahead_of_the_registry_by_the_round_trip() -> None:
    machine = Machine()
    machine.round_trip_s = 0.2
    clock = machine.clock()
    read_at = machine.registry_ms
    assert clock.now_ms() == read_at, "the answer counts as read at the end of the round trip: behind, never ahead"


def test_an_unreachable_registry_keeps_the_last_reading_going_and_before_any_the_wall_clock_stands_in() -> None:
    machine = Machine()
    machine.down = True
    clock = machine.clock(refresh=timedelta(seconds=5))
    assert clock.now_ms() == machine.wall_ms and clock.offset_ms is None
    machine.down = False
    machine.wait(1)
    assert machine.reads == 0, "no reading attempt per call while the registry is away"
    machine.wait(5)
    assert clock.now_ms() == machine.registry_ms and machine.reads == 1
    machine.down = True
    machine.wall_ms += 60_000
    machine.wait(30)
    assert clock.now_ms() == machine.registry_ms


def test_a_skew_beyond_the_tolerance_is_logged_once_as_an_error(caplog: pytest.LogCaptureFixture) -> None:
    machine = Machine()
    machine.wall_ms -= 2_500  # 2.5 s slow
    clock = machine.clock(refresh=timedelta(seconds=1), tolerance=timedelta(seconds=1))
    with caplog.at_level(logging.WARNING, logger="order_timeouts.clock"):
        for _ in range(5):
            clock.now_ms()
            machine.wait(1.5)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "-2.500 s off the registry's" in errors[0].getMessage()
    assert clock.offset_ms == 2_500


def test_a_clock_without_a_reader_never_reads_and_takes_the_readings_it_is_handed() -> None:
    # The asyncio API's clock: its reads are awaited queries, so now_ms() must do no I/O.
    machine = Machine()
    machine.registry_ms = machine.wall_ms + 5_000  # the registry runs 5 s ahead of this process
    clock = RegistryClock(None, monotonic=lambda: machine.monotonic, wall=lambda: machine.wall_ms)
    assert clock.wants_reading()
    assert clock.now_ms() == machine.wall_ms, "the process's own clock stands in before any reading"
    clock.record(machine.read())
    assert not clock.wants_reading()
    machine.wait(2)
    assert clock.now_ms() == machine.registry_ms
    machine.wait(4)
    assert clock.wants_reading(), "a reading is due again after `refresh`"
    clock.record(None)  # the read failed: the last reading goes on, the next try after `refresh`
    assert not clock.wants_reading()
    assert clock.now_ms() == machine.registry_ms
    assert machine.reads == 1
