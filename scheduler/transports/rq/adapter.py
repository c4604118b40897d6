"""The `rq` transport: each timeout is an RQ scheduled job; the consumer group is plain `rq worker`.

    publish ─HSET job + ZADD─▶ rq:scheduled:<queue>     one job per order: id `<prefix>-<order id>`
                                   │ RQ's scheduler (`rq worker --with-scheduler`), or move.lua
                                   ▼
                               rq:queue:<queue> ─▶ `rq worker -S json` runs consumers.rq_job.fire_timeout
                                   │                 (the same Handler and registry, one job at a time)
                                   └────────────▶ our Worker: receive ─▶ handle ─▶ settle, in batches

For shops that already run RQ. A job is RQ's own: JSON serializer (never pickle), the call
`consumers.rq_job.fire_timeout(due_ms, version)` for the order that its deterministic id names, so
scheduling twice, the relay and the reconciler all write the same job; revoke deletes it
(`Job.delete`); reschedule re-arms it. The job function applies the handler's settlement the RQ
way: done returns, retry returns `rq.Retry` (RQ re-schedules the job), dead raises, so the job
lands in RQ's FailedJobRegistry while the registry row says dead with the reason. Run the group,
with ORDER_TIMEOUTS_DATABASE_URL and ORDER_TIMEOUTS_BROKER_URL in its environment, as

    rq worker --with-scheduler -S json --url redis://host:6379/0 order_timeouts    # N of them
    rq worker --with-scheduler -S json -c consumers.rq_settings                   # the same, faster
    rq worker-pool -n 4 -S json -c consumers.rq_settings                          # or a pool

`-S json` is required (jobs are JSON). `-c consumers.rq_settings` takes Redis and the queue from
ORDER_TIMEOUTS_BROKER_URL and imports the job function before RQ forks a work horse per job, so
that no horse spends its job importing it (and SQLAlchemy, and the driver) again.

The project's own `order-timeouts worker` serves the same queue in batches, with RQ's own
bookkeeping: it moves due jobs onto the queue (move.lua, atomic, and only while no RQ scheduler
holds the queue's scheduler lock, so that the two never push one job twice), takes job ids off the
queue with LMOVE into RQ's intermediate list and reads them (take.lua), starts an RQ execution
of each in the StartedJobRegistry (start.lua, see executions.py), and settles like RQ's
worker: the execution ends (end.lua) and the job is deleted (done, result_ttl 0), re-scheduled
(retry), or failed into the FailedJobRegistry with a failure Result (dead). A round trip per step
and batch, not per job. An id that LMOVE gave to one consumer is in no other consumer's hands, rq
worker or ours.

Crashes. Every job carries `Retry(max=CRASH_RETRIES)`, so RQ's own recovery re-queues it:
- an rq worker's horse that dies (OOM, SIGKILL) fails the job in the worker, which re-queues it;
- our Worker that dies or freezes leaves its jobs in the StartedJobRegistry until their lease
  (`worker_lease`) runs out; then RQ's abandoned-job cleanup (`StartedJobRegistry.cleanup`, run
  every `maintenance_interval` seconds by each of our Workers and by every rq worker's maintenance)
  re-queues them. Another Worker takes them within worker_lease + maintenance_interval + 2 s (RQ
  keeps the lease in whole seconds; a receive lasts up to a second);
- an rq worker that dies or freezes leaves its job there until RQ's own lease runs out (its
  heartbeat TTL, a minute or more) and an rq worker's maintenance or one of our Workers cleans up;
- a job left in the intermediate list (dequeued, never registered) is failed, hence re-queued, by
  RQ's intermediate-queue cleanup after a minute (the same maintenance).
Each run counts itself in the job's meta: a job that keeps killing its worker is dead-lettered by
the handler's poison limit. Whatever is lost in Redis anyway (a Redis without persistence that
restarts, a job deleted by hand) stays pending in the registry, and the reconciler publishes it again.

Due times are kept to the millisecond (the registry claims only due rows, so a job that runs early
would be acked as stale): the scores are float seconds, which RQ's scheduler moves once its
whole-second clock has passed them. `Queue.enqueue_at` is not used because it truncates the time
to whole seconds (up to 1 s early) and writes the registry outside the caller's pipeline.

Memory. Every field of a job fits Redis's default `hash-max-listpack-value` (64 bytes) for order
ids up to 39 characters (a UUID has 36), so Redis keeps each job as one compact listpack, a
fraction of the memory of the hash table that RQ's `enqueue_at` writes for the same call (the
bytes per job are in docs/performance.md). A longer order id makes `description` longer than 64
bytes and its job a hash table too; `hash-max-listpack-value 128` in the Redis configuration keeps
order ids up to 103 characters compact.

A million pending. Redis doubles a full hash table and then moves its entries over a bucket per
operation on it: the keyspace in the background as well, a sorted set only as it is used. Once the
scheduled registry passes a power of two (2^20 = 1,048,576 jobs), and with it the keyspace (a key per
job), every arm also looks in the old and the new table and moves a bucket, so arming costs Redis
more for as many operations on them as there are jobs (the rehash window of docs/operations.md).
Apart from that window the number of pending jobs does not change what arming costs (figures in
docs/performance.md).

URL: `rq+redis://[[user]:password@]host[:port][/db][?option=value&...]`, `rq+rediss://` for TLS. Options:

- `prefix` (default `order-timeout`): first part of the job ids (letters, digits, `_`, `-`). RQ job
  ids are global to the Redis database: one prefix per deployment.
- `queue`: the RQ queue; give the rq workers the same name. Default `order_timeouts`, or
  `order_timeouts_<prefix>` with another prefix, so that deployments sharing a Redis never share
  a queue (a worker dead-letters a job whose id does not carry its prefix).
- `job_timeout` (default 60): RQ's timeout of one job run by an rq worker, in seconds.
- `worker_lease` (default 10): seconds a job taken by our Worker may stay unsettled before RQ's
  cleanup re-queues it for another worker: how long a frozen Worker holds its timeouts. Keep it well
  above the time one batch takes, or a slow batch is handled a second time meanwhile (a no-op in
  effect: the registry's conditional claim, but work done twice).
- `failure_ttl` (default 604800): seconds a failed (dead-lettered) job stays in the FailedJobRegistry.
- `move_batch` (default 1000): most due jobs one call of the mover moves.
- `maintenance_interval` (default 3): seconds between our Worker's runs of RQ's registry cleanup
  (one worker at a time cleans, under RQ's lock on the queue).

Other query options go to redis-py unchanged (`socket_timeout`, `ssl_ca_certs`, ...).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Self

import redis
from redis.exceptions import RedisError
from rq import Queue, SimpleWorker
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat
from sqlalchemy import Engine

from scheduler.clock import Clock
from scheduler.errors import ForeignNames, MalformedMessage, TransportUnavailable
from scheduler.transports.base import (
    FAILED_REDELIVERY_MS,
    Batch,
    BrokerTransport,
    Delivery,
    Deployment,
    Settlement,
    TimerMessage,
)
from scheduler.transports.redis.lineage import LineageMarkers
from scheduler.transports.redis.options import MAX_BLOCK_MS, RedisOptions, connect
from scheduler.transports.redis.sentinel import connect_sentinel, is_sentinel_url, parse_sentinel_url
from scheduler.transports.rq.executions import Executions
from scheduler.transports.rq.jobs import ARM_SCRIPT, JobTemplate, seconds
from scheduler.transports.rq.keys import (
    RQ_JOB_FUNCTION,
    RQ_META_DELIVERIES,
    rq_job_id,
    rq_lineage_key,
    rq_order_id,
    rq_owner_keys,
)
from scheduler.transports.rq.options import parse_url

log = logging.getLogger("order_timeouts.transports.rq")

MOVE_SCRIPT = files("scheduler.transports.rq").joinpath("move.lua").read_text()
TAKE_SCRIPT = files("scheduler.transports.rq").joinpath("take.lua").read_text()


def job_message(job: Job, prefix: str) -> TimerMessage:
    """The timer message a job carries; MalformedMessage when it is not one of our timeout jobs."""
    try:
        func_name, args, kwargs = job.func_name, job.args, job.kwargs
    except (DeserializationError, ValueError, TypeError) as exc:
        raise MalformedMessage(f"job data is not JSON: {exc.__cause__ or exc}") from None
    return call_message(job.id, func_name, args, kwargs, prefix)


def call_message(job_id: str, func_name: Any, args: Any, kwargs: Any, prefix: str) -> TimerMessage:
    """The timer message of a job's call, `fire_timeout(due_ms, version)` of the order its id names;
    MalformedMessage when it is not one."""
    if func_name != RQ_JOB_FUNCTION:
        raise MalformedMessage(f"job runs {func_name!r}, not {RQ_JOB_FUNCTION}")
    if kwargs or not isinstance(args, list | tuple) or len(args) != 2:
        raise MalformedMessage("job arguments are not (due_ms, version)")
    order_id = rq_order_id(prefix, job_id)
    if order_id is None:
        raise MalformedMessage(f"job id {job_id!r} is not the job id of an order (prefix {prefix!r})")
    return TimerMessage.from_json({"order_id": order_id, "due_ms": args[0], "version": args[1]})


def taken_message(job_id: str, data: bytes, meta: bytes | None, prefix: str) -> tuple[TimerMessage, dict[str, Any]]:
    """The timer message and the meta of a job from its hash's `data` and `meta`, read as
    `Job.restore` reads them (data may be a zlib stream); MalformedMessage when it is not ours."""
    try:
        data = zlib.decompress(data)
    except zlib.error:
        pass  # written plain (arm.lua)
    try:
        call = json.loads(data)
        job_meta = json.loads(meta) if meta else {}
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MalformedMessage(f"job data is not JSON: {exc}") from None
    if not isinstance(call, list) or len(call) != 4 or not isinstance(job_meta, dict):
        raise MalformedMessage("job data is not an RQ call")
    func_name, _instance, args, kwargs = call
    return call_message(job_id, func_name, args, kwargs, prefix), job_meta


@dataclass(frozen=True)
class _Taken:
    """The receipt of a delivery: the job, the execution started for it, and the job's meta."""

    job_id: str
    execution_id: str
    meta: dict[str, Any]


