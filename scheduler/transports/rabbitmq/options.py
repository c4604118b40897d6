"""The rabbitmq transport's URL: `amqp://user:password@host:port/vhost?option=value`, `amqps://` for TLS.

The vhost is the URL-quoted path (`%2F` for `/`). Query options are pika's URLParameters
(`heartbeat`, `socket_timeout`, `ssl_options`, ...; docs/transports.md lists them); this transport
changes only the defaults in CONNECTION_DEFAULTS, and a URL that gives one keeps its own value.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pika

from scheduler.config import redact
from scheduler.errors import ConfigurationError

#: pika options this transport sets unless the URL gives them: heartbeats every 15 s (so a dead
#: peer is noticed within a minute), and a dead broker must not stall schedule() for long
CONNECTION_DEFAULTS: dict[str, Any] = {
    "heartbeat": 30,
    "socket_timeout": 5.0,
    "stack_timeout": 10.0,
    "blocked_connection_timeout": 30.0,
}


def connection_parameters(broker_url: str) -> pika.URLParameters:
    try:
        params = pika.URLParameters(broker_url)
    except ValueError as exc:
        raise ConfigurationError(f"bad RabbitMQ URL {redact(broker_url)!r}: {exc}") from None
    given = parse_qs(urlsplit(broker_url).query)
    for name, value in CONNECTION_DEFAULTS.items():
        if name not in given:
            setattr(params, name, value)
    return params
