"""What is specific to the `rq` transport: RQ jobs with deterministic ids, JSON in Redis, real rq workers.

The contract suite (tests/contract/test_transport_contract.py -k rq) covers what every transport does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import RedisError
from rq import Queue
from rq.executions import Execution
from rq.job import Job
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from scheduler import Outcome, ScheduleResult, TimeoutState, TransportUnavailable
from scheduler.clock import SystemClock
from scheduler.config import ENV_MAX_ATTEMPTS
from scheduler.errors import ConfigurationError
from scheduler.schema import init_db
from scheduler.transports.base import Settlement, TimerMessage
from scheduler.transports.rq import executions as rq_executions
from scheduler.transports.rq.adapter import RQTransport
from scheduler.transports.rq.executions import Placeholders
from scheduler.transports.rq.jobs import CRASH_RETRIES, JobTemplate
from scheduler.transports.rq.keys import RQ_JOB_FUNCTION, rq_job_id, rq_order_id
from scheduler.transports.rq.options import parse_url
from tests.conftest import Stack, open_stack
from tests.rq_support import rq_broker_url
from tests.services import REDIS_URL, require
from tests.slow_store import pausing_after_cancel
from tests.stacks import STACKS
from tests.support import add_orders, cancel_counts, order_status, pay, postgres_schema, wait_until

RQ_CLI = str(Path(sys.executable).with_name("rq"))
#: what validation.order_id accepts
order_ids = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=255).filter(
    lambda s: s == s.strip() and s.isprintable()
)
PAST = timedelta(seconds=2)  # RQ's scheduler moves a job once its whole-second clock has passed the due time


@pytest.fixture
def rq(tmp_path: Path) -> Iterator[Stack]:
    yield from open_stack("rq", STACKS, tmp_path)


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(REDIS_URL)
    yield connection
    connection.close()


def transport(stack: Stack) -> RQTransport:
    found = stack.timeouts().transport
    assert isinstance(found, RQTransport)
    return found


def rq_queue_name(stack: Stack) -> str:
    return transport(stack).options.queue


def queue(stack: Stack, client: redis.Redis) -> Queue:
    return Queue(transport(stack).options.queue, connection=client, serializer=JSONSerializer)


def scheduled(stack: Stack, client: redis.Redis) -> dict[str, float]:
    """Job id → scheduled time (epoch seconds) of every job in the queue's ScheduledJobRegistry."""
    key = ScheduledJobRegistry(queue=queue(stack, client)).key
    return {member.decode(): score for member, score in client.zrange(key, 0, -1, withscores=True)}


