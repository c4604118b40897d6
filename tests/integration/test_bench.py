"""The bench's smallest profile on the `sql` systems: every figure is there and the JSON parses;
and how it settles a loaded Redis before measuring it.

Timings are not asserted: this machine's load decides them. The figures' meaning is checked where
it cannot depend on timing (the drains cancelled exactly the unpaid orders).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from benchmarks import BULK_ROUNDS
from benchmarks.cli import app
from benchmarks.report import PRODUCT_FIGURES, PURGE_LOAD_FIGURES, REGISTRY_FIGURES
from benchmarks.sandbox import finish_rehashing, redis_keys
from tests.redis_support import redis_prefix
from tests.services import POSTGRES_URL, REDIS_URL, require


def test_tiny_profile_reports_every_figure_for_the_sql_systems(tmp_path: Path) -> None:
    require("PostgreSQL", 5432)

    args = ["--profile", "tiny", "--systems", "sql-sqlite,sql-postgresql", "--json"]
    args += ["--postgres-url", POSTGRES_URL, "--output", str(tmp_path)]
    outcome = CliRunner().invoke(app, args)

    assert outcome.exit_code == 0, outcome.output
    document = json.loads(outcome.stdout)
    assert set(document["systems"]) == {"sql-sqlite", "sql-postgresql"}
    for system, entry in document["systems"].items():
        figures = entry["figures"]
        missing = [
            key for key in (*PRODUCT_FIGURES, *REGISTRY_FIGURES, *PURGE_LOAD_FIGURES) if figures.get(key) is None
        ]
        assert not missing, f"{system} lacks {missing}; notes: {entry['notes']}"
        assert figures["burst_verified"] is True and figures["loaded_verified"] is True
        assert figures["bulk_rate"] > 0 and figures["burst_p99_ms"] >= figures["burst_p50_ms"]
        # its own bulk and one per round taken in turns with the other systems: the best of them counts
        assert len(figures["bulk_rates"]) == BULK_ROUNDS + 1 and figures["bulk_rate"] == max(figures["bulk_rates"])
        # the fire rates are the better of two bursts each: the first burst's is one of the empty two
        assert figures["empty_fire_rate"] >= figures["burst_drain_rate"]
        # the tiny profile's purges: the one timed, and the one run beside the steady load, each of it all
        assert figures["purge_rate"] > 0 and figures["purge_load_rows"] == 2000
    assert any(check["figure"] == "steady_p99_ms" for check in document["targets"])
    for when in ("cpu_before", "cpu_after"):  # how far this machine's own speed moved, for the reader
        steadiness = document["machine"][when]
        assert 0 < steadiness["fastest_s"] <= steadiness["slowest_s"] and steadiness["spread"] >= 1.0
    saved = list(tmp_path.glob("bench-*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["profile"] == "tiny"


def test_a_loaded_redis_is_measured_with_its_sorted_sets_rehashed_and_nothing_written() -> None:
    """A sorted set that has just doubled its hash table moves it a bucket per operation on the set,
    and every insert costs twice as much until the move is over. The bench finishes that move
    before it measures a loaded system (as a running system's next operations would)."""
    slots = 2**14
    with redis_prefix() as prefix:
        client = redis.Redis.from_url(REDIS_URL)
        key = f"{{{prefix}}}:scheduled"
        members = {f"job-{i:05d}": float(i) for i in range(slots + 1)}
        client.zadd(key, dict(list(members.items())[:slots]))
        client.zadd(key, {"job-16384": float(slots)})  # one past 2^14: the table doubles and starts to move
        moving = client.memory_usage(key, samples=0)

        finish_rehashing(REDIS_URL, redis_keys(prefix))

        # MEMORY USAGE counts the slots of both tables while the move lasts: the old 2^14 pointers are gone.
        assert moving - client.memory_usage(key, samples=0) == slots * 8
        assert dict(client.zrange(key, 0, -1, withscores=True)) == {m.encode(): s for m, s in members.items()}
        client.close()


def test_the_scale_profile_times_each_admin_command_on_both_registries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few commands and one run each, on SQLite: the sizes, the figures of each command and the
    target check are in the document (the ratios themselves are this machine's)."""
    from benchmarks import scale

    monkeypatch.setattr(scale, "IN_PROCESS_RUNS", 1)
    monkeypatch.setattr(scale, "PROCESS_RUNS", 1)
    every = scale.admin_commands()
    monkeypatch.setattr(scale, "admin_commands", lambda: {key: every[key] for key in ("stats --json", "dead list")})
    args = ["--profile", "scale", "--systems", "sql-sqlite", "--json", "--output", str(tmp_path)]
    args += ["--scale-rows", "3000", "--scale-sqlite-rows", "3000", "--scale-small-rows", "1000"]
    outcome = CliRunner().invoke(app, args)

    assert outcome.exit_code == 0, outcome.output
    document = json.loads(outcome.stdout)
    figures = document["systems"]["sql-sqlite"]["figures"]
    assert (figures["scale_small_rows"], figures["scale_large_rows"]) == (1000, 3000)
    assert set(figures["admin_commands"]) == {"stats --json", "dead list"}
    for command in figures["admin_commands"].values():
        for way in ("in_process", "process"):
            assert command[f"{way}_large_s"] / command[f"{way}_small_s"] == pytest.approx(command[f"{way}_ratio"])
    assert [check["figure"] for check in document["targets"]] == ["admin_worst_process_ratio"]
