"""Every RabbitMQ exchange, queue and header name the rabbitmq transport uses."""

from __future__ import annotations

from dataclasses import dataclass

#: first part of the names that belong to one deployment (RabbitMQNames); the cascade is shared
RABBITMQ_NAMESPACE = "order_timeouts"
#: topic exchange every timer is published to; routes it to the delay queue of the first level its
#: routing key names (levels in random order), or to the ready queue when the key is only `now`
RABBITMQ_TIMERS_EXCHANGE = "order_timeouts.timers"
#: quorum queue the workers consume: timers whose delay has run out
RABBITMQ_READY_QUEUE = "order_timeouts.ready"
#: fanout exchange and quorum queue of dead letters (malformed, poison, given up), reason in a header
RABBITMQ_DEAD_EXCHANGE = "order_timeouts.dead"
RABBITMQ_DEAD_QUEUE = "order_timeouts.dead"
#: quorum queue holding one marker message while the broker holds the timers the relay published
#: (see RabbitMQTransport.lost_timers): a broker whose queues were lost comes back without it
RABBITMQ_MARKER_QUEUE = "order_timeouts.marker"
#: header of a dead letter that says why it was dead-lettered
RABBITMQ_REASON_HEADER = "order-timeouts-reason"
#: header: deliveries a timer had before it was published again on its own (a dead letter, a split message)
RABBITMQ_DELIVERIES_HEADER = "order-timeouts-deliveries"


def rabbitmq_delay_queue(level: int) -> str:
    """Level `level` of the TTL cascade: holds timers for TICK_MS·2^level ms (topology.py)."""
    return f"order_timeouts.delay.{level:02d}"


def rabbitmq_expired_exchange(level: int) -> str:
    """Topic exchange the delay queue of `level` dead-letters into: routes to the level that follows
    `level` in the timer's routing key, or to the ready queue after the last one."""
    return f"order_timeouts.delay.{level:02d}.expired"


@dataclass(frozen=True)
class RabbitMQNames:
    """The names that belong to one deployment: its ready, dead-letter and marker queues, under
    `order_timeouts.<identity>.` (registry/control.py), and the last word of its routing keys.

    The cascade (timers exchange, delay queues, expired exchanges) is shared by every deployment on the
    vhost: it only delays, and a timer's routing key ends in its deployment's identity, which the
    ready queue bindings of that deployment alone match. Without an identity (a transport built without
    a registry), the names are those of releases before identities: the constants above.
    """

    deployment: str | None = None

    @property
    def namespace(self) -> str:
        return RABBITMQ_NAMESPACE if self.deployment is None else f"{RABBITMQ_NAMESPACE}.{self.deployment}"

    @property
    def ready(self) -> str:
        return f"{self.namespace}.ready"

    @property
    def dead(self) -> str:
        """The dead-letter exchange (fanout) and its queue, of the same name."""
        return f"{self.namespace}.dead"

    @property
    def marker(self) -> str:
        return f"{self.namespace}.marker"

    @property
    def last_words(self) -> str:
        """How every routing key of this deployment ends: `now`, then the identity."""
        return "now" if self.deployment is None else f"now.{self.deployment}"
