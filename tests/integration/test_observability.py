"""Metrics, logs and health checks as an operator's tools see them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from consumers.worker import Worker
from scheduler.logs import configure_logging, scrub
from scheduler.observability import RegistryCollector, WorkerMetrics
from tests.conftest import Stack
from tests.support import add_orders, faketime, free_port, pay, wait_until


def test_worker_metrics_count_outcomes_and_registry_gauges(db_stack: Stack) -> None:
    add_orders(db_stack.engine, ["m-1", "m-2", "m-3"])
    client = db_stack.timeouts()
    now = datetime.now(UTC)
    client.schedule_many(["m-1", "m-2", "m-3", "m-ghost"], due_at=now)
    client.schedule("m-later")  # the default 30 minutes
    assert pay(db_stack.engine, "m-2")
    prometheus = CollectorRegistry()
    prometheus.register(RegistryCollector(client.engine, client.clock))
    metrics = WorkerMetrics(prometheus)

    Worker(client, burst=True, metrics=metrics).run()

    def sample(name: str, **labels: str) -> float | None:
        return prometheus.get_sample_value(name, labels)

    assert sample("order_timeouts_fired_total") == 4
    assert sample("order_timeouts_outcomes_total", outcome="cancelled") == 2
    assert sample("order_timeouts_outcomes_total", outcome="paid") == 1
    assert sample("order_timeouts_outcomes_total", outcome="retried") == 1, "the order that does not exist"
    assert sample("order_timeouts_lateness_seconds_count") == 4
    assert sample("order_timeouts_batch_duration_seconds_count") == 1
    assert sample("order_timeouts_pending") == 2, "the retried one and the one due in 30 minutes"
    assert sample("order_timeouts_dead") == 0
    assert sample("order_timeouts_registry_up") == 1


def test_a_worker_process_serves_metrics_over_http(db_stack: Stack) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "scheduler", "worker", "--metrics-port", str(port)]
    worker = subprocess.Popen(argv, env=db_stack.env(), stdout=subprocess.DEVNULL)
    try:
        body = ""

        def scraped() -> bool:
            nonlocal body
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
                    body = response.read().decode()
                return True
            except OSError:
                return False

        wait_until(scraped, timeout=20, interval=0.1)
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0
    assert "\norder_timeouts_fired_total " in body
    # The registry gauges describe the deployment: maintain exports them, once (test_metrics_series.py).
    for name in ("order_timeouts_pending", "order_timeouts_overdue_lag_seconds", "order_timeouts_dead"):
        assert f"\n{name} " not in body


def test_json_logs_carry_order_id_and_outcome_and_never_a_password(db_stack: Stack) -> None:
    add_orders(db_stack.engine, ["log-1"])
    db_stack.timeouts().schedule("log-1", due_at=datetime.now(UTC))
    argv = [sys.executable, "-m", "scheduler", "--log-format", "json", "--verbose", "worker", "--burst"]
    done = subprocess.run(argv, env=db_stack.env(), capture_output=True, text=True, timeout=60, check=True)
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    handled = [e for e in entries if e.get("order_id") == "log-1"]
    assert handled and handled[0]["outcome"] == "cancelled" and handled[0]["level"] == "info"


def test_passwords_in_log_lines_are_scrubbed(capsys: pytest.CaptureFixture[str]) -> None:
    assert scrub("connect amqp://shop:s3cret@10.0.0.1/%2F failed") == "connect amqp://shop:***@10.0.0.1/%2F failed"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(verbose=True, json_format=True)
        logging.getLogger("order_timeouts.test").warning("broker %s is down", "redis://:pw-123@10.0.0.9:6379/0")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "broker redis://:***@10.0.0.9:6379/0 is down"


def test_check_reports_each_component_and_fails_without_leaking_secrets(db_stack: Stack) -> None:
    argv = [sys.executable, "-m", "scheduler", "check", "--json"]
    ok = subprocess.run(argv, env=db_stack.env(), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True
    broken = db_stack.env(ORDER_TIMEOUTS_BROKER_URL="redis://user:topsecret@127.0.0.1:1/0")
    bad = subprocess.run(argv, env=broken, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    checks = {c["component"]: c["ok"] for c in report["checks"]}
    assert checks == {"database": True, "clock": True, "pause": True, "broker": False, "deployment": True}
    assert "topsecret" not in bad.stdout + bad.stderr


def test_check_fails_when_this_process_clock_is_off_the_registrys_beyond_the_tolerance(db_stack: Stack) -> None:
    argv = [sys.executable, "-m", "scheduler", "check", "--json"]
    skewed = db_stack.env(ORDER_TIMEOUTS_MAX_CLOCK_SKEW="0.5", **faketime("+2s"))
    done = subprocess.run(argv, env=skewed, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    (clock,) = [c for c in json.loads(done.stdout)["checks"] if c["component"] == "clock"]
    assert clock["ok"] is False and "beyond 0.5 s" in clock["problem"]
    assert 1.9 <= float(clock["target"].split()[0]) <= 2.1, clock


def test_check_of_a_sqlite_file_that_does_not_exist_says_so_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet.sqlite3"
    env = {**os.environ, "ORDER_TIMEOUTS_DATABASE_URL": f"sqlite:///{missing}", "ORDER_TIMEOUTS_BROKER_URL": "sql"}
    argv = [sys.executable, "-m", "scheduler", "check", "--json"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    checks = json.loads(done.stdout)["checks"]
    assert [c["ok"] for c in checks] == [False, False]
    assert "init-db" in checks[0]["problem"]
    assert list(tmp_path.iterdir()) == [], "no database file was created"