def run_rq_worker(stack: Stack, *args: str, name: str = "w1", **env: str) -> str:
    """`rq worker --with-scheduler --burst` as the operator runs it, configured by the environment."""
    namespace = transport(stack).options.queue
    command = [RQ_CLI, "worker", "--with-scheduler", "--burst", "-S", "json", "-n", f"{namespace}-{name}", *args]
    done = subprocess.run(command, env=stack.env(**env), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, children first."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children += [int(child) for child in (task / "children").read_text().split()]
    for child in children:
        kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_the_job_id_is_deterministic_so_one_order_is_one_job(rq: Stack, client: redis.Redis) -> None:
    timeouts = rq.timeouts()
    assert timeouts.schedule("o-1", delay=timedelta(hours=1)) is ScheduleResult.CREATED
    record = timeouts.get("o-1")
    assert record is not None
    # The relay and the reconciler publish the same timer again; a replace re-arms it.
    transport(rq).publish([TimerMessage("o-1", record.due_ms, record.version)] * 2)
    assert timeouts.schedule("o-1", delay=timedelta(hours=2), replace=True) is ScheduleResult.REPLACED

    job_id = transport(rq).job_id("o-1")
    assert job_id == f"{transport(rq).options.prefix}-o-1"
    replaced = timeouts.get("o-1")
    assert replaced is not None
    assert scheduled(rq, client) == {job_id: replaced.due_ms / 1000}, "one job, at the latest due time, to the ms"
    assert queue(rq, client).count == 0


def test_a_waiting_receive_returns_the_job_when_it_comes_due(rq: Stack) -> None:
    due = datetime.now(UTC) + timedelta(milliseconds=400)
    rq.timeouts().schedule("soon", due_at=due)
    batch = transport(rq).receive(10, 3.0)
    late = datetime.now(UTC) - due
    assert [d.message.order_id for d in batch.deliveries] == ["soon"]
    assert timedelta(0) <= late < timedelta(milliseconds=300), "on time, by the mover's own clock"
    transport(rq).settle(Settlement(done=batch.deliveries))
    assert transport(rq).figures()["started"] == 0


def test_order_ids_that_rq_rejects_get_an_encoded_job_id_and_are_handled(rq: Stack, client: redis.Redis) -> None:
    odd = ["ordre n°7/é", "a:b", "a_b", "a-b"]
    add_orders(rq.engine, odd)
    ids = {transport(rq).job_id(oid) for oid in odd}
    assert len(ids) == len(odd), "no two orders share a job"
    rq.timeouts().schedule_many(odd, due_at=datetime.now(UTC))
    assert set(scheduled(rq, client)) == ids
    rq.drain_until(lambda: cancel_counts(rq.engine) == dict.fromkeys(odd, 1))


def test_the_job_is_json_in_redis_never_pickle(rq: Stack, client: redis.Redis) -> None:
    rq.timeouts().schedule("o-1", delay=timedelta(minutes=30))
    record = rq.timeouts().get("o-1")
    assert record is not None
    job = client.hgetall(Job.key_for(transport(rq).job_id("o-1")))
    assert job[b"status"] == b"scheduled"
    assert json.loads(job[b"data"]) == [RQ_JOB_FUNCTION, None, [record.due_ms, 1], {}]
    assert job[b"description"] == b"payment timeout of order o-1"


def test_a_pending_job_is_a_compact_hash_for_order_ids_up_to_39_characters(rq: Stack, client: redis.Redis) -> None:
    """Every field then fits Redis's compact hash encoding (listpack, hash-max-listpack-value 64 by
    default); a longer order id makes the description longer than that."""
    limit = int(client.config_get("hash-max-listpack-value")["hash-max-listpack-value"])
    uuid_id = "3f2b6a1c-9d4e-4a57-b1c2-0123456789ab"
    long_id = "o" * (limit - len("payment timeout of order ") + 1)  # 40 characters at the default
    rq.timeouts().schedule_many([uuid_id, long_id], delay=timedelta(minutes=30))
    compact, table = (Job.key_for(transport(rq).job_id(oid)) for oid in (uuid_id, long_id))
    assert client.object("encoding", compact) == b"listpack"
    assert client.object("encoding", table) == b"hashtable"
    compact_bytes, table_bytes = client.memory_usage(compact), client.memory_usage(table)
    assert compact_bytes is not None and table_bytes is not None and compact_bytes * 2 < table_bytes


@given(prefix=st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True), order_id=order_ids)
def test_the_order_id_comes_back_from_its_job_id(prefix: str, order_id: str) -> None:
    job_id = rq_job_id(prefix, order_id)
    assert rq_order_id(prefix, job_id) == order_id
    assert rq_order_id(prefix + "x", job_id) is None, "another deployment's job"


@pytest.mark.parametrize("job_id", ["p", "p-", "p_", "p_!!", "p_/w", "p_b3JkZXI", "q-o-1", "p_bw"])
def test_a_job_id_that_names_no_order_of_the_prefix_gives_none(job_id: str) -> None:
    # "p_b3JkZXI" decodes to "order", whose job id is "p-order"; "p_bw" is "o", whose job id is "p-o"
    assert rq_order_id("p", job_id) is None


@given(message=st.builds(TimerMessage, order_ids, st.integers(0, 2**63 - 1), st.integers(0, 2**31 - 1)))
def test_job_data_is_the_json_rqs_serializer_writes(message: TimerMessage) -> None:
    data, _ = JobTemplate.encode(message)
    call = (RQ_JOB_FUNCTION, None, [message.due_ms, message.version], {})
    assert data == JSONSerializer.dumps(call)  # type: ignore[no-untyped-call]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Starts redis-servers of the test's own on free ports, with extra options (shut down after)."""
    if shutil.which("redis-server") is None:
        require("redis-server", 0)  # without redis-server: skips here, fails when CI=true
    servers: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
        servers.append(subprocess.Popen([*command, "--dir", str(tmp_path), *options], stdout=subprocess.DEVNULL))
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: _answers(url), timeout=10)
        return url

    yield start
    for server in servers:
        server.terminate()
        server.wait(timeout=10)


def _answers(url: str) -> bool:
    with contextlib.suppress(RedisError), redis.Redis.from_url(url) as probe:
        return bool(probe.ping())
    return False


