"""Checkpoints of a training stage's partition, written atomically and loaded safely.

A checkpoint is one file, ``<folder>/checkpoint.pt``, holding everything a
stage needs to carry on training after a restart::

    {
        "format": 1,
        "model": "vgg11", "split": [8], "partition": 1,   # which partition
        "step": 120,                                      # optimizer steps taken
        "module": {...},      # parameters and buffers (state_dict)
        "optimizer": {...},   # optimizer state (momentum buffers, param groups)
    }

It is written with :func:`torch.save` and read back with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers: a file crafted to run code when unpickled is refused. Writing
goes to a temporary file in the same folder, which is flushed, fsynced and
then renamed over the old checkpoint with :func:`os.replace` (the folder is
fsynced too), so a crash at any moment leaves either the old checkpoint or the
new one, never a torn file. A temporary file left behind by such a crash is
removed the next time the folder is opened.

A checkpoint names the model, split and partition index it belongs to; a
stage refuses one made for another partition (:class:`~sparse_zmq.errors.ConfigError`
naming both), so a folder reused by mistake cannot load the wrong weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_zmq.errors import ConfigError

__all__ = [
    "CHECKPOINT_FILE",
    "Checkpoint",
    "Checkpointer",
    "PartitionId",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
"""Name of the checkpoint file inside a stage's checkpoint folder."""

FORMAT_VERSION = 1
"""Layout version written into every checkpoint; others are refused."""

_TMP_PREFIX = f".{CHECKPOINT_FILE}.tmp-"

_REQUIRED = {
    "format": int,
    "model": str,
    "split": list,
    "partition": int,
    "step": int,
    "module": dict,
    "optimizer": dict,
}


@dataclass(frozen=True)
class PartitionId:
    """Which partition of which model a checkpoint holds.

    Attributes:
        model: Model name, as :func:`stages.models.build_model` takes it.
        split: Layer indices where the model is cut.
        index: Partition index within the split (0-based).
    """

    model: str
    split: tuple[int, ...]
    index: int

    def __str__(self) -> str:
        """Readable form for error messages and logs."""
        return f"model {self.model!r}, split {list(self.split)}, partition {self.index}"


@dataclass
class Checkpoint:
    """The saved state of one partition.

    Attributes:
        partition: The partition the state belongs to.
        step: Optimizer steps taken when the state was saved.
        module: The partition's ``state_dict`` (parameters and buffers).
        optimizer: The optimizer's ``state_dict``.
    """

    partition: PartitionId
    step: int
    module: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: str | os.PathLike[str], checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``folder`` atomically, replacing any older one.

    Args:
        folder: The stage's checkpoint folder; created if missing.
        checkpoint: What to save.

    Returns:
        The path of the checkpoint file.

    Raises:
        OSError: The folder or file cannot be written; the previous
            checkpoint, if any, is left as it was.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT_FILE
    tmp = folder / f"{_TMP_PREFIX}{os.getpid()}"
    payload = {
        "format": FORMAT_VERSION,
        "model": checkpoint.partition.model,
        "split": list(checkpoint.partition.split),
        "partition": checkpoint.partition.index,
        "step": checkpoint.step,
        "module": checkpoint.module,
        "optimizer": checkpoint.optimizer,
    }
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)
    return target


def load_checkpoint(
    folder: str | os.PathLike[str], expected: PartitionId | None = None
) -> Checkpoint | None:
    """Read the checkpoint in ``folder``, if there is one.

    Args:
        folder: The stage's checkpoint folder.
        expected: The partition the caller holds; a checkpoint of any other
            is refused. None accepts any partition.

    Returns:
        The checkpoint, or None when the folder holds none.

    Raises:
        ConfigError: The file cannot be read safely, is not in the expected
            layout, or belongs to another model, split or partition.
    """
    path = Path(folder) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - OSError, EOFError, RuntimeError or an unpickling error
        raise ConfigError(
            f"checkpoint {path} cannot be read as a weights-only torch file: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"checkpoint {path} holds a {type(raw).__name__}, expected a dict"
        )
    for key, kind in _REQUIRED.items():
        value = raw.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(
                f"checkpoint {path}: field {key!r} is {value!r:.60}, "
                f"expected a {kind.__name__}"
            )
    if raw["format"] != FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {path} has format {raw['format']}, "
            f"this version reads format {FORMAT_VERSION}"
        )
    if not all(type(p) is int for p in raw["split"]):
        raise ConfigError(
            f"checkpoint {path}: split {raw['split']!r:.60} is not a list of ints"
        )

    found = PartitionId(raw["model"], tuple(raw["split"]), raw["partition"])
    if expected is not None and found != expected:
        raise ConfigError(
            f"checkpoint {path} holds {found}, but this stage runs {expected}; "
            "give the stage its own checkpoint folder or remove the old file"
        )
    return Checkpoint(found, raw["step"], raw["module"], raw["optimizer"])


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups
    ]


