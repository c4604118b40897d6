"""An order service with the HTTP API of consumers/orders/http.py, on loopback, for its tests.

Its orders are in a database of its own (a SQLite file with an `orders` table and the demo's
cancel log), apart from the registry, as a real order service's are: a cancel commits in the
service, not in the worker's batch transaction. It records each request, and a test can make it
fail, pause, do something (a payment) just before it cancels, or go away and come back on the same
port (`stop`, `start`: connections are refused meanwhile).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine

from consumers.orders.sql import SqlOrderStore
from scheduler.config import OrdersTableNames
from scheduler.schema import orders_table
from scheduler.testing import install_cancel_log


@dataclass
class Request:
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class OrderService:
    engine: Engine
    url: str = ""
    requests: list[Request] = field(default_factory=list)
    #: answer every request with this HTTP status and body instead
    failing: tuple[int, str] | None = None
    #: called with the order ids just before the cancel (a payment that races it)
    before_cancel: Callable[[list[str]], None] | None = None
    #: set once a cancel has committed; the answer then waits `hold_s` seconds
    cancelled: threading.Event = field(default_factory=threading.Event)
    hold_s: float = 0.0
    #: serves on 127.0.0.1:`port` while started
    serve: Callable[[], ThreadingHTTPServer] | None = None
    server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        """Listen (again, after `stop`) on the service's port."""
        assert self.serve is not None and self.server is None
        self.server = self.serve()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Close the listening socket: connections are refused until `start`."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def answer(self, path: str, body: Any) -> tuple[int, Any]:
        store = SqlOrderStore(OrdersTableNames(), engine=self.engine)
        if path.endswith("/payment-status"):
            statuses = store.payment_status(None, body["order_ids"])  # type: ignore[arg-type]
            return 200, {"orders": {order_id: status.value for order_id, status in statuses.items()}}
        if path.endswith("/cancel"):
            if self.before_cancel is not None:
                self.before_cancel(body["order_ids"])
            at = datetime.fromisoformat(body["cancelled_at"])
            cancelled = store.cancel_unpaid(None, body["order_ids"], at)  # type: ignore[arg-type]
            self.cancelled.set()
            time.sleep(self.hold_s)
            return 200, {"cancelled": sorted(cancelled)}
        return 404, {"error": f"no such endpoint {path}"}

    def of(self, endpoint: str) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/" + endpoint)]


@contextmanager
def order_service(directory: Path, base_path: str = "/api/order-timeouts") -> Iterator[OrderService]:
    """The service, its database in `directory`, listening on a free loopback port until the block ends."""
    engine = create_engine(f"sqlite:///{directory / 'order-service.sqlite3'}")
    orders_table(OrdersTableNames()).create(engine)
    install_cancel_log(engine)
    service = OrderService(engine)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.loads(raw) if raw else None
            service.requests.append(Request(self.path, body, dict(self.headers)))
            if service.failing is not None:
                status, text = service.failing
                self._send(status, text.encode())
                return
            status, answer = service.answer(self.path, body)
            self._send(status, json.dumps(answer).encode())

        def _send(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    port = 0

    def serve() -> ThreadingHTTPServer:
        nonlocal port
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)  # reuses the address: a restart binds
        server.daemon_threads = True
        port = server.server_address[1]
        return server

    service.serve = serve
    service.start()
    service.url = f"http://127.0.0.1:{port}{base_path}"
    try:
        yield service
    finally:
        service.stop()
        engine.dispose()
