"""The stage runtime: run one partition as a worker of a broker.

An application defines a stage by subclassing :class:`Stage` and writing one
method, :meth:`Stage.process`. It receives a :class:`Task` and either returns
a :class:`Result` at once (a last stage), or is a *generator* that yields one
:class:`Offload` (the work to hand to the next stage) and receives that
stage's reply before returning its own :class:`Result` (an intermediate
stage)::

    class Double(Stage):
        def process(self, task):
            return Result({"y": task.tensors["x"] * 2})

    class Middle(Stage):
        def process(self, task):
            a = self.partition(task.tensors["x"])
            reply = yield Offload("train", {"x": a})   # runs on the next stage
            ...                                        # resumes with its reply
            return Result({"grad": g}, {"loss": reply.meta["loss"]})

:class:`StageRuntime` does the rest. It runs one poll loop over its broker
link and, for an intermediate stage, a :class:`~sparse_zmq.master.Master`
connected to the next broker's frontend. Many tasks may be in flight at once
(one generator each, keyed by the downstream task id), which is what lets
micro-batches flow through the stages back to back. An offload inherits the
``stream`` of the task it serves, so the next broker pins a training stream
to one worker as the first broker does.

The broker link. The poll loop owns the worker's DEALER and reads tasks
from it directly, so a task crosses no thread of ours on its way in or out.
While :meth:`Stage.process` computes, a small keeper thread borrows the
socket (behind a lock) to send the heartbeats that fall due, so a task may
compute for longer than the broker's liveness timeout. The link:

* connects under an identity unique to this process and connection,
  ``<node>/<stage>/<pid>/<random>``, and announces ``slots`` free slots;
* sends a heartbeat every interval: the broker's (learnt from its first
  heartbeat), or ``heartbeat_interval_s * liveness`` before one has come;
* reconnects as a new worker, under a new identity, when a broker that has
  sent heartbeats falls silent for its liveness timeout (it died, restarted
  or was cut off; silence is never judged before the first heartbeat, so a
  worker started before its broker just waits), or when it answers with
  ``disconnect`` (it declared this worker lost, or restarted). The poll loop
  then abandons its tasks waiting on the next stage, since the broker has
  given them to other workers or forgotten them; a reply computed for an old
  task still goes out, and the broker drops it.

A :meth:`Stage.process` that hangs while its process lives is not detected
by heartbeats; the master's task timeout ends such a task.

A task that raises, or whose offload fails or times out, is answered with an
``error`` message naming the node, stage, task and input shapes; the loop
carries on with the next task. Malformed messages get an error reply too and
are counted in :attr:`StageRuntime.stats`. A task or result larger than
``max_message_bytes`` is answered with an error naming both sizes.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from sparse_zmq.errors import ConfigError, ProtocolError, RemoteError, TaskTimeout
from sparse_zmq.master import LINGER_MS, Master, MasterConfig
from sparse_zmq.monitor import MonitorClient
from sparse_zmq.protocol import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_MESSAGE_BYTES,
    NOBLOCK,
    Kind,
    Limits,
    Message,
    error_frames,
    pack,
    parse_header,
    recv_frames,
    send_frames,
    split_envelope,
    unpack,
)
from sparse_zmq.security import CurveConfig, secure_client

__all__ = ["Offload", "Result", "Stage", "StageOutput", "StageRuntime", "Task"]

logger = logging.getLogger(__name__)

POLL_MS = 100
"""Poll timeout of the loop; bounds how long a stop request waits."""

STOP_TIMEOUT_S = 5.0
"""Longest wait for the heartbeat keeper to stop and the broker socket to be free."""

_READY_SLOTS_META = "slots"


@dataclass
class Task:
    """A task as a stage sees it.

    Attributes:
        task_id: Id given by the master that sent it.
        op: The operation asked for (``train``, ``infer``...).
        tensors: Decoded, writable CPU tensors.
        meta: The header's small JSON values (``op`` included).
    """

    task_id: str
    op: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


@dataclass
class Result:
    """What a stage answers a task with."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Offload:
    """Work an intermediate stage hands to the next stage of the pipeline."""

    op: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


StageOutput = Result | Generator[Offload, Message, Result]


