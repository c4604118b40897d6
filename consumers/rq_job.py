"""The job function of the `rq` transport: `rq worker` runs the same Handler and registry as our Worker.

    rq worker --with-scheduler -S json --url redis://… order_timeouts
        └─ fire_timeout(due_ms, version) ─▶ Handler.handle(a batch of one) ─▶ the settlement, the RQ way:
             done      return None: RQ deletes the job (result_ttl 0)
             retry     return rq.Retry: RQ re-schedules the job at the handler's new due time
             dead      raise TimeoutDeadLettered: RQ fails the job into its FailedJobRegistry
             failed    (the registry transaction rolled back) return rq.Retry: again after
                       FAILED_REDELIVERY_MS, in RQ's whole seconds (see `_again`)

The handler's transaction commits before the function returns, and RQ records the job's end
after: a worker that dies in between runs the job again (its crash Retry), and the registry's
conditional claim makes that second run a no-op.

Configuration comes from the rq worker's environment (ORDER_TIMEOUTS_DATABASE_URL,
ORDER_TIMEOUTS_BROKER_URL = the rq+redis:// URL of this queue, ...), read once per process: a
forking `rq worker` builds it in each work horse, `rq worker -w rq.worker.SimpleWorker` and
`rq worker-pool -w rq.worker.SimpleWorker` once per worker.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from rq.job import Job, Retry, get_current_job
from rq.registry import ScheduledJobRegistry
from sqlalchemy.exc import SQLAlchemyError

from consumers.breaker import Breaker
from consumers.handler import Handler, RetryPolicy
from consumers.orders import OrderStore, load_order_store
from consumers.worker import worker_id
from scheduler.api import OrderTimeouts
from scheduler.clock import Clock
from scheduler.config import ENV_BROKER_URL, Settings, redact
from scheduler.errors import ConfigurationError, ForeignNames, MalformedMessage, TransportUnavailable
from scheduler.transports.base import FAILED_REDELIVERY_MS, Batch, Delivery, TimerMessage
from scheduler.transports.rq.adapter import RQTransport, job_message
from scheduler.transports.rq.jobs import job_args
from scheduler.transports.rq.keys import RQ_META_DELIVERIES

log = logging.getLogger("order_timeouts.rq_job")

#: RQ's Retry wants a maximum; the handler decides when to give up (attempts), so it never runs out
UNBOUNDED_RETRIES = 2**31 - 1


class TimeoutDeadLettered(Exception):
    """The handler dead-lettered this timeout: RQ fails the job, and the registry row says why."""


def fire_timeout(*_call: Any) -> Retry | None:
    """Handle one due timeout: the job's (due_ms, version), of the order its id names (`job_message`)."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("fire_timeout is an RQ job function: an rq worker runs it")
    context = _context()
    try:
        # The queue may belong to another deployment (another registry): then none of its jobs is run
        # here, where this registry would ack it as stale (keys.rq_owner_keys). The job fails, and RQ
        # keeps it in its FailedJobRegistry for its owner. A no-op once connected.
        context.transport.connect()
    except ForeignNames as exc:
        log.error("job %s not run: %s", job.id, exc)
        _no_crash_retry(job)
        raise
    except TransportUnavailable:
        pass  # an outage: the handler below finds it and hands the job back (`settlement.failed`)
    try:
        timer = job_message(job, context.transport.options.prefix)
    except MalformedMessage:
        _no_crash_retry(job)
        raise
    # Counted before the handler runs: a run that kills the worker still counts (the poison limit).
    deliveries = int(job.meta.get(RQ_META_DELIVERIES, 0)) + 1
    job.meta[RQ_META_DELIVERIES] = deliveries
    job.save_meta()  # type: ignore[no-untyped-call]  # rq leaves it unannotated

    handler = Handler(
        context.timeouts.engine,
        context.store,
        clock=context.clock,
        worker_id=(job.worker_name or worker_id())[:64],
        outbox=context.timeouts.outbox,
        retry=context.retry,
        mode=context.timeouts.settings.mode,
        breaker=context.breaker,
        transport=context.transport.name,
    )
    # A paused fleet hands the job back like a failed batch: it runs again after FAILED_REDELIVERY_MS
    # as a fresh delivery (its count reset by `_again`), its registry row untouched.
    settlement, _ = handler.handle(Batch([Delivery(timer, receipt=job.id, deliveries=deliveries)]))
    if settlement.failed:
        return _again(job, timer, context.clock.now_ms() + FAILED_REDELIVERY_MS, context.clock)
    if settlement.retry:
        _, later = settlement.retry[0]
        try:
            # RQ re-schedules the job once we return; until this commits the relay would send it again.
            context.timeouts.outbox.rearmed([later])
        except SQLAlchemyError as exc:
            log.warning("order %s: retry not marked published, the relay will publish it: %s", later.order_id, exc)
        return _again(job, later, later.due_ms, context.clock)
    if settlement.dead:
        _, reason = settlement.dead[0]
        _no_crash_retry(job)
        raise TimeoutDeadLettered(reason)
    # Published again while it ran (reschedule, the relay): the scheduled registry holds the job
    # anew, and RQ's success handling would delete its hash. Re-schedule it ourselves instead.
    score = job.connection.zscore(ScheduledJobRegistry.key_template.format(job.origin), job.id)
    if score is not None:
        current = Job.fetch(job.id, connection=job.connection, serializer=job.serializer)
        message = job_message(current, context.transport.options.prefix)
        return _again(job, message, round(float(score) * 1000), context.clock)
    return None


