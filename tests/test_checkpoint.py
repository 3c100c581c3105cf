"""Checkpoints of training stages: atomic writes, safe loads, resuming after kill -9."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from brokers.fog import FogBroker
from sparse_zmq.errors import ConfigError
from sparse_zmq.master import Master
from sparse_zmq.stage import Task
from stages.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    Checkpointer,
    PartitionId,
    load_checkpoint,
    save_checkpoint,
)
from stages.data import batches, load_dataset
from stages.source import TrainingSource
from stages.training import Optimizer, SplitTrainingStage, build_partition

LOOPBACK = "tcp://127.0.0.1:*"
TIMEOUT_S = 120.0  # generous: the test machine is a noisy 2-core box
REPO_ROOT = Path(__file__).resolve().parents[1]
OPT = Optimizer(lr=0.05, momentum=0.9)

# The tail of VGG-11 after layer 22: a small real partition (conv 512->512,
# batch norm, ReLU, pool, linear head) that trains fast on random activations.
SPLIT = (22,)
HEAD = PartitionId("vgg11", SPLIT, 1)


def _activations(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 512, 2, 2, generator=g), torch.randint(
        0, 10, (n,), generator=g
    )


def _head_stage(
    checkpoint: Checkpointer | None = None, seed: int = 0
) -> SplitTrainingStage:
    module = build_partition(HEAD.model, list(HEAD.split), HEAD.index, seed=seed)
    return SplitTrainingStage(module, last=True, optimizer=OPT, checkpoint=checkpoint)


def _train(stage: SplitTrainingStage, steps: int, first_seed: int = 0) -> None:
    for i in range(steps):
        x, y = _activations(first_seed + i)
        stage.process(
            Task(f"t{first_seed + i}", "train", {"x": x, "y": y}, {"op": "train"})
        )


def _assert_same_tensors(got: Any, want: Any, where: str = "") -> None:
    """Compare nested dicts / lists of tensors and plain values exactly."""
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want), f"{where} differs"
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), f"{where} keys differ"
        for key in want:
            _assert_same_tensors(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where} lengths differ"
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same_tensors(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_restored_stage_has_the_saved_parameters_buffers_and_optimizer_state(
    tmp_path: Path,
) -> None:
    trained = _head_stage(Checkpointer(tmp_path, HEAD, every=3))
    _train(trained, 3)
    assert trained.checkpoint is not None and trained.checkpoint.saved_step == 3

    resumed = _head_stage(Checkpointer(tmp_path, HEAD, every=3), seed=7)
    assert resumed.steps == 3
    _assert_same_tensors(
        resumed.module.state_dict(), trained.module.state_dict(), "module"
    )
    _assert_same_tensors(
        resumed.optimizer.state_dict(), trained.optimizer.state_dict(), "optimizer"
    )
    assert resumed.optimizer.state_dict()["state"], "momentum buffers were not saved"

    # Momentum came back too: one more identical step keeps both identical.
    _train(trained, 1, first_seed=100)
    _train(resumed, 1, first_seed=100)
    _assert_same_tensors(
        resumed.module.state_dict(), trained.module.state_dict(), "after"
    )


def test_stage_checkpoints_every_n_optimizer_steps_counting_micro_batches_once(
    tmp_path: Path,
) -> None:
    stage = _head_stage(Checkpointer(tmp_path, HEAD, every=2))
    x, y = _activations(0, n=6)
    for batch in range(3):  # three mini-batches of three micro-batches each
        for micro, (xs, ys) in enumerate(zip(x.chunk(3), y.chunk(3))):
            meta = {"op": "train", "batch": f"b{batch}", "micro": micro, "micros": 3}
            stage.process(Task(f"b{batch}-{micro}", "train", {"x": xs, "y": ys}, meta))
    assert stage.steps == 3
    saved = load_checkpoint(tmp_path, HEAD)
    assert saved is not None and saved.step == 2


def test_a_save_interrupted_before_the_rename_leaves_the_old_checkpoint_loadable(
    tmp_path: Path,
) -> None:
    stage = _head_stage(Checkpointer(tmp_path, HEAD, every=1))
    _train(stage, 1)
    good = (tmp_path / CHECKPOINT_FILE).read_bytes()
    # A process killed mid-save leaves a half-written temporary file behind
    # and never renames it.
    torn = tmp_path / f".{CHECKPOINT_FILE}.tmp-99999"
    torn.write_bytes(good[: len(good) // 2])

    saved = load_checkpoint(tmp_path, HEAD)
    assert saved is not None and saved.step == 1
    resumed = _head_stage(Checkpointer(tmp_path, HEAD, every=1), seed=3)
    assert resumed.steps == 1
    assert not torn.exists(), "the stale temporary file was not cleaned up"


def test_a_save_failing_at_the_rename_keeps_the_old_checkpoint_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpointer = Checkpointer(tmp_path, HEAD, every=1)
    stage = _head_stage(checkpointer)
    _train(stage, 1)

    def no_rename(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    _train(stage, 1, first_seed=10)  # the task itself still succeeds
    monkeypatch.undo()

    assert stage.steps == 2 and checkpointer.failures == 1
    saved = load_checkpoint(tmp_path, HEAD)
    assert saved is not None and saved.step == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


@pytest.mark.parametrize(
    "other",
    [
        PartitionId("vgg11", SPLIT, 0),
        PartitionId("vgg11", (8,), 1),
        PartitionId("vgg13", SPLIT, 1),
    ],
    ids=["partition", "split", "model"],
)
def test_checkpoint_of_another_partition_is_refused_naming_both(
    tmp_path: Path, other: PartitionId
) -> None:
    stage = _head_stage(Checkpointer(tmp_path, HEAD, every=1))
    _train(stage, 1)
    module = build_partition(other.model, list(other.split), other.index, seed=0)
    with pytest.raises(ConfigError) as err:
        SplitTrainingStage(
            module, last=True, checkpoint=Checkpointer(tmp_path, other, every=1)
        )
    assert str(HEAD) in str(err.value) and str(other) in str(err.value)


def test_garbage_checkpoint_file_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match=CHECKPOINT_FILE):
        load_checkpoint(tmp_path, HEAD)


class _TouchOnLoad:
    """Pickles into something that would create ``path`` when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.path,))


