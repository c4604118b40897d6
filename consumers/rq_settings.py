"""Settings module for `rq worker -c consumers.rq_settings`: the rq transport's queue and Redis, from the env.

    ORDER_TIMEOUTS_BROKER_URL=rq+redis://host:6379/0?queue=order_timeouts ORDER_TIMEOUTS_DATABASE_URL=… \\
        rq worker --with-scheduler -S json -c consumers.rq_settings

RQ's CLI imports this module in the worker's main process and reads its upper-case names: the
Redis URL (or, for an `rq+redis+sentinel://` URL, the sentinels and the service) and the queue of
ORDER_TIMEOUTS_BROKER_URL, so that neither is written twice. Importing
it also loads the job function and its dependencies (SQLAlchemy, the driver) before RQ forks a
work horse for each job; without it every horse imports them again, a cost paid per job. The
serializer still goes on the command line (`-S json`): RQ's settings module has no entry for it.
"""

from __future__ import annotations

import os

import consumers.rq_job  # noqa: F401  (loaded once here, inherited by every forked work horse)
from scheduler.config import ENV_BROKER_URL
from scheduler.transports.redis.sentinel import is_sentinel_url, parse_sentinel_url
from scheduler.transports.rq.options import parse_url

_redis_url, _options = parse_url(os.environ.get(ENV_BROKER_URL) or "rq+redis://localhost:6379/0")

#: read by RQ's CLI (`rq worker -c`); `--url` and queue names on the command line still win
QUEUES = [_options.queue]
if is_sentinel_url(_redis_url):
    # RQ's CLI builds redis-py's Sentinel(...).master_for(MASTER_NAME) from this, so the rq worker
    # follows a failover as our processes do.
    _target = parse_sentinel_url(_redis_url)
    _credentials = {"USERNAME": _target.username, "PASSWORD": _target.password}
    SENTINEL = {
        "INSTANCES": list(_target.sentinels),
        "MASTER_NAME": _target.service,
        "DB": _target.db,
        **_credentials,
        "SSL": _target.tls,
        "CONNECTION_KWARGS": _target.redis_options,
        "SENTINEL_KWARGS": {
            **({k.lower(): v for k, v in _credentials.items()} if _target.sentinel_auth else {}),
            **_target.tls_options(),
        },
    }
else:
    REDIS_URL = _redis_url
