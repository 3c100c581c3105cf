"""The data source: the edge node that feeds a split-learning pipeline.

The source reads mini-batches, optionally runs the first partition itself
(the *on-device* placement), cuts each mini-batch into micro-batches and
sends them to the first broker, all of one mini-batch before the first reply
(GPipe-style). With an on-device partition it back-propagates the gradients
that come back and steps its own optimizer once per mini-batch.

Replies are matched to micro-batches by task id, never by arrival order.
After training it measures accuracy on held-out data with ``infer`` tasks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparse_zmq.errors import RemoteError, TaskTimeout
from sparse_zmq.master import Master
from sparse_zmq.monitor import MonitorClient
from stages.data import Dataset, batches
from stages.training import Optimizer

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


class TrainingSource:
    """Feeds mini-batches into a pipeline and records their completion.

    Args:
        master: Connected to the first broker's frontend.
        first: The partition run on this device, or None to send raw data.
        optimizer: Optimizer settings for ``first``.
        micro_batches: Micro-batches per mini-batch.
        monitor: Where one record per mini-batch goes.
        timeout_s: How long one mini-batch may take end to end.
    """

    def __init__(
        self,
        master: Master,
        *,
        first: nn.Module | None = None,
        optimizer: Optimizer = Optimizer(),
        micro_batches: int = 1,
        monitor: MonitorClient | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.master = master
        self.first = first
        self.optimizer = optimizer.build(first.parameters()) if first is not None else None
        self.micro_batches = micro_batches
        self.monitor = monitor or MonitorClient(None, node="source", stage="source", role="source")
        self.timeout_s = timeout_s

    def train(self, data: Dataset, *, batch_size: int, batches_total: int, seed: int = 0) -> TrainingReport:
        """Train for ``batches_total`` mini-batches, cycling over ``data``.

        A mini-batch that fails or times out is logged, counted in the report
        and not retried (the stages may hold part of its update).
        """
        report = TrainingReport()
        started = time.perf_counter()
        epoch = 0
        while len(report.losses) + report.failed_batches < batches_total:
            for images, labels in batches(data, batch_size, shuffle=True, seed=seed + epoch):
                if len(report.losses) + report.failed_batches >= batches_total:
                    break
                index = len(report.losses) + report.failed_batches
                try:
                    loss, correct = self.train_batch(images, labels, batch_id=f"b{index}")
                except (RemoteError, TaskTimeout) as exc:
                    report.failed_batches += 1
                    logger.warning("source: mini-batch %d failed: %s", index, exc)
                    continue
                report.losses.append(loss)
                report.train_correct += correct
                report.samples += len(labels)
                if index % 10 == 0:
                    logger.info("source: batch %d/%d loss %.4f", index, batches_total, loss)
            epoch += 1
        report.seconds = time.perf_counter() - started
        return report

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor, *, batch_id: str) -> tuple[float, int]:
        """Send one mini-batch as micro-batches and wait for all their replies.

        Returns:
            The mini-batch's mean loss and number of correct predictions.

        Raises:
            RemoteError: A micro-batch failed in the pipeline.
            TaskTimeout: A micro-batch got no reply in time.
        """
        started = time.time()
        chunks = list(zip(images.chunk(self.micro_batches), labels.chunk(self.micro_batches)))
        activations: dict[str, tuple[torch.Tensor, float]] = {}
        bytes_out = 0
        for micro, (x, y) in enumerate(chunks):
            meta = {"batch": batch_id, "micro": micro, "micros": len(chunks),
                    "scale": len(y) / len(labels), "grad": self.first is not None}
            if self.first is not None:
                self.first.train()
                x = self.first(x)
            task_id = self.master.submit("train", {"x": x.detach(), "y": y}, meta,
                                         timeout_s=self.timeout_s)
            bytes_out += self.master.pending[task_id].bytes_out
            activations[task_id] = (x, meta["scale"])

        loss = 0.0
        correct = 0
        bytes_in = 0
        failure: Exception | None = None
        while activations:
            reply = self.master.receive(self.timeout_s)
            if reply is None:
                failure = TaskTimeout(f"{len(activations)} micro-batches of {batch_id} got no reply")
                break
            sent = activations.pop(reply.pending.task_id, None)
            if sent is None:
                continue
            activation, scale = sent
            bytes_in += reply.bytes_in
            try:
                message = reply.raise_for_error()
            except RemoteError as exc:
                failure = failure or exc
                continue
            if self.first is not None:
                activation.backward(message.tensors["grad"])
            loss += float(message.meta["loss"]) * scale
            correct += int(message.meta.get("correct", 0))
        for task_id in activations:
            self.master.pending.pop(task_id, None)
        if failure is not None:
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            self.monitor.task(batch_id, "train", len(labels), started, time.time(),
                              bytes_in, bytes_out, status="error", detail=str(failure)[:200])
            raise failure
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.monitor.task(batch_id, "train", len(labels), started, time.time(),
                          bytes_in, bytes_out, status="ok")
        return loss, correct

    def evaluate(self, data: Dataset, *, batch_size: int) -> tuple[int, int]:
        """Count correct predictions on ``data`` with ``infer`` tasks.

        Returns:
            ``(samples, correct)``.
        """
        samples = 0
        correct = 0
        for images, labels in batches(data, batch_size, shuffle=False, seed=0, drop_last=False):
            x = images
            if self.first is not None:
                self.first.eval()
                with torch.no_grad():
                    x = self.first(x)
            reply = self.master.request("infer", {"x": x, "y": labels}, timeout_s=self.timeout_s)
            correct += int(reply.message.meta["correct"])
            samples += len(labels)
        return samples, correct
