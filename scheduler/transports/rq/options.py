"""The `rq` transport's URL: `rq+redis://…` with our options in the query string, the rest for redis-py.

The options are listed in the docstring of scheduler/transports/rq/adapter.py and in
docs/transports.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from scheduler.config import bounded_int, redact
from scheduler.errors import ConfigurationError
from scheduler.transports.redis.sentinel import is_sentinel_url, parse_sentinel_url
from scheduler.transports.rq.keys import RQ_DEFAULT_JOB_PREFIX, RQ_DEFAULT_QUEUE, RQ_JOB_ID_CHARACTERS


@dataclass(frozen=True)
class RQOptions:
    queue: str = RQ_DEFAULT_QUEUE
    prefix: str = RQ_DEFAULT_JOB_PREFIX
    job_timeout: int = 60
    failure_ttl: int = 7 * 86_400
    move_batch: int = 1000
    maintenance_interval: int = 3
    worker_lease: int = 10

    @property
    def lease_s(self) -> int:
        """How long a job our Worker took stays in the StartedJobRegistry before RQ's cleanup treats
        it as abandoned and re-queues it (rq workers give their jobs RQ's own lease instead)."""
        return self.worker_lease


_LIMITS = {
    "job_timeout": (1, 86_400),
    "failure_ttl": (1, 10 * 365 * 86_400),
    "move_batch": (1, 10_000),
    "maintenance_interval": (1, 86_400),
    "worker_lease": (1, 86_400),
}


def parse_url(broker_url: str) -> tuple[str, RQOptions]:
    """The redis:// URL redis-py gets, and our options; bad options raise ConfigurationError."""
    scheme, sep, rest = broker_url.partition("://")
    if not sep or scheme.lower() not in ("rq+redis", "rq+rediss", "rq+redis+sentinel", "rq+rediss+sentinel"):
        raise ConfigurationError(
            f"not an rq broker URL (rq+redis[s]://, rq+redis[s]+sentinel://): {redact(broker_url)}"
        )
    try:
        parts = urlsplit(f"{scheme.lower().removeprefix('rq+')}://{rest}")
    except ValueError as exc:  # an unbalanced IPv6 bracket
        raise ConfigurationError(f"bad rq broker URL {redact(broker_url)!r}: {exc}") from None
    ours: dict[str, Any] = {}
    passed: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "queue":
            if not value or any(c.isspace() for c in value):
                raise ConfigurationError(f"rq option queue={value!r}: give a non-empty name without spaces")
            ours[key] = value
        elif key == "prefix":
            if not value or not set(value) <= RQ_JOB_ID_CHARACTERS:
                raise ConfigurationError(f"rq option prefix={value!r}: use letters, digits, '_' and '-' only")
            ours[key] = value
        elif key in _LIMITS:
            ours[key] = bounded_int("rq", key, value, _LIMITS[key])
        else:
            passed.append((key, value))
    if "prefix" in ours and "queue" not in ours and ours["prefix"] != RQ_DEFAULT_JOB_PREFIX:
        # A deployment of its own: a shared queue would hand its jobs to another deployment's
        # workers, which dead-letter them as not theirs (the job id has the wrong prefix).
        ours["queue"] = f"{RQ_DEFAULT_QUEUE}_{ours['prefix']}"
    url = urlunsplit(parts._replace(query=urlencode(passed)))
    if is_sentinel_url(url):
        parse_sentinel_url(url)  # a bad form fails here, at start-up, not on first use
    return url, RQOptions(**ours)
