"""The HTTP order store: the worker asks the order service itself, one request per batch and step.

    ORDER_TIMEOUTS_ORDER_STORE=https://orders.internal/order-timeouts
    ORDER_TIMEOUTS_ORDER_STORE_TOKEN=…        # optional: sent as `Authorization: Bearer …`
    ORDER_TIMEOUTS_ORDER_STORE_TIMEOUT=4s     # optional: the longest wait to connect, send or read

For an order service that owns its orders behind an API (its own database, its own side effects
of a cancel: stock, e-mails, refunds). The service implements two endpoints under that base URL:

    POST <base>/payment-status   {"order_ids": ["A", "B"]}
        200 {"orders": {"A": "unpaid", "B": "paid"}}
            each status one of unpaid, paid, cancelled, unknown; an id left out is unknown

    POST <base>/cancel           {"order_ids": ["A"], "cancelled_at": "2026-11-21T09:30:00.123+00:00",
                                  "reason": "payment timeout"}
         Idempotency-Key: order-timeouts-<hash of the sorted order ids>
        200 {"cancelled": ["A"]}
            cancel each order that is still unpaid, conditionally (a payment that came first
            wins), and answer the ids this request cancelled

The cancel is at-least-once: a worker that dies after the service cancelled but before the
registry committed hands the batch on, and the same order ids come again. The service's condition
(only an unpaid order is cancelled) makes that a no-op, and the next worker finds the order
`cancelled` at its status query. The Idempotency-Key (the same for the same orders) lets a service
that keeps keys answer a repeated request as it answered the first.

What the worker does with the answers is the handler's. Nothing but an answer is a reason to
cancel. A request that fails as a whole (refused or reset connection, timeout, any status but 200,
an answer that is not this protocol) raises OrderStoreUnavailable: an outage, after which the batch
is handed back whole, spends no attempt, and the worker backs off; the reason quotes the service's
own words. Only `unknown` for an order (or the order left out) spends one of its attempts.
`http://user:password@host/…` sends basic auth; the password and the token never appear in logs or
output.

A batch makes at most two requests, each giving up after the timeout, with one immediate retry of
a connection that could not be made: with the default 4 s a batch waits on the service for about
8 s at worst, within the 12 s after which PostgreSQL ends an idle batch transaction.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import Connection

from consumers.orders import PaymentStatus
from scheduler.clock import parse_duration
from scheduler.config import redact
from scheduler.errors import ConfigurationError, InvalidTimeout, OrderStoreUnavailable

#: the logger's name is part of the output that operators filter on
log = logging.getLogger("order_timeouts.orders_http")

ENV_ORDER_STORE_TOKEN = "ORDER_TIMEOUTS_ORDER_STORE_TOKEN"
ENV_ORDER_STORE_TIMEOUT = "ORDER_TIMEOUTS_ORDER_STORE_TIMEOUT"
#: the longest wait for each phase of a request (connect, send, each read of the answer)
TIMEOUT_S = 4.0
#: the longest timeout ORDER_TIMEOUTS_ORDER_STORE_TIMEOUT accepts
MAX_TIMEOUT_S = 60.0
#: a connection that could not be made is tried again this often, at once, before the request fails
CONNECT_RETRIES = 1
#: the longest answer excerpt quoted in a reason
EXCERPT = 200
CANCEL_REASON = "payment timeout"


class HttpOrderStore:
    """Payment status and conditional cancel through the order service's HTTP API (module docstring)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        try:
            url = httpx.URL(base_url)
            valid = url.scheme in ("http", "https") and bool(url.host) and 0 < (url.port or 80) < 65536
        except httpx.InvalidURL:
            valid = False
        if not valid:
            raise ConfigurationError(f"order store URL {redact(base_url)!r}: give http://host/… or https://host/…")
        self.url = redact(base_url)
        headers = {"User-Agent": "order-timeouts"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            base_url=url.copy_with(path=url.path.rstrip("/") + "/"),
            headers=headers,
            timeout=timeout_s,
            transport=transport or httpx.HTTPTransport(retries=CONNECT_RETRIES),
        )

    def payment_status(self, conn: Connection, order_ids: Sequence[str]) -> dict[str, PaymentStatus]:
        if not order_ids:
            return {}
        answer = self._post("payment-status", {"order_ids": list(order_ids)}, "orders", dict)
        statuses: dict[str, PaymentStatus] = {}
        for order_id in order_ids:
            value = answer.get(order_id)
            try:
                statuses[order_id] = PaymentStatus(value)
            except ValueError:
                if value is not None:
                    log.warning("order %s: the order service answered status %r, taken as unknown", order_id, value)
                statuses[order_id] = PaymentStatus.UNKNOWN
        return statuses

    def cancel_unpaid(self, conn: Connection, order_ids: Sequence[str], now: datetime) -> set[str]:
        if not order_ids:
            return set()
        body = {"order_ids": list(order_ids), "cancelled_at": now.isoformat(), "reason": CANCEL_REASON}
        answer = self._post("cancel", body, "cancelled", list, idempotency_key(order_ids))
        asked = set(order_ids)
        cancelled = {order_id for order_id in answer if order_id in asked}
        if len(cancelled) != len(answer):
            log.warning("the order service answered cancels of orders it was not asked to cancel; ignored")
        return cancelled

    def probe(self) -> None:
        """Ask for the status of no orders: OrderStoreUnavailable unless the service answers as it should."""
        self._post("payment-status", {"order_ids": []}, "orders", dict)

    def close(self) -> None:
        self._client.close()

    def _post(self, path: str, body: dict[str, Any], field: str, kind: type, key: str | None = None) -> Any:
        """POST `body` to `path` and return the answer's `field`, or raise OrderStoreUnavailable."""
        headers = {"Idempotency-Key": key} if key else None
        try:
            response = self._client.post(path, json=body, headers=headers)
        except httpx.HTTPError as exc:  # refused, reset, timed out, ...
            raise OrderStoreUnavailable(f"order service {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != httpx.codes.OK:
            excerpt = response.text[:EXCERPT].strip()
            raise OrderStoreUnavailable(f"order service {path}: HTTP {response.status_code}: {excerpt}")
        try:
            value = response.json()[field]
        except (ValueError, KeyError, TypeError):
            value = None
        if not isinstance(value, kind):
            raise OrderStoreUnavailable(f"order service {path}: the answer has no {field!r} {kind.__name__}")
        return value


def idempotency_key(order_ids: Sequence[str]) -> str:
    """The same key for the same orders, in any order: a batch that comes again is the same request."""
    digest = hashlib.sha256("\n".join(sorted(set(order_ids))).encode()).hexdigest()
    return f"order-timeouts-{digest[:32]}"


def from_env(base_url: str) -> HttpOrderStore:
    """The store of ORDER_TIMEOUTS_ORDER_STORE=http(s)://…, with the token and timeout from the environment."""
    return HttpOrderStore(base_url, token=os.environ.get(ENV_ORDER_STORE_TOKEN) or None, timeout_s=timeout_from_env())


def timeout_from_env() -> float:
    """ORDER_TIMEOUTS_ORDER_STORE_TIMEOUT in seconds (a duration like the CLI's --delay: 4s, 1500ms)."""
    raw = os.environ.get(ENV_ORDER_STORE_TIMEOUT)
    if not raw:
        return TIMEOUT_S
    try:
        seconds = parse_duration(raw).total_seconds()
    except InvalidTimeout:
        seconds = 0.0
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ConfigurationError(
            f"{ENV_ORDER_STORE_TIMEOUT} must be a duration like 4s or 1500ms, above 0 and at most "
            f"{MAX_TIMEOUT_S:g}s; got {raw!r}"
        )
    return seconds