class Stage(abc.ABC):
    """One partition of a pipeline, as an application writes it."""

    name: str = "stage"

    @abc.abstractmethod
    def process(self, task: Task) -> StageOutput:
        """Run one task.

        Returns:
            A :class:`Result`, or a generator that yields :class:`Offload`
            requests, is sent each one's reply :class:`Message`, and returns
            the :class:`Result`. A failed offload is thrown into the generator
            as :class:`~sparse_zmq.errors.RemoteError` or
            :class:`~sparse_zmq.errors.TaskTimeout`.
        """

    def serving(self) -> contextlib.AbstractContextManager[Any]:
        """A context the runtime holds open, in its thread, while it serves.

        The default does nothing. A stage overrides it for state that must
        span tasks, such as autograd hooks (see
        :class:`stages.training.SplitTrainingStage`'s weight stashing).
        """
        return contextlib.nullcontext()


@dataclass
class _Running:
    """A task whose generator waits on an offload."""

    task: Task
    envelope: list[Any]
    generator: Generator[Offload, Message, Result]
    started: float
    bytes_in: int
    batch_size: int


class _BrokerLink:
    """The worker's connection to its broker.

    The poll loop owns the DEALER and reads tasks from it directly, so a task
    crosses no extra thread on its way in or out. While the loop computes
    (inside :meth:`busy`), a keeper thread may borrow the socket to send
    heartbeats. A lock decides who holds the socket at any moment: the loop
    holds it except while it computes, and the keeper only takes it when it
    is free. Handing a socket from thread to thread behind a lock is what
    ZeroMQ allows (the lock is the full memory barrier it asks for).

    Everything else about the broker (identity, ``ready``, heartbeats, the
    broker's liveness, reconnecting) happens here too; the loop calls
    :meth:`receive` when the socket is readable and :meth:`tick` every turn.
    """

    def __init__(
        self,
        context: zmq.Context[Any],
        backend: str,
        *,
        where: str,
        slots: int,
        heartbeat_interval_s: float,
        liveness: int,
        limits: Limits,
        curve: CurveConfig | None,
    ) -> None:
        self.backend = backend
        self.slots = slots
        self.stats = {
            "heartbeats_sent": 0,
            "heartbeats_received": 0,
            "reconnects": 0,
            "replies_dropped": 0,
        }
        self.identity = b""
        self.broker: str | None = None
        self.on_reset: Callable[[], None] | None = None
        """Called (by the loop's thread) after reconnecting as a new worker."""
        self._context = context
        self._where = where
        self._own_interval = heartbeat_interval_s
        self._own_liveness = liveness
        self._limits = limits
        self._curve = curve
        self._interval = heartbeat_interval_s
        self._liveness = liveness
        self._heard_at: float | None = None
        self._next_beat = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._closed = False
        self.socket: zmq.Socket[Any] = self._connect()

    def _connect(self) -> zmq.Socket[Any]:
        """A new DEALER to the broker under a new identity."""
        name = f"{self._where}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.identity = name.encode("utf-8", "replace")[-255:].lstrip(b"\0") or b"w"
        dealer: zmq.Socket[Any] = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, LINGER_MS)
        dealer.setsockopt(zmq.IDENTITY, self.identity)
        if self._curve is not None:
            secure_client(dealer, self._curve)
        dealer.connect(self.backend)
        return dealer

    def start(self) -> None:
        """Take the socket for the calling thread, announce the slots, start the keeper."""
        self._lock.acquire()
        self._control(Kind.READY, {_READY_SLOTS_META: self.slots})
        logger.info(
            "%s: announced %d slots to %s as worker %s",
            self._where,
            self.slots,
            self.backend,
            self.identity.decode("utf-8", "replace"),
        )
        self._next_beat = time.monotonic() + self._beat_interval()
        if self._keeper is None:
            self._keeper = threading.Thread(
                target=self._keep, name=f"heartbeats {self._where}", daemon=True
            )
            self._keeper.start()

    def release(self) -> None:
        """Give the socket up (the loop has ended)."""
        self._lock.release()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Lend the socket to the keeper while the calling thread computes."""
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()

    def stop(self) -> None:
        """Withdraw from the broker and close the socket (bounded wait)."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(STOP_TIMEOUT_S)
        if not self._lock.acquire(timeout=STOP_TIMEOUT_S):
            logger.warning("%s: broker link is still in use; not closed", self._where)
            return
        try:
            if not self._closed:
                self._closed = True
                try:
                    self._control(Kind.DISCONNECT, {})
                finally:
                    self.socket.close(linger=LINGER_MS)
        finally:
            self._lock.release()

    def _keep(self) -> None:
        """Send the heartbeats that fall due while the loop computes.

        Wakes at least twice per heartbeat interval; when the loop holds the
        socket it beats by itself, and the keeper just looks again later.
        """
        while not self._stop.wait(
            max(0.005, min(self._next_beat - time.monotonic(), self._interval / 2))
        ):
            if self._lock.acquire(blocking=False):
                try:
                    if not self._closed:
                        self._beat_if_due(time.monotonic())
                finally:
                    self._lock.release()

    # Called by the loop, holding the socket.

    def wait_ms(self, longest_ms: int) -> int:
        """How long the loop may poll before the next heartbeat is due."""
        due_ms = int((self._next_beat - time.monotonic()) * 1000) + 1
        return max(0, min(longest_ms, due_ms))

    def receive(self) -> list[list[zmq.Frame]]:
        """Read what the broker sent; return the messages meant for the loop.

        Heartbeats and ``disconnect`` are handled here; everything else,
        tasks and malformed messages alike, goes to the loop.
        """
        dealer = self.socket
        messages = []
        for _ in range(256):
            try:
                frames = recv_frames(dealer, NOBLOCK)
            except zmq.Again:
                break
            if self._heard_at is not None:
                self._heard_at = time.monotonic()
            if len(frames[0]) == 0 and self._on_control(frames):
                if self.socket is not dealer:
                    break  # reconnected: what the old socket held is stale
                continue
            messages.append(frames)
        return messages

    def tick(self) -> None:
        """Heartbeat if due; reconnect if the broker has fallen silent."""
        now = time.monotonic()
        self._beat_if_due(now)
        silence = self._interval * self._liveness
        if self._heard_at is not None and now - self._heard_at > silence:
            self._reconnect(f"the broker has been silent for {now - self._heard_at:.1f}s")

    def send(self, frames: list[Any]) -> None:
        """Send a reply to the broker; drop it if the broker stops reading."""
        deadline = time.monotonic() + self._interval * self._liveness
        while True:
            try:
                send_frames(self.socket, frames, NOBLOCK)
                return
            except zmq.Again:
                now = time.monotonic()
                if now > deadline or self._stop.is_set():
                    break
                self._beat_if_due(now)
                self.socket.poll(POLL_MS, zmq.POLLOUT)
        self.stats["replies_dropped"] += 1
        logger.warning(
            "%s: the broker at %s does not take replies; one dropped",
            self._where,
            self.backend,
        )

    def _beat_if_due(self, now: float) -> None:
        if now >= self._next_beat:
            self._control(Kind.HEARTBEAT, {})
            self.stats["heartbeats_sent"] += 1
            self._next_beat = now + self._beat_interval()

    def _beat_interval(self) -> float:
        if self._heard_at is None:
            return self._own_interval * self._own_liveness
        return self._interval

    def _on_control(self, frames: list[zmq.Frame]) -> bool:
        """Handle a broker heartbeat or disconnect; False for anything else."""
        try:
            message = unpack(frames[1:], self._limits)
        except ProtocolError:
            return False  # the loop answers and counts it
        if message.kind is Kind.HEARTBEAT:
            # Silence counts from the first heartbeat on: a broker that never
            # sends any is never taken for dead.
            self._heard_at = time.monotonic()
            self.stats["heartbeats_received"] += 1
            self._adopt(message.meta)
            return True
        if message.kind is Kind.DISCONNECT:
            self._reconnect(
                "the broker does not know this worker (declared lost, or it restarted)"
            )
            return True
        return False

    def _adopt(self, meta: dict[str, Any]) -> None:
        """Take the broker's heartbeat interval and liveness, if sensible."""
        interval = meta.get("interval_s")
        liveness = meta.get("liveness")
        if (
            type(interval) in (int, float)
            and math.isfinite(interval)
            and (0.01 <= interval <= 3600)
        ):
            self._interval = float(interval)
        if type(liveness) is int and 1 <= liveness <= 1000:
            self._liveness = liveness
        # The first heartbeat may come long before the slow pre-handshake beat.
        self._next_beat = min(self._next_beat, time.monotonic() + self._interval)
        broker = meta.get("broker")
        if isinstance(broker, str) and broker != self.broker:
            logger.info(
                "%s: broker instance %.40s serves worker %s",
                self._where,
                broker,
                self.identity.decode("utf-8", "replace"),
            )
            self.broker = broker

    def _control(self, kind: Kind, meta: dict[str, Any]) -> None:
        try:
            send_frames(self.socket, [b"", *pack(Message(kind, meta=meta))], NOBLOCK)
        except zmq.Again:
            pass

    def _reconnect(self, reason: str) -> None:
        """Start afresh as a new worker and tell the loop."""
        old = self.identity.decode("utf-8", "replace")
        self.socket.close(linger=0)
        self.socket = self._connect()
        self._heard_at = None
        self._interval, self._liveness = self._own_interval, self._own_liveness
        self.stats["reconnects"] += 1
        logger.warning(
            "%s: %s; worker %s reconnects to %s as %s",
            self._where,
            reason,
            old,
            self.backend,
            self.identity.decode("utf-8", "replace"),
        )
        self._control(Kind.READY, {_READY_SLOTS_META: self.slots})
        self._next_beat = time.monotonic() + self._beat_interval()
        if self.on_reset is not None:
            self.on_reset()


