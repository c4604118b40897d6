"""The transport port: the timer and the delivery. One adapter module per broker.

The worker loop in `consumers/` sees only this interface. The consumer side works in three steps:
`receive` a batch (outside any database transaction), let the handler claim and settle it in one
registry transaction, then `settle` with the broker (ack, retry later, dead-letter) after commit.
Only the worker loop calls `settle`; the handler never touches the broker (dramatiq's rule).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection

from scheduler.errors import MalformedMessage
from scheduler.registry import MAX_ORDER_ID_LENGTH


@dataclass(frozen=True)
class TimerMessage:
    """What a broker carries: small JSON, never pickle."""

    order_id: str
    due_ms: int
    version: int

    def encode(self) -> bytes:
        return json.dumps({"order_id": self.order_id, "due_ms": self.due_ms, "version": self.version}).encode()

    @classmethod
    def decode(cls, body: bytes | str) -> TimerMessage:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedMessage(f"body is not JSON: {exc}") from None
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: object) -> TimerMessage:
        """The message from its decoded JSON; MalformedMessage names what is wrong."""
        if not isinstance(data, dict):
            raise MalformedMessage("body is not a JSON object")
        order_id, due_ms, version = data.get("order_id"), data.get("due_ms"), data.get("version")
        if not isinstance(order_id, str) or not order_id or len(order_id) > MAX_ORDER_ID_LENGTH:
            raise MalformedMessage("order_id must be a non-empty string of at most 255 characters")
        for name, value in (("due_ms", due_ms), ("version", version)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MalformedMessage(f"{name} must be a non-negative integer")
        assert isinstance(due_ms, int) and isinstance(version, int)
        return cls(order_id, due_ms, version)


@dataclass(frozen=True)
class Delivery:
    """One message handed to this worker; `receipt` is the adapter's handle for ack/nack."""

    message: TimerMessage
    receipt: Any = None
    deliveries: int = 1  #: how many times the broker has delivered it, where it knows


@dataclass
class Batch:
    deliveries: list[Delivery] = field(default_factory=list)
    #: the `sql` transport delivers nothing itself: it asks the handler to claim up to this many
    #: due registry rows inside the batch transaction (FOR UPDATE SKIP LOCKED)
    claim_due: int = 0

    def __bool__(self) -> bool:
        return bool(self.deliveries) or self.claim_due > 0


@dataclass
class Settlement:
    """What the handler decided for a batch, for the transport to carry out after commit."""

    done: list[Delivery] = field(default_factory=list)  #: ack: handled, duplicate or stale
    retry: list[tuple[Delivery, TimerMessage]] = field(default_factory=list)  #: re-arm at a later due, then ack
    dead: list[tuple[Delivery, str]] = field(default_factory=list)  #: dead-letter with the reason, then ack
    failed: list[Delivery] = field(default_factory=list)  #: the transaction failed: deliver again
    claimed: int = 0  #: registry rows this batch took
    rolled_back: bool = False  #: the batch transaction failed; nothing it decided holds


class Transport(Protocol):
    """A timer and a delivery channel for timeouts. Adapters raise TransportUnavailable, not library errors."""

    #: short name shown by the CLI: sql, redis, rabbitmq, rq
    name: str
    #: True when the registry table is the queue: rows count as published when written
    registry_is_queue: bool

    def notify_scheduled(self, conn: Connection, earliest_due_ms: int) -> None:
        """Inside the scheduling transaction: wake sleeping workers if this is sooner than they expect."""
        ...

    def publish(self, messages: Sequence[TimerMessage]) -> None:
        """Hand timers to the broker and return once it has confirmed all of them (raise otherwise)."""
        ...

    def revoke(self, order_ids: Sequence[str]) -> None:
        """Best-effort removal of timers (the registry already says revoked; a late copy is acked as stale)."""
        ...

    def receive(self, limit: int, timeout: float) -> Batch:
        """Wait at most `timeout` seconds for due timeouts and return up to `limit` of them."""
        ...

    def settle(self, settlement: Settlement) -> None:
        """Ack, re-arm, dead-letter or release what a batch decided, after its commit."""
        ...

    def figures(self) -> dict[str, Any]:
        """Broker-side depths and lags for `stats` (empty for figures the registry already gives)."""
        ...

    def close(self) -> None: ...