def test_checkpoint_carrying_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    payload = {
        "format": 1,
        "model": "vgg11",
        "split": [22],
        "partition": 1,
        "step": 1,
        "module": {"w": _TouchOnLoad(marker)},
        "optimizer": {},
    }
    torch.save(payload, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ConfigError, match="weights-only"):
        load_checkpoint(tmp_path, HEAD)
    assert not marker.exists()


def test_checkpoint_round_trip_through_save_and_load(tmp_path: Path) -> None:
    stage = _head_stage()
    _train(stage, 2)
    path = save_checkpoint(
        tmp_path / "new",
        Checkpoint(HEAD, 2, stage.module.state_dict(), stage.optimizer.state_dict()),
    )
    assert path == tmp_path / "new" / CHECKPOINT_FILE
    loaded = load_checkpoint(tmp_path / "new")
    assert loaded is not None and loaded.partition == HEAD and loaded.step == 2
    _assert_same_tensors(loaded.optimizer, stage.optimizer.state_dict(), "optimizer")
    _assert_same_tensors(dict(loaded.module), dict(stage.module.state_dict()), "module")


def test_checkpoint_interval_below_one_step_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="got 0"):
        Checkpointer(tmp_path, HEAD, every=0)


# A stage process killed with kill -9 and restarted.


