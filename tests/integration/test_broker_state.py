"""What finished timeouts leave on a broker: nothing beyond the bounds docs/transports.md gives under
"What stays on the broker".

A few hundred timeouts per transport are scheduled and fired (the order unpaid, paid, cancelled
already), revoked, rescheduled, retried and dead-lettered (payment status unknown), beside a few
malformed messages; then the test's own namespace on the broker (key prefix, RQ queue, vhost) is
scanned and every structure found is held to its documented bound.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from scheduler import TimeoutState
from scheduler.transports.rabbitmq.adapter import RabbitMQTransport
from scheduler.transports.rabbitmq.keys import RABBITMQ_TIMERS_EXCHANGE, RabbitMQNames
from scheduler.transports.rabbitmq.topology import Queue as DeclaredQueue
from scheduler.transports.rabbitmq.topology import declarations, routing_key
from scheduler.transports.redis.adapter import RedisTransport
from scheduler.transports.redis.keys import redis_dead_key, redis_due_key, redis_lineage_key, redis_timers_key
from scheduler.transports.rq.keys import RQ_JOB_FUNCTION, rq_lineage_key, rq_owner_keys
from tests.conftest import Stack, open_stack
from tests.rabbitmq_support import channel, rabbitmqctl
from tests.services import REDIS_URL
from tests.stacks import STACKS
from tests.support import add_orders, registry_records

#: the dead-letter bounds the test deploys with, well below the dead timeouts it makes
DEAD_MAXLEN = 20
FAILURE_TTL_S = 3600
OPTIONS: dict[str, dict[str, object]] = {
    "redis": {"dead_maxlen": DEAD_MAXLEN},
    "rq": {"failure_ttl": FAILURE_TTL_S},
    "rabbitmq": {"dead_maxlen": DEAD_MAXLEN},
}

#: timeouts per kind: the order unpaid, paid, already cancelled; revoked before due; rescheduled
#: later; no order row (payment status unknown: retried once, then dead). More dead ones than a
#: Redis stream node holds (100), so that the dead stream's approximate trim has to act.
COUNTS = {"unpaid": 120, "paid": 50, "cancelled": 20, "revoked": 40, "rescheduled": 30, "unknown": 150}
MALFORMED = 3


@pytest.fixture(params=sorted(OPTIONS))
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    name = request.param
    yield from open_stack(name, {name: functools.partial(STACKS[name], **OPTIONS[name])}, tmp_path)


def test_finished_timeouts_leave_nothing_on_the_broker_beyond_the_documented_bounds(broker: Stack) -> None:
    ids = {kind: [f"{kind}-{n}" for n in range(count)] for kind, count in COUNTS.items()}
    add_orders(broker.engine, ids["unpaid"] + ids["revoked"] + ids["rescheduled"])
    add_orders(broker.engine, ids["paid"], status="PAID")
    add_orders(broker.engine, ids["cancelled"], status="CANCELLED")

    client = broker.timeouts()
    now = datetime.now(UTC)
    later, last = now + timedelta(seconds=2), now + timedelta(seconds=3)
    client.schedule_many([*ids["unpaid"], *ids["paid"], *ids["cancelled"], *ids["unknown"]], due_at=now)
    client.schedule_many([*ids["revoked"], *ids["rescheduled"]], due_at=later)
    for order_id in ids["revoked"]:
        assert client.cancel(order_id)
    for order_id in ids["rescheduled"]:
        client.reschedule(order_id, due_at=last)
    MALFORM[broker.name](broker)

    worker = broker.timeouts(max_attempts=2, retry_backoff=timedelta(milliseconds=200))

    def finished() -> bool:
        records = registry_records(broker.engine).values()
        return datetime.now(UTC) > last + timedelta(seconds=2) and all(
            r.state is not TimeoutState.PENDING for r in records
        )

    broker.drain_until(finished, timeout=30, client=worker)
    broker.drain(worker)  # copies of revoked and rescheduled timers that arrive at their old due time
    worker.close()  # a worker that stops leaves no consumer behind

    states = [record.state for record in registry_records(broker.engine).values()]
    assert states.count(TimeoutState.DEAD) == COUNTS["unknown"]
    assert states.count(TimeoutState.REVOKED) == COUNTS["revoked"]
    assert states.count(TimeoutState.DONE) == sum(COUNTS.values()) - COUNTS["unknown"] - COUNTS["revoked"]
    assert LEFTOVERS[broker.name](broker) == []


# -- malformed messages, the way each broker can carry them ------------------------------------------


def query(stack: Stack, name: str) -> str:
    return parse_qs(urlsplit(stack.broker_url).query)[name][0]


def redis_namespace(stack: Stack) -> str:
    """The deployment's key namespace: the prefix and the registry's identity."""
    transport = stack.timeouts().transport
    assert isinstance(transport, RedisTransport)
    return transport.namespace


def rabbitmq_names(stack: Stack) -> RabbitMQNames:
    transport = stack.timeouts().transport
    assert isinstance(transport, RabbitMQTransport)
    return transport.names


def malform_redis(stack: Stack) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for n in range(MALFORMED):
            client.xadd(redis_due_key(redis_namespace(stack), 0), {"m": f"not json {n}"})
    finally:
        client.close()


def malform_rq(stack: Stack) -> None:
    name = query(stack, "queue")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        jobs = Queue(name, connection=client, serializer=JSONSerializer)
        for n in range(MALFORMED):
            jobs.enqueue(RQ_JOB_FUNCTION, "soon", n, job_id=f"{name}-malformed-{n}")
    finally:
        client.close()


def malform_rabbitmq(stack: Stack) -> None:
    with channel(stack.broker_url.partition("?")[0]) as ch:
        ch.confirm_delivery()
        for n in range(MALFORMED):
            key = routing_key(0, rabbitmq_names(stack))
            ch.basic_publish(RABBITMQ_TIMERS_EXCHANGE, key, f"not json {n}".encode(), mandatory=True)


MALFORM: dict[str, Callable[[Stack], None]] = {"redis": malform_redis, "rq": malform_rq, "rabbitmq": malform_rabbitmq}


# -- what is left, against the bounds of docs/transports.md ------------------------------------------


def redis_leftovers(stack: Stack) -> list[str]:
    """The shard's stream (empty, its group without consumers), its marker, and the dead-letter
    stream within `dead_maxlen` plus one stream node (the trim is approximate): nothing else."""
    prefix = redis_namespace(stack)
    due, dead = redis_due_key(prefix, 0), redis_dead_key(prefix)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        keys = {key for pattern in (f"{{{prefix}:*", f"{{{prefix}}}:*") for key in client.scan_iter(match=pattern)}
        problems = [f"{key} is left" for key in sorted(keys - {due, dead, redis_lineage_key(prefix, 0)})]
        if redis_timers_key(prefix, 0) in keys:
            problems.append(f"{client.zcard(redis_timers_key(prefix, 0))} timers are left in the sorted set")
        if client.xlen(due):
            problems.append(f"{client.xlen(due)} entries are left in the due stream")
        for group in client.xinfo_groups(due):
            if group["pending"] or group["consumers"]:
                problems.append(f"group {group['name']}: {group['pending']} pending, {group['consumers']} consumers")
        node = int(client.config_get("stream-node-max-entries")["stream-node-max-entries"])
        dead_letters = client.xlen(dead)
        if not DEAD_MAXLEN <= dead_letters <= DEAD_MAXLEN + node:
            problems.append(f"{dead_letters} dead letters, bound {DEAD_MAXLEN} (+{node})")
        problems += [f"{key} has a TTL" for key in sorted(keys) if client.ttl(key) != -1]
        return problems
    finally:
        client.close()


def rq_leftovers(stack: Stack) -> list[str]:
    """The queue's marker and its FailedJobRegistry; the dead jobs' hashes and failure results with
    a TTL of at most `failure_ttl`; RQ's short-lived locks and worker sets; no job of a timeout that
    finished otherwise, and nothing queued, scheduled or started."""
    name = query(stack, "queue")
    failed = f"rq:failed:{name}"
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        keys = set(client.scan_iter(match=f"rq:*{name}*"))
        # Our worker's own keys carry its name (host:pid:…), not the queue's.
        keys |= set(client.scan_iter(match=f"rq:*:{os.getpid()}:*"))
        problems = []
        dead_jobs = set(client.zrange(failed, 0, -1))
        if len(dead_jobs) != COUNTS["unknown"] + MALFORMED:
            problems.append(f"{len(dead_jobs)} failed jobs, {COUNTS['unknown'] + MALFORMED} dead-lettered")
        expiry = time.time() + FAILURE_TTL_S + 5
        scores = client.zrange(failed, 0, -1, withscores=True)
        problems += [f"{job} stays failed past failure_ttl" for job, at in scores if at > expiry]
        for key in sorted(keys - {failed, rq_lineage_key(name), *rq_owner_keys(name, name)}):
            ttl = client.ttl(key)
            job = key.rsplit(":", 1)[-1]
            if key.startswith(("rq:job:", "rq:results:")) and job not in dead_jobs:
                problems.append(f"{key} is left by a timeout that did not die")
            elif not 0 < ttl <= FAILURE_TTL_S:
                problems.append(f"{key} is left with TTL {ttl}")
        return problems
    finally:
        client.close()


def rabbitmq_leftovers(stack: Stack) -> list[str]:
    """The declared queues only: all empty but the marker (one message) and the dead-letter queue
    (at most `dead_maxlen`)."""
    vhost = unquote(urlsplit(stack.broker_url).path[1:])
    listed = rabbitmqctl("list_queues", "-p", vhost, "-q", "--no-table-headers", "name", "messages")
    depths = {name: int(count) for name, count in (line.split() for line in listed.splitlines() if line.strip())}
    names = rabbitmq_names(stack)
    declared = {step.name for step in declarations(names=names) if isinstance(step, DeclaredQueue)}
    problems = [f"queue {name} is not the transport's" for name in sorted(set(depths) - declared)]
    bounds = {names.marker: 1, names.dead: DEAD_MAXLEN}
    problems += [f"{name}: {count} messages" for name, count in depths.items() if count > bounds.get(name, 0)]
    if depths.get(names.dead) != DEAD_MAXLEN:
        problems.append(f"the dead-letter queue holds {depths.get(names.dead)}, its bound {DEAD_MAXLEN}")
    return problems


LEFTOVERS: dict[str, Callable[[Stack], list[str]]] = {
    "redis": redis_leftovers,
    "rq": rq_leftovers,
    "rabbitmq": rabbitmq_leftovers,
}