def _again(job: Job, message: TimerMessage, due_ms: int, clock: Clock) -> Retry:
    """A Retry that RQ schedules at or just after `due_ms`, carrying `message` as a fresh delivery."""
    job.args = job_args(message)
    job.meta.pop(RQ_META_DELIVERIES, None)
    # RQ schedules a retry at now + interval cut to whole seconds: one second more, never early
    # (a run before the registry's due time would find nothing to claim and end the timer).
    interval = max(math.ceil((due_ms - clock.now_ms()) / 1000), 0) + 1
    return Retry(max=UNBOUNDED_RETRIES, interval=interval)


def _no_crash_retry(job: Job) -> None:
    """The job fails for good: RQ's worker reads `retries_left` from this very object."""
    job.retries_left = 0


@dataclass
class _Context:
    timeouts: OrderTimeouts
    transport: RQTransport
    store: OrderStore
    retry: RetryPolicy
    clock: Clock
    #: per process, like the context: the fleet's window is read at most once a second per process
    breaker: Breaker | None


#: per process and configuration; a forked work horse has another pid and builds its own
_contexts: dict[tuple[int, str, str], _Context] = {}


def _context() -> _Context:
    settings = Settings.from_env()
    key = (os.getpid(), settings.database_url, settings.broker_url)
    context = _contexts.get(key)
    if context is not None:
        return context
    for other in [k for k in _contexts if k[0] == key[0]]:
        _contexts.pop(other).timeouts.close()  # reconfigured in this process (tests do that)
    timeouts = OrderTimeouts(settings=settings)
    if not isinstance(timeouts.transport, RQTransport):
        timeouts.close()
        raise ConfigurationError(
            f"{ENV_BROKER_URL} must be the rq+redis:// URL of this queue for rq workers, "
            f"not {redact(settings.broker_url)!r}"
        )
    context = _Context(
        timeouts=timeouts,
        transport=timeouts.transport,
        store=load_order_store(settings),
        retry=RetryPolicy.from_settings(settings),
        clock=timeouts.clock,
        breaker=Breaker(timeouts.engine, timeouts.clock, settings.breaker) if settings.breaker.active else None,
    )
    _contexts[key] = context
    return context
