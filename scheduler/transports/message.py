"""What a broker carries for one timeout: small JSON, never pickle."""

from __future__ import annotations

import json
from dataclasses import dataclass

from scheduler.errors import MalformedMessage
from scheduler.registry import MAX_ORDER_ID_LENGTH


@dataclass(frozen=True)
class TimerMessage:
    """The order, its due time in epoch milliseconds, and the registry version it was published for."""

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
            raise MalformedMessage(f"order_id must be a non-empty string of at most {MAX_ORDER_ID_LENGTH} characters")
        for name, value in (("due_ms", due_ms), ("version", version)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MalformedMessage(f"{name} must be a non-negative integer")
        assert isinstance(due_ms, int) and isinstance(version, int)
        return cls(order_id, due_ms, version)
