"""What a broker carries for one timeout: small JSON, never pickle."""

from __future__ import annotations

import json
from dataclasses import dataclass

from scheduler.errors import MalformedMessage
from scheduler.registry import MAX_ORDER_ID_LENGTH

#: longest deployment identity a message may carry (the control table's own are 12 characters)
MAX_DEPLOYMENT = 64


@dataclass(frozen=True)
class TimerMessage:
    """The order, its due time in epoch milliseconds, the registry version it was published for, and
    the deployment (registry/control.py) whose registry holds it: None in messages of releases before
    identities, which are taken as this deployment's."""

    order_id: str
    due_ms: int
    version: int
    deployment: str | None = None

    def encode(self) -> bytes:
        data: dict[str, object] = {"order_id": self.order_id, "due_ms": self.due_ms, "version": self.version}
        if self.deployment is not None:
            data["deployment"] = self.deployment
        return json.dumps(data).encode()

    def foreign_to(self, deployment: str | None) -> bool:
        """Whether this timer belongs to another deployment's registry than `deployment` (None: unbound)."""
        return deployment is not None and self.deployment is not None and self.deployment != deployment

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
        deployment = data.get("deployment")
        if deployment is not None and (not isinstance(deployment, str) or not 0 < len(deployment) <= MAX_DEPLOYMENT):
            raise MalformedMessage(f"deployment must be a non-empty string of at most {MAX_DEPLOYMENT} characters")
        return cls(order_id, due_ms, version, deployment)