def test_a_redis_without_copy_gets_the_same_jobs_written_field_by_field(
    rq: Stack, client: redis.Redis, private_redis: Callable[..., str]
) -> None:
    before_6_2 = private_redis("--rename-command", "COPY", "")  # COPY came with Redis 6.2
    messages = [TimerMessage(f"o-{i}", 1_900_000_000_123 + i, 1 + i % 3) for i in range(3)]
    transport(rq).publish(messages)
    old = RQTransport(rq_broker_url(rq_queue_name(rq), base=before_6_2), SystemClock())
    try:
        old.publish(messages)
        with redis.Redis.from_url(before_6_2) as old_client:
            with pytest.raises(RedisError, match="unknown command"):
                old_client.copy("a", "b")
            assert scheduled(rq, old_client) == scheduled(rq, client)
            for message in messages:
                key = Job.key_for(transport(rq).job_id(message.order_id))
                written, copied = old_client.hgetall(key), client.hgetall(key)
                assert written.pop(b"created_at") and copied.pop(b"created_at")
                assert written == copied
            assert len(old_client.keys()) == len(messages) + 2, "jobs, the scheduled registry, rq:queues"
    finally:
        old.close()


def test_a_publish_after_redis_lost_its_scripts_or_our_connection_arms_every_job(
    rq: Stack, private_redis: Callable[..., str]
) -> None:
    url = private_redis()
    ours = RQTransport(rq_broker_url(rq_queue_name(rq), base=url), SystemClock())
    try:
        with redis.Redis.from_url(url) as other:
            ours.publish([TimerMessage("first", 1_900_000_000_000, 1)])
            other.script_flush()  # as a restart does
            ours.publish([TimerMessage(f"flushed-{i}", 1_900_000_000_000 + i, 1) for i in range(2500)])
            assert other.client_kill_filter(_type="normal", skipme=True) >= 1  # our pooled connection
            ours.publish([TimerMessage(f"killed-{i}", 1_900_000_000_000 + i, 1) for i in range(2500)])
            assert other.zcard(ScheduledJobRegistry(rq_queue_name(rq), connection=other).key) == 5001
            assert len(other.keys(Job.key_for(f"{rq_queue_name(rq)}-*"))) == 5001
    finally:
        ours.close()


def rq_saved_job(stack: Stack, client: redis.Redis, message: TimerMessage) -> dict[bytes, bytes]:
    """The hash RQ's own `Job.create(...).save()` writes for the timer's job (then removed again)."""
    job = JobTemplate(transport(stack).options, client).job(message)
    job.save()
    saved = client.hgetall(job.key)
    client.delete(job.key)
    return saved


@pytest.mark.parametrize("exact", [True, False], ids=["arm.lua", "rq-fallback"])
def test_armed_jobs_are_the_jobs_rq_itself_writes(
    rq: Stack, client: redis.Redis, monkeypatch: pytest.MonkeyPatch, exact: bool
) -> None:
    if not exact:
        # An RQ release that encodes jobs differently: the template notices and saves RQ's own Jobs.
        monkeypatch.setattr(JobTemplate, "encode", staticmethod(lambda message: (b"[]", "")))
    messages = [TimerMessage(f"o-{i}", 1_900_000_000_123 + i, 1 + i % 3) for i in range(3)] + [
        TimerMessage("order #7/ü", 1_900_000_000_500, 2)
    ]
    transport(rq).publish(messages)
    assert transport(rq)._template is not None and transport(rq)._template.exact is exact

    rq_queue = queue(rq, client)
    assert client.sismember("rq:queues", rq_queue.key), "`rq info` lists the queue"
    assert not client.exists(f"{rq_queue.key}:arm-template"), "arm.lua's scratch hash is gone"
    assert scheduled(rq, client) == {transport(rq).job_id(m.order_id): m.due_ms / 1000 for m in messages}
    for message in messages:
        job_id = transport(rq).job_id(message.order_id)
        job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)
        assert job.func_name == RQ_JOB_FUNCTION
        assert job.args == [message.due_ms, message.version]
        assert job.retries_left == CRASH_RETRIES
        assert abs(job.created_at.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1)

        armed = client.hgetall(Job.key_for(job_id))
        expected = rq_saved_job(rq, client, message)  # overwrites the job: the last look at it
        assert armed.keys() == expected.keys()
        # RQ compresses data; the lua path writes it plain, which RQ reads as it is
        assert armed[b"data"] == (zlib.decompress(expected[b"data"]) if exact else expected[b"data"])
        assert {k: v for k, v in armed.items() if k not in (b"created_at", b"data")} == {
            k: v for k, v in expected.items() if k not in (b"created_at", b"data")
        }


