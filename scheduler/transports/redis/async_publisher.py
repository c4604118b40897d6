"""The redis transport's producer side for the asyncio API: redis.asyncio, the commands of `publish`.

The commands are queued by the transport's own steps (`RedisTransport._queue_timers`, `_wake_plan`,
`_queue_wake`, `_move_call`), so a timer published from asyncio code lands exactly as one published
by `OrderTimeouts`; only the client differs. One client per publisher, connected on first use.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from scheduler.transports.base import AsyncPublisher
from scheduler.transports.message import TimerMessage
from scheduler.transports.redis.options import connect

if TYPE_CHECKING:
    from scheduler.transports.redis.adapter import RedisTransport


class RedisAsyncPublisher(AsyncPublisher):
    def __init__(self, transport: RedisTransport, url: str) -> None:
        self._transport = transport
        self._url = url
        self._client: Any = None
        self._move: Any = None

    async def publish(self, messages: Sequence[TimerMessage]) -> None:
        """ZADD in one pipeline; confirmed when the pipeline has returned."""
        transport = self._transport
        due_by_shard = transport._by_shard(messages)
        if not due_by_shard:
            return
        await self._bind()
        with transport._edge("publish"):
            client = self._redis()
            pipe = client.pipeline(transaction=False)
            transport._queue_timers(pipe, due_by_shard)
            now, due_now, wake = transport._wake_plan(due_by_shard, await pipe.execute())
            for shard in due_now:
                # Due already: moving it into the stream wakes a reader (one script call per shard,
                # whose keys may live on a node of their own in a cluster).
                keys, args = transport._move_call(shard, now)
                await self._move(keys=keys, args=args)
            if wake:
                pipe = client.pipeline(transaction=False)
                transport._queue_wake(pipe, wake)
                await pipe.execute()

    async def revoke(self, order_ids: Sequence[str]) -> None:
        if order_ids:
            await self._bind()
            with self._transport._edge("revoke"):
                pipe = self._redis().pipeline(transaction=False)
                self._transport._queue_revoke(pipe, order_ids)
                await pipe.execute()

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def _bind(self) -> None:
        """The key names carry the deployment's identity, read from the registry once per transport:
        in a worker thread, so that the first publish does not block the event loop on a query."""
        if not self._transport.bound:
            await asyncio.to_thread(self._transport._bind)

    def _redis(self) -> Any:
        if self._client is None:
            from scheduler.transports.redis.adapter import MOVE_SCRIPT

            self._client = connect(self._url, self._transport.options, asyncio=True)
            self._move = self._client.register_script(MOVE_SCRIPT)
        return self._client
