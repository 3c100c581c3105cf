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

:class:`StageRuntime` does the rest. It connects a DEALER to the broker's
backend, announces ``slots`` free task slots, and runs one poll loop over
that socket and, for an intermediate stage, a :class:`~sparse_zmq.master.Master`
connected to the next broker's frontend. Many tasks may be in flight at once
(one generator each, keyed by the downstream task id), which is what lets
micro-batches flow through the stages back to back.

A task that raises, or whose offload fails or times out, is answered with an
``error`` message naming the node, stage, task and input shapes; the loop
carries on with the next task. Malformed messages get an error reply too and
are counted in :attr:`StageRuntime.stats`.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import zmq

from sparse_zmq.errors import ProtocolError, RemoteError, TaskTimeout
from sparse_zmq.master import LINGER_MS, Master
from sparse_zmq.monitor import MonitorClient
from sparse_zmq.protocol import (
    DEFAULT_LIMITS,
    Kind,
    Limits,
    Message,
    error_frames,
    pack,
    split_envelope,
    unpack,
)
from sparse_zmq.security import CurveConfig, secure_client

__all__ = ["Task", "Result", "Offload", "Stage", "StageRuntime", "StageOutput"]

logger = logging.getLogger(__name__)

POLL_MS = 100
"""Poll timeout of the loop; bounds how long a stop request waits."""


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


StageOutput = Union[Result, Generator[Offload, Message, Result]]


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