def rq_leaves(client: redis.Redis, stack: Stack, order_id: str, execution_id: str) -> dict[str, Any]:
    """Every key that names the order's job, and every entry of the queue's registries and lists
    that does, with the ids as <job>, <order> and <execution>, and times relative to now."""
    rq_queue = queue(stack, client)
    normal = Placeholders(transport(stack).options.lease_s)
    job_id = transport(stack).job_id(order_id)
    names = {job_id.encode(): b"<job>", order_id.encode(): b"<order>", execution_id.encode(): b"<execution>"}
    found: dict[str, Any] = {}
    for key in client.scan_iter(match=f"*{job_id}*", count=1000):
        kind = client.type(key).decode()
        value = {"hash": client.hgetall, "zset": lambda k: client.zrange(k, 0, -1, withscores=True)}[kind](key)
        found[normal(key, names).decode()] = (kind, normal(value, names), normal(client.ttl(key), names))
    shared = [rq_queue.key, rq_queue.intermediate_queue_key]
    shared += [r.key for r in (StartedJobRegistry(queue=rq_queue), rq_queue.scheduled_job_registry)]
    shared += [rq_queue.failed_job_registry.key]
    # RQ 3 also lists a worker's executions in a set of the worker's.
    layout = Execution(execution_id, job_id, connection=client, worker_name=transport(stack)._name)
    shared += [layout.worker_executions_key] if hasattr(layout, "worker_executions_key") else []
    for key in shared:
        entries = {
            "list": lambda k: client.lrange(k, 0, -1),
            "set": lambda k: sorted(client.smembers(k)),
            "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            "none": lambda k: [],
        }[client.type(key).decode()](key)
        found[key] = [normal(entry, names) for entry in entries if job_id.encode() in str(entry).encode()]
    return found


@pytest.mark.parametrize("exact", [True, False], ids=["start.lua", "rq-fallback"])
def test_jobs_our_worker_runs_leave_what_rqs_own_worker_leaves(
    rq: Stack, client: redis.Redis, monkeypatch: pytest.MonkeyPatch, exact: bool
) -> None:
    if not exact:
        # An RQ release that keeps executions differently: the check notices, and RQ's own calls run.
        diverging = rq_executions.START_SCRIPT.replace("'status', 'started'", "'status', 'busy'")
        monkeypatch.setattr(rq_executions, "START_SCRIPT", diverging)
    now_ms = int(time.time() * 1000)
    ours, theirs = TimerMessage("ours", now_ms - 1000, 1), TimerMessage("theirs", now_ms - 1000, 1)
    transport(rq).publish([ours, theirs])
    batch = transport(rq).receive(1, 0.0)
    assert [d.message for d in batch.deliveries] == [ours]
    assert transport(rq)._executions is not None and transport(rq)._executions.exact is exact
    taken = batch.deliveries[0].receipt
    assert StartedJobRegistry(queue=queue(rq, client)).get_job_ids(cleanup=False) == [taken.job_id]
    probes = f"*{rq_queue_name(rq)}-execution-probe*"
    assert not list(client.scan_iter(match=probes)), "nothing of the check's probe jobs is left"

    # What RQ's worker does with the next job: dequeue, Execution.create, prepare_for_execution.
    rq_queue, name = queue(rq, client), transport(rq)._name
    assert client.lmove(rq_queue.key, rq_queue.intermediate_queue_key) == transport(rq).job_id("theirs").encode()
    job = Job.fetch(transport(rq).job_id("theirs"), connection=client, serializer=JSONSerializer)
    job.meta["deliveries"] = 1  # consumers/rq_job.py counts the run, as our Worker does
    pipe = client.pipeline()
    execution = Execution.create(job, transport(rq).options.lease_s, pipe, worker_name=name)
    job.prepare_for_execution(name, pipe)
    pipe.hset(job.key, "meta", JSONSerializer.dumps(job.meta))
    pipe.lrem(rq_queue.intermediate_queue_key, 1, job.id)
    pipe.execute()

    started = rq_leaves(client, rq, "ours", taken.execution_id)
    assert started == rq_leaves(client, rq, "theirs", execution.id)
    assert any(key.startswith("rq:execution:") for key in started), "the comparison saw the execution"

    # Done: RQ's success with result_ttl 0 deletes the job and ends its execution.
    transport(rq).settle(Settlement(done=batch.deliveries))
    pipe = client.pipeline()
    job.delete(pipeline=pipe, remove_from_queue=False)
    execution.delete(job, pipe)
    pipe.execute()
    ended = rq_leaves(client, rq, "ours", taken.execution_id)
    assert ended == rq_leaves(client, rq, "theirs", execution.id)
    assert not client.exists(Job.key_for(taken.job_id)), "nothing of a job done is kept"


