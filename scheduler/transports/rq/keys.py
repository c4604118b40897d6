"""RQ names the rq transport uses: its queue, job ids and the job function."""

from __future__ import annotations

import base64
import binascii

#: default RQ queue of the timeout jobs: `rq worker --with-scheduler -S json order_timeouts` consumes it.
#: RQ's own key names (rq:queue:…, rq:scheduled:…, rq:job:…) follow from it and from the job ids.
RQ_DEFAULT_QUEUE = "order_timeouts"
#: default first part of every job id; RQ job ids are global, so one prefix per deployment
RQ_DEFAULT_JOB_PREFIX = "order-timeout"
#: the job function, by import path: the producer side never imports the consumer side
RQ_JOB_FUNCTION = "consumers.rq_job.fire_timeout"
#: job meta field: deliveries since the job was last armed, for the handler's poison check
RQ_META_DELIVERIES = "deliveries"


def rq_lineage_key(queue: str) -> str:
    """The queue's marker: the replication ID of the data that holds its jobs (redis/lineage.py).
    Under RQ's `rq:` namespace, beside the queue's own keys."""
    return f"rq:order_timeouts:lineage:{queue}"


def rq_owner_keys(queue: str, prefix: str) -> list[str]:
    """Which deployment (registry/control.py) owns the queue, and the job ids of the prefix: the first
    process of a deployment to connect writes its identity into each, and a process of another finds
    them taken and refuses to use the queue (RQ's names cannot carry the identity: the queue is named
    on every `rq worker` command line, and job ids are global to the Redis database)."""
    return [f"rq:order_timeouts:owner:queue:{queue}", f"rq:order_timeouts:owner:prefix:{prefix}"]


#: the characters RQ accepts in a job id
RQ_JOB_ID_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def rq_job_id(prefix: str, order_id: str) -> str:
    """The deterministic RQ job id of an order's timeout: one job per order, whatever publishes it.

    RQ accepts only `[A-Za-z0-9_-]` in job ids: such order ids follow `<prefix>-`, any other is
    base64url-encoded after `<prefix>_`. The separator tells the two apart, so no two orders share a job.
    """
    if order_id and set(order_id) <= RQ_JOB_ID_CHARACTERS:
        return f"{prefix}-{order_id}"
    return f"{prefix}_{base64.urlsafe_b64encode(order_id.encode()).decode().rstrip('=')}"


def rq_order_id(prefix: str, job_id: str) -> str | None:
    """The order whose timeout job this is (the inverse of `rq_job_id`); None for any other job id."""
    if job_id.startswith(f"{prefix}-"):
        order_id = job_id[len(prefix) + 1 :]
    elif job_id.startswith(f"{prefix}_"):
        encoded = job_id[len(prefix) + 1 :]
        try:
            order_id = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (binascii.Error, ValueError):  # not base64, or not UTF-8 (UnicodeDecodeError)
            return None
    else:
        return None
    return order_id if order_id and rq_job_id(prefix, order_id) == job_id else None