class Checkpointer:
    """Saves a stage's partition every ``every`` optimizer steps, restores it on start.

    Args:
        folder: Where this stage's checkpoint lives (one folder per stage).
        partition: The partition the stage holds.
        every: Optimizer steps between two checkpoints (at least 1).

    Raises:
        ConfigError: ``every`` is not a positive integer.
    """

    def __init__(
        self, folder: str | os.PathLike[str], partition: PartitionId, *, every: int
    ) -> None:
        if type(every) is not int or every < 1:
            raise ConfigError(
                f"checkpoint interval must be an integer >= 1 step, got {every!r}"
            )
        self.folder = Path(folder)
        self.partition = partition
        self.every = every
        self.saved_step: int | None = None
        self.failures = 0

    def restore(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the folder's checkpoint into ``module`` and ``optimizer``, if any.

        Temporary files left by a crash during an earlier save are removed
        first. The optimizer's settings (learning rate, momentum...) come
        back as they were saved; a warning says when they differ from the
        ones the stage was started with.

        Returns:
            The optimizer step the checkpoint was taken at, 0 without one.

        Raises:
            ConfigError: The checkpoint belongs to another partition, cannot be
                read safely, or does not fit the module or optimizer.
        """
        for stale in self.folder.glob(f"{_TMP_PREFIX}*"):
            logger.info(
                "%s: removing %s, left by an interrupted save", self.partition, stale
            )
            stale.unlink(missing_ok=True)
        checkpoint = load_checkpoint(self.folder, self.partition)
        if checkpoint is None:
            logger.info(
                "%s: no checkpoint in %s, starting at step 0",
                self.partition,
                self.folder,
            )
            return 0
        configured = _hyperparameters(optimizer)
        try:
            module.load_state_dict(checkpoint.module)
            optimizer.load_state_dict(checkpoint.optimizer)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"checkpoint {self.folder / CHECKPOINT_FILE} does not fit "
                f"{self.partition}: {type(exc).__name__}: {exc}"
            ) from exc
        if _hyperparameters(optimizer) != configured:
            logger.warning(
                "%s: optimizer settings %s from the checkpoint replace configured %s",
                self.partition,
                _hyperparameters(optimizer),
                configured,
            )
        self.saved_step = checkpoint.step
        logger.info(
            "%s: resumed from checkpoint %s at step %d",
            self.partition,
            self.folder / CHECKPOINT_FILE,
            checkpoint.step,
        )
        return checkpoint.step

    def after_step(
        self, step: int, module: nn.Module, optimizer: torch.optim.Optimizer
    ) -> bool:
        """Save a checkpoint when ``step`` is a multiple of the interval.

        A save that fails (disk full, folder gone) is logged and counted in
        :attr:`failures`; training carries on and the previous checkpoint stays.

        Returns:
            True when a checkpoint was written.
        """
        if step % self.every:
            return False
        snapshot = Checkpoint(
            self.partition, step, module.state_dict(), optimizer.state_dict()
        )
        try:
            path = save_checkpoint(self.folder, snapshot)
        except OSError as exc:
            self.failures += 1
            logger.error(
                "%s: checkpoint at step %d not written to %s (%s); step %s's stays",
                self.partition,
                step,
                self.folder,
                exc,
                self.saved_step,
            )
            return False
        self.saved_step = step
        logger.info(
            "%s: checkpoint at step %d written to %s", self.partition, step, path
        )
        return True