class RQTransport(BrokerTransport):
    name = "rq"

    @classmethod
    def from_url(cls, broker_url: str, engine: Engine, clock: Clock) -> Self:
        return cls(broker_url, clock, engine)

    def __init__(self, broker_url: str, clock: Clock, engine: Engine | None = None) -> None:
        self._url, self.options = parse_url(broker_url)
        self._clock = clock
        self.deployment = Deployment(engine, clock)
        self._client: Any = None  # connected on first use: a dead broker must not break start-up
        self._queue: Queue | None = None
        self._move: Any = None
        self._take: Any = None
        self._arm_script: Any = None
        self._template: JobTemplate | None = None
        self._executions: Executions | None = None
        self._maintainer: SimpleWorker | None = None
        self._next_maintenance = 0.0
        self._markers = LineageMarkers([rq_lineage_key(self.options.queue)])
        self._name = f"order-timeouts:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def job_id(self, order_id: str) -> str:
        return rq_job_id(self.options.prefix, order_id)

    # -- producer side ---------------------------------------------------------------------------

    def publish(self, messages: Sequence[TimerMessage]) -> None:
        """Write each timer as an RQ scheduled job (arm.lua per chunk); confirmed when it returns."""
        latest = {m.order_id: m for m in messages}  # one job per order: the last message wins
        with self._edge("publish"):
            self._arm(self._redis(), list(latest.values()))

    def lost_timers(self) -> bool:
        """The queue's marker is missing or names another replication ID than the server's
        (scheduler/transports/redis/lineage.py)."""
        with self._edge("lineage"):
            return self._markers.lost(self._redis())

    def timers_restored(self) -> None:
        with self._edge("lineage"):
            self._markers.restore(self._redis())

    def revoke(self, order_ids: Sequence[str]) -> None:
        """Delete the jobs (`Job.delete`: hash, registries, queue entry)."""
        ids = [self.job_id(oid) for oid in dict.fromkeys(order_ids)]
        if not ids:
            return
        with self._edge("revoke"):
            queue = self._rq_queue()
            jobs = self._fetch(ids)
            pipe = self._redis().pipeline(transaction=False)
            for job_id in ids:
                job = jobs.get(job_id)
                try:
                    if isinstance(job, Job):
                        job.delete(pipeline=pipe)
                except ValueError:  # RQ found an execution record half gone: delete what we know
                    pass
                pipe.delete(Job.key_for(job_id))
            # Whatever its status said, a revoked timer is in none of these any more.
            pipe.zrem(queue.scheduled_job_registry.key, *ids)
            pipe.zrem(queue.failed_job_registry.key, *ids)
            pipe.execute()

    def _arm(self, client: Any, messages: Sequence[TimerMessage]) -> None:
        """Write the jobs afresh (no state of an earlier life survives) and schedule them at their due times."""
        if self._template is None:
            self._template = JobTemplate(self.options, self._redis())
        self._template.arm(self._arm_script, client, self._rq_queue(), messages)

    # -- consumer side (the project's Worker; rq workers run consumers/rq_job.py instead) ----------

    def receive(self, limit: int, timeout: float) -> Batch:
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._edge("receive"):
            self._maintain()
            while True:
                moved, earliest_ms = self.move_due()
                deliveries = self._take_jobs(limit)
                if deliveries:
                    return Batch(deliveries)
                wait_s = deadline - time.monotonic()
                if moved >= 0 and earliest_ms is not None:
                    wait_s = min(wait_s, (earliest_ms - self._clock.now_ms()) / 1000)
                if wait_s > 0:
                    # Wakes when a job is pushed: by our mover elsewhere, or by RQ's scheduler.
                    deliveries = self._take_jobs(limit, block_s=min(wait_s, MAX_BLOCK_MS / 1000))
                    if deliveries:
                        return Batch(deliveries)
                elif time.monotonic() >= deadline:
                    return Batch()

    def move_due(self, now_ms: int | None = None) -> tuple[int, int | None]:
        """Move due scheduled jobs onto the queue: (jobs moved or -1 when an RQ scheduler owns the
        queue, earliest due time left in ms)."""
        now_ms = self._clock.now_ms() if now_ms is None else now_ms
        queue = self._rq_queue()
        keys = [queue.scheduled_job_registry.key, queue.key, RQScheduler.get_locking_key(queue.name)]
        args = [f"{seconds(now_ms):.3f}", self.options.move_batch, Job.redis_job_namespace_prefix, utcformat(now())]
        with self._edge("move"):
            moved, head = self._move(keys=keys, args=args)
        return int(moved), (round(float(head) * 1000) if head else None)

    def _take_jobs(self, limit: int, block_s: float | None = None) -> list[Delivery]:
        queue = self._rq_queue()
        client = self._redis()
        first: list[bytes] = []
        if block_s is not None:
            taken = client.blmove(queue.key, queue.intermediate_queue_key, block_s, "LEFT", "RIGHT")
            if taken is None:
                return []
            first.append(taken)
        keys = [queue.key, queue.intermediate_queue_key]
        replies = self._take(keys=keys, args=[limit - len(first), Job.redis_job_namespace_prefix, *first])
        if not replies:
            return []
        messages: dict[str, tuple[TimerMessage, dict[str, Any]]] = {}
        unstarted: list[str] = []
        malformed: dict[str, str] = {}
        for index in range(0, len(replies), 4):
            raw_id, exists, data, meta = replies[index : index + 4]
            job_id: str = raw_id.decode()
            if not exists:
                unstarted.append(job_id)  # revoked after it was queued: nothing to deliver
                continue
            try:
                if data is None:
                    raise MalformedMessage("job hash has no data")
                messages[job_id] = taken_message(job_id, data, meta, self.options.prefix)
            except MalformedMessage as exc:
                malformed[job_id] = str(exc)
                unstarted.append(job_id)
        if malformed:
            # Failed before they leave the intermediate list: a crash in between leaves them to RQ's cleanup.
            jobs = self._fetch(list(malformed))
            pipe = client.pipeline(transaction=False)
            for job_id, reason in malformed.items():
                job = jobs.get(job_id)
                self._bury(pipe, job_id, job if isinstance(job, Job) else None, reason)
            pipe.execute()
        for _, meta in messages.values():
            meta[RQ_META_DELIVERIES] = int(meta.get(RQ_META_DELIVERIES, 0)) + 1
        started = self._executions_of(queue).start(
            [(job_id, json.dumps(meta).encode()) for job_id, (_, meta) in messages.items()], unstarted
        )
        return [
            Delivery(message, receipt=_Taken(job_id, started[job_id], meta), deliveries=meta[RQ_META_DELIVERIES])
            for job_id, (message, meta) in messages.items()
            if job_id in started
        ]

    def settle(self, settlement: Settlement) -> None:
        now_ms = self._clock.now_ms()
        with self._edge("settle"):
            queue = self._rq_queue()
            client = self._redis()
            dead = self._fetch([d.receipt.job_id for d, _ in settlement.dead]) if settlement.dead else {}
            ended = [(d.receipt, True) for d in settlement.done]
            ended += [(d.receipt, False) for d, _ in settlement.retry]
            ended += [(d.receipt, False) for d, _ in settlement.dead]
            ended += [(d.receipt, False) for d in settlement.failed]
            pipe = client.pipeline(transaction=False)
            # RQ's end of each execution; a job done is deleted (RQ's success with result_ttl 0),
            # unless it was published again while we held it (reschedule, replay, the relay): it
            # stays scheduled for that.
            self._executions_of(queue).end(pipe, [(t.job_id, t.execution_id, done) for t, done in ended])
            for _, message in settlement.retry:
                self._arm(pipe, [message])
            for delivery, reason in settlement.dead:
                job = dead.get(delivery.receipt.job_id)
                self._bury(pipe, delivery.receipt.job_id, job if isinstance(job, Job) else None, reason)
            for delivery in settlement.failed:
                # The batch transaction failed (database trouble), which says nothing against the
                # job: re-arm it shortly, as a fresh delivery. NX keeps a later due time that a
                # reschedule has published in the meantime.
                taken = delivery.receipt
                meta = {k: v for k, v in taken.meta.items() if k != RQ_META_DELIVERIES}
                pipe.hset(
                    Job.key_for(taken.job_id),
                    mapping={"status": JobStatus.SCHEDULED.value, "meta": json.dumps(meta)},
                )
                score = seconds(now_ms + FAILED_REDELIVERY_MS)
                pipe.zadd(queue.scheduled_job_registry.key, {taken.job_id: score}, nx=True)
            pipe.execute()

    def _executions_of(self, queue: Queue) -> Executions:
        if self._executions is None:
            self._executions = Executions(self._redis(), queue, self._name, self.options.lease_s)
        return self._executions

    def _bury(self, pipe: Any, job_id: str, job: Job | None, reason: str) -> None:
        """Fail a job into RQ's FailedJobRegistry with the reason, as RQ's worker fails a job."""
        queue = self._rq_queue()
        log.warning("rq job %s dead-lettered: %s", job_id, reason)
        if job is None:
            # Not even readable as a job: list it as failed; the reason is in the log.
            pipe.hset(Job.key_for(job_id), "status", JobStatus.FAILED.value)
            pipe.expire(Job.key_for(job_id), self.options.failure_ttl)
            pipe.zadd(queue.failed_job_registry.key, {job_id: time.time() + self.options.failure_ttl})
            return
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        FailedJobRegistry(queue=queue).add(job, ttl=self.options.failure_ttl, exc_string=reason, pipeline=pipe)
        Result.create_failure(job, self.options.failure_ttl, exc_string=reason, worker_name=self._name, pipeline=pipe)

    def _maintain(self) -> None:
        """RQ's registry cleanup, as every rq worker runs it: abandoned jobs in the StartedJobRegistry
        and jobs stuck in the intermediate list are re-queued (their Retry) or failed."""
        if time.monotonic() < self._next_maintenance:
            return
        self._next_maintenance = time.monotonic() + self.options.maintenance_interval
        if self._maintainer is None:
            # Its own connection: RQ's worker raises the socket timeout of the connection it is given.
            if is_sentinel_url(self._url):
                client = connect_sentinel(parse_sentinel_url(self._url), socket_connect_timeout=2.0)
            else:
                client = redis.Redis.from_url(self._url, socket_connect_timeout=2.0)
            self._maintainer = SimpleWorker(
                [Queue(self.options.queue, connection=client, serializer=JSONSerializer)],
                name=self._name,
                connection=client,
                serializer=JSONSerializer,
                worker_ttl=16,  # bounds that socket timeout to 11 s
                prepare_for_work=False,
            )
        self._maintainer.clean_registries()  # type: ignore[no-untyped-call]  # rq leaves it unannotated

    # -- figures and lifecycle -------------------------------------------------------------------

    def clock_offset_ms(self) -> int | None:
        """Redis's TIME minus the registry's clock."""
        with self._edge("time"):
            seconds, microseconds = self._redis().time()
        return int(seconds) * 1000 + int(microseconds) // 1000 - self._clock.now_ms()

    def figures(self) -> dict[str, Any]:
        """RQ's registries of the queue: scheduled, queued, started, failed, and the mover's lag."""
        with self._edge("figures"):
            queue = self._rq_queue()
            pipe = self._redis().pipeline(transaction=False)
            pipe.zcard(queue.scheduled_job_registry.key)
            pipe.zrange(queue.scheduled_job_registry.key, 0, 0, withscores=True)
            pipe.llen(queue.key)
            pipe.zcard(StartedJobRegistry(queue=queue).key)
            pipe.zcard(queue.failed_job_registry.key)
            scheduled, head, queued, started, failed = pipe.execute()
        oldest_unmoved_ms = round(head[0][1] * 1000) if head else None
        lag_ms = max(self._clock.now_ms() - oldest_unmoved_ms, 0) if oldest_unmoved_ms is not None else 0
        return {
            "queue": queue.name,
            "scheduled": scheduled,
            "queued": queued,
            "started": started,
            "failed": failed,
            "unmoved_lag_seconds": lag_ms / 1000,
        }

    def close(self) -> None:
        for client in (self._client, self._maintainer.connection if self._maintainer else None):
            if client is not None:
                with contextlib.suppress(RedisError):
                    client.close()
        self._client = self._queue = self._maintainer = self._template = self._executions = None

    def _redis(self) -> Any:
        if self._client is None:
            client = connect(self._url, RedisOptions())
            try:
                self.claim_names(client)
            except BaseException:
                client.close()
                raise
            self._client = client
            self._move = self._client.register_script(MOVE_SCRIPT)
            self._take = self._client.register_script(TAKE_SCRIPT)
            self._arm_script = self._client.register_script(ARM_SCRIPT)
        return self._client

    def connect(self) -> None:
        """Connect now (rq workers' job function: before running a job), claiming the names."""
        with self._edge("connect"):
            self._redis()

    def claim_names(self, client: Any) -> None:
        """Make sure the queue and the job ids of the prefix are this deployment's (keys.rq_owner_keys),
        claiming them if no deployment has: TransportUnavailable, logged by whoever calls, when another
        deployment owns them (ForeignNames), so that this one's workers never run, and ack, the other's jobs."""
        identity = self.deployment.id
        if identity is None:
            return
        keys = rq_owner_keys(self.options.queue, self.options.prefix)
        with self._edge("owner"):
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.set(key, identity, nx=True)
                pipe.get(key)
            owners = pipe.execute()[1::2]
        for key, owner in zip(keys, owners, strict=True):
            if owner is not None and owner.decode() != identity:
                what = key.removeprefix("rq:order_timeouts:owner:").replace(":", " ", 1)
                raise ForeignNames(
                    f"rq {what} belongs to deployment {owner.decode()}, not to this registry's {identity}:"
                    " give each deployment its own prefix and queue (docs/operations.md)"
                )

    def _rq_queue(self) -> Queue:
        if self._queue is None:
            self._queue = Queue(self.options.queue, connection=self._redis(), serializer=JSONSerializer)
        return self._queue

    def _fetch(self, job_ids: Sequence[str]) -> dict[str, Job | str | None]:
        """Jobs by id, like `Job.fetch_many`; a hash that is not a readable job gives the reason instead."""
        pipe = self._redis().pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(Job.key_for(job_id))
        jobs: dict[str, Job | str | None] = {}
        for job_id, raw in zip(job_ids, pipe.execute(), strict=True):
            if not raw:
                jobs[job_id] = None
                continue
            job = Job(job_id, connection=self._redis(), serializer=JSONSerializer)
            try:
                job.restore(raw)
            except (NoSuchJobError, DeserializationError, ValueError, TypeError, KeyError) as exc:
                jobs[job_id] = f"job hash is not an RQ job: {exc}"
            else:
                jobs[job_id] = job
        return jobs

    @contextlib.contextmanager
    def _edge(self, action: str) -> Iterator[None]:
        """redis-py and RQ errors become the project's own here: callers never import redis or rq."""
        try:
            yield
        except RedisError as exc:
            raise TransportUnavailable(f"rq {action}: {exc}") from exc
        except (NoSuchJobError, DeserializationError) as exc:
            raise MalformedMessage(f"rq {action}: {exc}") from exc
