"""Split-learning stages: each keeps one partition and its optimizer in memory.

Forward activations (with the labels) travel down the pipeline; the last
stage computes the loss, back-propagates, and answers with the gradient of
its input; every earlier stage back-propagates that gradient through its own
partition and answers with the gradient of *its* input, down to the source.
Only activations, gradients and labels cross the network.

Task ``meta`` fields (all optional but ``op``):

========== ===================================================================
``op``     ``train`` (forward, backward, step) or ``infer`` (forward only,
           in eval mode)
``grad``   true when the sender needs the gradient of ``x`` back (it ran an
           earlier partition itself); false for raw data
``batch``  id of the mini-batch this micro-batch belongs to
``micro``  index of this micro-batch in its mini-batch (0-based)
``micros`` number of micro-batches in the mini-batch; a stage steps its
           optimizer once it has back-propagated all of them (GPipe-style
           gradient accumulation), so the result equals one unsplit step
``scale``  this micro-batch's share of the mini-batch (its size divided by
           the mini-batch size), applied to the mean loss
========== ===================================================================

Tensors: ``x`` (input of the partition), ``y`` (int64 labels; required by the
last stage for ``train``). The last stage answers ``train`` with meta ``loss``
(mean over the micro-batch) and ``correct``, plus tensor ``grad`` when asked;
``infer`` is answered with tensor ``logits`` (and ``correct`` when labels came).

Batch norm statistics are taken per micro-batch, as in GPipe: with one
micro-batch per mini-batch a split run equals the unsplit one exactly; with
several it matches only for models without batch norm.

Checkpoints and what a crash loses
----------------------------------

Given a :class:`~stages.checkpoint.Checkpointer`, a stage counts its
optimizer steps and saves its partition (parameters, buffers, optimizer
state, step count, and the model, split and partition index) every N steps,
atomically; started again with the same folder it resumes from that
checkpoint. A stage killed at any moment loses:

* the optimizer steps taken since its last checkpoint (at most N - 1), and
  the gradients of a mini-batch it was part-way through;
* the task it was holding: its reply never comes, so the broker sends the
  task again or the master sees it fail or time out (see :mod:`brokers.fog`
  and :mod:`sparse_zmq.master`).

What carries on regardless:

* the source's record of losses (it lives in the source, which keeps
  counting mini-batches, so its loss curve continues across the restart with
  a step back of up to N - 1 updates);
* the other partitions, which keep their own parameters and step counts. After
  one stage resumes, the partitions' step counts differ by the steps it lost:
  the restarted partition is older than its neighbours, which were updated
  against its lost parameters. Training carries on from that mixed state; it
  is no longer exactly equal to an unsplit run. Restarting every stage from
  checkpoints taken at the same step avoids that only if all of them were
  stopped between the same two mini-batches.

Delivery to workers is at least once, so a micro-batch may reach a stage
again after a crash or a broker restart (for example the last stage, when an
earlier stage died before its own step and its task went to another worker).
A stage remembers which micro-batches of each mini-batch it has
back-propagated (by ``batch`` and ``micro``, and the last 4096 mini-batches it
stepped): a micro-batch seen again is answered as usual, its input gradient
included, but its gradient is not added to the parameters a second time and
it does not count towards the step (counted in
:attr:`SplitTrainingStage.duplicates` and logged). A stage that restarted from
a checkpoint has forgotten what it saw before.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparse_zmq.errors import ConfigError
from sparse_zmq.protocol import Message
from sparse_zmq.stage import Offload, Result, Stage, StageOutput, Task
from stages.checkpoint import Checkpointer
from stages.models import build_model, partition

__all__ = ["Optimizer", "SplitTrainingStage", "WeightStash", "build_partition"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Optimizer:
    """SGD settings shared by every stage of a run."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def build(self, params: Any) -> torch.optim.Optimizer:
        """Create the optimizer for a partition's parameters."""
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


def build_partition(
    model: str, split: list[int], index: int, *, seed: int
) -> nn.Module:
    """Build the whole model from ``seed`` and return partition ``index`` of it.

    Every process of a run builds the model from the same seed, so the
    partitions together hold exactly the parameters of one unsplit model.

    Raises:
        ConfigError: ``index`` is not a partition of ``split``.
    """
    if not 0 <= index <= len(split):
        raise ConfigError(
            f"partition index {index} out of range for split {split}: "
            f"allowed 0..{len(split)}"
        )
    return partition(build_model(model, seed=seed), split)[index]


