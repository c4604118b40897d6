"""RQ's bookkeeping of the jobs a worker runs, for a whole batch in one script call each way.

Before RQ's worker runs a job it starts an execution of it: `Execution.create` (the execution's
hash, the job's ExecutionRegistry and the queue's StartedJobRegistry, each with the lease that
RQ's abandoned-job cleanup goes by) and `Job.prepare_for_execution` (status started). After the
job, `Execution.delete` undoes the three, and a job done with result_ttl 0 is deleted. Through
redis-py that is 13 commands per job, and packing and parsing them would outweigh the rest of our
Worker's work on a batch. start.lua and end.lua do the same for a whole batch from three arguments
per job.

They must leave what RQ leaves, or RQ's cleanup would not find a dead worker's jobs. `Executions`
checks that when it is built, as the JobTemplate checks the jobs it arms: it runs a probe job
through RQ's own calls and another through the scripts, and compares what each leaves in Redis
after the start and after the end. An RQ release that keeps executions differently fails the
check, and `Executions` then makes RQ's own calls per job: slower, always what RQ reads.

RQ 3 keeps two things more, and the scripts write them where this RQ has them: the job's id in the
execution hash (`job_id`), and each worker's set of its executions (`rq:worker:<name>:executions`).
RQ 3's abandoned-job cleanup, like RQ 2's, goes by the StartedJobRegistry's scores alone, so the
executions of a worker that is not an `rq worker` (ours) are re-queued when their lease runs out,
never before.
"""

from __future__ import annotations

import calendar
import logging
import uuid
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from redis.exceptions import RedisError
from rq import Queue
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat, utcparse

log = logging.getLogger("order_timeouts.transports.rq")

START_SCRIPT = files("scheduler.transports.rq").joinpath("start.lua").read_text()
END_SCRIPT = files("scheduler.transports.rq").joinpath("end.lua").read_text()

#: key prefixes of the scripts, from RQ's own classes
EXECUTION_PREFIX = Execution("<e>", "<j>", connection=None).key.removesuffix("<j>:<e>")  # type: ignore[arg-type]
EXECUTIONS_PREFIX = ExecutionRegistry.key_template.format("")
#: the probe's timestamps and RQ's differ by the time between the two calls, well under this
CLOCK_SLACK_S = 5.0
#: the probe jobs are deleted after the check, or expire
PROBE_TTL_S = 60


