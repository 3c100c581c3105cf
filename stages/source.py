"""The data source: the edge node that feeds a split-learning pipeline.

The source reads mini-batches, optionally runs the first partition itself
(the *on-device* placement), cuts each mini-batch into micro-batches and
sends them to the first broker, all of one mini-batch before the first reply
(GPipe-style). With an on-device partition it back-propagates the gradients
that come back and steps its own optimizer once per mini-batch.

**Mini-batches in flight.** By default (``in_flight=1``) the next mini-batch
is sent only once every micro-batch of the previous one has come back and
the source has stepped: with micro-batches this is exact GPipe, and the
parameters equal those of sequential, unsplit training (for models without
batch norm; with batch norm the statistics are per micro-batch). With
``in_flight=k > 1`` up to ``k`` mini-batches are under way at once, so the
stages never wait for the source between mini-batches; but a mini-batch may
then run forward on weights that earlier mini-batches have not updated yet,
and the run **no longer equals sequential training** (it is one or more
steps stale, as in asynchronous pipelines such as PipeDream). The source's own
partition then keeps the weights each mini-batch's forward used for its
backward (weight stashing, through
:class:`~stages.training.WeightStash`). So must every
intermediate remote stage: a
:class:`~stages.training.SplitTrainingStage` holds autograd graphs across its
offload, and without ``stash_weights`` (``sparse-zmq stage
--stash-weights``, which ``sparse-zmq run`` passes when ``--in-flight`` is
above 1) a step between another mini-batch's forward and backward makes that
backward fail (``modified by an inplace operation``), so the mini-batch is
answered with an error.

Replies are matched to micro-batches by task id, never by arrival order.
After training it measures accuracy on held-out data with ``infer`` tasks.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparse_zmq.errors import ConfigError, RemoteError, TaskTimeout
from sparse_zmq.master import Master, Reply
from sparse_zmq.monitor import MonitorClient
from stages.data import Dataset, batches
from stages.training import Optimizer, WeightStash

__all__ = ["TrainingSource", "TrainingReport"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingReport:
    """What a source saw during a run."""

    samples: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    train_correct: int = 0
    test_samples: int = 0
    test_correct: int = 0
    failed_batches: int = 0

    @property
    def samples_per_s(self) -> float:
        """Training throughput seen by the source."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def test_accuracy(self) -> float | None:
        """Held-out accuracy, or None when no evaluation ran."""
        return self.test_correct / self.test_samples if self.test_samples else None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        head = self.losses[: max(1, len(self.losses) // 10)]
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return {
            "samples": self.samples,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.samples_per_s, 2),
            "batches": len(self.losses),
            "failed_batches": self.failed_batches,
            "loss_start": sum(head) / len(head) if self.losses else None,
            "loss_end": sum(tail) / len(tail) if self.losses else None,
            "test_samples": self.test_samples,
            "test_accuracy": self.test_accuracy,
        }


@dataclass
class _MiniBatch:
    """A mini-batch under way: the micro-batches still out, and what came back."""

    batch_id: str
    size: int
    started: float
    waiting: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    loss: float = 0.0
    correct: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    failure: Exception | None = None


class TrainingSource:
    """Feeds mini-batches into a pipeline and records their completion.

    Args:
        master: Connected to the first broker's frontend.
        first: The partition run on this device, or None to send raw data.
        optimizer: Optimizer settings for ``first``.
        micro_batches: Micro-batches per mini-batch.
        in_flight: Mini-batches under way at once (see the module docstring:
            1 is exact GPipe; more no longer equals sequential training).
        monitor: Where one record per mini-batch goes.
        timeout_s: How long one mini-batch may take end to end.

    Raises:
        ConfigError: ``micro_batches`` or ``in_flight`` is below 1.
    """

    def __init__(
        self,
        master: Master,
        *,
        first: nn.Module | None = None,
        optimizer: Optimizer = Optimizer(),
        micro_batches: int = 1,
        in_flight: int = 1,
        monitor: MonitorClient | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        for name, value in (("micro_batches", micro_batches), ("in_flight", in_flight)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        self.master = master
        self.first = first
        self.optimizer = (
            optimizer.build(first.parameters()) if first is not None else None
        )
        self.micro_batches = micro_batches
        self.in_flight = in_flight
        self.monitor = monitor or MonitorClient(
            None, node="source", stage="source", role="source"
        )
        self.timeout_s = timeout_s
        self._by_task: dict[str, _MiniBatch] = {}
        self._stash = WeightStash()

    def train(
        self, data: Dataset, *, batch_size: int, batches_total: int, seed: int = 0
    ) -> TrainingReport:
        """Train for ``batches_total`` mini-batches, cycling over ``data``.

        Up to :attr:`in_flight` mini-batches are under way at once. A
        mini-batch that fails or times out is logged, counted in the report
        and not retried (the stages may hold part of its update).
        """
        report = TrainingReport()
        started = time.perf_counter()
        under_way: collections.deque[_MiniBatch] = collections.deque()
        # Several mini-batches in flight: the source's partition steps between a
        # later mini-batch's forward and backward, so keep the weights it used.
        stash: contextlib.AbstractContextManager[Any] = (
            self._stash if self.in_flight > 1 and self.first is not None
            else contextlib.nullcontext()
        )
        # Mini-batch ids are unique to this call, so that a long-lived stage
        # never takes a new mini-batch for a re-sent old one.
        run = uuid.uuid4().hex[:8]
        with stash:
            sent = 0
            epoch = 0
            while sent < batches_total:
                for images, labels in batches(
                    data, batch_size, shuffle=True, seed=seed + epoch
                ):
                    if sent >= batches_total:
                        break
                    while len(under_way) >= self.in_flight:
                        self._complete_oldest(under_way, report, batches_total)
                    under_way.append(
                        self._send(images, labels, batch_id=f"{run}-b{sent}")
                    )
                    sent += 1
                epoch += 1
            while under_way:
                self._complete_oldest(under_way, report, batches_total)
        report.seconds = time.perf_counter() - started
        return report

    def _complete_oldest(
        self,
        under_way: collections.deque[_MiniBatch],
        report: TrainingReport,
        total: int,
    ) -> None:
        """Wait for the oldest mini-batch under way and record it in ``report``."""
        batch = under_way.popleft()
        index = len(report.losses) + report.failed_batches
        try:
            loss, correct = self._wait(batch)
        except (RemoteError, TaskTimeout) as exc:
            report.failed_batches += 1
            logger.warning("source: mini-batch %s failed: %s", batch.batch_id, exc)
            return
        report.losses.append(loss)
        report.train_correct += correct
        report.samples += batch.size
        if index % 10 == 0:
            logger.info("source: batch %d/%d loss %.4f", index, total, loss)

    def train_batch(
        self, images: torch.Tensor, labels: torch.Tensor, *, batch_id: str
    ) -> tuple[float, int]:
        """Send one mini-batch as micro-batches and wait for all their replies.

        Returns:
            The mini-batch's mean loss and number of correct predictions.

        Raises:
            RemoteError: A micro-batch failed in the pipeline.
            TaskTimeout: A micro-batch got no reply in time.
        """
        return self._wait(self._send(images, labels, batch_id=batch_id))

    def _send(
        self, images: torch.Tensor, labels: torch.Tensor, *, batch_id: str
    ) -> _MiniBatch:
        """Run the source's partition on each micro-batch and send them all."""
        batch = _MiniBatch(batch_id, len(labels), time.time())
        chunks = list(
            zip(
                images.chunk(self.micro_batches),
                labels.chunk(self.micro_batches),
                strict=True,
            )
        )
        for micro, (x, y) in enumerate(chunks):
            # "stream" pins training to the workers holding this run's parameters.
            meta = {
                "batch": batch_id,
                "micro": micro,
                "micros": len(chunks),
                "scale": len(y) / len(labels),
                "grad": self.first is not None,
                "stream": f"{self.master.name}/train",
            }
            if self.first is not None:
                self.first.train()
                x = self.first(x)
            task_id = self.master.submit(
                "train", {"x": x.detach(), "y": y}, meta, timeout_s=self.timeout_s
            )
            batch.bytes_out += self.master.pending[task_id].bytes_out
            batch.waiting[task_id] = (x, meta["scale"])
            self._by_task[task_id] = batch
        return batch

    def _wait(self, batch: _MiniBatch) -> tuple[float, int]:
        """Take replies (of any mini-batch under way) until ``batch`` is in, then step.

        Raises:
            RemoteError: A micro-batch of ``batch`` failed in the pipeline.
            TaskTimeout: A micro-batch of ``batch`` got no reply in time.
        """
        while batch.waiting:
            reply = self.master.receive(self.timeout_s)
            if reply is None:
                batch.failure = batch.failure or TaskTimeout(
                    f"{len(batch.waiting)} micro-batches of {batch.batch_id} got no "
                    "reply "
                    f"within {self.timeout_s:.0f}s"
                )
                break
            self._on_reply(reply)
        for task_id in batch.waiting:
            self.master.pending.pop(task_id, None)
            self._by_task.pop(task_id, None)
        batch.waiting.clear()

        if batch.failure is not None:
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            self._record(batch, status="error", detail=str(batch.failure)[:200])
            raise batch.failure
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._stash.forget_spent()
        self._record(batch, status="ok")
        return batch.loss, batch.correct

    def _record(self, batch: _MiniBatch, **fields: Any) -> None:
        """Write one mini-batch's task record to the monitor."""
        self.monitor.task(
            batch.batch_id,
            "train",
            batch.size,
            batch.started,
            time.time(),
            batch.bytes_in,
            batch.bytes_out,
            **fields,
        )

    def _on_reply(self, reply: Reply) -> None:
        """Back-propagate one micro-batch's gradient and add up its loss."""
        task_id = reply.pending.task_id
        batch = self._by_task.pop(task_id, None)
        sent = batch.waiting.pop(task_id, None) if batch is not None else None
        if batch is None or sent is None:
            return
        activation, scale = sent
        batch.bytes_in += reply.bytes_in
        try:
            message = reply.raise_for_error()
        except (RemoteError, TaskTimeout) as exc:
            batch.failure = batch.failure or exc
            return
        if self.first is not None:
            activation.backward(message.tensors["grad"])
        batch.loss += float(message.meta["loss"]) * scale
        batch.correct += int(message.meta.get("correct", 0))

    def evaluate(self, data: Dataset, *, batch_size: int) -> tuple[int, int]:
        """Count correct predictions on ``data`` with ``infer`` tasks.

        Returns:
            ``(samples, correct)``.
        """
        samples = 0
        correct = 0
        for images, labels in batches(
            data, batch_size, shuffle=False, seed=0, drop_last=False
        ):
            x = images
            if self.first is not None:
                self.first.eval()
                with torch.no_grad():
                    x = self.first(x)
            reply = self.master.request(
                "infer", {"x": x, "y": labels}, timeout_s=self.timeout_s
            )
            correct += int(reply.message.meta["correct"])
            samples += len(labels)
        return samples, correct
