"""The master side of a pipeline hop: offload tasks to a broker, match replies.

A :class:`Master` owns one DEALER socket connected to a broker's frontend. It
names every task it sends (``<master name>-<random prefix>-<counter>``), keeps
what it still waits for in :attr:`Master.pending`, and matches each reply to
its task **by task id**, never by arrival order. A reply for a task that is not
pending (a late or duplicated answer) is discarded and counted.

Two ways to use it:

* blocking: :meth:`Master.request` sends one task and waits for its reply;
* asynchronous: :meth:`Master.submit` many tasks, then :meth:`Master.receive`
  replies as they come (or register :attr:`Master.socket` in a poller, as the
  stage runtime does, and call :meth:`Master.read` when it is readable).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from sparse_zmq.errors import ProtocolError, RemoteError, TaskTimeout
from sparse_zmq.protocol import DEFAULT_LIMITS, Kind, Limits, Message, pack, split_envelope, unpack
from sparse_zmq.security import CurveConfig, secure_client

__all__ = ["Master", "Pending", "Reply"]

logger = logging.getLogger(__name__)

LINGER_MS = 200
"""How long a closing socket may keep trying to deliver queued messages."""


@dataclass
class Pending:
    """A task sent and not yet answered."""

    task_id: str
    op: str
    sent_at: float
    bytes_out: int
    deadline: float
    context: Any = None


@dataclass
class Reply:
    """A reply matched to its task.

    Attributes:
        message: The decoded reply (kind ``result`` or ``error``).
        pending: What was recorded when the task was sent.
        bytes_in: Size of the reply's frames on the wire.
        received_at: Wall-clock time the reply was read.
    """

    message: Message
    pending: Pending
    bytes_in: int
    received_at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        """True when the task succeeded."""
        return self.message.kind is Kind.RESULT

    def raise_for_error(self) -> Message:
        """Return the result message, or raise :class:`RemoteError` for an error reply."""
        if self.message.kind is Kind.ERROR:
            reason = str(self.message.meta.get("reason", "no reason given"))
            raise RemoteError(self.message.task_id, reason)
        return self.message


class Master:
    """Sends tasks to one broker frontend and matches their replies.

    Args:
        endpoint: The broker frontend, e.g. ``tcp://127.0.0.1:5555``.
        name: Names this master in task ids and logs.
        context: ZeroMQ context to use (one per process; never shared across fork).
        limits: Bounds checked on every received message.
        task_timeout_s: Default time a task may stay unanswered.
        curve: CURVE keys to connect with; None for a plain connection.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        name: str = "master",
        context: zmq.Context | None = None,
        limits: Limits = DEFAULT_LIMITS,
        task_timeout_s: float = 600.0,
        curve: CurveConfig | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.name = name
        self.limits = limits
        self.task_timeout_s = task_timeout_s
        self.pending: dict[str, Pending] = {}
        self.discarded = 0
        self.malformed = 0
        self._prefix = f"{name}-{uuid.uuid4().hex[:8]}"
        self._counter = 0
        self._context = context or zmq.Context.instance()
        self.socket: zmq.Socket = self._context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, LINGER_MS)
        if curve is not None:
            secure_client(self.socket, curve)
        self.socket.connect(endpoint)
        logger.info("%s: master connected to %s", name, endpoint)

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
            tensors: Named tensors to send; their buffers are sent without copies.
            meta: Small JSON values to carry along.
            context: Anything the caller wants back with the reply.
            timeout_s: Deadline for this task (default: the master's).

        Returns:
            The new task's id.
        """
        self._counter += 1
        task_id = f"{self._prefix}-{self._counter}"
        frames = pack(Message(Kind.TASK, task_id, tensors, {"op": op, **(meta or {})}))
        self.socket.send_multipart([b"", *frames], copy=False)
        now = time.time()
        size = sum(memoryview(f).nbytes for f in frames)
        timeout = self.task_timeout_s if timeout_s is None else timeout_s
        self.pending[task_id] = Pending(task_id, op, now, size, now + timeout, context)
        logger.debug("%s: sent task %s op=%s bytes=%d", self.name, task_id, op, size)
        return task_id

    def read(self) -> Reply | None:
        """Read one message from the socket (which must be readable).

        Returns:
            The reply matched to its pending task, or None when the message was
            malformed or answered no pending task (both are counted).
        """
        frames = self.socket.recv_multipart(copy=False)
        size = sum(len(f) for f in frames)
        try:
            _, body = split_envelope(frames)
            message = unpack(body, self.limits)
        except ProtocolError as exc:
            self.malformed += 1
            logger.warning("%s: malformed reply from %s dropped: %s", self.name, self.endpoint, exc)
            return None
        pending = self.pending.pop(message.task_id, None)
        if pending is None:
            self.discarded += 1
            logger.warning(
                "%s: discarded a %s for task %r that is not pending (late or duplicate)",
                self.name,
                message.kind.value,
                message.task_id,
            )
            return None
        return Reply(message, pending, size)

    def receive(self, timeout_s: float) -> Reply | None:
        """Wait up to ``timeout_s`` for the next reply to any pending task."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.socket.poll(int(remaining * 1000) + 1):
                return None
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

        Raises:
            TaskTimeout: No reply within the timeout.
            RemoteError: The task failed remotely.
        """
        task_id = self.submit(op, tensors, meta, timeout_s=timeout_s)
        deadline = self.pending[task_id].deadline
        while True:
            reply = self.receive(max(0.0, deadline - time.time()))
            if reply is None:
                self.pending.pop(task_id, None)
                raise TaskTimeout(f"task {task_id} ({op}) got no reply from {self.endpoint}")
            if reply.pending.task_id == task_id:
                reply.raise_for_error()
                return reply
            logger.warning("%s: reply for %s while waiting for %s", self.name, reply.pending.task_id, task_id)

    def close(self) -> None:
        """Close the socket (bounded by its linger)."""
        self.socket.close()

    def __enter__(self) -> Master:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
