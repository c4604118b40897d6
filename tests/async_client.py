"""`AsyncOrderTimeouts` driven from synchronous test code, so that one test body holds both APIs to
the same contract (the `client` fixtures of tests/contract and tests/integration/test_api.py)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any

from scheduler import AsyncOrderTimeouts

#: the APIs the producer-side tests run against
APIS = ["sync", "async"]


class BlockingAsyncClient:
    """Each awaitable method of the wrapped client runs on an event loop of this wrapper's own
    thread and is waited for; every other attribute (settings, clock) is the client's own.

    The loop lives as long as the client: the asyncio drivers' pooled connections belong to it."""

    def __init__(self, client: AsyncOrderTimeouts) -> None:
        self.inner = client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="async-client", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        def blocking(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run_coroutine_threadsafe(attribute(*args, **kwargs), self._loop).result()

        return blocking

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.inner.close(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
