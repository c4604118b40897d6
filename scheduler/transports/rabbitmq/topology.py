"""The RabbitMQ timer: a binary cascade of TTL queues (NServiceBus, kombu's native delayed delivery).

A timer's delay is a whole number of ticks of TICK_MS. Level n is one quorum queue in
which every message waits TICK_MS·2^n ms (`x-message-ttl`) and is then dead-lettered, at least
once, into level n's "expired" exchange. A timer visits the level of each set bit of its delay,
once each, and then the ready queue. Its routing key lists those levels and ends in `now`
(36000 ticks: `10.5.15.7.11.now`); the entry exchange routes on the first word, level
k's expired exchange on the word after `k`:

    publish ─▶ order_timeouts.timers ─"10.#"─▶ delay.10 ─TTL─▶ delay.10.expired ─"#.10.5.#"─▶ delay.05
        ─TTL─▶ … ─▶ delay.11 ─TTL─▶ delay.11.expired ─"#.11.now"─▶ order_timeouts.ready

Every queue has a single TTL, so it expires in arrival order and no timer waits behind a longer
one: a 60 s timer published before a 2 s one never holds it back. The delay is computed from the
message's absolute due time at publish, so a timer lands on time however late it is published.

Why a cascade rather than one TTL queue per distinct delay:
- The topology is fixed (LEVELS quorum queues) and declared at every connect. Per-delay queues
  multiply with the delays really used: the relay, jittered retries, `due_at` from callers and
  reschedules each make new ones, every one a Raft group; and `x-expires` does not count
  publishing as use, so a per-delay queue that keeps receiving timers still expires with them
  inside unless every publisher re-declares it in time.
- Its cost is hops: a timer passes one queue per set bit, and each hop is an at-least-once
  dead-letter that the broker does at a limited rate (CPU bound, whatever the number of queues).
  Hence the next two points.
- A timer is routed to reach the ready queue somewhat early, within a window before its due time,
  and the consumer holds it until due (scheduler/transports/rabbitmq/adapter.py). Within the window the
  delay with the fewest set bits is taken (`fewest_hops`): a 1 s window always holds a multiple of
  16 ticks, so the low bits cost nothing, and a delay under a few seconds is one hop. Arriving
  early also absorbs the hops' own backlog, which otherwise makes a timer late by as much (each
  TTL counts from the moment the timer entered its queue).
- The tick is 50 ms rather than a power of two: round delays have few set bits (30 min = 36000
  ticks, at most 5 hops, 4 with the window).

Choices made against a burst of timers due at once and a load of timers due over a spread of
time (the figures behind them are in docs/performance.md):
- Keys name the set levels, one word each, instead of one 0/1 word per level (NServiceBus): a
  key of LEVELS words makes topic matching the bottleneck of publishing.
- Each expired exchange routes straight to the next level, not through one exchange per zero bit.
- The visiting order is shuffled per timer. Highest bit first (NServiceBus) makes timers published
  together share their first hops and expire from the same queue at the same instant, so a
  burst's last hops all land together and make it late; lowest bit first piles every timer's small
  hops right after the publish, which makes a spread load late; shuffled, the hops spread out.

Delays beyond the cascade (about 38.8 days) are capped, and the consumer re-arms a timer that
arrives too early for what remains.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Any

from scheduler.transports.rabbitmq.keys import (
    RABBITMQ_TIMERS_EXCHANGE,
    RabbitMQNames,
    rabbitmq_delay_queue,
    rabbitmq_expired_exchange,
)

#: the cascade's resolution: delays are rounded up to whole ticks
TICK_MS = 50
#: levels 0 … LEVELS-1 wait 50 ms … 50 ms·2^25 (about 19.4 days); together about 38.8 days
LEVELS = 26
MAX_TICKS = (1 << LEVELS) - 1
#: the broker dead-letters a delivery returned this many times without an ack; set above the
#: handler's max_deliveries (default 10), so that normally the handler, which records the reason
#: in the registry, acts first
DELIVERY_LIMIT = 20
#: dead letters the dead-letter queue keeps by default (`dead_maxlen`); beyond it the oldest are
#: dropped (the registry keeps every dead timeout with its reason regardless)
DEAD_MAXLEN = 100_000

_AT_LEAST_ONCE: dict[str, Any] = {
    # At-least-once dead-lettering keeps a timer in its queue until the next queue has confirmed
    # it; RabbitMQ requires reject-publish overflow for that strategy.
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}


@dataclass(frozen=True)
class Exchange:
    name: str
    kind: str


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict, hash=False)
    #: the queue had fewer arguments in earlier releases: one that exists with other arguments is
    #: used as it is (with a warning) rather than refused, so that a deployment keeps working
    #: (link.py declares it on its own channel, where the broker's 406 does not end the connection)
    existing_may_differ: bool = False


@dataclass(frozen=True)
class Binding:
    queue: str
    exchange: str
    pattern: str


Declaration = Exchange | Queue | Binding


def delay_ms(level: int) -> int:
    return TICK_MS << level


@functools.lru_cache(maxsize=4096)
def _set_levels(ticks: int) -> tuple[str, ...]:
    return tuple(str(level) for level in range(ticks.bit_length()) if ticks >> level & 1)


def fewest_hops(earliest_ms: int, latest_ms: int) -> int:
    """The delay in ticks, between the two bounds (or 0 when `latest_ms` is not ahead), with the
    fewest set bits: the fewest hops. Clearing low bits from the latest fit is optimal: every
    number in range shares the bounds' common high bits and needs at most one bit more."""
    latest = latest_ms // TICK_MS
    if latest <= 0:
        return 0
    earliest = max(-(-earliest_ms // TICK_MS), 0)
    ticks = min(latest, MAX_TICKS)
    while ticks and ticks & (ticks - 1) >= earliest:
        ticks &= ticks - 1
    return ticks


def routing_key(ticks: int, names: RabbitMQNames | None = None) -> str:
    """The key of a timer to delay by `ticks`: the levels of its set bits, in random order, then `now`
    and the deployment's identity (RabbitMQNames.last_words)."""
    levels = list(_set_levels(ticks))
    random.shuffle(levels)
    return ".".join([*levels, (names or RabbitMQNames()).last_words])


def bindings(names: RabbitMQNames | None = None) -> list[Binding]:
    """Entry: to the queue of the key's first level. After level k: to the level that follows k, or ready.

    Keys are short (one word per set bit), so each topic match is cheap: a key with one word per
    level (NServiceBus's layout) makes the topic exchange the bottleneck of publishing.
    """
    names = names or RabbitMQNames()
    ready, last = names.ready, names.last_words
    result = [Binding(rabbitmq_delay_queue(j), RABBITMQ_TIMERS_EXCHANGE, f"{j}.#") for j in range(LEVELS)]
    result.append(Binding(ready, RABBITMQ_TIMERS_EXCHANGE, last))
    for k in range(LEVELS):
        after = rabbitmq_expired_exchange(k)
        result += [Binding(rabbitmq_delay_queue(j), after, f"#.{k}.{j}.#") for j in range(LEVELS) if j != k]
        result.append(Binding(ready, after, f"#.{k}.{last}"))
    return result


def declarations(
    quorum_group_size: int | None = None, dead_maxlen: int = DEAD_MAXLEN, names: RabbitMQNames | None = None
) -> list[Declaration]:
    """Everything the transport needs, in an order that can be declared idempotently at every connect.

    Every queue is a quorum queue, replicated on `quorum_group_size` nodes of the cluster, or as
    many as the broker decides when None (`x-quorum-initial-group-size`). The broker compares the
    arguments of a queue that exists already: a deployment must declare them alike everywhere.
    The dead-letter queue keeps at most `dead_maxlen` messages, dropping the oldest; a dead-letter
    queue declared by an earlier release (no bound) or with another bound keeps what it has, and a
    policy (`max-length`) bounds it instead (docs/transports.md).
    """
    names = names or RabbitMQNames()
    replicas: dict[str, Any] = {"x-queue-type": "quorum"}
    if quorum_group_size is not None:
        replicas["x-quorum-initial-group-size"] = quorum_group_size
    exchanges: list[Declaration] = [Exchange(RABBITMQ_TIMERS_EXCHANGE, "topic")]
    exchanges += [Exchange(rabbitmq_expired_exchange(k), "topic") for k in range(LEVELS)]
    queues: list[Declaration] = [
        Queue(
            rabbitmq_delay_queue(k),
            {
                **replicas,
                **_AT_LEAST_ONCE,
                "x-message-ttl": delay_ms(k),
                "x-dead-letter-exchange": rabbitmq_expired_exchange(k),
            },
        )
        for k in range(LEVELS)
    ]
    ready = Queue(
        names.ready,
        {
            **replicas,
            **_AT_LEAST_ONCE,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": names.dead,
        },
    )
    dead: list[Declaration] = [
        Exchange(names.dead, "fanout"),
        Queue(
            names.dead,
            {**replicas, "x-max-length": dead_maxlen, "x-overflow": "drop-head"},
            existing_may_differ=True,
        ),
        Binding(names.dead, names.dead, ""),
    ]
    # One marker at most: the newest is kept.
    marker = Queue(names.marker, {**replicas, "x-max-length": 1, "x-overflow": "drop-head"})
    return [*dead, ready, marker, *exchanges, *queues, *bindings(names)]


def figure_queues(names: RabbitMQNames | None = None) -> dict[str, str]:
    """Label → queue name, for `stats`."""
    names = names or RabbitMQNames()
    labels = {"ready": names.ready, "dead_letters": names.dead}
    labels.update({f"delay_{delay_ms(k) / 1000:g}s": rabbitmq_delay_queue(k) for k in range(LEVELS)})
    return labels