def test_arming_a_failed_job_again_clears_its_failure(rq: Stack, client: redis.Redis) -> None:
    message = TimerMessage("o-1", 1_900_000_000_000, 1)
    job_id = transport(rq).job_id("o-1")
    client.hset(Job.key_for(job_id), mapping={"exc_info": b"boom", "status": "failed"})
    client.zadd(queue(rq, client).failed_job_registry.key, {job_id: 1})
    transport(rq).publish([message])
    assert b"exc_info" not in client.hgetall(Job.key_for(job_id))
    assert client.zscore(queue(rq, client).failed_job_registry.key, job_id) is None
    assert scheduled(rq, client) == {job_id: message.due_ms / 1000}


def test_cancel_deletes_the_job_scheduled_or_queued(rq: Stack, client: redis.Redis) -> None:
    timeouts = rq.timeouts()
    timeouts.schedule_many(["later", "due"], due_at=datetime.now(UTC) + timedelta(milliseconds=50))
    timeouts.reschedule("later", delay=timedelta(hours=1))
    time.sleep(0.1)
    later = timeouts.get("later")
    assert later is not None
    assert transport(rq).move_due() == (1, later.due_ms)
    assert queue(rq, client).job_ids == [transport(rq).job_id("due")]

    assert timeouts.cancel("later") and timeouts.cancel("due")
    assert scheduled(rq, client) == {}
    assert queue(rq, client).count == 0
    assert not client.exists(*(Job.key_for(transport(rq).job_id(oid)) for oid in ("later", "due")))


def test_reschedule_moves_the_job(rq: Stack, client: redis.Redis) -> None:
    timeouts = rq.timeouts()
    timeouts.schedule("r-1", delay=timedelta(hours=1))
    moved = timeouts.reschedule("r-1", delay=timedelta(hours=2))
    job_id = transport(rq).job_id("r-1")
    assert scheduled(rq, client) == {job_id: moved.due_ms / 1000}
    job = Job.fetch(job_id, connection=client, serializer=JSONSerializer)
    assert job.args == [moved.due_ms, 2]


def test_rq_workers_with_scheduler_cancel_each_unpaid_order_once(rq: Stack, client: redis.Redis) -> None:
    ids = [f"w-{i:02d}" for i in range(24)]
    add_orders(rq.engine, ids)
    paid = set(ids[::4])
    for oid in paid:
        assert pay(rq.engine, oid)
    rq.timeouts().schedule_many(ids, due_at=datetime.now(UTC) - PAST)

    # Two members of the consumer group at once: the plain command line, and the settings module
    # that takes Redis and the queue from ORDER_TIMEOUTS_BROKER_URL and preloads the job function.
    namespace = transport(rq).options.queue
    plain = [RQ_CLI, "worker", "--with-scheduler", "--burst", "-S", "json", "--url", REDIS_URL]
    workers = [
        subprocess.Popen([*plain, "-n", f"{namespace}-plain", namespace], env=rq.env(), stderr=subprocess.PIPE),
        subprocess.Popen(
            [*plain[:-2], "-c", "consumers.rq_settings", "-n", f"{namespace}-preloaded"],
            env=rq.env(),
            stderr=subprocess.PIPE,
        ),
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=60)
        assert worker.returncode == 0, stderr.decode()[-2000:]
    if scheduled(rq, client) or queue(rq, client).count:
        run_rq_worker(rq, "-c", "consumers.rq_settings")  # the second one may have started first

    assert cancel_counts(rq.engine) == {oid: 1 for oid in ids if oid not in paid}
    assert {oid for oid, status in order_status(rq.engine).items() if status == "PAID"} == paid
    for oid in ids:
        record = rq.timeouts().get(oid)
        assert record is not None and record.state is TimeoutState.DONE
        assert record.outcome is (Outcome.PAID if oid in paid else Outcome.CANCELLED)
        assert record.worker and record.worker.startswith(namespace)
    # RQ's success with result_ttl 0: nothing of the jobs is left.
    assert not client.exists(*(Job.key_for(transport(rq).job_id(oid)) for oid in ids))
    assert transport(rq).figures() | {"unmoved_lag_seconds": 0} == {
        "queue": namespace,
        "scheduled": 0,
        "queued": 0,
        "started": 0,
        "failed": 0,
        "unmoved_lag_seconds": 0,
    }


