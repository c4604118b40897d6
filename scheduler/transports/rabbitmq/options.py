"""The rabbitmq transport's URL: `amqp://user:password@host:port[,host:port...]/vhost?option=value`,
`amqps://` for TLS.

Several comma-separated hosts name the nodes of one cluster; a connection goes to the first of
them that answers (pika's connection workflow tries them in turn), and after a connection is lost
the transport tries the others before the one it lost. The vhost is the URL-quoted path (`%2F` for
`/`). Query options are pika's URLParameters (`heartbeat`, `socket_timeout`, `ssl_options`, ...;
docs/transports.md lists them), applied to every host; this transport changes only the defaults in
CONNECTION_DEFAULTS, and a URL that gives one keeps its own value. TRANSPORT_OPTIONS are this
transport's own and are not pika's.

TLS (`amqps://`) takes the options of RabbitMQ's own URI spec, TLS_OPTIONS: `cacertfile` (the CA
that signed the brokers' certificates; the system's CAs when not given), `certfile` and `keyfile`
(this client's certificate, for brokers that require one), `server_name_indication` (the name the
brokers' certificates carry, when it is not the host of the URL). The broker's certificate is
always verified, and its name checked against the host.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika

from scheduler.config import bounded_int, redact
from scheduler.errors import ConfigurationError
from scheduler.transports.rabbitmq.topology import DEAD_MAXLEN

#: pika options this transport sets unless the URL gives them:
#: - heartbeat: the broker closes a connection that has been silent for two to three heartbeat
#:   timeouts, and hands that connection's unacked deliveries to other consumers: it bounds how long
#:   a frozen worker (a long GC pause, a stopped VM) holds its timers, here to 12 s. A healthy
#:   worker is never silent: its I/O thread sends a heartbeat every half timeout whatever its batch
#:   is doing, so a busy worker keeps its connection.
#: - socket_timeout, stack_timeout: a dead node must not stall schedule() or a failover for long
#:   before the next host is tried.
CONNECTION_DEFAULTS: dict[str, Any] = {
    "heartbeat": 4,
    "socket_timeout": 3.0,
    "stack_timeout": 6.0,
    "blocked_connection_timeout": 30.0,
}

#: this transport's own query options: name → (lowest, highest)
TRANSPORT_OPTIONS: dict[str, tuple[int, int]] = {
    # `x-quorum-initial-group-size` of every quorum queue the transport declares: how many nodes
    # hold a replica. Not given, the broker decides (its `quorum_cluster_size`, 3 by default: every
    # node of a 3-node cluster, 3 nodes of a larger one).
    "quorum_group_size": (1, 99),
    # `x-max-length` of the dead-letter queue, which drops its oldest messages beyond it. It takes
    # effect when the queue is first declared; an existing queue keeps its own (docs/transports.md).
    "dead_maxlen": (1, 1_000_000_000),
}

#: TLS options of an amqps:// URL (RabbitMQ's URI spec names), read by this transport, not by pika
TLS_OPTIONS = ("cacertfile", "certfile", "keyfile", "server_name_indication")

_HOST = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]/]+)(?::(?P<port>[^:]*))?$")


@dataclass(frozen=True)
class RabbitMQOptions:
    #: one connection parameter set per host, in the URL's order
    hosts: list[pika.URLParameters]
    #: replicas of each quorum queue; None leaves it to the broker
    quorum_group_size: int | None = None
    #: most messages the dead-letter queue keeps
    dead_maxlen: int = DEAD_MAXLEN


def rabbitmq_options(broker_url: str) -> RabbitMQOptions:
    """The URL's hosts and options; ConfigurationError names what is wrong (never the password)."""
    shown = redact(broker_url)
    parts = urlsplit(broker_url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(f"bad RabbitMQ URL {shown!r}: the scheme must be amqp or amqps")
    credentials, at, host_list = parts.netloc.rpartition("@")
    if not host_list:
        raise ConfigurationError(f"bad RabbitMQ URL {shown!r}: no host")
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {name for name, _ in query}
    own = {name: value for name, value in query if name in TRANSPORT_OPTIONS}
    tls = {name: value for name, value in query if name in TLS_OPTIONS}
    ours = {*TRANSPORT_OPTIONS, *TLS_OPTIONS}
    pika_query = urlencode([(name, value) for name, value in query if name not in ours])
    context = _tls_context(tls, shown) if parts.scheme == "amqps" and tls else None
    if tls and parts.scheme != "amqps":
        raise ConfigurationError(f"bad RabbitMQ URL {shown!r}: {', '.join(sorted(tls))} need the amqps:// scheme")
    hosts = []
    for entry in host_list.split(","):
        address = _address(entry.strip(), shown)
        url = urlunsplit((parts.scheme, f"{credentials}{at}{address}", parts.path, pika_query, ""))
        params = _parameters(url, shown, given)
        if context is not None:
            params.ssl_options = pika.SSLOptions(context, tls.get("server_name_indication") or params.host)
        hosts.append(params)
    group_size = None
    if "quorum_group_size" in own:
        group_size = bounded_int(
            "rabbitmq", "quorum_group_size", own["quorum_group_size"], TRANSPORT_OPTIONS["quorum_group_size"]
        )
    dead_maxlen = DEAD_MAXLEN
    if "dead_maxlen" in own:
        dead_maxlen = bounded_int("rabbitmq", "dead_maxlen", own["dead_maxlen"], TRANSPORT_OPTIONS["dead_maxlen"])
    return RabbitMQOptions(hosts, group_size, dead_maxlen)


def _address(entry: str, shown: str) -> str:
    if not entry:
        raise ConfigurationError(f"bad RabbitMQ URL {shown!r}: an empty host in the host list")
    match = _HOST.match(entry)
    if match is None:
        raise ConfigurationError(f"bad RabbitMQ URL {shown!r}: {entry!r} is not host or host:port")
    port = match["port"]
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigurationError(f"bad RabbitMQ URL {shown!r}: port {port!r} of {match['host']} is not 1-65535")
    return entry


def _parameters(url: str, shown: str, given: set[str]) -> pika.URLParameters:
    try:
        params = pika.URLParameters(url)
    except ValueError as exc:
        raise ConfigurationError(f"bad RabbitMQ URL {shown!r}: {exc}") from None
    for name, value in CONNECTION_DEFAULTS.items():
        if name not in given:
            setattr(params, name, value)
    return params


def _tls_context(tls: dict[str, str], shown: str) -> ssl.SSLContext:
    """One client context for every host: the broker's certificate verified against `cacertfile` (or
    the system's CAs) and its name checked; this client's certificate when `certfile` is given."""
    if "keyfile" in tls and "certfile" not in tls:
        raise ConfigurationError(f"bad RabbitMQ URL {shown!r}: keyfile needs certfile (the client certificate)")
    try:
        context = ssl.create_default_context(cafile=tls.get("cacertfile") or None)
        if "certfile" in tls:
            context.load_cert_chain(tls["certfile"], tls.get("keyfile") or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"bad RabbitMQ URL {shown!r}: TLS files: {exc}") from None
    return context
