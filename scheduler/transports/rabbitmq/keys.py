"""Every RabbitMQ exchange, queue and header name the rabbitmq transport uses."""

from __future__ import annotations

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
