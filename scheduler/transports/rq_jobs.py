"""The RQ job of a timer, and many of them armed in one round trip.

RQ's way to write a job, `Job.create(...)` then `job.save(pipeline)`, costs about 45 packed
arguments, a zlib stream and a Python Job per timer: 3.5k jobs/s on this machine, most of it in
redis-py's command packing. A timer's job differs from any other only in `data` (the function call,
with the timer message as its argument), `description` and `created_at`, so `JobTemplate` takes
every other field from one job that RQ itself builds and encodes the two per timer; rq_arm.lua then
writes a whole chunk of jobs from four arguments per timer.

`data` is the JSON of the call, not compressed: RQ reads a `data` that is not a zlib stream as is
(`Job.restore`), and for ~120 bytes zlib saves 10 while costing more than all the rest of a job
(CPython's zlib sets up 256 KiB of state per call and gives up the GIL around it).

The template checks itself against RQ when it is built: RQ must restore, from the hash it writes,
the same call and description as from RQ's own job. An RQ release that reads jobs differently
fails that check, and the transport falls back to RQ's own `Job.create(...).save()`: slower, but
always what RQ reads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from redis.client import Pipeline
from rq import Queue
from rq.job import Job, JobStatus, Retry
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from scheduler.names import RQ_JOB_FUNCTION, rq_job_id
from scheduler.transports.base import TimerMessage
from scheduler.transports.rq_options import RQOptions

log = logging.getLogger("order_timeouts.transports.rq")

ARM_SCRIPT = files("scheduler.transports").joinpath("rq_arm.lua").read_text()

#: RQ re-queues a job this often after its worker died on it; above the handler's poison limit
#: (Settings.max_deliveries), so that the handler, which records why, is the one that gives up
CRASH_RETRIES = 100
#: fields rq_arm.lua writes per job; every other field is the template's
PER_JOB_FIELDS = ("data", "description")


def job_body(message: TimerMessage) -> dict[str, Any]:
    """The job's one argument: the timer message as a JSON object."""
    return {"order_id": message.order_id, "due_ms": message.due_ms, "version": message.version}


def seconds(ms: int) -> float:
    """A registry time as an RQ registry score: epoch seconds, to the millisecond."""
    return ms / 1000


class JobTemplate:
    """The jobs of one transport's timers: RQ's own `Job`, or its fields for rq_arm.lua."""

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
            args=[job_body(message)],
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
        """`data` (the call `Job.data` serializes, uncompressed) and `description` of the timer's job."""
        call: tuple[Any, ...] = (RQ_JOB_FUNCTION, None, [job_body(message)], {})
        data: bytes = JSONSerializer.dumps(call)  # type: ignore[no-untyped-call]  # rq leaves it unannotated
        return data, description(message)

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
        one call of rq_arm.lua (`script`), or RQ's own Jobs when this RQ encodes jobs differently."""
        if not messages:
            return
        scheduled, failed = queue.scheduled_job_registry.key, queue.failed_job_registry.key
        if not self.exact:
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
            return
        shared = self._shared | {"created_at": utcformat(now())}
        args: list[Any] = [queue.key, Job.redis_job_namespace_prefix, len(shared)]
        for name, value in shared.items():
            args += (name, value)
        prefix = self._options.prefix
        for message in messages:
            args += (rq_job_id(prefix, message.order_id), repr(seconds(message.due_ms)), *self.encode(message))
        script(keys=[scheduled, failed, Queue.redis_queues_keys], args=args, client=client)


def description(message: TimerMessage) -> str:
    return f"payment timeout of order {message.order_id}"