class Executions:
    """Start and end RQ executions of the jobs of one queue that one worker runs."""

    def __init__(self, client: Any, queue: Queue, worker_name: str, lease_s: int) -> None:
        self._client = client
        self._queue = queue
        self._worker = worker_name
        self._lease = lease_s
        self._started = StartedJobRegistry(queue=queue)
        layout = Execution("<e>", "<j>", connection=client, worker_name=worker_name)
        #: the worker's set of executions, '' where this RQ keeps none (before RQ 3)
        self._worker_executions: str = getattr(layout, "worker_executions_key", "")
        #: whether this RQ's execution hash names its job (RQ 3)
        self._names_job = "job_id" in layout.serialize()
        self._start_script = client.register_script(START_SCRIPT)
        self._end_script = client.register_script(END_SCRIPT)
        #: False when this RQ keeps executions differently: start() and end() then make RQ's own calls
        self.exact = self._same_as_rq()
        if not self.exact:
            log.warning("this RQ version keeps executions differently: starting jobs one RQ call at a time (slower)")

    def start(self, jobs: Sequence[tuple[str, bytes]], unstarted: Sequence[str] = ()) -> dict[str, str]:
        """Start an execution of each job (id, its meta as JSON) and take all of them and the
        `unstarted` ids off the intermediate list. Returns job id → execution id of the jobs
        started: a job whose hash has gone meanwhile (revoked) is not."""
        if not self.exact:
            return self._start_as_rq(jobs, unstarted)
        prefixes = (Job.redis_job_namespace_prefix, EXECUTION_PREFIX, EXECUTIONS_PREFIX)
        intermediate = self._queue.intermediate_queue_key
        execution_ids = {job_id: uuid.uuid4().hex for job_id, _ in jobs}
        right_now = now()
        whole = calendar.timegm(right_now.utctimetuple())  # RQ's current_timestamp()
        args: list[Any] = [
            *prefixes,
            repr(right_now.timestamp()),
            self._lease,
            whole + self._lease,
            whole + self._lease + 60,
            self._lease + 60,
            utcformat(right_now),
            self._worker,
            self._worker_executions,
            "1" if self._names_job else "0",
            len(unstarted),
            *unstarted,
        ]
        for job_id, meta in jobs:
            args += (job_id, execution_ids[job_id], meta)
        started = self._start_script(keys=[self._started.key, intermediate], args=args)
        return {job_id: execution_ids[job_id] for job_id in (i.decode() for i in started)}

    def end(self, pipe: Any, executions: Sequence[tuple[str, str, bool]]) -> None:
        """End each execution (job id, execution id, done) through `pipe`; a job done is deleted,
        unless it has been scheduled again meanwhile (it then waits, status scheduled)."""
        if not executions:
            return
        if not self.exact:
            self._end_as_rq(pipe, executions)
            return
        args: list[Any] = [Job.redis_job_namespace_prefix, EXECUTION_PREFIX, EXECUTIONS_PREFIX, self._worker_executions]
        for job_id, execution_id, done in executions:
            args += (job_id, execution_id, "1" if done else "0")
        keys = [self._started.key, self._queue.scheduled_job_registry.key]
        self._end_script(keys=keys, args=args, client=pipe)

    # -- RQ's own calls (Execution.create, prepare_for_execution, Execution.delete): the fallback,
    # and what the check compares the scripts with --------------------------------------------------

    def _start_as_rq(self, jobs: Sequence[tuple[str, bytes]], unstarted: Sequence[str]) -> dict[str, str]:
        intermediate = self._queue.intermediate_queue_key
        present = self._client.pipeline(transaction=False)
        for job_id, _ in jobs:
            present.exists(Job.key_for(job_id))
        alive = [job for job, exists in zip(jobs, present.execute(), strict=True) if exists]
        pipe = self._client.pipeline(transaction=False)
        for job_id in unstarted:
            pipe.lrem(intermediate, 1, job_id)
        execution_ids: dict[str, str] = {}
        for job_id, meta in alive:
            job = self._job(job_id)
            execution_ids[job_id] = Execution.create(job, self._lease, pipe, worker_name=self._worker).id
            job.prepare_for_execution(self._worker, pipeline=pipe)
            pipe.hset(job.key, "meta", meta)
        for job_id, _ in jobs:
            pipe.lrem(intermediate, 1, job_id)
        pipe.execute()
        return execution_ids

    def _end_as_rq(self, pipe: Any, executions: Sequence[tuple[str, str, bool]]) -> None:
        done = [job_id for job_id, _, is_done in executions if is_done]
        scores = self._client.zmscore(self._queue.scheduled_job_registry.key, done) if done else []
        rearmed = {job_id for job_id, score in zip(done, scores, strict=True) if score is not None}
        for job_id, execution_id, is_done in executions:
            execution = Execution(execution_id, job_id, connection=self._client, worker_name=self._worker)
            execution.delete(self._job(job_id), pipe)
            if not is_done:
                continue
            if job_id in rearmed:
                pipe.hset(Job.key_for(job_id), "status", JobStatus.SCHEDULED.value)
            else:
                pipe.delete(Job.key_for(job_id), ExecutionRegistry(job_id, connection=pipe).key)

    def _job(self, job_id: str) -> Job:
        """The job as RQ's execution calls need it: its id and its queue (no round trip)."""
        job = Job(job_id, connection=self._client, serializer=JSONSerializer)
        job.origin = self._queue.name
        return job

    # -- the check ----------------------------------------------------------------------------------

    def _same_as_rq(self) -> bool:
        """Whether the scripts leave, for a probe job, what RQ's own calls leave for another, after
        the start and after the end."""
        probes = [f"{self._queue.name}-execution-probe-{uuid.uuid4().hex}" for _ in range(2)]
        intermediate = self._queue.intermediate_queue_key
        started: list[dict[str, str]] = []
        try:
            for exact, probe in zip((False, True), probes, strict=True):
                self._client.hset(Job.key_for(probe), mapping={"status": "queued", "meta": "{}"})
                self._client.expire(Job.key_for(probe), PROBE_TTL_S)  # should this process die right here
                self._client.rpush(intermediate, probe)
                self.exact = exact
                started.append(self.start([(probe, b'{"deliveries": 1}')]))
            if not self._states_equal(*started):
                return False
            for exact, execution in zip((False, True), started, strict=True):
                self.exact = exact
                pipe = self._client.pipeline(transaction=False)
                self.end(pipe, [(job_id, execution_id, True) for job_id, execution_id in execution.items()])
                pipe.execute()
            return self._states_equal(*started)
        except RedisError:
            raise  # Redis is unreachable, which says nothing about RQ: the check runs again next time
        except Exception:  # whatever a different RQ raises here, it does not keep executions our way
            log.exception("checking the rq execution scripts against RQ's own calls failed")
            return False
        finally:
            # Whatever the check got to: nothing of the probes stays, in RQ's registries least of all.
            pipe = self._client.pipeline(transaction=False)
            for execution in started:
                for job_id, execution_id in execution.items():
                    leftover = Execution(execution_id, job_id, connection=self._client)
                    pipe.delete(leftover.key)
                    pipe.zrem(self._started.key, leftover.composite_key)
                    if self._worker_executions:
                        pipe.srem(self._worker_executions, leftover.composite_key)
            for probe_id in probes:
                pipe.delete(Job.key_for(probe_id), ExecutionRegistry(probe_id, connection=self._client).key)
                pipe.lrem(intermediate, 0, probe_id)
            pipe.execute()

    def _states_equal(self, theirs: dict[str, str], ours: dict[str, str]) -> bool:
        def state(started: dict[str, str]) -> list[Any]:
            return execution_state(self._client, self._queue, started, self._lease, self._worker_executions)

        return bool(theirs) and state(theirs) == state(ours)


