"""The RQ job of a timer, and many of them armed in one round trip.

RQ's way to write a job, `Job.create(...)` then `job.save(pipeline)`, costs about 45 packed
arguments, a zlib stream and a Python Job per timer, and redis-py's command packing of those
arguments is most of that cost. A timer's job differs from any other only in `data` (the function
call), `description` and `created_at`, so `JobTemplate` takes every other field from one job that RQ
itself builds and encodes the two per timer. arm.lua writes the shared fields once per call into a
scratch hash and copies it to each job (COPY), then sets the two: copying one compact hash costs
Redis less than writing 18 fields for each job (figures in docs/performance.md). The chunks of one
publish go out on one connection as each is encoded, and their replies are read after the last:
Redis writes chunk k while Python encodes chunk k+1, where a call (or a redis-py pipeline, which
encodes everything before it sends) awaited chunk by chunk leaves one of them idle.

The call is `fire_timeout(due_ms, version)`: the order is the one the job id names (`rq_order_id`),
so that every field stays within Redis's `hash-max-listpack-value` (64 bytes) and Redis keeps the
hash as one compact listpack, a fraction of the memory of a hash table (docs/performance.md). An
order id longer than 39 characters makes `description` longer than that, and its job a hash table again.

`data` is the JSON of the call as RQ's JSONSerializer writes it, not compressed: RQ reads a `data`
that is not a zlib stream as is (`Job.restore`), and CPython's zlib sets up 256 KiB of state per call
to save nothing on 60 bytes.

The template checks itself against RQ when it is built: RQ must restore, from the hash it writes,
the same call and description as from RQ's own job. An RQ release that reads jobs differently
fails that check, and the transport falls back to RQ's own `Job.create(...).save()`: slower, but
always what RQ reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from importlib.resources import files
from typing import Any

from redis.client import Pipeline
from redis.exceptions import NoScriptError, ResponseError
from rq import Queue
from rq.job import Job, JobStatus, Retry
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from scheduler.transports.base import TimerMessage
from scheduler.transports.rq.keys import RQ_JOB_FUNCTION, rq_job_id
from scheduler.transports.rq.options import RQOptions

log = logging.getLogger("order_timeouts.transports.rq")

ARM_SCRIPT = files("scheduler.transports.rq").joinpath("arm.lua").read_text()

#: RQ re-queues a job this often after its worker died on it; above the handler's poison limit
#: (Settings.max_deliveries), so that the handler, which records why, is the one that gives up
CRASH_RETRIES = 100
#: jobs per call of arm.lua: Redis runs a script without serving anyone else, so keep each call
#: short (what a call of this size costs Redis is in docs/performance.md)
ARM_CHUNK = 1000
#: fields arm.lua writes per job; every other field is the template's
PER_JOB_FIELDS = ("data", "description")


def job_args(message: TimerMessage) -> list[int]:
    """The job's arguments: the message's due time and version (the job id names the order)."""
    return [message.due_ms, message.version]


#: what the JSON of every timer's call begins with, up to its arguments
_CALL_HEAD = JSONSerializer.dumps([RQ_JOB_FUNCTION, None, []]).decode().removesuffix("]]")  # type: ignore[no-untyped-call]


def seconds(ms: int) -> float:
    """A registry time as an RQ registry score: epoch seconds, to the millisecond."""
    return ms / 1000


class JobTemplate:
    """The jobs of one transport's timers: RQ's own `Job`, or its fields for arm.lua."""

    def __init__(self, options: RQOptions, connection: Any) -> None:
        self._options = options
        self._connection = connection
        message = TimerMessage("template-probe", 0, 1)
        probe = self.job(message)
        mapping = probe.to_dict()
        self._shared = {name: value for name, value in mapping.items() if name not in PER_JOB_FIELDS}
        ours = self._shared | dict(zip(PER_JOB_FIELDS, self.encode(message), strict=True))
        #: False when this RQ reads our jobs differently: arm() then saves RQ's own Job per timer
        self.exact = self._reads_back(probe, ours)
        if not self.exact:
            log.warning("this RQ version reads jobs differently: arming timers one RQ Job at a time (slower)")

    def job(self, message: TimerMessage) -> Job:
        """The timer's job as RQ builds it."""
        options = self._options
        return Job.create(
            RQ_JOB_FUNCTION,
            args=job_args(message),
            connection=self._connection,
            id=rq_job_id(options.prefix, message.order_id),
            origin=options.queue,
            status=JobStatus.SCHEDULED,
            description=description(message),
            timeout=options.job_timeout,
            result_ttl=0,
            failure_ttl=options.failure_ttl,
            retry=Retry(max=CRASH_RETRIES),
            serializer=JSONSerializer,
        )

    @staticmethod
    def encode(message: TimerMessage) -> tuple[bytes, str]:
        """`data` (the call `Job.data` serializes, uncompressed) and `description` of the timer's job.

        The bytes of JSONSerializer.dumps((RQ_JOB_FUNCTION, None, job_args(message), {})), without
        the serializer's generic work: the arguments are two integers, formatted into the call's
        fixed head (the template's check and a test hold it to RQ's encoding)."""
        return f"{_CALL_HEAD}{message.due_ms}, {message.version}], {{}}]".encode(), description(message)

    def _reads_back(self, probe: Job, mapping: dict[str, Any]) -> bool:
        """Whether RQ restores, from this hash as Redis returns it, the probe job's call and description."""
        encoder = self._connection.get_encoder()  # redis-py's own conversion of the values it sends
        raw = {name.encode(): encoder.encode(value) for name, value in mapping.items()}
        job = Job(probe.id, connection=self._connection, serializer=JSONSerializer)
        try:
            job.restore(raw)
            return (job.func_name, job.args, job.kwargs, job.description, job.origin, job.timeout) == (
                probe.func_name, probe.args, probe.kwargs, probe.description, probe.origin, probe.timeout
            )  # fmt: skip
        except Exception:  # whatever a different RQ raises on it, it does not read our jobs
            return False

    def arm(self, script: Any, client: Any, queue: Queue, messages: Sequence[TimerMessage]) -> None:
        """Write the messages' jobs afresh and schedule them, through `client` (a Redis or a pipeline):
        arm.lua (`script`) per ARM_CHUNK jobs, or RQ's own Jobs when this RQ encodes jobs differently."""
        if not messages:
            return
        if not self.exact:
            self._arm_rq_jobs(client, queue, messages)
            return
        calls = (
            self._script_call(queue, messages[start : start + ARM_CHUNK])
            for start in range(0, len(messages), ARM_CHUNK)
        )
        if isinstance(client, Pipeline):
            for keys, args in calls:
                script(keys=keys, args=args, client=client)
        else:
            run_overlapped(client, script, calls)

    def _script_call(self, queue: Queue, messages: Sequence[TimerMessage]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of arm.lua for these messages."""
        shared = self._shared | {"created_at": utcformat(now())}
        args: list[Any] = [queue.key, Job.redis_job_namespace_prefix, len(shared)]
        for name, value in shared.items():
            args += (name, value)
        prefix = self._options.prefix
        for message in messages:
            args += (rq_job_id(prefix, message.order_id), repr(seconds(message.due_ms)), *self.encode(message))
        scratch = f"{queue.key}:arm-template"  # no job id has a colon: never a job's key
        return [queue.scheduled_job_registry.key, queue.failed_job_registry.key, Queue.redis_queues_keys, scratch], args

    def _arm_rq_jobs(self, client: Any, queue: Queue, messages: Sequence[TimerMessage]) -> None:
        scheduled, failed = queue.scheduled_job_registry.key, queue.failed_job_registry.key
        pipe = client if isinstance(client, Pipeline) else client.pipeline(transaction=False)
        pipe.sadd(Queue.redis_queues_keys, queue.key)
        for message in messages:
            job = self.job(message)
            pipe.delete(job.key)
            job.save(pipeline=pipe)
            pipe.zrem(failed, job.id)
            pipe.zadd(scheduled, {job.id: seconds(message.due_ms)})
        if pipe is not client:
            pipe.execute()


def run_overlapped(client: Any, script: Any, calls: Iterable[tuple[list[str], list[Any]]]) -> list[Any]:
    """Run a registered `script` once per (keys, args) call on one connection of the client's pool,
    sending each call as soon as it is built and reading every reply after the last send: Redis runs
    call k while the caller builds call k+1.

    Each call must be safe to run twice. A dropped connection sends them all again (the client's
    Retry, as redis-py retries a command), and calls that find the script missing from Redis's cache
    (a restart, SCRIPT FLUSH) run again through the script, which loads it. The first other error
    reply is raised once every reply has been read."""
    built: list[tuple[list[str], list[Any]]] = []
    pending: Iterator[tuple[list[str], list[Any]]] = iter(calls)
    pool = client.connection_pool
    conn = pool.get_connection()

    def send(keys: list[str], args: list[Any]) -> None:
        conn.send_command("EVALSHA", script.sha, len(keys), *keys, *args)

    def attempt() -> list[Any]:
        for keys, args in built:  # a retry: what a dropped connection may have lost
            send(keys, args)
        for keys, args in pending:
            built.append((keys, args))
            send(keys, args)
        replies: list[Any] = []
        for _ in built:
            try:
                replies.append(conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies

    try:
        replies: list[Any] = conn.retry.call_with_retry(attempt, lambda _error: conn.disconnect())
    finally:
        pool.release(conn)
    for index, ((keys, args), reply) in enumerate(zip(built, replies, strict=True)):
        if isinstance(reply, NoScriptError):
            replies[index] = script(keys=keys, args=args, client=client)
        elif isinstance(reply, ResponseError):
            raise reply
    return replies


def description(message: TimerMessage) -> str:
    return f"payment timeout of order {message.order_id}"
