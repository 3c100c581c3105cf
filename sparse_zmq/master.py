"""The master side of a pipeline hop: offload tasks to a broker, match replies.

A :class:`Master` owns one DEALER socket connected to a broker's frontend. It
names every task it sends (``<master name>-<random prefix>-<counter>``), keeps
what it still waits for in :attr:`Master.pending`, and matches each reply to
its task **by task id**, never by arrival order.

Two ways to use it:

* blocking: :meth:`Master.request` sends one task and waits for its reply;
* asynchronous: :meth:`Master.submit` many tasks, then :meth:`Master.receive`
  their ends as they come (or register :attr:`Master.socket` in a poller, as
  the stage runtime does, call :meth:`Master.read` when it is readable and
  :meth:`Master.tick` every poll round).

What a master guarantees:

* **Every task ends exactly once**, as one :class:`Reply`: completed (a
  ``result``), failed with a reason (an ``error`` from a worker or the
  broker), or timed out (:attr:`Reply.timed_out`, made locally when the
  task's deadline passes). Anything arriving for a task that has ended (a
  late result of a task re-run elsewhere, a second copy) is discarded by
  task id and counted in ``stats["discarded"]``.
* **Tasks survive a broker that is not there yet, restarts or is cut off.**
  The master asks its broker for a heartbeat every ``heartbeat_interval_s``;
  a master whose broker does not answer for ``heartbeat_interval_s *
  liveness`` logs that it is waiting, keeps its tasks, and carries on when
  the broker answers. Each answer carries the broker's instance id, new at
  every broker start: after a restart, or after a silence, every pending
  task is sent again.
* **Retries re-send the same task id.** The broker knows a task by the
  master's identity (fixed for the master's lifetime, ``zmq.IDENTITY``) and
  the task id, so it answers a re-sent task it still holds with an error
  marked ``duplicate``, which the master ignores, and the task still runs
  once per broker life. A task may nevertheless *run* more than once (its
  worker died after computing it, or a re-sent copy arrived after the first
  had finished): delivery to workers is at-least-once, results at the master
  exactly-once.
* **Back-pressure is explicit.** A broker at its queue limit answers
  ``busy``; the master re-sends after a backoff (``busy_backoff_s``,
  doubling up to ``busy_backoff_max_s``), and once ``max_retries`` re-sends
  are spent the task ends as failed with the broker's busy reason
  (:attr:`Reply.busy`). Only busy answers count against ``max_retries``.
* **Lost messages are made good by re-sending.** A task unanswered for
  ``retry_after_s`` is sent again, and so is every pending task after a
  broker restart or silence: a connection that dropped, or a broker that
  could not deliver an answer because this master was not reading (its
  queue to the master full), may have lost the task or its answer. These
  re-sends go on, every ``retry_after_s``, until the task's deadline.
* **Size is checked before sending**: :meth:`Master.submit` refuses a task
  larger than ``max_message_bytes`` with a
  :class:`~sparse_zmq.errors.ProtocolError` naming both sizes.

Tensors handed to :meth:`Master.submit` are sent without copies and kept for
re-sending: they must not be modified until the task has ended.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import zmq

from sparse_zmq.errors import ConfigError, ProtocolError, RemoteError, TaskTimeout
from sparse_zmq.protocol import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_MESSAGE_BYTES,
    NOBLOCK,
    Kind,
    Limits,
    Message,
    pack,
    recv_frames,
    send_frames,
    split_envelope,
    unpack,
)
from sparse_zmq.security import CurveConfig, secure_client

if TYPE_CHECKING:
    # Only for annotations: typing.Self exists from Python 3.11 on.
    from typing import Self

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "LINGER_MS",
    "Master",
    "MasterConfig",
    "Pending",
    "Reply",
]

logger = logging.getLogger(__name__)

LINGER_MS = 200
"""How long a closing socket may keep trying to deliver queued messages."""


TICK_S = 0.1
"""Longest wait between two rounds of re-sends, heartbeats and deadlines."""


@dataclass(frozen=True)
class MasterConfig:
    """Timings, retries and limits of a :class:`Master`.

    Attributes:
        task_timeout_s: Default time a task may stay unanswered before it
            ends as timed out.
        retry_after_s: A task unanswered this long is sent again (same id),
            and again after each further ``retry_after_s``, until its
            deadline.
        max_retries: Most re-sends of one task after busy answers; the
            next busy answer ends the task as failed.
        busy_backoff_s: Wait before the first re-send of a task the broker
            refused as busy; it doubles with each further busy answer.
        busy_backoff_max_s: Longest wait between busy re-sends.
        heartbeat_interval_s: Seconds between heartbeat requests to the
            broker.
        liveness: Heartbeat intervals without an answer after which the
            broker is taken to be gone (the master logs that it waits).
        max_message_bytes: Largest task accepted by :meth:`Master.submit`,
            all frames together; must be at least ``limits.max_header_bytes``.
        linger_ms: How long closing waits for unsent messages.
        limits: Bounds checked on every received message.
    """

    task_timeout_s: float = 600.0
    retry_after_s: float = 30.0
    max_retries: int = 3
    busy_backoff_s: float = 0.1
    busy_backoff_max_s: float = 5.0
    heartbeat_interval_s: float = 1.0
    liveness: int = 3
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    linger_ms: int = LINGER_MS
    limits: Limits = DEFAULT_LIMITS

    def __post_init__(self) -> None:
        """Check every field.

        Raises:
            ConfigError: A field has the wrong type or is out of range.
        """
        for name in (
            "task_timeout_s",
            "retry_after_s",
            "busy_backoff_s",
            "busy_backoff_max_s",
            "heartbeat_interval_s",
        ):
            value = getattr(self, name)
            if type(value) not in (int, float) or not (
                math.isfinite(value) and value > 0
            ):
                raise ConfigError(
                    f"MasterConfig.{name} must be a positive number of seconds, "
                    f"got {value!r}"
                )
        for name, minimum in (("max_retries", 0), ("liveness", 1), ("linger_ms", 0)):
            value = getattr(self, name)
            if type(value) is not int or value < minimum:
                raise ConfigError(
                    f"MasterConfig.{name} must be an integer >= {minimum}, "
                    f"got {value!r}"
                )
        if (
            type(self.max_message_bytes) is not int
            or self.max_message_bytes < self.limits.max_header_bytes
        ):
            raise ConfigError(
                f"MasterConfig.max_message_bytes of {self.max_message_bytes!r} is too "
                f"small: a message must at least carry a header of up to "
                f"limits.max_header_bytes = {self.limits.max_header_bytes} bytes"
            )


@dataclass
class Pending:
    """A task sent and not yet ended.

    Attributes:
        task_id: Its id.
        op: The operation asked for.
        sent_at: Wall-clock time of :meth:`Master.submit`.
        bytes_out: Size of its frames.
        deadline: Wall-clock time at which it ends as timed out.
        context: Whatever the caller passed to :meth:`Master.submit`.
        frames: Its encoded frames, kept for re-sending.
        retries: Re-sends after busy answers, counted against ``max_retries``.
        last_sent: Monotonic time of its latest send (0 if never sent).
        resend_at: Monotonic time of a scheduled re-send, or None.
    """

    task_id: str
    op: str
    sent_at: float
    bytes_out: int
    deadline: float
    context: Any = None
    frames: list[Any] = field(default_factory=list, repr=False)
    retries: int = 0
    last_sent: float = 0.0
    resend_at: float | None = None


@dataclass
class Reply:
    """How a task ended, matched to its task.

    Attributes:
        message: The decoded reply (kind ``result`` or ``error``); for a
            timed-out task, an ``error`` made locally.
        pending: What was recorded when the task was sent.
        bytes_in: Size of the reply's frames on the wire (0 if made locally).
        received_at: Wall-clock time the reply was read.
        timed_out: True when no answer came before the task's deadline.
    """

    message: Message
    pending: Pending
    bytes_in: int
    received_at: float = field(default_factory=time.time)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the task succeeded."""
        return self.message.kind is Kind.RESULT

    @property
    def busy(self) -> bool:
        """True when the task failed because the broker stayed busy."""
        return self.message.kind is Kind.ERROR and self.message.meta.get("busy") is True

    @property
    def reason(self) -> str:
        """Why the task failed ('' when it succeeded)."""
        if self.ok:
            return ""
        return str(self.message.meta.get("reason", "no reason given"))

    def raise_for_error(self) -> Message:
        """Return the result message, or raise for a task that did not succeed.

        Raises:
            TaskTimeout: The task timed out.
            RemoteError: The task failed remotely (busy included).
        """
        if self.timed_out:
            raise TaskTimeout(self.reason)
        if self.message.kind is Kind.ERROR:
            raise RemoteError(self.message.task_id, self.reason)
        return self.message