def execution_state(
    client: Any, queue: Queue, started: dict[str, str], lease_s: int, worker_executions: str = ""
) -> list[Any]:
    """What Redis holds of these jobs and their executions (job id → execution id), with the ids
    replaced by placeholders and times by what they are relative to now, so that two jobs compare.
    With `worker_executions` (RQ 3), also whether that worker's set lists each execution, and its TTL."""
    pipe = client.pipeline(transaction=False)
    per_job = 9 if worker_executions else 7
    for job_id, execution_id in started.items():
        execution = Execution(execution_id, job_id, connection=client)
        registry = ExecutionRegistry(job_id, connection=client)
        pipe.hgetall(Job.key_for(job_id))
        pipe.hgetall(execution.key)
        pipe.ttl(execution.key)
        pipe.zrange(registry.key, 0, -1, withscores=True)
        pipe.ttl(registry.key)
        pipe.zscore(StartedJobRegistry(queue=queue).key, execution.composite_key)
        pipe.lpos(queue.intermediate_queue_key, job_id)
        if worker_executions:
            pipe.sismember(worker_executions, execution.composite_key)
            pipe.ttl(worker_executions)
    replies = pipe.execute()
    normal = Placeholders(lease_s)
    states: list[Any] = []
    for index, (job_id, execution_id) in enumerate(started.items()):
        names = {job_id.encode(): b"<job>", execution_id.encode(): b"<execution>"}
        states.append([normal(reply, names) for reply in replies[index * per_job : (index + 1) * per_job]])
    return states


class Placeholders:
    """A reply with ids replaced by placeholders; times (epoch seconds, RQ's timestamp format) as
    `<now>` or `<now+N>` for the lease offsets N; TTLs as `<N s>`."""

    def __init__(self, lease_s: int) -> None:
        self._now = now().timestamp()
        self._offsets = (0, lease_s, lease_s + 60)

    def __call__(self, value: Any, names: dict[bytes, bytes]) -> Any:
        if isinstance(value, dict):
            return {self(k, names): self(v, names) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self(item, names) for item in value]
        if isinstance(value, bytes):
            for name, placeholder in names.items():
                value = value.replace(name, placeholder)
            return self._time(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            for offset in self._offsets[1:]:
                if abs(value - offset) <= CLOCK_SLACK_S:
                    return f"<{offset} s>"
            return self._time(value)
        return value

    def _time(self, value: Any) -> Any:
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = utcparse(value.decode()).timestamp()
            except ValueError:
                return value
        for offset in self._offsets:
            if abs(seconds - self._now - offset) <= CLOCK_SLACK_S:
                return f"<now+{offset}>"
        return value
