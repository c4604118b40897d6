"""The handler: one registry transaction per batch, payment checked once, conditional cancel.

    claim registry rows ─▶ payment status (one query) ─▶ cancel unpaid (one conditional update)
        ─▶ record outcomes ─▶ commit            (the worker loop then settles with the broker)

Exactly-once in effect comes from at-least-once delivery plus this idempotency: the claim only
takes rows still pending and due, so a duplicate, revoked or stale delivery claims nothing and is
acked; a crash before commit rolls everything back and the delivery comes again.

A paused fleet (scheduler/registry/control.py) decides nothing: the pause row is read first in the
batch transaction (one primary-key read), and a batch that finds it is handed back whole the same
way, claiming nothing, so the timers stay pending and due and spend neither attempts nor deliveries.
In shadow mode the unpaid orders are recorded `would_cancel` and the order store's cancel is never
called.

An order store that cannot answer (unreachable, failing as a whole) is an outage, not an answer
about the orders: the batch is rolled back and handed back whole, no attempt is spent and nothing
is dead-lettered, and the worker backs off. Attempts count only answers about an order: the store
answered, and said `unknown` for it (or left it out).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from consumers.breaker import Breaker
from consumers.orders import OrderStore, PaymentStatus
from scheduler import registry, tracing
from scheduler.clock import Clock, from_ms
from scheduler.config import Mode, Settings
from scheduler.errors import OrderStoreUnavailable
from scheduler.outage import first_line
from scheduler.outbox import Outbox
from scheduler.registry import Claim, Outcome, Retry, control
from scheduler.registry.control import Pause
from scheduler.transports.base import Batch, Delivery, Settlement, TimerMessage

log = logging.getLogger("order_timeouts.handler")


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for timeouts whose payment status the order store answered as unknown."""

    max_attempts: int = 5
    #: broker deliveries without an ack (the worker died handling it) before it is dead-lettered
    max_deliveries: int = 10
    base_s: float = 2.0
    cap_s: float = 300.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_attempts=settings.max_attempts,
            max_deliveries=settings.max_deliveries,
            base_s=settings.retry_backoff.total_seconds(),
            cap_s=settings.retry_backoff_cap.total_seconds(),
        )

    def delay_ms(self, attempts: int) -> int:
        delay = min(self.cap_s, self.base_s * 2 ** max(attempts - 1, 0))
        # Jitter spreads a batch that failed together so that it does not retry as one burst.
        return int(delay * random.uniform(0.8, 1.2) * 1000)


@dataclass
class BatchReport:
    """What one batch did, for logs, metrics and the worker's summary."""

    claimed: int = 0
    cancelled: int = 0
    paid: int = 0
    already_cancelled: int = 0
    #: shadow mode: unpaid, not cancelled
    would_cancel: int = 0
    retried: int = 0
    dead: int = 0
    stale: int = 0
    #: delivered before their due time by the registry's clock: handed back to the transport
    early: int = 0
    #: batches handed back whole because the fleet is paused
    paused: int = 0
    #: pauses this batch's circuit breaker check started
    breaker_trips: int = 0
    #: claim time minus due time of each claimed timeout, for the lateness histogram
    lateness_ms: list[int] = field(default_factory=list)


class _StoreOutage(Exception):
    """Raised inside the batch transaction to roll it back: the order store did not answer."""


class _Paused(Exception):
    """Raised inside the batch transaction before the claim: the fleet is paused."""

    def __init__(self, pause: Pause) -> None:
        super().__init__(pause.reason)
        self.pause = pause