class WeightStash:
    """Weight stashing held open across many tasks, kept from growing.

    Inside :func:`torch.autograd.graph.allow_mutation_on_saved_tensors`, a
    tensor saved for a pending backward is copied before an in-place change
    (an optimizer step), so that backward uses the values its forward saw.
    Torch's context also records, for every tensor ever saved, which storage
    it aliases, and forgets nothing until the context ends: held open for the
    life of a stage, that record grows by every step. :meth:`forget_spent`
    drops the records of saved tensors that no pending graph holds any more
    (torch skips those records anyway), so a stage that calls it after each
    step keeps only what its pending graphs need.

    Torch allows one such context per process at a time.
    """

    def __init__(self) -> None:
        self._manager: contextlib.AbstractContextManager[Any] | None = None
        self.context: Any = None
        """Torch's state of the open context (None while closed)."""

    def __enter__(self) -> WeightStash:
        """Open the torch context."""
        self._manager = torch.autograd.graph.allow_mutation_on_saved_tensors()
        self.context = self._manager.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the torch context (its records are dropped with it)."""
        manager, self._manager, self.context = self._manager, None, None
        if manager is not None:
            manager.__exit__(*exc)  # type: ignore[arg-type]

    def forget_spent(self) -> None:
        """Drop the aliasing records of saved tensors no graph holds any more."""
        aliases = getattr(self.context, "sid_to_tid", None)
        handles = getattr(self.context, "tid_to_weakhandle", None)
        if aliases is None or handles is None:
            return  # closed, or a torch whose context is laid out otherwise
        live = set(handles.keys())
        for storage in list(aliases):
            tensors = aliases[storage]
            tensors &= live
            if not tensors:
                del aliases[storage]


_REMEMBERED_STEPS = 4096
"""Mini-batches a stage remembers having stepped, to recognise late re-sends."""


class SplitTrainingStage(Stage):
    """A partition of a split-learning pipeline.

    Args:
        module: The partition this stage holds.
        last: True for the stage that computes the loss.
        optimizer: Optimizer settings.
        name: Stage name in logs and monitor records.
        checkpoint: Saves the partition every N optimizer steps; when its
            folder already holds a checkpoint of this partition, the stage
            resumes from it here.
        stash_weights: Keep, for each pending backward, the weights its
            forward used, so that several mini-batches may be in flight
            through this stage when it is an intermediate one (see
            :meth:`serving`).

    Attributes:
        steps: Optimizer steps taken, counting those restored from a checkpoint.

    Raises:
        ConfigError: The checkpoint folder holds a checkpoint of another
            partition, or one that cannot be read safely.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        last: bool,
        optimizer: Optimizer = Optimizer(),
        name: str = "train",
        checkpoint: Checkpointer | None = None,
        stash_weights: bool = False,
    ) -> None:
        self.module = module
        self.stash_weights = stash_weights
        self._stash = WeightStash()
        self.last = last
        self.name = name
        self.optimizer = optimizer.build(module.parameters())
        self.loss_fn = nn.CrossEntropyLoss()
        self.checkpoint = checkpoint
        self.steps = checkpoint.restore(module, self.optimizer) if checkpoint else 0
        self.duplicates = 0
        """Micro-batch backwards skipped because their gradient was already applied."""
        self._backwards_done: dict[str, set[int]] = {}
        self._stepped: collections.OrderedDict[str, None] = collections.OrderedDict()

    def serving(self) -> contextlib.AbstractContextManager[Any]:
        """Weight stashing while the runtime serves, if asked for.

        An intermediate stage holds each micro-batch's autograd graph while
        the next stage works on it. With one mini-batch in flight, the stage
        steps only once every graph of the mini-batch is spent. With more,
        it steps for one mini-batch while graphs of the next are pending; the
        step changes parameters those graphs saved, and their backward would
        fail (``modified by an inplace operation``). With ``stash_weights``
        the runtime serves inside
        :func:`torch.autograd.graph.allow_mutation_on_saved_tensors`: a
        parameter about to be changed is first copied for the graphs that
        saved it, so each backward uses the weights its forward used (weight
        stashing, as in PipeDream), at the cost of one copy of the stepped
        parameters per pending mini-batch (see :class:`WeightStash`). Torch
        allows one such context per process, so one stashing stage per
        process (as ``sparse-zmq stage`` runs them).
        """
        if self.stash_weights:
            return self._stash
        return contextlib.nullcontext()

    def process(self, task: Task) -> StageOutput:
        """Run ``train`` or ``infer`` for one (micro-)batch."""
        x = task.tensors.get("x")
        if x is None:
            raise ConfigError(
                f"task carries tensors {sorted(task.tensors)}; expected 'x'"
            )
        if task.op == "infer":
            return self._infer(task, x)
        if task.op != "train":
            raise ConfigError(f"unknown op {task.op!r}; expected 'train' or 'infer'")
        want_grad = bool(task.meta.get("grad", False))
        if want_grad:
            x.requires_grad_(True)
        self.module.train()
        if self.last:
            return self._train_last(task, x, want_grad)
        return self._train_middle(task, x, want_grad)

    def _labels(self, task: Task) -> torch.Tensor:
        y = task.tensors.get("y")
        if y is None or y.dtype != torch.int64 or y.dim() != 1:
            got = None if y is None else (y.dtype, list(y.shape))
            raise ConfigError(
                f"last stage needs int64 labels 'y' of shape [batch], got {got}"
            )
        return y

    def _train_last(self, task: Task, x: torch.Tensor, want_grad: bool) -> Result:
        y = self._labels(task)
        out = self.module(x)
        if out.shape[0] != y.shape[0]:
            raise ConfigError(f"{out.shape[0]} predictions for {y.shape[0]} labels")
        loss = self.loss_fn(out, y)
        scaled = loss * float(task.meta.get("scale", 1.0))
        if self._applied(task):
            # A re-sent micro-batch: answer it, but add no gradient twice.
            tensors = {"grad": torch.autograd.grad(scaled, [x])[0]} if want_grad else {}
        else:
            scaled.backward()
            self._micro_done(task)
            tensors = {"grad": x.grad} if want_grad and x.grad is not None else {}
        correct = int((out.detach().argmax(1) == y).sum())
        return Result(tensors, {"loss": float(loss.detach()), "correct": correct})

    def _train_middle(
        self, task: Task, x: torch.Tensor, want_grad: bool
    ) -> Generator[Offload, Message, Result]:
        activation = self.module(x)
        meta = {
            k: v
            for k, v in task.meta.items()
            if k in ("batch", "micro", "micros", "scale")
        }
        tensors = {
            "x": activation.detach(),
            **({"y": task.tensors["y"]} if "y" in task.tensors else {}),
        }
        reply = yield Offload("train", tensors, {**meta, "grad": True})
        grad = reply.tensors.get("grad")
        if grad is None or grad.shape != activation.shape:
            got = None if grad is None else list(grad.shape)
            raise ConfigError(
                f"next stage answered with gradient of shape {got}, "
                f"expected {list(activation.shape)}"
            )
        try:
            if self._applied(task):
                # A re-sent micro-batch: answer it, but add no gradient twice.
                tensors = (
                    {"grad": torch.autograd.grad(activation, [x], grad)[0]}
                    if want_grad
                    else {}
                )
            else:
                activation.backward(grad)
                self._micro_done(task)
                tensors = {"grad": x.grad} if want_grad and x.grad is not None else {}
        except RuntimeError as exc:
            if "modified by an inplace operation" not in str(exc) or self.stash_weights:
                raise
            raise ConfigError(
                f"{self.name}: a step for another mini-batch changed the weights the "
                "forward of this micro-batch used, so its backward cannot run: several "
                "mini-batches are in flight through this intermediate stage; start it "
                "with --stash-weights (SplitTrainingStage(stash_weights=True)) or keep "
                "one mini-batch in flight"
            ) from exc
        return Result(
            tensors, {k: reply.meta[k] for k in ("loss", "correct") if k in reply.meta}
        )

    @staticmethod
    def _micro_of(task: Task) -> tuple[str, int, int]:
        """The task's mini-batch id, micro-batch index and micro-batch count."""
        batch = str(task.meta.get("batch", task.task_id))
        return batch, int(task.meta.get("micro", 0)), int(task.meta.get("micros", 1))

    def _applied(self, task: Task) -> bool:
        """True if this micro-batch's gradient is already in (a re-sent task)."""
        batch, micro, _ = self._micro_of(task)
        if batch in self._stepped or micro in self._backwards_done.get(batch, ()):
            self.duplicates += 1
            logger.warning(
                "%s: micro-batch %d of mini-batch %s arrived again (task %s, re-sent "
                "after a failure); answered, its gradient not applied twice",
                self.name,
                micro,
                batch,
                task.task_id,
            )
            return True
        return False

    def _micro_done(self, task: Task) -> None:
        """Note a finished backward; step once every micro-batch is in."""
        batch, micro, micros = self._micro_of(task)
        done = self._backwards_done.setdefault(batch, set())
        done.add(micro)
        if len(done) < micros:
            return
        del self._backwards_done[batch]
        self._stepped[batch] = None
        if len(self._stepped) > _REMEMBERED_STEPS:
            self._stepped.popitem(last=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self._stash.forget_spent()
        if self.checkpoint is not None:
            self.checkpoint.after_step(self.steps, self.module, self.optimizer)

    def _infer(self, task: Task, x: torch.Tensor) -> StageOutput:
        self.module.eval()
        with torch.no_grad():
            out = self.module(x)
        self.module.train()
        if self.last:
            meta: dict[str, Any] = {}
            if "y" in task.tensors:
                meta["correct"] = int((out.argmax(1) == task.tensors["y"]).sum())
            return Result({"logits": out}, meta)
        return self._forward_infer(task, out)

    def _forward_infer(
        self, task: Task, out: torch.Tensor
    ) -> Generator[Offload, Message, Result]:
        tensors = {
            "x": out,
            **({"y": task.tensors["y"]} if "y" in task.tensors else {}),
        }
        reply = yield Offload("infer", tensors, {})
        return Result(reply.tensors, reply.meta)
