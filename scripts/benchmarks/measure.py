"""Small measuring tools shared by the product's workloads and the baselines."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def percentile(values: Sequence[float], share: float) -> float | None:
    """Nearest-rank percentile (share in 0..1) of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))
    return float(ordered[rank])


@dataclass
class Lateness:
    """How late timeouts took effect: finished (or fired) time minus due time, in ms."""

    samples: list[float] = field(default_factory=list)

    def summary(self, prefix: str) -> dict[str, float | None]:
        return {
            f"{prefix}_p50_ms": percentile(self.samples, 0.50),
            f"{prefix}_p99_ms": percentile(self.samples, 0.99),
            f"{prefix}_max_ms": max(self.samples) if self.samples else None,
        }


@dataclass
class SystemResult:
    """Every figure of one system, plus what the plot and the notes need."""

    system: str
    figures: dict[str, Any] = field(default_factory=dict)
    lateness: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def wait_for(condition: Callable[[], bool], *, timeout: float, interval: float = 0.02) -> bool:
    """Poll until the condition holds; False when the timeout passed first."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


class ProcessGroup:
    """Worker processes started for one workload; stopped with SIGTERM, killed if they linger."""

    def __init__(self, argv: list[str] | Callable[[int], list[str]], count: int, env: dict[str, str]) -> None:
        # stderr to a file, not a pipe: a chatty worker must never block on a full pipe.
        self._stderr = tempfile.TemporaryFile()
        self._members = [
            subprocess.Popen(
                argv(i) if callable(argv) else argv,
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
            )
            for i in range(count)
        ]

    def alive(self) -> bool:
        return all(member.poll() is None for member in self._members)

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def failure(self) -> str | None:
        """The stderr tail of a member that exited early, if any."""
        for member in self._members:
            if member.poll() is not None:
                self._stderr.seek(0)
                tail = self._stderr.read().decode(errors="replace")[-500:]
                return f"worker exited with {member.returncode}: {tail}"
        return None

    def stop(self, timeout: float = 20.0) -> None:
        for member in self._members:
            if member.poll() is None:
                member.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for member in self._members:
            try:
                member.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                member.kill()
                member.wait()
        self._stderr.close()


#: rounds of the CPU probe, and the work of each (a pure-Python loop of a fraction of a second)
CPU_ROUNDS = 10
CPU_WORK = 2_000_000


def cpu_steadiness() -> dict[str, float]:
    """How steady this machine's CPU is right now: the same pure-Python loop timed CPU_ROUNDS times.

    On a shared VM a core's speed can change a lot within seconds (other tenants, frequency); a
    figure measured over a fraction of a second moves with it. `spread` (slowest / fastest round)
    says how much: near 1.0 the figures compare well; at 1.5 or more, differences of that size
    between two runs, or between the empty and the loaded rates, are the machine's.
    """
    rounds = []
    for _ in range(CPU_ROUNDS):
        started = time.perf_counter()
        total = 0
        for i in range(CPU_WORK):
            total += i
        rounds.append(time.perf_counter() - started)
    fastest, slowest = min(rounds), max(rounds)
    return {"fastest_s": round(fastest, 4), "slowest_s": round(slowest, 4), "spread": round(slowest / fastest, 2)}


def machine_load() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2)}