class StageRuntime:
    """Serve a :class:`Stage` as a worker of a broker.

    Args:
        stage: The application's stage.
        backend: The broker backend to take tasks from.
        next_frontend: The next broker's frontend, for an intermediate stage.
        node: Name of this node in logs and monitor records.
        slots: Tasks this worker may hold at once.
        monitor: Where task records go (a no-op client if None).
        context: ZeroMQ context (one per process).
        limits: Bounds checked on every received message.
        task_timeout_s: Deadline for offloaded work.
        heartbeat_interval_s: Heartbeat interval used until the broker
            announces its own (it then also sets the liveness).
        liveness: Silent intervals after which the broker is taken to be gone.
        max_message_bytes: Largest task or result accepted or sent.
        next_config: Retries and timings of the master to the next broker
            (``task_timeout_s`` overrides its timeout).
        curve: CURVE keys for both connections; None for plain connections.

    Raises:
        ConfigError: ``slots`` or a limit is out of range.
    """

    def __init__(
        self,
        stage: Stage,
        backend: str,
        *,
        next_frontend: str | None = None,
        node: str = "node",
        slots: int = 1,
        monitor: MonitorClient | None = None,
        context: zmq.Context | None = None,
        limits: Limits = DEFAULT_LIMITS,
        task_timeout_s: float = 600.0,
        heartbeat_interval_s: float = 1.0,
        liveness: int = 3,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        next_config: MasterConfig | None = None,
        curve: CurveConfig | None = None,
    ) -> None:
        if type(slots) is not int or slots < 1:
            raise ConfigError(f"slots must be an integer of at least 1, got {slots!r}")
        if max_message_bytes < limits.max_header_bytes:
            raise ConfigError(
                f"max_message_bytes of {max_message_bytes} is too small: a message "
                f"must at least carry a header of up to {limits.max_header_bytes} bytes"
            )
        self.stage = stage
        self.node = node
        self.slots = slots
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.monitor = monitor or MonitorClient(
            None, node=node, stage=stage.name, role="stage"
        )
        self.stats = {"tasks": 0, "errors": 0, "malformed": 0, "abandoned": 0}
        self._context = context or zmq.Context.instance()
        self._where = f"{node}/{stage.name}"
        self._link = _BrokerLink(
            self._context,
            backend,
            where=self._where,
            slots=slots,
            heartbeat_interval_s=heartbeat_interval_s,
            liveness=liveness,
            limits=limits,
            curve=curve,
        )
        self._link.on_reset = self._abandon
        self._next = (
            Master(
                next_frontend,
                name=self._where,
                context=self._context,
                limits=limits,
                task_timeout_s=task_timeout_s,
                config=next_config,
                curve=curve,
            )
            if next_frontend
            else None
        )
        logger.info(
            "%s: stage connected to backend %s%s",
            self._where,
            backend,
            f", offloading to {next_frontend}" if next_frontend else "",
        )

    @property
    def link_stats(self) -> dict[str, int]:
        """Counters of the broker link: heartbeats sent and received, reconnects."""
        return dict(self._link.stats)

    @property
    def identity(self) -> bytes:
        """The worker's current routing identity at its broker."""
        return self._link.identity

    def run(self, stop: threading.Event) -> None:
        """Serve tasks until ``stop`` is set."""
        self._link.start()
        try:
            with self.stage.serving():
                self._serve(stop)
        finally:
            self._link.release()
        logger.info(
            "%s: stopping with %d tasks in flight",
            self._where,
            len(self._next.pending) if self._next is not None else 0,
        )

    def _serve(self, stop: threading.Event) -> None:
        link = self._link
        poller = zmq.Poller()
        polled = link.socket
        poller.register(polled, zmq.POLLIN)
        if self._next is not None:
            poller.register(self._next.socket, zmq.POLLIN)
        while not stop.is_set():
            events = dict(poller.poll(link.wait_ms(POLL_MS)))
            if polled in events:
                for frames in link.receive():
                    self._on_task(frames)
            if self._next is not None:
                if self._next.socket in events:
                    reply = self._next.read()
                    if reply is not None:
                        self._resume(reply)
                for reply in self._next.tick():
                    self._resume(reply)
            link.tick()
            if link.socket is not polled:  # reconnected as a new worker
                poller.unregister(polled)
                polled = link.socket
                poller.register(polled, zmq.POLLIN)

    def close(self) -> None:
        """Withdraw from the broker and close the sockets (bounded waits)."""
        self._link.stop()
        if self._next is not None:
            self._next.close()
        self.monitor.close(linger_s=1.0)

    def _resume(self, reply: Any) -> None:
        """Resume the task waiting on an offload with how that offload ended."""
        running = reply.pending.context
        if reply.ok:
            self._advance(running, reply.message)
        elif reply.timed_out:
            self._advance(
                running,
                error=TaskTimeout(
                    f"offloaded task {reply.pending.task_id} got no reply in time"
                ),
            )
        else:
            self._advance(
                running, error=RemoteError(reply.message.task_id, reply.reason)
            )

    def _abandon(self) -> None:
        """Drop the tasks waiting on offloads: the broker re-sent them elsewhere."""
        if self._next is None:
            return
        dropped = 0
        for task_id in list(self._next.pending):
            pending = self._next.cancel(task_id)
            if pending is not None and isinstance(pending.context, _Running):
                pending.context.generator.close()
                dropped += 1
        self.stats["abandoned"] += dropped
        if dropped:
            logger.warning(
                "%s: reconnected as a new worker; %d tasks waiting on the "
                "next stage abandoned",
                self._where,
                dropped,
            )

    def _malformed(self, what: str, exc: ProtocolError) -> None:
        """Count a malformed message; log the first 100, then one in 1000."""
        self.stats["malformed"] += 1
        count = self.stats["malformed"]
        if count <= 100 or count % 1000 == 0:
            logger.warning("%s: %s (malformed=%d): %s", self._where, what, count, exc)

    def _on_task(self, frames: list[zmq.Frame]) -> None:
        started = time.time()
        bytes_in = sum(len(f) for f in frames)
        try:
            envelope, body = split_envelope(frames)
        except ProtocolError as exc:
            self._malformed("unroutable message dropped", exc)
            return
        try:
            size = bytes_in - sum(len(f) for f in envelope)
            if size > self.max_message_bytes:
                task_id = parse_header(body[0], self.limits).task_id if body else ""
                raise ProtocolError(
                    f"task {task_id!r} is {size} bytes, above this worker's message "
                    f"size limit (max_message_bytes) of {self.max_message_bytes}"
                )
            message = unpack(body, self.limits)
            if message.kind is not Kind.TASK:
                raise ProtocolError(
                    f"stage expects kind 'task', got {message.kind.value!r}"
                )
            op = message.meta.get("op")
            if not isinstance(op, str):
                raise ProtocolError(f"task meta 'op' must be a string, got {op!r:.40}")
        except ProtocolError as exc:
            self._malformed("malformed task rejected", exc)
            self._link.send([*envelope, b"", *error_frames("", str(exc))])
            return

        task = Task(message.task_id, op, message.tensors, message.meta)
        first = next(iter(task.tensors.values()), None)
        batch_size = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
        try:
            with self._link.busy():
                output = self.stage.process(task)
        except Exception as exc:  # noqa: BLE001 - one bad task must not end the loop
            self._fail(task, envelope, started, bytes_in, batch_size, exc)
            return
        if isinstance(output, Result):
            self._finish(task, envelope, started, bytes_in, batch_size, output)
            return
        self._advance(
            _Running(task, envelope, output, started, bytes_in, batch_size), None
        )

    def _advance(
        self,
        running: _Running,
        reply: Message | None = None,
        *,
        error: Exception | None = None,
    ) -> None:
        """Resume a task's generator with a reply (or error) and act on what it yields."""
        try:
            with self._link.busy():
                if error is not None:
                    request = running.generator.throw(error)
                else:
                    request = running.generator.send(reply)  # type: ignore[arg-type]
        except StopIteration as done:
            result = done.value if isinstance(done.value, Result) else Result()
            self._finish(
                running.task,
                running.envelope,
                running.started,
                running.bytes_in,
                running.batch_size,
                result,
            )
            return
        except Exception as exc:  # noqa: BLE001 - answer the task, keep serving
            self._fail(
                running.task,
                running.envelope,
                running.started,
                running.bytes_in,
                running.batch_size,
                exc,
            )
            return

        if self._next is None or not isinstance(request, Offload):
            running.generator.close()
            self._fail(
                running.task,
                running.envelope,
                running.started,
                running.bytes_in,
                running.batch_size,
                ProtocolError(
                    f"stage yielded {type(request).__name__} but only an Offload to a "
                    "next stage (started with a next broker) is allowed"
                ),
            )
            return
        meta = request.meta
        stream = running.task.meta.get("stream")
        if stream is not None and "stream" not in meta:
            meta = {**meta, "stream": stream}
        try:
            self._next.submit(request.op, request.tensors, meta, context=running)
        except ProtocolError as exc:
            running.generator.close()
            self._fail(
                running.task,
                running.envelope,
                running.started,
                running.bytes_in,
                running.batch_size,
                exc,
            )

    def _finish(
        self,
        task: Task,
        envelope: list[Any],
        started: float,
        bytes_in: int,
        batch_size: int,
        result: Result,
    ) -> None:
        frames = pack(Message(Kind.RESULT, task.task_id, result.tensors, result.meta))
        bytes_out = sum(memoryview(f).nbytes for f in frames)
        if bytes_out > self.max_message_bytes:
            self._fail(
                task,
                envelope,
                started,
                bytes_in,
                batch_size,
                ProtocolError(
                    f"result is {bytes_out} bytes, above the message size limit "
                    f"(max_message_bytes) of {self.max_message_bytes}"
                ),
            )
            return
        self._link.send([*envelope, b"", *frames])
        self.stats["tasks"] += 1
        self.monitor.task(
            task.task_id,
            task.op,
            batch_size,
            started,
            time.time(),
            bytes_in,
            bytes_out,
            status="ok",
        )

    def _fail(
        self,
        task: Task,
        envelope: list[Any],
        started: float,
        bytes_in: int,
        batch_size: int,
        exc: BaseException,
    ) -> None:
        shapes = {name: list(t.shape) for name, t in task.tensors.items()}
        reason = f"{self._where} failed task {task.task_id} (op {task.op}, shapes {shapes}): "
        reason += f"{type(exc).__name__}: {exc}"
        logger.warning(
            "%s",
            reason,
            exc_info=not isinstance(exc, (RemoteError, TaskTimeout, ProtocolError)),
        )
        frames = error_frames(task.task_id, reason)
        self._link.send([*envelope, b"", *frames])
        self.stats["errors"] += 1
        self.monitor.task(
            task.task_id,
            task.op,
            batch_size,
            started,
            time.time(),
            bytes_in,
            sum(len(f) for f in frames),
            status="error",
            detail=f"{type(exc).__name__}: {exc}"[:200],
        )
