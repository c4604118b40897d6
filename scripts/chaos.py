"""Chaos run: orders, payments at random moments, workers SIGKILLed and restarted, the broker restarted.

    python scripts/chaos.py --transport redis --orders 2000
    python scripts/chaos.py --transport rabbitmq --database-url postgresql://127.0.0.1/test
    python scripts/chaos.py --transport sql

Creates N orders whose timeouts fall due over the run, pays a random share at random moments (some
racing their deadline, some too late), runs a consumer group of worker processes plus `maintain`,
SIGKILLs and restarts workers at random, restarts the broker once, then checks the orders table and
the registry: every order unpaid at its deadline cancelled exactly once, no paid order cancelled,
nothing pending, no dead letters. Prints one summary line; exits 1 on any violation.

With `--ha` the run uses local clusters instead (scripts/postgresql_standby.sh, scripts/redis_sentinel.sh,
scripts/rabbitmq_cluster.sh): a PostgreSQL primary with a streaming standby as the registry, given to
every process as one multi-host URL, and for redis/rq a Redis primary with a replica under Sentinel,
for rabbitmq a 3-node cluster. No worker is killed; instead the broker node the clients use is killed
a third into the run, and the PostgreSQL primary two thirds in, its standby promoted. On top of the
usual checks, every process must still be running at the end. For each kill it prints the seconds to
the first cancel after it, and the lateness p99 of the run.

    python scripts/chaos.py --ha --transport redis

Broker restarts: `redis` runs a private redis-server (no persistence, so the restart loses every
timer and the reconciler must recover them); `rabbitmq` does `rabbitmqctl stop_app`/`start_app` on
the broker of the URL (durable quorum queues survive); `sql` has no broker to restart.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from scheduler import OrderTimeouts, Settings, TimeoutState
from scheduler.config import ENV_BROKER_URL, ENV_DATABASE_URL
from scheduler.config import database_url as parse_database_url
from scheduler.database import reading
from scheduler.registry import all_records, count_pending
from scheduler.schema import init_db
from scheduler.testing import cancel_log_counts, install_cancel_log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of our own, so that restarting it (and losing its data) disturbs nobody else."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self._workdir = workdir
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._process = subprocess.Popen(argv, cwd=self._workdir, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def restart(self) -> None:
        self.stop()
        time.sleep(0.5)  # an outage, not just a blip
        self.start()

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


def restart_rabbitmq() -> None:
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
    try:
        time.sleep(0.5)
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)


SCRIPTS = Path(__file__).resolve().parent
#: the registry of an --ha run: libpq picks whichever of the two takes writes
HA_DATABASE_URL = "postgresql://postgres@127.0.0.1:5440,127.0.0.1:5441/postgres?target_session_attrs=read-write"
HA_ADMIN_URL = "postgresql://postgres@127.0.0.1:5440/postgres"


def script(name: str, *args: str) -> str:
    done = subprocess.run(["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/{name} {' '.join(args)} failed: {done.stdout}{done.stderr}".strip())
    return done.stdout


class Kill:
    """A node of a local cluster that an --ha run kills, when it was dead, and what a failover
    manager would do next (promote a standby), at once."""

    def __init__(self, name: str, kill: Callable[[], None], recover: Callable[[], None] | None = None) -> None:
        self.name = name
        self._kill = kill
        self._recover = recover
        self.at_ms: int | None = None

    def __call__(self) -> None:
        self._kill()
        self.at_ms = int(time.time() * 1000)
        if self._recover is not None:
            self._recover()


class Group:
    """Worker processes and one maintain process, restartable."""

    def __init__(self, env: dict[str, str], workers: int, maintain_args: list[str]) -> None:
        self._env = env
        self._maintain_args = maintain_args
        self.workers = [self._worker() for _ in range(workers)]
        self.maintainer = self._spawn(["maintain", *maintain_args])
        self.kills = 0

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "scheduler", *args]
        return subprocess.Popen(argv, env=self._env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _worker(self) -> subprocess.Popen[bytes]:
        return self._spawn(["worker", "--batch-size", "100"])

    def kill_one(self, rng: random.Random) -> None:
        index = rng.randrange(len(self.workers))
        self.workers[index].kill()
        self.workers[index].wait()
        self.kills += 1
        self.workers[index] = self._worker()

    def exited(self) -> list[int]:
        """Exit codes of the members that stopped on their own."""
        return [code for member in [*self.workers, self.maintainer] if (code := member.poll()) is not None]

    def stop(self) -> list[int]:
        members = [*self.workers, self.maintainer]
        for member in members:
            member.send_signal(signal.SIGTERM)
        return [member.wait(timeout=60) for member in members]


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="order-timeouts-chaos-"))
    private_redis: PrivateRedis | None = None
    broker_url = args.broker_url
    kills: list[Kill] = []
    if args.ha:
        script("postgresql_standby.sh", "stop")
        script("postgresql_standby.sh", "start")
        args.database_url = HA_ADMIN_URL
        broker_url, broker_kill = ha_broker(args.transport)
        if broker_kill is not None:
            kills.append(broker_kill)
        kills.append(
            Kill(
                "postgresql primary (standby promoted)",
                lambda: script("postgresql_standby.sh", "kill"),
                lambda: script("postgresql_standby.sh", "promote"),
            )
        )
    elif args.transport == "redis" and not broker_url:
        private_redis = PrivateRedis(workdir)
        private_redis.start()
        broker_url = f"redis://127.0.0.1:{private_redis.port}/0?claim_idle_ms=2000"
    elif args.transport == "sql":
        broker_url = "sql"
    elif not broker_url:
        broker_url = "amqp://guest:guest@127.0.0.1:5672/%2F"
    database_url = args.database_url or f"sqlite:///{workdir / 'chaos.sqlite3'}"
    schema = None
    if database_url.startswith(("postgresql", "postgres")):
        # A schema of our own: the run never touches tables someone else owns.
        schema = f"chaos_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_plain(database_url), autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        if args.ha:
            database_url = HA_DATABASE_URL
        database_url += ("&" if "?" in database_url else "?") + f"options={quote(f'-csearch_path={schema}')}"

    settings = Settings(database_url=database_url, broker_url=broker_url)
    timeouts = OrderTimeouts(settings=settings)
    engine = timeouts.engine
    init_db(engine, settings.orders)
    install_cancel_log(engine)

    ids = [f"chaos-{i:06d}" for i in range(args.orders)]
    spread = args.duration
    delays = {oid: rng.uniform(1.0, spread) for oid in ids}
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO orders (id, status) VALUES (:id, 'PENDING')"), [{"id": oid} for oid in ids])
    started = time.monotonic()
    timeouts.schedule_many([(oid, timedelta(seconds=delays[oid])) for oid in ids])

    # Payments: 40 % of orders, at any moment up to shortly after their deadline.
    plan = sorted((rng.uniform(0.0, delays[oid] + 0.5), oid) for oid in ids if rng.random() < 0.4)
    paid: set[str] = set()
    refused: set[str] = set()
    payer_done = threading.Event()

    def pay(oid: str) -> bool:
        """The order service's payment: paid, or refused because the timeout cancelled the order first.
        Tried again while the database is away, as a client would; a commit whose answer was lost is
        found out by reading the order."""
        while True:
            try:
                with engine.begin() as conn:
                    ok = conn.execute(
                        text("UPDATE orders SET status = 'PAID' WHERE id = :id AND status = 'PENDING'"), {"id": oid}
                    ).rowcount
                    if ok:
                        timeouts.cancel(oid, connection=conn)
                return bool(ok)
            except OperationalError:
                time.sleep(0.2)
                with contextlib.suppress(OperationalError), engine.connect() as conn:
                    status = conn.execute(text("SELECT status FROM orders WHERE id = :id"), {"id": oid}).scalar()
                    if status == "PAID":
                        return True

    def payer() -> None:
        for at, oid in plan:
            time.sleep(max(0.0, started + at - time.monotonic()))
            (paid if pay(oid) else refused).add(oid)
        payer_done.set()

    env = {**os.environ, ENV_DATABASE_URL: database_url, ENV_BROKER_URL: broker_url}
    maintain_args = ["--relay-interval", "0.5s", "--sweep-interval", "1s", "--grace", f"{args.grace}s"]
    group = Group(env, args.workers, maintain_args)
    threading.Thread(target=payer, daemon=True).start()

    broker_restarts = 0
    restart_at = started + spread / 2
    next_kill = started + rng.uniform(0.5, 2.0)
    deadline = started + spread + args.grace + 60
    kill_at = [started + spread * (i + 1) / (len(kills) + 1) for i in range(len(kills))]
    finished = False
    while time.monotonic() < deadline:
        now = time.monotonic()
        for at, kill in zip(kill_at, kills, strict=True):
            if kill.at_ms is None and now >= at:
                kill()
        if args.ha:
            pass  # no worker kills and no broker restart: the nodes go instead
        elif now >= next_kill and now < started + spread:
            group.kill_one(rng)
            next_kill = now + rng.uniform(0.5, 2.0)
        if not args.ha and broker_restarts == 0 and now >= restart_at and args.transport != "sql":
            if private_redis is not None:
                private_redis.restart()
            elif args.transport == "rabbitmq":
                restart_rabbitmq()
            broker_restarts += 1
        with reading(engine) as conn:
            left = count_pending(conn)
        if left == 0 and payer_done.is_set():
            finished = True
            break
        time.sleep(0.2)
    exited = group.exited()
    codes = group.stop()
    elapsed = time.monotonic() - started

    with reading(engine) as conn:
        status = dict(conn.execute(text("SELECT id, status FROM orders")).all())
        cancels = cancel_log_counts(conn)
        records = {r.order_id: r for r in all_records(conn)}
    violations: list[str] = []
    if not finished:
        violations.append("timeouts still pending at the deadline")
    if any(code not in (0, -signal.SIGTERM) for code in codes):
        violations.append(f"exit codes {codes}")
    for oid in ids:
        if oid in paid:
            if status[oid] != "PAID" or oid in cancels:
                violations.append(f"paid order {oid} cancelled")
        elif status[oid] != "CANCELLED" or cancels.get(oid) != 1:
            violations.append(f"unpaid order {oid}: {status[oid]}, cancelled {cancels.get(oid, 0)} times")
    dead = sum(1 for r in records.values() if r.state is TimeoutState.DEAD)
    if dead:
        violations.append(f"{dead} dead letters")
    if args.ha and exited:
        violations.append(f"{len(exited)} processes stopped on their own during the run (exit codes {exited})")
    fired = sorted(r.fired_ms for r in records.values() if r.fired_ms is not None)
    lateness = sorted(r.fired_ms - r.due_ms for r in records.values() if r.fired_ms is not None)
    for kill in kills:
        after = [f for f in fired if kill.at_ms is not None and f >= kill.at_ms]
        first = f"{(after[0] - kill.at_ms) / 1000:.2f}s" if after and kill.at_ms is not None else "never"
        print(f"chaos killed the {kill.name}: first cancel {first} after it")

    pending = sum(1 for r in records.values() if r.state is TimeoutState.PENDING)
    print(
        f"chaos transport={args.transport} orders={len(ids)} cancelled={sum(cancels.values())} paid={len(paid)} "
        f"late_payments_refused={len(refused)} pending={pending} "
        f"dead={dead} worker_kills={group.kills} broker_restarts={broker_restarts} elapsed={elapsed:.1f}s "
        f"lateness_p99={lateness[int(len(lateness) * 0.99) - 1] / 1000 if lateness else 0:.2f}s "
        f"violations={len(violations)}"
    )
    for violation in violations[:10]:
        print(f"  violation: {violation}", file=sys.stderr)
    timeouts.close()
    if private_redis is not None:
        private_redis.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    if args.ha:
        script("postgresql_standby.sh", "stop")
        stop_ha_broker(args.transport)
    elif schema is not None:
        with psycopg.connect(_plain(args.database_url), autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
    return 1 if violations else 0


def ha_broker(transport: str) -> tuple[str, Kill | None]:
    """The broker URL of an --ha run on a local cluster, and how to kill the node its clients use."""
    if transport == "sql":
        return "sql", None
    if transport in ("redis", "rq"):
        script("redis_sentinel.sh", "stop")
        script("redis_sentinel.sh", "start")
        sentinels = "127.0.0.1:26390,127.0.0.1:26391,127.0.0.1:26392"
        scheme = "redis+sentinel" if transport == "redis" else "rq+redis+sentinel"
        prefix = f"chaos{uuid.uuid4().hex[:8]}"
        options = f"prefix={prefix}" if transport == "redis" else f"queue={prefix}&prefix={prefix}"
        return f"{scheme}://{sentinels}/order-timeouts?{options}", Kill(
            "redis primary (the sentinels promote the replica)", lambda: script("redis_sentinel.sh", "kill")
        )
    # rabbitmq: a vhost of its own on the 3-node cluster; clients start on the first host of the URL
    script("rabbitmq_cluster.sh", "start")
    vhost = f"chaos-{uuid.uuid4().hex[:8]}"
    script("rabbitmq_cluster.sh", "ctl", "1", "add_vhost", vhost)
    script("rabbitmq_cluster.sh", "ctl", "1", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    base = script("rabbitmq_cluster.sh", "url").strip()
    return f"{base.rsplit('/', 1)[0]}/{vhost}", Kill(
        "rabbitmq node the clients use", lambda: script("rabbitmq_cluster.sh", "kill", "1")
    )


def stop_ha_broker(transport: str) -> None:
    """Stop the local cluster that ha_broker started."""
    if transport in ("redis", "rq"):
        script("redis_sentinel.sh", "stop")
    elif transport == "rabbitmq":
        script("rabbitmq_cluster.sh", "stop")


def _plain(url: str) -> str:
    return parse_database_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=["sql", "redis", "rq", "rabbitmq"], required=True)
    parser.add_argument("--database-url", help="registry and orders (default: a fresh SQLite file)")
    parser.add_argument("--broker-url", help="default: a private redis-server, or the local RabbitMQ")
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds over which timeouts fall due")
    parser.add_argument("--grace", type=float, default=3.0, help="reconciler grace period in seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--ha", action="store_true", help="local clusters; kill the broker node in use, then fail PostgreSQL over"
    )
    args = parser.parse_args()
    if urlsplit(args.broker_url or "").hostname not in (None, "127.0.0.1", "localhost", "::1"):
        parser.error("chaos only runs against loopback brokers")
    sys.exit(run(args))


if __name__ == "__main__":
    main()