_PING = pack(Message(Kind.HEARTBEAT))

_STAT_NAMES = (
    "sent",
    "resent",
    "busy",
    "duplicates",
    "discarded",
    "malformed",
    "timeouts",
    "broker_restarts",
)


class Master:
    """Sends tasks to one broker frontend and matches their replies.

    Args:
        endpoint: The broker frontend, e.g. ``tcp://127.0.0.1:5555``.
        name: Names this master in task ids, its identity and logs.
        context: ZeroMQ context to use (one per process; never shared across fork).
        limits: Bounds checked on every received message (overrides
            ``config.limits``).
        task_timeout_s: Default time a task may stay unanswered (overrides
            ``config.task_timeout_s``).
        config: Timings, retries and limits; defaults to :class:`MasterConfig`.
        curve: CURVE keys to connect with; None for a plain connection.

    Attributes:
        identity: This master's routing identity, ``<name>/<pid>/<random>``.
        pending: Tasks sent and not yet ended, by id.
        stats: Counters: ``sent``, ``resent``, ``busy`` (busy answers),
            ``duplicates`` (duplicate notices, ignored), ``discarded``
            (answers for tasks not pending), ``malformed``, ``timeouts``,
            ``broker_restarts``.
        broker_stats: The broker's counters from its latest heartbeat answer.

    Raises:
        ConfigError: A configuration value is out of range.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        name: str = "master",
        context: zmq.Context | None = None,
        limits: Limits | None = None,
        task_timeout_s: float | None = None,
        config: MasterConfig | None = None,
        curve: CurveConfig | None = None,
    ) -> None:
        config = config if config is not None else MasterConfig()
        overrides: dict[str, Any] = {}
        if task_timeout_s is not None:
            overrides["task_timeout_s"] = task_timeout_s
        if limits is not None:
            overrides["limits"] = limits
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.endpoint = endpoint
        self.name = name
        self.limits = self.config.limits
        self.task_timeout_s = self.config.task_timeout_s
        self.pending: dict[str, Pending] = {}
        self.stats: dict[str, int] = dict.fromkeys(_STAT_NAMES, 0)
        self.broker_stats: dict[str, Any] = {}
        self.identity = f"{name}/{os.getpid()}/{uuid.uuid4().hex[:8]}".encode()[-255:]
        self._prefix = f"{name}-{uuid.uuid4().hex[:8]}"
        self._counter = 0
        self._ended: collections.deque[Reply] = collections.deque()

        # Broker liveness, all in monotonic seconds.
        self._broker: str | None = None
        self._unanswered_since: float | None = None
        self._silent = False
        self._resend_due = False
        self._next_ping = 0.0
        self._next_tick = 0.0

        self._context = context or zmq.Context.instance()
        self.socket: zmq.Socket = self._context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, self.config.linger_ms)
        self.socket.setsockopt(zmq.IDENTITY, self.identity)
        if curve is not None:
            secure_client(self.socket, curve)
        self.socket.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self.socket, zmq.POLLIN)
        logger.info(
            "%s: master %s connected to %s", name, self.identity.decode(), endpoint
        )

    @property
    def discarded(self) -> int:
        """Answers discarded because their task was not pending."""
        return self.stats["discarded"]

    @property
    def malformed(self) -> int:
        """Messages from the broker that broke the wire format."""
        return self.stats["malformed"]

    def submit(
        self,
        op: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
        *,
        context: Any = None,
        timeout_s: float | None = None,
    ) -> str:
        """Send one task without waiting for its reply.

        Args:
            op: The operation the worker should run (``train``, ``infer``...).
            tensors: Named tensors to send; their buffers are sent without
                copies and kept until the task ends.
            meta: Small JSON values to carry along (``stream`` pins the task
                to the worker serving that training stream).
            context: Anything the caller wants back with the reply.
            timeout_s: Deadline for this task (default: the master's).

        Returns:
            The new task's id.

        Raises:
            ProtocolError: The task cannot be encoded or is larger than
                ``max_message_bytes``.
        """
        self._counter += 1
        task_id = f"{self._prefix}-{self._counter}"
        frames = pack(Message(Kind.TASK, task_id, tensors, {"op": op, **(meta or {})}))
        size = sum(memoryview(f).nbytes for f in frames)
        if size > self.config.max_message_bytes:
            raise ProtocolError(
                f"{self.name}: task {task_id} ({op}) is {size} bytes, above the "
                f"message size limit (max_message_bytes) of "
                f"{self.config.max_message_bytes}"
            )
        now = time.time()
        timeout = self.task_timeout_s if timeout_s is None else timeout_s
        pending = Pending(task_id, op, now, size, now + timeout, context, frames)
        self.pending[task_id] = pending
        self._send(pending)
        logger.debug("%s: sent task %s op=%s bytes=%d", self.name, task_id, op, size)
        return task_id

    def cancel(self, task_id: str) -> Pending | None:
        """Stop waiting for a task; anything arriving for it is discarded.

        Returns:
            The task's record, or None if it was not pending.
        """
        return self.pending.pop(task_id, None)

    def read(self) -> Reply | None:
        """Read one message from the socket (which must be readable).

        Returns:
            The :class:`Reply` when the message ends a pending task; None when
            it was a heartbeat, a busy or duplicate answer that the master
            handles itself, malformed, or for a task not pending (all
            counted).
        """
        frames = recv_frames(self.socket)
        now = time.monotonic()
        self._heard(now)
        size = sum(len(f) for f in frames)
        try:
            _, body = split_envelope(frames)
            message = unpack(body, self.limits)
            if message.kind not in (Kind.RESULT, Kind.ERROR, Kind.HEARTBEAT):
                raise ProtocolError(
                    f"a master accepts result, error or heartbeat messages, "
                    f"got {message.kind.value!r}"
                )
        except ProtocolError as exc:
            self.stats["malformed"] += 1
            logger.warning(
                "%s: malformed reply from %s dropped: %s", self.name, self.endpoint, exc
            )
            return None
        if message.kind is Kind.HEARTBEAT:
            self._on_heartbeat(message.meta, now)
            return None

        pending = self.pending.get(message.task_id)
        if message.kind is Kind.ERROR and message.meta.get("duplicate") is True:
            # The broker still holds the first copy; its answer will come.
            self.stats["duplicates"] += 1
            logger.debug("%s: broker already holds task %s", self.name, message.task_id)
            return None
        if pending is None:
            self.stats["discarded"] += 1
            logger.warning(
                "%s: discarded a %s for task %r that is not pending (late or duplicate)",
                self.name,
                message.kind.value,
                message.task_id,
            )
            return None
        if message.kind is Kind.ERROR and message.meta.get("busy") is True:
            self.stats["busy"] += 1
            if pending.retries < self.config.max_retries:
                pending.retries += 1
                backoff = min(
                    self.config.busy_backoff_max_s,
                    self.config.busy_backoff_s * 2 ** (pending.retries - 1),
                )
                # Jitter, so that masters refused together do not return together.
                pending.resend_at = now + backoff * random.uniform(0.75, 1.25)
                logger.debug(
                    "%s: broker busy, task %s re-sent in %.2fs (retry %d of %d)",
                    self.name,
                    message.task_id,
                    backoff,
                    pending.retries,
                    self.config.max_retries,
                )
                return None
            logger.info(
                "%s: task %s refused as busy after %d retries: %s",
                self.name,
                message.task_id,
                pending.retries,
                message.meta.get("reason"),
            )
        del self.pending[message.task_id]
        return Reply(message, pending, size)

    def tick(self) -> list[Reply]:
        """Send heartbeats and due re-sends; end tasks whose deadline passed.

        Cheap to call often: it does its work at most every ``TICK_S``.

        Returns:
            One timed-out :class:`Reply` per task whose deadline has passed.
        """
        now = time.monotonic()
        if now < self._next_tick:
            return []
        self._next_tick = now + TICK_S
        config = self.config
        if now >= self._next_ping:
            self._ping(now)
        silence_limit = config.heartbeat_interval_s * config.liveness
        if (
            not self._silent
            and self._unanswered_since is not None
            and now - self._unanswered_since > silence_limit
            # Unread messages prove the broker alive: the caller was busy.
            and not self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN
        ):
            self._silent = True
            logger.warning(
                "%s: %s at %s for %.1fs; waiting for it, %d tasks kept and sent "
                "when it answers",
                self.name,
                "no answer yet from the broker"
                if self._broker is None
                else "the broker has been silent",
                self.endpoint,
                now - self._unanswered_since,
                len(self.pending),
            )
        for pending in list(self.pending.values()):
            if pending.resend_at is not None:
                if now >= pending.resend_at:
                    self._send(pending, resend=True)
            elif not self._silent and now - pending.last_sent >= config.retry_after_s:
                logger.info(
                    "%s: task %s unanswered for %.1fs, sent again",
                    self.name,
                    pending.task_id,
                    now - pending.last_sent,
                )
                self._send(pending, resend=True)
        return [self._timed_out(p) for p in self.expired()]

    def receive(self, timeout_s: float) -> Reply | None:
        """Wait up to ``timeout_s`` for the next task to end.

        Returns:
            The :class:`Reply` of a task that completed, failed or timed out,
            or None when none ended in time.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if not self._ended:
                self._ended.extend(self.tick())
            if self._ended:
                return self._ended.popleft()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            wait_ms = int(min(remaining, TICK_S) * 1000) + 1
            if self._poller.poll(wait_ms):
                reply = self.read()
                if reply is not None:
                    return reply

    def expired(self, now: float | None = None) -> list[Pending]:
        """Remove and return pending tasks whose deadline has passed."""
        now = time.time() if now is None else now
        late = [p for p in self.pending.values() if p.deadline <= now]
        for p in late:
            del self.pending[p.task_id]
        return late

    def request(
        self,
        op: str,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Reply:
        """Send one task and wait for its reply.

        Ends of other tasks that arrive meanwhile are kept for the next
        :meth:`receive`.

        Raises:
            TaskTimeout: No reply within the timeout.
            RemoteError: The task failed remotely.
        """
        task_id = self.submit(op, tensors, meta, timeout_s=timeout_s)
        deadline = self.pending[task_id].deadline
        others: list[Reply] = []
        try:
            while True:
                reply = self.receive(max(0.0, deadline - time.time()) + TICK_S)
                if reply is None:
                    if task_id in self.pending:
                        continue
                    raise TaskTimeout(f"task {task_id} ({op}) was cancelled")
                if reply.pending.task_id == task_id:
                    reply.raise_for_error()
                    return reply
                others.append(reply)
        finally:
            self._ended.extendleft(reversed(others))

    def close(self) -> None:
        """Close the socket (bounded by its linger)."""
        self.socket.close(linger=self.config.linger_ms)

    def __enter__(self) -> Self:
        """Return the master itself."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the master."""
        self.close()

    # Internals.

    def _send(self, pending: Pending, *, resend: bool = False) -> None:
        """Send a task's frames; if the socket cannot take them, retry next tick."""
        try:
            send_frames(self.socket, [b"", *pending.frames], NOBLOCK)
        except zmq.Again:
            pending.resend_at = time.monotonic() + TICK_S
            logger.debug("%s: socket full, task %s waits", self.name, pending.task_id)
            return
        pending.last_sent = time.monotonic()
        pending.resend_at = None
        self.stats["resent" if resend else "sent"] += 1

    def _ping(self, now: float) -> None:
        """Ask the broker for a heartbeat; re-ask slowly while it is silent."""
        interval = self.config.heartbeat_interval_s
        if self._unanswered_since is not None:
            interval *= self.config.liveness
        self._next_ping = now + interval
        try:
            send_frames(self.socket, [b"", *_PING], NOBLOCK)
        except zmq.Again:
            pass
        if self._unanswered_since is None:
            self._unanswered_since = now

    def _heard(self, now: float) -> None:
        """Note a message from the broker; after a silence, plan a re-send.

        The re-send waits for the next heartbeat answer, which also tells
        whether the broker restarted, so that every task goes out once more.
        """
        self._unanswered_since = None
        if self._silent:
            self._silent = False
            self._resend_due = True
            self._next_ping = 0.0
            logger.warning(
                "%s: the broker at %s answers again", self.name, self.endpoint
            )

    def _on_heartbeat(self, meta: dict[str, Any], now: float) -> None:
        instance = meta.get("broker")
        stats = meta.get("stats")
        if isinstance(stats, dict):
            self.broker_stats = stats
        if not isinstance(instance, str):
            return
        if self._broker is None:
            logger.info(
                "%s: broker at %s is up (instance %s)",
                self.name,
                self.endpoint,
                instance,
            )
        elif instance != self._broker:
            self.stats["broker_restarts"] += 1
            self._resend_due = True
            logger.warning(
                "%s: broker at %s restarted (instance %s, was %s)",
                self.name,
                self.endpoint,
                instance,
                self._broker,
            )
        self._broker = instance
        if self._resend_due:
            self._resend_due = False
            self._resend_all()

    def _resend_all(self) -> None:
        """Send every pending task again (not counted against max_retries)."""
        if self.pending:
            logger.warning(
                "%s: re-sending %d pending tasks to %s",
                self.name,
                len(self.pending),
                self.endpoint,
            )
        for pending in list(self.pending.values()):
            self._send(pending, resend=True)

    def _timed_out(self, pending: Pending) -> Reply:
        self.stats["timeouts"] += 1
        timeout = pending.deadline - pending.sent_at
        reason = (
            f"task {pending.task_id} ({pending.op}) got no reply from {self.endpoint} "
            f"within {timeout:.3g}s"
        )
        logger.warning("%s: %s", self.name, reason)
        message = Message(
            Kind.ERROR, pending.task_id, meta={"reason": reason, "timeout": True}
        )
        return Reply(message, pending, 0, timed_out=True)