def test_an_rq_worker_pool_is_a_consumer_group_too(rq: Stack) -> None:
    ids = [f"p-{i}" for i in range(8)]
    add_orders(rq.engine, ids)
    rq.timeouts().schedule_many(ids, due_at=datetime.now(UTC) - PAST)
    command = [RQ_CLI, "worker-pool", "--burst", "-n", "2", "-S", "json", "-c", "consumers.rq_settings"]
    # Its workers get random names; RQ expires their keys a minute after they stop.
    done = subprocess.run(command, env=rq.env(), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert cancel_counts(rq.engine) == dict.fromkeys(ids, 1)


def test_an_rq_worker_killed_mid_job_cancels_nothing_and_rqs_cleanup_brings_the_job_back(
    rq: Stack, client: redis.Redis, tmp_path: Path
) -> None:
    add_orders(rq.engine, ["k-1"])
    rq.timeouts().schedule("k-1", due_at=datetime.now(UTC) - PAST)
    marker = tmp_path / "cancelled-not-committed"
    namespace = transport(rq).options.queue
    command = [RQ_CLI, "worker", "--with-scheduler", "--burst", "-S", "json", "-c", "consumers.rq_settings"]
    env = rq.env(**pausing_after_cancel(marker))
    worker = subprocess.Popen([*command, "-n", f"{namespace}-doomed"], env=env)
    try:
        wait_until(marker.exists, timeout=30)
    finally:
        kill_tree(worker.pid)  # the worker and its work horse (which RQ puts in its own process group)
        worker.wait(timeout=10)
    assert order_status(rq.engine) == {"k-1": "PENDING"}, "the cancel was never committed"
    job_id = transport(rq).job_id("k-1")
    assert StartedJobRegistry(queue=queue(rq, client)).get_job_ids(cleanup=False) == [job_id]

    # RQ's abandoned-job cleanup, as any rq worker runs it once the lease is over, re-queues the job.
    # The lease is RQ's own for an rq worker's job (its heartbeat TTL), within job_timeout + 60 s.
    rq_lease_s = transport(rq).options.job_timeout + 60
    StartedJobRegistry(queue=queue(rq, client)).cleanup(timestamp=time.time() + rq_lease_s + 1)
    assert queue(rq, client).job_ids == [job_id]
    run_rq_worker(rq, "-c", "consumers.rq_settings", name="w2")
    assert cancel_counts(rq.engine) == {"k-1": 1}
    record = rq.timeouts().get("k-1")
    assert record is not None and record.state is TimeoutState.DONE


def test_a_dead_timeout_fails_its_job_into_rqs_failed_registry(rq: Stack, client: redis.Redis) -> None:
    # No order row: the payment status is unknown; with one attempt allowed, that is the end.
    rq.timeouts().schedule("ghost", due_at=datetime.now(UTC) - PAST)
    stderr = run_rq_worker(rq, "-c", "consumers.rq_settings", **{ENV_MAX_ATTEMPTS: "1"})
    assert "TimeoutDeadLettered" in stderr

    record = rq.timeouts().get("ghost")
    assert record is not None and record.state is TimeoutState.DEAD
    assert record.error and "unknown after 1 attempts" in record.error
    job_id = transport(rq).job_id("ghost")
    assert FailedJobRegistry(queue=queue(rq, client)).get_job_ids() == [job_id]
    failure = Job.fetch(job_id, connection=client, serializer=JSONSerializer).latest_result()
    assert failure is not None and failure.exc_string and record.error in failure.exc_string
    assert transport(rq).figures()["failed"] == 1

    # Replaying the dead timeout takes the job out of the failed registry and schedules it again.
    add_orders(rq.engine, ["ghost"])
    assert rq.timeouts().replay_dead(["ghost"]) == ["ghost"]
    assert FailedJobRegistry(queue=queue(rq, client)).get_job_ids() == []
    time.sleep(1.1)  # whole seconds for RQ's scheduler
    run_rq_worker(rq, "-c", "consumers.rq_settings", name="w2")
    assert cancel_counts(rq.engine) == {"ghost": 1}


def test_an_unknown_payment_status_returns_a_retry_that_rq_schedules_not_before_the_registry(
    rq: Stack, client: redis.Redis
) -> None:
    rq.timeouts().schedule("ghost", due_at=datetime.now(UTC) - PAST)
    run_rq_worker(rq, "-c", "consumers.rq_settings", **{ENV_MAX_ATTEMPTS: "3"})
    record = rq.timeouts().get("ghost")
    assert record is not None
    assert (record.state, record.attempts) == (TimeoutState.PENDING, 1)
    assert record.published_ms is not None, "the job function re-armed it: nothing for the relay"
    score = scheduled(rq, client)[transport(rq).job_id("ghost")]
    assert record.due_ms / 1000 <= score <= record.due_ms / 1000 + 2.5


def test_our_worker_dead_letters_into_rqs_failed_registry_with_the_reason(rq: Stack, client: redis.Redis) -> None:
    timeouts = rq.timeouts(max_attempts=1)
    timeouts.schedule("ghost", due_at=datetime.now(UTC))
    rq.drain_until(lambda: timeouts.get("ghost").state is TimeoutState.DEAD, client=timeouts)  # type: ignore[union-attr]
    job_id = transport(rq).job_id("ghost")
    assert FailedJobRegistry(queue=queue(rq, client)).get_job_ids() == [job_id]
    failure = Job.fetch(job_id, connection=client, serializer=JSONSerializer).latest_result()
    assert failure is not None and failure.exc_string and "unknown after 1 attempts" in failure.exc_string
    assert StartedJobRegistry(queue=queue(rq, client)).get_job_ids() == []


def test_a_job_our_worker_holds_is_not_run_by_an_rq_worker_and_comes_back_if_ours_dies(
    rq: Stack, client: redis.Redis
) -> None:
    add_orders(rq.engine, ["held"])
    rq.timeouts().schedule("held", due_at=datetime.now(UTC))
    crashing = rq.timeouts(broker_url=rq.broker_url)  # another worker's own client
    batch = crashing.transport.receive(10, 0.0)
    assert [d.message.order_id for d in batch.deliveries] == ["held"]
    crashing.close()  # dies without settling: the job stays in RQ's StartedJobRegistry
    job_id = transport(rq).job_id("held")
    assert StartedJobRegistry(queue=queue(rq, client)).get_job_ids(cleanup=False) == [job_id]

    run_rq_worker(rq, "-c", "consumers.rq_settings")
    assert cancel_counts(rq.engine) == {}, "the rq worker found nothing to run"

    # Once the lease has run out, RQ's abandoned-job cleanup re-queues the job (its crash Retry).
    StartedJobRegistry(queue=queue(rq, client)).cleanup(timestamp=time.time() + transport(rq).options.lease_s + 1)
    assert queue(rq, client).job_ids == [job_id]
    assert Job.fetch(job_id, connection=client, serializer=JSONSerializer).meta == {"deliveries": 1}
    rq.drain_until(lambda: cancel_counts(rq.engine) == {"held": 1})


def test_malformed_jobs_on_the_queue_are_failed_with_the_reason(rq: Stack, client: redis.Redis) -> None:
    add_orders(rq.engine, ["good"])
    rq.timeouts().schedule("good", due_at=datetime.now(UTC))
    jobs, name = queue(rq, client), rq_queue_name(rq)  # ids that name the test's namespace: deleted after it
    bad = jobs.enqueue(RQ_JOB_FUNCTION, {"order_id": "bad", "due_ms": 1, "version": 1}, job_id=f"{name}-bad")
    foreign = jobs.enqueue("os.getcwd", job_id=f"{name}-foreign")
    bad_version = jobs.enqueue(RQ_JOB_FUNCTION, 1, True, job_id=f"{name}-version")
    bad_due = jobs.enqueue(RQ_JOB_FUNCTION, "soon", 1, job_id=f"{name}-due")
    no_order = jobs.enqueue(RQ_JOB_FUNCTION, 1, 1, job_id=f"{name}_bw")  # order "o" has job id {name}-o

    rq.drain_until(lambda: cancel_counts(rq.engine) == {"good": 1})
    malformed = (bad, foreign, bad_version, bad_due, no_order)
    assert set(FailedJobRegistry(queue=jobs).get_job_ids()) == {job.id for job in malformed}
    reasons = {job.id: job.latest_result().exc_string for job in malformed}  # type: ignore[union-attr]
    assert "job arguments are not (due_ms, version)" in (reasons[bad.id] or "")
    assert "os.getcwd" in (reasons[foreign.id] or "")
    assert "version must be a non-negative integer" in (reasons[bad_version.id] or "")
    assert "due_ms must be a non-negative integer" in (reasons[bad_due.id] or "")
    assert "is not the job id of an order" in (reasons[no_order.id] or "")


def test_redis_unreachable_schedule_still_commits_the_row_unpublished(tmp_path: Path) -> None:
    with postgres_schema() as database_url:
        stack = Stack("rq-down", database_url, rq_broker_url("nowhere", base="redis://127.0.0.1:1/0"))
        try:
            init_db(stack.engine, stack.opened[0].settings.orders)
            timeouts = stack.timeouts()
            started = time.monotonic()
            assert timeouts.schedule("o-1", delay=timedelta(minutes=30)) is ScheduleResult.CREATED
            assert time.monotonic() - started < 5
            record = timeouts.get("o-1")
            assert record is not None and record.published_ms is None, "left for the relay"
            with pytest.raises(TransportUnavailable):
                timeouts.publish_unpublished()
            with pytest.raises(TransportUnavailable):
                timeouts.transport.receive(10, 0.0)
            assert timeouts.cancel("o-1") is True, "revoke is best effort; the registry says revoked"
        finally:
            for opened in stack.opened:
                opened.close()


def test_a_redis_that_stalls_during_the_execution_check_is_retried_not_taken_for_another_rq(
    rq: Stack, client: redis.Redis
) -> None:
    stalled = RQTransport(rq_broker_url(transport(rq).options.queue, socket_timeout="0.2"), SystemClock())
    rq_queue = stalled._rq_queue()
    try:
        client.client_pause(3000, all=False)  # writes wait, past the transport's socket timeout and retries
        with pytest.raises(RedisError):
            stalled._executions_of(rq_queue)
        assert stalled._executions is None, "no verdict on RQ from an unreachable Redis"
        client.client_unpause()
        assert stalled._executions_of(rq_queue).exact, "checked again: the scripts, not the fallback"
    finally:
        client.client_unpause()
        stalled.close()


def test_the_url_options_are_checked() -> None:
    url, options = parse_url(
        "rq+rediss://:pw@host:6380/2?queue=q1&prefix=p-1&job_timeout=30&worker_lease=20&ssl_cert_reqs=none"
    )
    assert url == "rediss://:pw@host:6380/2?ssl_cert_reqs=none"
    assert (options.queue, options.prefix, options.job_timeout, options.lease_s) == ("q1", "p-1", 30, 20)
    for bad in ("prefix=a:b", "queue=", "job_timeout=0", "failure_ttl=x"):
        with pytest.raises(ConfigurationError):
            parse_url(f"rq+redis://host/0?{bad}")


def test_deployments_with_their_own_prefix_get_their_own_queue() -> None:
    # Sharing one would hand one deployment's jobs to the other's workers, which dead-letter them.
    queues = {
        query: parse_url(f"rq+redis://host/0?{query}")[1].queue
        for query in ("", "prefix=order-timeout", "prefix=shop-b", "prefix=shop-b&queue=mine")
    }
    assert queues == {
        "": "order_timeouts",
        "prefix=order-timeout": "order_timeouts",
        "prefix=shop-b": "order_timeouts_shop-b",
        "prefix=shop-b&queue=mine": "mine",
    }


def test_rq_workers_of_a_paused_fleet_hand_each_job_back_to_rq_and_run_it_after_resume(
    rq: Stack, client: redis.Redis
) -> None:
    ids = [f"z-{i}" for i in range(6)]
    add_orders(rq.engine, ids)
    rq.timeouts().pause("provider incident")
    rq.timeouts().schedule_many(ids, due_at=datetime.now(UTC) - PAST)

    # Each job runs, finds the fleet paused and returns a Retry: back in RQ's scheduled registry,
    # neither failed nor finished, its registry row untouched.
    run_rq_worker(rq, "-c", "consumers.rq_settings")
    assert set(scheduled(rq, client)) == {transport(rq).job_id(oid) for oid in ids}
    assert transport(rq).figures()["failed"] == 0
    records = [rq.timeouts().get(oid) for oid in ids]
    assert {(r.state, r.attempts) for r in records if r is not None} == {(TimeoutState.PENDING, 0)}
    assert cancel_counts(rq.engine) == {}

    rq.timeouts().resume()
    deadline = time.monotonic() + 20
    while scheduled(rq, client) or queue(rq, client).count:
        assert time.monotonic() < deadline, "the handed-back jobs ran again after resume"
        time.sleep(0.5)
        run_rq_worker(rq, "-c", "consumers.rq_settings")
    assert cancel_counts(rq.engine) == dict.fromkeys(ids, 1)


def test_rq_workers_in_shadow_mode_record_would_cancel_and_cancel_nothing(rq: Stack, client: redis.Redis) -> None:
    ids = [f"h-{i}" for i in range(4)]
    add_orders(rq.engine, ids)
    assert pay(rq.engine, ids[0])
    rq.timeouts().schedule_many(ids, due_at=datetime.now(UTC) - PAST)
    run_rq_worker(rq, "-c", "consumers.rq_settings", ORDER_TIMEOUTS_MODE="shadow")
    outcomes = {oid: getattr(rq.timeouts().get(oid), "outcome", None) for oid in ids}
    assert outcomes == {ids[0]: Outcome.PAID, **dict.fromkeys(ids[1:], Outcome.WOULD_CANCEL)}
    assert cancel_counts(rq.engine) == {}
    assert order_status(rq.engine) == {ids[0]: "PAID", **dict.fromkeys(ids[1:], "PENDING")}
