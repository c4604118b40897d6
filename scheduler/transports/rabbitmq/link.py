"""One AMQP connection served by its own I/O thread (pika's SelectConnection).

pika is not thread-safe: every pika call happens on the link's I/O thread, and other threads only
hand it work through `ioloop.add_callback_threadsafe`, the one thread-safe entry point. Running
the I/O loop all the time is what keeps heartbeats flowing while a worker spends a long batch in
the database, and it lets publisher confirms stream back while more messages go out: a window of
WINDOW unconfirmed messages instead of one round trip per message (pika's BlockingChannel in
confirm mode waits for each confirm, which caps publishing at one message per round trip; the
figures are in docs/performance.md).

The link connects to the first of its hosts (the nodes of a cluster) that answers, through pika's
connection workflow (`SelectConnection.create_connection`), which tries each host in turn.

A link that fails in any way is dead for good: waiters are woken with the reason, the broker
requeues whatever it had delivered unacked, and the transport opens a new link on its next call.
Nothing is retried inside a link, so nothing is ever assumed sent: a publish whose confirm has not
come back when the connection goes (a node lost, a queue leader moving and the link timing out)
fails, and its rows stay unpublished for the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.adapters.select_connection import IOLoop, SelectConnection
from pika.adapters.utils.connection_workflow import AMQPConnectionWorkflowFailed
from pika.exceptions import ChannelClosedByBroker
from pika.spec import Basic

from scheduler.errors import TransportUnavailable
from scheduler.transports.rabbitmq.keys import RABBITMQ_READY_QUEUE
from scheduler.transports.rabbitmq.topology import Declaration, Exchange, Queue

log = logging.getLogger("order_timeouts.rabbitmq")

#: most published messages awaiting their confirm at once
WINDOW = 2000
#: message TTL on quorum queues and at-least-once dead-lettering arrived in RabbitMQ 3.10 (which
#: also needs the `stream_queue` feature flag enabled for at-least-once; AMQP cannot check that)
MIN_SERVER_VERSION = (3, 10)
#: AMQP reply code of a declaration whose arguments differ from the existing queue's
PRECONDITION_FAILED = 406

#: (exchange, routing key, body, properties) of one message to publish
Outgoing = tuple[str, str, bytes, Any]


@dataclass(frozen=True)
class Inbound:
    """A message the broker delivered on this link, not yet acked."""

    tag: int
    body: bytes
    headers: dict[str, Any]

    @property
    def redeliveries(self) -> int:
        # Quorum queues count deliveries returned without an ack (nack, lost consumer).
        count = self.headers.get("x-delivery-count", 0)
        return count if isinstance(count, int) else 0


@dataclass(eq=False)
class _Job:
    items: Sequence[Outgoing]
    sent: int = 0
    unconfirmed: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    #: called (on any thread) once the job is done: how an asyncio caller is woken (publish_async)
    wake: Callable[[], None] | None = None

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    def finish(self) -> None:
        self.done.set()
        if self.wake is not None:
            self.wake()


class Link:
    def __init__(
        self,
        hosts: Sequence[pika.URLParameters],
        topology: Sequence[Declaration],
        timeout: float,
        ready_queue: str = RABBITMQ_READY_QUEUE,
    ) -> None:
        self._hosts = list(hosts)
        self._ready_queue = ready_queue  # the queue `consume` reads
        #: the host this link connected to, once it has
        self.host: pika.URLParameters | None = None
        self._topology = topology
        self._cond = threading.Condition()
        self._inbox: deque[Inbound] = deque()
        self._jobs: set[_Job] = set()  # every job not yet done, so that a dying link can fail them
        self._error: str | None = None
        self._ready = threading.Event()
        self._closing = False
        self._ioloop = IOLoop()
        # I/O-thread state:
        self._workflow: Any = None  # pika's connection workflow, until it has connected
        self._conn: Any = None
        self._probe: Any = None  # a channel for passive declares; a 404 closes it, the next call opens another
        self._probe_waiting: list[Callable[[], None]] = []  # inspections waiting for the probe channel to open
        self._inspections: set[threading.Event] = set()  # inspections in progress, ended early by a 404
        self._pub: Any = None  # confirm mode, mandatory publishes
        self._sub: Any = None  # the ready-queue consumer
        self._outbox: deque[_Job] = deque()
        self._unconfirmed: dict[int, _Job] = {}  # delivery tag → job, in publish order
        self._seq = 0
        self._consumer: str | None = None
        self._prefetch = 0  # as requested by the caller (read on any thread, written under _cond)
        self._thread = threading.Thread(target=self._run, name="order-timeouts-amqp", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self._die(f"no connection to RabbitMQ within {timeout:g}s")
        if self._error is not None:
            self.close()
            raise TransportUnavailable(self._error)

    @property
    def alive(self) -> bool:
        return self._error is None and not self._closing

    # -- called from the transport's threads -------------------------------------------------

    def publish(self, items: Sequence[Outgoing], timeout: float) -> None:
        """Return once the broker has confirmed every message as routed; raise otherwise."""
        job = self._submit(items, wake=None)
        self._outcome(job, job.done.wait(timeout), timeout)

    async def publish_async(self, items: Sequence[Outgoing], timeout: float) -> None:
        """`publish` for an asyncio caller: the same job on the I/O thread, whose end wakes the
        caller's event loop (call_soon_threadsafe) instead of a waiting thread. Nothing here blocks
        the loop: handing the job over and reading its outcome take the link's lock only briefly."""
        loop = asyncio.get_running_loop()
        confirmed: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            # From the I/O thread, possibly after the caller gave up and its loop has closed.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, confirmed)

        job = self._submit(items, wake=wake)
        try:
            await asyncio.wait_for(confirmed, timeout)
        except TimeoutError:
            pass
        self._outcome(job, job.done.is_set(), timeout)

    def _submit(self, items: Sequence[Outgoing], wake: Callable[[], None] | None) -> _Job:
        job = _Job(items, unconfirmed=len(items), wake=wake)
        with self._cond:
            self._raise_if_dead()
            self._jobs.add(job)
        self._call(lambda: self._start(job))
        return job

    def _outcome(self, job: _Job, done: bool, timeout: float) -> None:
        if not done:
            self._die(f"no publisher confirm within {timeout:g}s")
            job.fail(f"no publisher confirm within {timeout:g}s")
        if job.error is not None:
            # A nack or a returned message leaves the link in doubt: start afresh.
            self._die(job.error)
            raise TransportUnavailable(job.error)

    def consume(self, prefetch: int) -> None:
        """Consume the ready queue with this prefetch (a change re-subscribes)."""
        if prefetch != self._prefetch:
            with self._cond:
                self._prefetch = prefetch
            self._call(lambda: self._subscribe(prefetch))

    def take(self, limit: int, timeout: float, collect: float) -> list[Inbound]:
        """Up to `limit` deliveries: wait at most `timeout` for the first, then `collect` for more."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._inbox and self.alive and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            if self._inbox and len(self._inbox) < limit and self.alive:
                until = time.monotonic() + collect
                while len(self._inbox) < limit and self.alive and (left := until - time.monotonic()) > 0:
                    self._cond.wait(left)
            # Deliveries of a dead link cannot be acked any more; the broker has requeued them.
            self._raise_if_dead()
            return [self._inbox.popleft() for _ in range(min(limit, len(self._inbox)))]

    def settle(self, acks: Iterable[int], nacks: Iterable[int]) -> None:
        """Ack, or nack with requeue, deliveries of this link (fire and forget, like AMQP acks)."""
        acks, nacks = list(acks), list(nacks)
        if acks or nacks:
            self._call(lambda: self._settle(acks, nacks))

    def queue_depths(self, queues: Sequence[str], timeout: float) -> dict[str, tuple[int, int]]:
        """(messages ready, consumers) per queue, by passive declare (no management plugin needed)."""
        result: dict[str, tuple[int, int]] = {}
        finished = threading.Event()
        self._call(lambda: self._inspect(list(queues), result, finished))
        deadline = time.monotonic() + timeout
        while not finished.wait(0.05):
            self._raise_if_dead()
            if time.monotonic() > deadline:
                raise TransportUnavailable(f"no queue figures from RabbitMQ within {timeout:g}s")
        return result

    def close(self) -> None:
        with self._cond:
            self._closing = True
        if self._thread.is_alive():
            try:
                self._ioloop.add_callback_threadsafe(self._close_connection)
            except Exception:  # the loop is already gone: nothing left to close
                log.debug("link I/O loop already stopped")
        if threading.current_thread() is not self._thread:
            self._thread.join(10.0)
        self._die("connection closed")

    def _call(self, callback: Callable[[], None]) -> None:
        self._raise_if_dead()
        try:
            self._ioloop.add_callback_threadsafe(callback)
        except Exception as exc:  # pika raises assorted errors on a closed loop
            self._die(f"RabbitMQ I/O loop stopped: {exc!r}")
            raise TransportUnavailable(f"RabbitMQ connection lost: {exc!r}") from None

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise TransportUnavailable(self._error)
        if self._closing:
            raise TransportUnavailable("RabbitMQ connection closed")

    def _die(self, reason: str) -> None:
        """Mark the link dead (first reason wins) and wake everyone waiting on it."""
        with self._cond:
            if self._error is None:
                self._error = reason
                if self._ready.is_set() and not self._closing:
                    # (A failed connect is the caller's to report.)
                    log.warning("RabbitMQ link lost: %s", reason)
            for job in self._jobs:
                job.fail(self._error)
                job.finish()
            self._jobs.clear()
            self._inbox.clear()
            self._cond.notify_all()
        self._ready.set()

    # -- the I/O thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._workflow = SelectConnection.create_connection(
                self._hosts, self._on_connected, custom_ioloop=self._ioloop
            )
            self._ioloop.start()
        except Exception as exc:  # anything pika raises ends this link, reported to callers
            self._die(f"RabbitMQ I/O failed: {exc!r}")
            if self._conn is not None and self._conn.is_open:
                self._conn.close()  # best effort: the broker requeues our unacked deliveries anyway
        finally:
            self._die("connection closed")
            self._ioloop.close()  # its wake-up socket pair

    def _on_connected(self, result: Any) -> None:
        """The workflow's end: a connection to one of the hosts, or why none would do."""
        self._workflow = None
        if not isinstance(result, pika.connection.Connection):
            self._stop(f"cannot connect to RabbitMQ at {_addresses(self._hosts)}: {_connect_error(result)}")
            return
        self._conn = result
        self.host = result.params
        result.add_on_close_callback(lambda _conn, exc: self._stop(f"RabbitMQ connection closed: {exc!r}"))
        if self._closing:
            result.close()
            return
        self._on_open(result)

    def _stop(self, reason: str) -> None:
        self._die(reason)
        self._ioloop.stop()

    def _close_connection(self) -> None:
        if self._conn is not None:
            if self._conn.is_open:
                self._conn.close()  # its close callback stops the loop
            elif self._conn.is_closed:
                self._ioloop.stop()
        elif self._workflow is not None:
            self._workflow.abort()  # its completion callback stops the loop
        else:
            self._ioloop.stop()

    def _on_open(self, conn: Any) -> None:
        version = (conn.server_properties or {}).get("version", b"")
        if _version(version) < MIN_SERVER_VERSION:
            # Older brokers ignore or refuse quorum-queue TTL and at-least-once dead-lettering: fail
            # loudly rather than run a timer that could lose timeouts.
            self._lose(f"RabbitMQ {version!r} is too old: the rabbitmq transport needs 3.10 or later")
            return
        conn.channel(on_open_callback=self._on_publish_channel)

    def _on_publish_channel(self, channel: Any) -> None:
        self._pub = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        self._declare_lenient([step for step in self._topology if isinstance(step, Queue) and step.existing_may_differ])

    def _declare_lenient(self, queues: list[Queue]) -> None:
        """Declare, one at a time, the queues that may exist with other arguments, then the rest.

        Each goes on a channel of its own and waits for its reply: a 406 (the queue exists with other
        arguments, declared by an earlier release or with another option) closes only that channel,
        and the queue is used as it is, with a warning.
        """
        if not queues:
            self._declare()
            return
        queue, rest = queues[0], queues[1:]
        answered = False

        def on_declared(channel: Any) -> None:
            nonlocal answered
            answered = True
            channel.close()
            self._declare_lenient(rest)

        def on_closed(_channel: Any, reason: Exception) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            if isinstance(reason, ChannelClosedByBroker) and reason.reply_code == PRECONDITION_FAILED:
                log.warning(
                    "RabbitMQ queue %s exists with other arguments than %s; it is used as it is: %s",
                    queue.name,
                    queue.arguments,
                    reason.reply_text,
                )
                self._declare_lenient(rest)
            else:
                self._lose(f"RabbitMQ closed a channel: {reason}")

        def on_open(channel: Any) -> None:
            channel.add_on_close_callback(on_closed)
            channel.queue_declare(
                queue.name, durable=True, arguments=queue.arguments, callback=lambda _frame: on_declared(channel)
            )

        self._conn.channel(on_open_callback=on_open)

    def _declare(self) -> None:
        """Declare the topology without waiting for each reply (nowait), then enter confirm mode.

        The broker handles a channel's commands in order: once confirm mode is acknowledged, every
        declaration before it has succeeded; one that failed (406: a queue exists with other
        arguments) closes the channel instead, and the link dies with that reason.
        """
        for step in self._topology:
            # callback=None makes pika send nowait requests: one burst, not a round trip per declaration
            # (about LEVELS² of them, mostly bindings).
            if isinstance(step, Exchange):
                self._pub.exchange_declare(step.name, step.kind, durable=True, callback=None)
            elif isinstance(step, Queue):
                if not step.existing_may_differ:  # declared already, by _declare_lenient
                    self._pub.queue_declare(step.name, durable=True, arguments=step.arguments, callback=None)
            else:
                self._pub.queue_bind(step.queue, step.exchange, step.pattern, callback=None)
        self._pub.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        self._conn.channel(on_open_callback=self._on_consumer_channel)

    def _on_consumer_channel(self, channel: Any) -> None:
        self._sub = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(lambda _frame: self._lose("the broker cancelled the ready-queue consumer"))
        self._ready.set()

    def _on_channel_closed(self, channel: Any, reason: Exception) -> None:
        if channel is self._pub or channel is self._sub:
            # e.g. 406 PRECONDITION_FAILED: the queues exist with other arguments; 404: topology gone
            self._lose(f"RabbitMQ closed a channel: {reason}")

    def _lose(self, reason: str) -> None:
        self._die(reason)
        if self._conn.is_open:
            self._conn.close()

    def _start(self, job: _Job) -> None:
        if job.done.is_set():
            return
        if not job.items:
            self._finish(job)
            return
        self._outbox.append(job)
        self._pump()

    def _pump(self) -> None:
        while self._outbox and len(self._unconfirmed) < WINDOW:
            job = self._outbox[0]
            exchange, key, body, properties = job.items[job.sent]
            job.sent += 1
            if job.sent == len(job.items):
                self._outbox.popleft()
            self._pub.basic_publish(exchange, key, body, properties, mandatory=True)
            self._seq += 1
            self._unconfirmed[self._seq] = job

    def _on_return(self, _channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        # A Basic.Return comes before the confirm of the same message and names no delivery tag:
        # fail every job in flight (they stay unpublished; the relay sends them again).
        reason = f"message unroutable: {method.reply_code} {method.reply_text} (exchange {method.exchange!r})"
        for job in self._unconfirmed.values():
            job.fail(reason)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        nack = isinstance(method, Basic.Nack)
        if method.multiple:
            while self._unconfirmed:
                tag = next(iter(self._unconfirmed))
                if tag > method.delivery_tag:
                    break
                self._confirmed(tag, nack)
        else:
            self._confirmed(method.delivery_tag, nack)
        self._pump()

    def _confirmed(self, tag: int, nack: bool) -> None:
        job = self._unconfirmed.pop(tag, None)
        if job is None:
            return
        if nack:
            job.fail("the broker refused a message (nack)")
        job.unconfirmed -= 1
        if job.unconfirmed == 0:
            self._finish(job)

    def _finish(self, job: _Job) -> None:
        with self._cond:
            self._jobs.discard(job)
        job.finish()

    def _subscribe(self, prefetch: int) -> None:
        if self._consumer is not None:
            # Per-consumer prefetch only applies to new consumers (quorum queues refuse global QoS).
            # Deliveries of the old consumer stay valid on this channel.
            self._sub.basic_cancel(self._consumer)
        self._sub.basic_qos(prefetch_count=prefetch)
        self._consumer = self._sub.basic_consume(self._ready_queue, self._on_delivery)

    def _on_delivery(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        with self._cond:
            self._inbox.append(Inbound(method.delivery_tag, body, properties.headers or {}))
            self._cond.notify_all()

    def _settle(self, acks: list[int], nacks: list[int]) -> None:
        for tag in acks:
            self._sub.basic_ack(tag)
        for tag in nacks:
            self._sub.basic_nack(tag, requeue=True)

    def _inspect(self, queues: list[str], result: dict[str, tuple[int, int]], finished: threading.Event) -> None:
        """Passive declares, one after another, on the link's probe channel, which stays open between
        calls (the relay asks for its marker every second: one round trip). A missing queue (404)
        closes that channel, which ends every inspection in progress; the next one opens another."""

        def step(frame: Any) -> None:
            if frame is not None:
                declared = frame.method
                result[declared.queue] = (declared.message_count, declared.consumer_count)
            if len(result) == len(queues) or self._probe is None:
                self._inspections.discard(finished)
                finished.set()
                return
            self._probe.queue_declare(queues[len(result)], passive=True, callback=step)

        def on_open(channel: Any) -> None:
            self._probe = channel
            channel.add_on_close_callback(self._on_probe_closed)
            for waiting in self._probe_waiting:
                waiting()
            self._probe_waiting.clear()

        self._inspections.add(finished)
        if self._probe is not None:
            step(None)
            return
        self._probe_waiting.append(lambda: step(None))
        if len(self._probe_waiting) == 1:
            self._conn.channel(on_open_callback=on_open)

    def _on_probe_closed(self, _channel: Any, _reason: Exception) -> None:
        self._probe = None
        for finished in self._inspections:
            finished.set()
        self._inspections.clear()


def _addresses(hosts: Sequence[pika.URLParameters]) -> str:
    return ", ".join(f"{host.host}:{host.port}" for host in hosts)


def _connect_error(result: Any) -> str:
    """The last host's error: one line, where pika's message lists every attempt."""
    if isinstance(result, AMQPConnectionWorkflowFailed) and result.exceptions:
        return repr(result.exceptions[-1])
    return repr(result)


def _version(raw: bytes | str) -> tuple[int, ...]:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    numbers = []
    for part in text.split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