class Handler:
    def __init__(
        self,
        engine: Engine,
        store: OrderStore,
        *,
        clock: Clock,
        worker_id: str,
        outbox: Outbox,
        retry: RetryPolicy | None = None,
        mode: Mode = Mode.LIVE,
        breaker: Breaker | None = None,
        transport: str = "",
    ) -> None:
        self._engine = engine
        self._mode = mode
        self._breaker = breaker
        self._store = store
        self._clock = clock
        self.worker_id = worker_id
        self._outbox = outbox
        self._retry = retry or RetryPolicy()
        self._transport = transport  #: the transport's name, for the batch's span

    def handle(self, batch: Batch) -> tuple[Settlement, BatchReport]:
        attributes = {tracing.TRANSPORT: self._transport, tracing.COUNT: len(batch.deliveries)}
        with tracing.span("order-timeouts batch", kind="consumer", attributes=attributes) as step:
            settlement, report, traced = self._handle(batch)
            step.set_attribute(tracing.OUTCOME, "rolled back" if settlement.rolled_back else "committed")
            for claim, outcome in traced:
                # The scheduling request's trace, linked to the batch that fired its timeout.
                step.link(claim.trace_context, {tracing.ORDER_ID: claim.order_id, tracing.OUTCOME: outcome})
            if len(traced) == 1:
                step.set_attribute(tracing.ORDER_ID, traced[0][0].order_id)
        return settlement, report

    def _handle(self, batch: Batch) -> tuple[Settlement, BatchReport, list[tuple[Claim, str]]]:
        report = BatchReport()
        try:
            with self._engine.connect() as conn:
                transaction = conn.begin()  # closing the connection without a commit rolls it back
                # Before the claim, in the same transaction: a pause committed before this batch
                # began stops it, and one committed later stops the next.
                valves = control.read_valves(conn)
                if valves.pause is not None:
                    raise _Paused(valves.pause)
                now = self._clock.now_ms()
                with tracing.span("order-timeouts claim"):
                    claims = batch.claim(conn, now=now, worker=self.worker_id)
                early = self._early(conn, batch.deliveries, claims, now)
                report.claimed = len(claims)
                report.lateness_ms = [now - c.due_ms for c in claims]
                poison = self._poison(batch.deliveries, claims)
                outcomes, retries, dead = self._decide(conn, [c for c in claims if c.order_id not in poison], now)
                dead.update(poison)
                # Finished when the outcome is written, just before the commit: fired_ms says when
                # the batch claimed it, and the difference is the batch's own time.
                finished = self._clock.now_ms()
                registry.finish(conn, outcomes, now=finished)
                registry.retry_later(conn, retries, now=now, published=self._outbox.published_on_write)
                registry.bury(conn, dead, now=finished)
                with tracing.span("order-timeouts commit"):
                    transaction.commit()
        except _Paused as paused:
            # Handed back as a failed batch: fresh deliveries after FAILED_REDELIVERY_MS, no attempt spent.
            report.paused = 1
            return Settlement(failed=list(batch.deliveries), rolled_back=True, paused=paused.pause), report, []
        except _StoreOutage as outage:
            # Rolled back, claim and cancel included: the rows stay pending and due, their attempts
            # untouched. A cancel the store committed before failing is found `cancelled` next time.
            reason = f"order store: {outage.__cause__}"
            return Settlement(failed=list(batch.deliveries), rolled_back=True, unavailable=reason), report, []
        except SQLAlchemyError as exc:
            reason = f"registry database: {type(exc).__name__}: {first_line(exc)}"
            return Settlement(failed=list(batch.deliveries), rolled_back=True, unavailable=reason), report, []
        decided = {oid: outcome.value for oid, outcome in outcomes.items()}
        decided.update({r.order_id: "retried" for r in retries})
        decided.update(dict.fromkeys(dead, "dead"))
        traced = [(c, decided[c.order_id]) for c in claims if c.order_id in decided]
        for outcome in outcomes.values():
            if outcome is Outcome.CANCELLED:
                report.cancelled += 1
            elif outcome is Outcome.PAID:
                report.paid += 1
            elif outcome is Outcome.WOULD_CANCEL:
                report.would_cancel += 1
            else:
                report.already_cancelled += 1
        report.retried, report.dead = len(retries), len(dead)
        if self._breaker is not None:
            unpaid = report.cancelled + report.would_cancel
            answered = unpaid + report.paid + report.already_cancelled
            report.breaker_trips = int(self._breaker.after_batch(unpaid, answered, valves) is not None)
        versions = {c.order_id: c.version for c in claims}
        return self._settlement(batch.deliveries, retries, dead, early, versions, report), report, traced

    @staticmethod
    def _early(
        conn: Connection, deliveries: Sequence[Delivery], claims: Sequence[Claim], now: int
    ) -> dict[str, TimerMessage]:
        """Delivered timers that are not due yet by the registry's clock (a broker or a process whose
        clock runs ahead): their timer, to arm again at the registry's due time.

        Acked as stale they would be lost. A copy of an earlier due time (the timeout was rescheduled
        later) is stale and is not among them. Costs a query only when a delivery went unclaimed.
        """
        claimed = {c.order_id for c in claims}
        unclaimed = sorted({d.message.order_id for d in deliveries} - claimed)
        if not unclaimed:
            return {}
        ahead = registry.pending_after(conn, unclaimed, now=now)
        early = {
            d.message.order_id: TimerMessage(d.message.order_id, *ahead[d.message.order_id])
            for d in deliveries
            if d.message.order_id in ahead and d.message.due_ms >= ahead[d.message.order_id][0]
        }
        if early:
            log.warning(
                "%d timers delivered before their due time by the registry's clock, armed again: %s",
                len(early),
                ", ".join(sorted(early)[:5]),
            )
        return early

    def _poison(self, deliveries: Sequence[Delivery], claims: Sequence[Claim]) -> dict[str, str]:
        """Claimed timeouts whose message keeps coming back unacked: something kills the worker on them."""
        claimed = {c.order_id for c in claims}
        limit = self._retry.max_deliveries
        return {
            d.message.order_id: f"delivered {d.deliveries} times without an ack (limit {limit})"
            for d in deliveries
            if d.deliveries > limit and d.message.order_id in claimed
        }

    def _decide(
        self, conn: Connection, claims: Sequence[Claim], now: int
    ) -> tuple[dict[str, Outcome], list[Retry], dict[str, str]]:
        """Outcomes of the orders the store answered about, retries and dead letters of the unknown.

        Raises _StoreOutage when either call fails as a whole: nothing of the batch is decided.
        """
        outcomes: dict[str, Outcome] = {}
        unknown: dict[str, str] = {}
        if claims:
            order_ids = [c.order_id for c in claims]
            try:
                with tracing.span("order-timeouts payment check"):
                    statuses = self._store.payment_status(conn, order_ids)
                unpaid = [oid for oid in order_ids if statuses.get(oid) is PaymentStatus.UNPAID]
                cancelled: set[str] = set()
                if unpaid and self._mode is Mode.LIVE:
                    with tracing.span("order-timeouts cancel", attributes={tracing.COUNT: len(unpaid)}):
                        cancelled = self._store.cancel_unpaid(conn, unpaid, from_ms(now))
            except OrderStoreUnavailable as exc:
                raise _StoreOutage from exc
            for oid in order_ids:
                status = statuses.get(oid, PaymentStatus.UNKNOWN)
                if oid in cancelled:
                    outcomes[oid] = Outcome.CANCELLED
                elif status is PaymentStatus.UNPAID and self._mode is Mode.SHADOW:
                    outcomes[oid] = Outcome.WOULD_CANCEL
                elif status is PaymentStatus.UNPAID:
                    # Unpaid when we looked, not pending when we cancelled: the payment won the race.
                    outcomes[oid] = Outcome.PAID
                elif status is PaymentStatus.PAID:
                    outcomes[oid] = Outcome.PAID
                elif status is PaymentStatus.CANCELLED:
                    outcomes[oid] = Outcome.ALREADY_CANCELLED
                else:
                    unknown[oid] = "the order store does not know it (unknown, or not found)"
        retries: list[Retry] = []
        dead: dict[str, str] = {}
        attempts = {c.order_id: c.attempts for c in claims}
        for oid, why in unknown.items():
            if attempts[oid] >= self._retry.max_attempts:
                dead[oid] = f"payment status unknown after {attempts[oid]} attempts: {why}"
                log.warning("order %s dead-lettered: %s", oid, dead[oid], extra={"order_id": oid, "outcome": "dead"})
            else:
                retries.append(Retry(oid, now + self._retry.delay_ms(attempts[oid]), f"payment status unknown: {why}"))
                log.info("order %s retried later: %s", oid, why, extra={"order_id": oid, "outcome": "retried"})
        if log.isEnabledFor(logging.INFO):
            for oid, outcome in outcomes.items():
                log.info("order %s: %s", oid, outcome.value, extra={"order_id": oid, "outcome": outcome.value})
        return outcomes, retries, dead

    @staticmethod
    def _settlement(
        deliveries: Sequence[Delivery],
        retries: Sequence[Retry],
        dead: dict[str, str],
        early: dict[str, TimerMessage],
        versions: dict[str, int],
        report: BatchReport,
    ) -> Settlement:
        settlement = Settlement(claimed=report.claimed)
        retry_at = {r.order_id: r for r in retries}
        seen: set[str] = set()
        for delivery in deliveries:
            oid = delivery.message.order_id
            # A second copy of the same order in one batch is only acked: the first carries the decision.
            first = oid not in seen
            seen.add(oid)
            if first and oid in retry_at:
                # The registry's version, not the message's: brokers may not carry it (Redis stores ids only).
                again = TimerMessage(oid, retry_at[oid].due_ms, versions[oid])
                settlement.retry.append((delivery, again))
            elif first and oid in dead:
                settlement.dead.append((delivery, dead[oid]))
            elif first and oid in early:
                settlement.retry.append((delivery, early[oid]))
                report.early += 1
            else:
                settlement.done.append(delivery)
        # Deliveries beyond what the registry let us claim: duplicates, revoked or rescheduled.
        report.stale = max(len(deliveries) - report.claimed - report.early, 0)
        return settlement
