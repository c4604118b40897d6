"""The rabbitmq transport's producer side for the asyncio API.

The synchronous transport already talks AMQP asynchronously: one link runs pika's SelectConnection
on an I/O thread of its own, with a window of publisher confirms (link.py). The asyncio API hands
its publishes to that same link and awaits their confirms (`Link.publish_async`): the same topology,
routes, envelopes and failover, no second AMQP client to keep in step, and heartbeats that do not
depend on the order service's event loop staying responsive. Only connecting (the AMQP handshake
and the topology's declarations) runs in a worker thread, once per link.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from scheduler.transports.base import AsyncPublisher
from scheduler.transports.message import TimerMessage

if TYPE_CHECKING:
    from scheduler.transports.rabbitmq.adapter import RabbitMQTransport


class RabbitMQAsyncPublisher(AsyncPublisher):
    def __init__(self, transport: RabbitMQTransport) -> None:
        self._transport = transport

    async def publish(self, messages: Sequence[TimerMessage]) -> None:
        if not messages:
            return
        from scheduler.transports.rabbitmq.adapter import CONFIRM_TIMEOUT_S

        transport = self._transport
        link = transport._live_link()
        if link is None:
            link = await asyncio.to_thread(transport._connected)
        await link.publish_async(transport._timers(messages), CONFIRM_TIMEOUT_S)

    async def revoke(self, order_ids: Sequence[str]) -> None:
        """Nothing to remove, as `RabbitMQTransport.revoke`."""

    async def aclose(self) -> None:
        """The link is the transport's: `AsyncOrderTimeouts.close` closes it with the transport."""
