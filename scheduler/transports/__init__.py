"""Transports are chosen by URL: `sql` (default), `redis://`, `amqp://`, `rq+redis://`."""

from __future__ import annotations

from sqlalchemy import Engine

from scheduler.clock import Clock
from scheduler.config import redact
from scheduler.errors import ConfigurationError
from scheduler.transports.base import Batch, Delivery, Settlement, TimerMessage, Transport

__all__ = ["Batch", "Delivery", "Settlement", "TimerMessage", "Transport", "open_transport"]


def open_transport(broker_url: str, engine: Engine, clock: Clock) -> Transport:
    scheme = broker_url.partition("://")[0].lower() if "://" in broker_url else broker_url.lower()
    if scheme in ("sql", ""):
        from scheduler.transports.sql.adapter import SqlTransport

        return SqlTransport(engine, clock)
    if scheme in ("redis", "rediss"):
        from scheduler.transports.redis.adapter import RedisTransport

        return RedisTransport(broker_url, clock)
    if scheme in ("amqp", "amqps"):
        from scheduler.transports.rabbitmq.adapter import RabbitMQTransport

        return RabbitMQTransport(broker_url, clock)
    if scheme in ("rq+redis", "rq+rediss"):
        from scheduler.transports.rq.adapter import RQTransport

        return RQTransport(broker_url, clock)
    raise ConfigurationError(
        f"unknown broker URL {redact(broker_url)!r}: use sql, redis://, rediss://, amqp://, amqps:// or rq+redis://"
    )
