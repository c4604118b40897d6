"""Transports, chosen by the scheme of the broker URL (`ORDER_TIMEOUTS_BROKER_URL`).

A transport's module is imported only when its URL is used, so a process that runs on the `sql`
transport never loads a broker's client library. Adding a transport is one folder beside these
and one line in SCHEMES; a transport shipped in another package registers its scheme in the
`order_timeouts.transports` entry point group instead (`kafka = "mypackage.kafka:KafkaTransport"`).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from sqlalchemy import Engine

from scheduler.clock import Clock
from scheduler.config import redact
from scheduler.errors import ConfigurationError
from scheduler.transports.base import Batch, BrokerTransport, Delivery, Settlement, TimerMessage, Transport

__all__ = [
    "SCHEMES",
    "Batch",
    "BrokerTransport",
    "Delivery",
    "Settlement",
    "TimerMessage",
    "Transport",
    "open_transport",
]

#: URL scheme -> "module:class". The class is built as `cls.from_url(url, engine, clock)`.
SCHEMES: dict[str, str] = {
    "sql": "scheduler.transports.sql.adapter:SqlTransport",
    "redis": "scheduler.transports.redis.adapter:RedisTransport",
    "rediss": "scheduler.transports.redis.adapter:RedisTransport",
    "redis+sentinel": "scheduler.transports.redis.adapter:RedisTransport",
    "rediss+sentinel": "scheduler.transports.redis.adapter:RedisTransport",
    "amqp": "scheduler.transports.rabbitmq.adapter:RabbitMQTransport",
    "amqps": "scheduler.transports.rabbitmq.adapter:RabbitMQTransport",
    "rq+redis": "scheduler.transports.rq.adapter:RQTransport",
    "rq+rediss": "scheduler.transports.rq.adapter:RQTransport",
    "rq+redis+sentinel": "scheduler.transports.rq.adapter:RQTransport",
    "rq+rediss+sentinel": "scheduler.transports.rq.adapter:RQTransport",
}


def scheme_of(broker_url: str) -> str:
    """`sql` for the bare word and for an empty URL, else what comes before `://`, lower-cased."""
    scheme = broker_url.partition("://")[0] if "://" in broker_url else broker_url
    return scheme.lower() or "sql"


#: entry point group of transports that other packages provide, by URL scheme
PLUGIN_GROUP = "order_timeouts.transports"


def open_transport(broker_url: str, engine: Engine, clock: Clock) -> Transport:
    scheme = scheme_of(broker_url)
    target = SCHEMES.get(scheme)
    if target is None:
        plugins = {plugin.name: plugin.value for plugin in entry_points(group=PLUGIN_GROUP)}
        target = plugins.get(scheme)
    if target is None:
        known = ", ".join(f"{name}://" if name != "sql" else name for name in [*SCHEMES, *plugins])
        raise ConfigurationError(f"unknown broker URL {redact(broker_url)!r}: use {known}")
    module, _, name = target.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise ConfigurationError(f"{target} (broker URL scheme {scheme!r}) is not a Transport")
    return cls.from_url(broker_url, engine, clock)