class _StageProcess:
    """``sparse-zmq stage`` in its own process, its log read line by line."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log.open("a", encoding="utf-8")
        self.lines: queue.Queue[str] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sparse_zmq.cli", "stage", *args],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        self._reader = threading.Thread(
            target=self._read, args=(self.proc.stderr,), daemon=True
        )
        self._reader.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.log.write(line)
            self.lines.put(line)
        self.lines.put("")

    def wait_for_line(self, fragment: str) -> str:
        """Return the first log line containing ``fragment``."""
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"no log line with {fragment!r}") from None
            assert line, (
                f"stage exited (code {self.proc.wait()}) before logging {fragment!r}"
            )
            if fragment in line:
                return line

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(TIMEOUT_S)
        self._reader.join(TIMEOUT_S)
        self.log.close()
        return code


@pytest.fixture
def broker_backend() -> Iterator[tuple[str, str, FogBroker]]:
    """A fog broker serving in a thread; yields (frontend, backend, broker)."""
    broker = FogBroker(LOOPBACK, LOOPBACK, name="ckpt-broker")
    frontend, backend = broker.bind()
    stop = threading.Event()
    thread = threading.Thread(target=broker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield frontend, backend, broker
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
        broker.close()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.slow
def test_stage_killed_with_sigkill_resumes_from_its_checkpoint_and_loss_keeps_falling(
    tmp_path: Path, broker_backend: tuple[str, str, FogBroker]
) -> None:
    frontend, backend, _ = broker_backend
    folder = tmp_path / "ckpt"
    every, before_kill, after_restart = 5, 12, 18
    args = [
        "--backend",
        backend,
        "--partition",
        "0",
        "--model",
        "vgg11",
        "--lr",
        "0.003",
        "--momentum",
        "0.9",
        "--threads",
        "2",
        "--node",
        "cloud",
        "--checkpoint",
        str(folder),
        "--checkpoint-every",
        str(every),
    ]
    unsplit = PartitionId("vgg11", (), 0)
    data = load_dataset(None, train=True)
    stream = iter(batches(data, 16, shuffle=True, seed=0))
    losses: list[float] = []

    stage = _StageProcess(args, tmp_path / "stage-1.log")
    with Master(frontend, name="source") as master:
        source = TrainingSource(master, timeout_s=TIMEOUT_S)
        try:
            for i in range(before_kill):
                images, labels = next(stream)
                losses.append(source.train_batch(images, labels, batch_id=f"b{i}")[0])
            stage.proc.send_signal(signal.SIGKILL)
            assert stage.stop() == -signal.SIGKILL

            saved = load_checkpoint(folder, unsplit)
            assert saved is not None
            assert (
                saved.step == before_kill // every * every
            )  # steps since then are lost

            stage = _StageProcess(args, tmp_path / "stage-2.log")
            assert f"at step {saved.step}" in stage.wait_for_line(
                "resumed from checkpoint"
            )

            # The restarted stage answers with exactly the checkpoint's parameters.
            reference = build_partition("vgg11", [], 0, seed=99)
            reference.load_state_dict(saved.module)
            reference.eval()
            probe, probe_labels = next(stream)
            reply = master.request(
                "infer", {"x": probe, "y": probe_labels}, timeout_s=TIMEOUT_S
            )
            with torch.no_grad():
                expected = reference(probe)
            torch.testing.assert_close(
                reply.message.tensors["logits"], expected, rtol=1e-4, atol=1e-4
            )

            for i in range(before_kill, before_kill + after_restart):
                images, labels = next(stream)
                losses.append(source.train_batch(images, labels, batch_id=f"b{i}")[0])
        finally:
            stage.stop()

    resumed = load_checkpoint(folder, unsplit)
    assert resumed is not None
    assert resumed.step == (saved.step + after_restart) // every * every  # counting on
    window = 5
    start = _mean(losses[:window])
    before = _mean(losses[before_kill - window : before_kill])
    after = _mean(losses[-window:])
    assert before < 0.75 * start, losses
    assert after < 0.75 * start and after < before, losses