@dataclass
class _Running:
    """A task whose generator waits on an offload."""

    task: Task
    envelope: list[Any]
    generator: Generator[Offload, Message, Result]
    started: float
    bytes_in: int
    batch_size: int


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
        curve: CURVE keys for both connections; None for plain connections.
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
        curve: CurveConfig | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.stage = stage
        self.node = node
        self.slots = slots
        self.limits = limits
        self.monitor = monitor or MonitorClient(None, node=node, stage=stage.name, role="stage")
        self.stats = {"tasks": 0, "errors": 0, "malformed": 0}
        self._context = context or zmq.Context.instance()
        self._worker = self._context.socket(zmq.DEALER)
        self._worker.setsockopt(zmq.LINGER, LINGER_MS)
        if curve is not None:
            secure_client(self._worker, curve)
        self._worker.connect(backend)
        self._next = (
            Master(
                next_frontend,
                name=f"{node}/{stage.name}",
                context=self._context,
                limits=limits,
                task_timeout_s=task_timeout_s,
                curve=curve,
            )
            if next_frontend
            else None
        )
        self._running: dict[str, _Running] = {}
        self._where = f"{node}/{stage.name}"
        logger.info(
            "%s: stage connected to backend %s%s", self._where, backend,
            f", offloading to {next_frontend}" if next_frontend else "",
        )

    def run(self, stop: threading.Event) -> None:
        """Serve tasks until ``stop`` is set."""
        poller = zmq.Poller()
        poller.register(self._worker, zmq.POLLIN)
        if self._next is not None:
            poller.register(self._next.socket, zmq.POLLIN)
        self._send_control(Kind.READY, {"slots": self.slots})

        while not stop.is_set():
            events = dict(poller.poll(POLL_MS))
            if self._worker in events:
                self._on_task(self._worker.recv_multipart(copy=False))
            if self._next is not None and self._next.socket in events:
                reply = self._next.read()
                if reply is not None:
                    running = reply.pending.context
                    if reply.ok:
                        self._advance(running, reply.message)
                    else:
                        self._advance(running, error=RemoteError(
                            reply.message.task_id, str(reply.message.meta.get("reason"))
                        ))
            if self._next is not None and self._next.pending:
                for late in self._next.expired():
                    self._advance(late.context, error=TaskTimeout(
                        f"offloaded task {late.task_id} got no reply in time"
                    ))
        logger.info("%s: stopping with %d tasks in flight", self._where, len(self._running))

    def close(self) -> None:
        """Withdraw from the broker and close the sockets (bounded linger)."""
        try:
            self._send_control(Kind.DISCONNECT, {})
        except zmq.ZMQError:
            pass
        self._worker.close()
        if self._next is not None:
            self._next.close()
        self.monitor.close(linger_s=1.0)

    def _send_control(self, kind: Kind, meta: dict[str, Any]) -> None:
        self._worker.send_multipart([b"", *pack(Message(kind, meta=meta))])

    def _on_task(self, frames: list[zmq.Frame]) -> None:
        started = time.time()
        bytes_in = sum(len(f) for f in frames)
        try:
            envelope, body = split_envelope(frames)
        except ProtocolError as exc:
            self.stats["malformed"] += 1
            logger.warning("%s: unroutable message dropped: %s", self._where, exc)
            return
        try:
            message = unpack(body, self.limits)
            if message.kind is not Kind.TASK:
                raise ProtocolError(f"stage expects kind 'task', got {message.kind.value!r}")
            op = message.meta.get("op")
            if not isinstance(op, str):
                raise ProtocolError(f"task meta 'op' must be a string, got {op!r:.40}")
        except ProtocolError as exc:
            self.stats["malformed"] += 1
            logger.warning("%s: malformed task rejected: %s", self._where, exc)
            self._worker.send_multipart([*envelope, b"", *error_frames("", str(exc))])
            return

        task = Task(message.task_id, op, message.tensors, message.meta)
        first = next(iter(task.tensors.values()), None)
        batch_size = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
        try:
            output = self.stage.process(task)
        except Exception as exc:  # noqa: BLE001 - one bad task must not end the loop
            self._fail(task, envelope, started, bytes_in, batch_size, exc)
            return
        if isinstance(output, Result):
            self._finish(task, envelope, started, bytes_in, batch_size, output)
            return
        self._advance(_Running(task, envelope, output, started, bytes_in, batch_size), None)

    def _advance(
        self,
        running: _Running,
        reply: Message | None = None,
        *,
        error: Exception | None = None,
    ) -> None:
        """Resume a task's generator with a reply (or error) and act on what it yields."""
        try:
            if error is not None:
                request = running.generator.throw(error)
            else:
                request = running.generator.send(reply)  # type: ignore[arg-type]
        except StopIteration as done:
            result = done.value if isinstance(done.value, Result) else Result()
            self._finish(running.task, running.envelope, running.started,
                         running.bytes_in, running.batch_size, result)
            return
        except Exception as exc:  # noqa: BLE001 - answer the task, keep serving
            self._fail(running.task, running.envelope, running.started,
                       running.bytes_in, running.batch_size, exc)
            return

        if self._next is None or not isinstance(request, Offload):
            running.generator.close()
            self._fail(running.task, running.envelope, running.started, running.bytes_in,
                       running.batch_size, ProtocolError(
                           f"stage yielded {type(request).__name__} but only an Offload to a "
                           "next stage (started with a next broker) is allowed"))
            return
        self._next.submit(request.op, request.tensors, request.meta, context=running)

    def _finish(
        self, task: Task, envelope: list[Any], started: float, bytes_in: int,
        batch_size: int, result: Result,
    ) -> None:
        frames = pack(Message(Kind.RESULT, task.task_id, result.tensors, result.meta))
        self._worker.send_multipart([*envelope, b"", *frames], copy=False)
        self.stats["tasks"] += 1
        bytes_out = sum(memoryview(f).nbytes for f in frames)
        self.monitor.task(task.task_id, task.op, batch_size, started, time.time(),
                          bytes_in, bytes_out, status="ok")

    def _fail(
        self, task: Task, envelope: list[Any], started: float, bytes_in: int,
        batch_size: int, exc: BaseException,
    ) -> None:
        shapes = {name: list(t.shape) for name, t in task.tensors.items()}
        reason = f"{self._where} failed task {task.task_id} (op {task.op}, shapes {shapes}): "
        reason += f"{type(exc).__name__}: {exc}"
        logger.warning("%s", reason, exc_info=not isinstance(exc, (RemoteError, TaskTimeout)))
        frames = error_frames(task.task_id, reason)
        self._worker.send_multipart([*envelope, b"", *frames])
        self.stats["errors"] += 1
        self.monitor.task(task.task_id, task.op, batch_size, started, time.time(),
                          bytes_in, sum(len(f) for f in frames), status="error",
                          detail=f"{type(exc).__name__}: {exc}"[:200])
