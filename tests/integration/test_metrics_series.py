"""The metric an autoscaler and the alerts read is one series per deployment, however many worker
and maintain replicas Prometheus scrapes: real processes, their real /metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from scheduler.cli import main
from tests.conftest import ROOT, Stack, deployed
from tests.support import add_orders, free_port, postgres_schema, wait_until

REGISTRY_GAUGES = (
    "order_timeouts_pending",
    "order_timeouts_overdue",
    "order_timeouts_due_next_hour",
    "order_timeouts_overdue_lag_seconds",
    "order_timeouts_dead",
    "order_timeouts_unpublished",
    "order_timeouts_oldest_finished_age_seconds",
)


def scrape(port: int) -> dict[str, float] | None:
    """The samples of one /metrics page by name (labels left in the name), None when it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            body = response.read().decode()
    except OSError:
        return None
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def exporters(ports: list[int], name: str) -> list[int]:
    """The ports whose page has a series of `name` (each page must answer)."""
    pages = {port: scrape(port) for port in ports}
    assert all(page is not None for page in pages.values()), pages
    return [port for port, page in pages.items() if page is not None and name in page]


@pytest.fixture
def pg_stack(tmp_path: Path) -> Iterator[Stack]:
    with postgres_schema() as url:
        yield from deployed(Stack("sql-postgresql", url, "sql"))


def start(stack: Stack, *args: str, port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "scheduler", *args, "--metrics-port", str(port)]
    process = subprocess.Popen(argv, env=stack.env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: scrape(port) is not None or process.poll() is not None, timeout=30, interval=0.05)
    assert process.poll() is None, f"{args} exited with {process.returncode}"
    return process


@pytest.mark.slow
def test_the_registry_gauges_come_from_one_process_whatever_the_replicas_and_move_when_it_goes(
    pg_stack: Stack,
) -> None:
    add_orders(pg_stack.engine, ["late-1", "late-2"])
    pg_stack.timeouts().schedule_many(["late-1", "late-2"], delay=timedelta(hours=1))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        worker_ports = [free_port() for _ in range(3)]
        for port in worker_ports:
            processes.append(start(pg_stack, "worker", "--batch-size", "10", port=port))
        maintain_ports = [free_port() for _ in range(2)]
        for port in maintain_ports:
            processes.append(start(pg_stack, "maintain", "--gauge-lease", "2s", port=port))
        ports = worker_ports + maintain_ports

        # Five replicas scraped, twice each: every registry gauge has exactly one series, from one
        # maintain process, and the same one on each round while it lives.
        first = exporters(ports, "order_timeouts_overdue_lag_seconds")
        assert len(first) == 1 and first[0] in maintain_ports
        for name in REGISTRY_GAUGES:
            assert exporters(ports, name) == first, name
        page = scrape(first[0])
        assert page is not None and page["order_timeouts_pending"] == 2
        assert page['order_timeouts_maintenance_last_success_timestamp_seconds{task="relay"}'] > 0
        assert page["order_timeouts_retention_seconds"] == 7 * 86400
        for port in ports:
            page = scrape(port)
            assert page is not None and page.get("order_timeouts_registry_up", 1) == 1

        # SIGKILL the holder: the other maintain replica takes the gauges once the lease has run out.
        holder = processes[len(worker_ports) + maintain_ports.index(first[0])]
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        survivors = [port for port in ports if port != first[0]]
        other = [port for port in maintain_ports if port != first[0]]
        wait_until(lambda: exporters(survivors, "order_timeouts_overdue_lag_seconds") == other, timeout=15)
        assert exporters(survivors, "order_timeouts_pending") == other
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            process.wait(timeout=30)


@pytest.mark.parametrize("lease", ["0s", "-5s", "soon"])
def test_maintain_refuses_a_gauge_lease_that_is_not_a_positive_duration(
    lease: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "registry.sqlite3"
    argv = ["order-timeouts", "--database-url", f"sqlite:///{database}", "maintain", "--once", "--gauge-lease", lease]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--gauge-lease" in error
    assert not database.exists(), "nothing was opened"
