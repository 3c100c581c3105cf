"""Split-learning training over real sockets equals training in one process."""

from __future__ import annotations

import threading

import pytest
import torch
import zmq
from torch import nn

from brokers.fog import FogBroker
from sparse_zmq.errors import ConfigError
from sparse_zmq.master import Master
from sparse_zmq.protocol import Kind, Message, pack, split_envelope, unpack
from sparse_zmq.stage import StageRuntime, Task
from stages.data import Dataset, batches
from stages.models import build_model, partition
from stages.source import TrainingSource
from stages.training import Optimizer, SplitTrainingStage, build_partition
from tests.conftest import LOOPBACK, serve_pipeline

TIMEOUT_S = 60.0
OPT = Optimizer(lr=0.1, momentum=0.9, weight_decay=5e-4)


def _batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _unsplit_step(model_name: str, x: torch.Tensor, y: torch.Tensor, steps: int = 1) -> nn.Module:
    model = build_model(model_name, seed=0)
    opt = OPT.build(model.parameters())
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def _assert_same_state(parts: list[nn.Module], reference: nn.Module, split: list[int]) -> None:
    for part, ref in zip(parts, partition(reference, split)):
        for (name, got), (_, want) in zip(part.state_dict().items(), ref.state_dict().items()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


@pytest.mark.parametrize(("split", "on_device"), [([8], False), ([8, 15], False), ([8], True), ([8, 15], True)])
def test_split_training_steps_give_the_unsplit_parameters(split, on_device) -> None:
    x, y = _batch()
    parts = [build_partition("vgg11", split, i, seed=0) for i in range(len(split) + 1)]
    remote = parts[1:] if on_device else parts
    stages = [SplitTrainingStage(p, last=i == len(remote) - 1, optimizer=OPT)
              for i, p in enumerate(remote)]
    with serve_pipeline(stages) as pipe, Master(pipe.frontend) as master:
        source = TrainingSource(master, first=parts[0] if on_device else None, optimizer=OPT,
                                timeout_s=TIMEOUT_S)
        for step in range(2):
            loss, _ = source.train_batch(x, y, batch_id=f"b{step}")
            assert loss > 0
    _assert_same_state(parts, _unsplit_step("vgg11", x, y, steps=2), split)


def test_micro_batched_training_equals_one_unsplit_step_without_batch_norm() -> None:
    split = [7]
    x, y = _batch(12)
    parts = [build_partition("vgg11-nobn", split, i, seed=0) for i in range(2)]
    stages = [SplitTrainingStage(parts[1], last=True, optimizer=OPT)]
    with serve_pipeline(stages, slots=4) as pipe, Master(pipe.frontend) as master:
        source = TrainingSource(master, first=parts[0], optimizer=OPT, micro_batches=4,
                                timeout_s=TIMEOUT_S)
        source.train_batch(x, y, batch_id="b0")
    _assert_same_state(parts, _unsplit_step("vgg11-nobn", x, y), split)


@pytest.mark.slow
def test_micro_batched_training_equals_unsplit_across_three_partitions_off_device() -> None:
    split = [7, 14]
    x, y = _batch(12)
    parts = [build_partition("vgg11-nobn", split, i, seed=0) for i in range(3)]
    stages = [SplitTrainingStage(p, last=i == 2, optimizer=OPT, name=f"p{i}")
              for i, p in enumerate(parts)]
    with serve_pipeline(stages, slots=3) as pipe, Master(pipe.frontend) as master:
        source = TrainingSource(master, optimizer=OPT, micro_batches=3, timeout_s=TIMEOUT_S)
        source.train_batch(x, y, batch_id="b0")
    _assert_same_state(parts, _unsplit_step("vgg11-nobn", x, y), split)


def _dataset(batches: int, batch_size: int) -> Dataset:
    g = torch.Generator().manual_seed(3)
    n = batches * batch_size
    return Dataset(torch.randn(n, 3, 32, 32, generator=g),
                   torch.randint(0, 10, (n,), generator=g), "random")


@pytest.mark.slow
def test_one_mini_batch_in_flight_trains_like_sequential_steps_and_more_run_stale() -> None:
    split = [7]
    data = _dataset(3, 8)
    results = {}
    for in_flight in (1, 2):
        parts = [build_partition("vgg11-nobn", split, i, seed=0) for i in range(2)]
        stages = [SplitTrainingStage(parts[1], last=True, optimizer=OPT)]
        with serve_pipeline(stages, slots=4) as pipe, Master(pipe.frontend) as master:
            source = TrainingSource(master, first=parts[0], optimizer=OPT, micro_batches=2,
                                    in_flight=in_flight, timeout_s=TIMEOUT_S)
            report = source.train(data, batch_size=8, batches_total=3, seed=0)
        assert report.failed_batches == 0 and len(report.losses) == 3
        results[in_flight] = parts

    reference = build_model("vgg11-nobn", seed=0)
    opt = OPT.build(reference.parameters())
    for images, labels in batches(data, 8, shuffle=True, seed=0):
        nn.functional.cross_entropy(reference(images), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _assert_same_state(results[1], reference, split)
    # Two in flight: the second mini-batch ran forward before the first stepped.
    stale = results[2][0].state_dict()
    assert any(not torch.allclose(stale[k], v, atol=1e-6)
               for k, v in results[1][0].state_dict().items())


def test_in_flight_and_micro_batches_below_one_are_refused() -> None:
    with Master("tcp://127.0.0.1:1") as master:
        for bad in ({"in_flight": 0}, {"micro_batches": 0}):
            with pytest.raises(ConfigError, match="must be an integer >= 1"):
                TrainingSource(master, **bad)


class _ReversingLastStage:
    """The last stage behind a bare ROUTER: holds every micro-batch, answers in reverse."""

    def __init__(self, stage: SplitTrainingStage, ctx: zmq.Context) -> None:
        self.stage = stage
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(LOOPBACK)
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.order: list[int] = []

    def serve(self, count: int) -> None:
        held = []
        while len(held) < count:
            assert self.sock.poll(int(TIMEOUT_S * 1000)), "micro-batch did not arrive"
            envelope, body = split_envelope(self.sock.recv_multipart())
            message = unpack(body)
            if message.kind is Kind.TASK:  # a master may also send heartbeats
                held.append((envelope, message))
        for envelope, msg in reversed(held):
            self.order.append(msg.meta["micro"])
            result = self.stage.process(Task(msg.task_id, msg.meta["op"], msg.tensors, msg.meta))
            reply = Message(Kind.RESULT, msg.task_id, result.tensors, result.meta)
            self.sock.send_multipart([*envelope, b"", *pack(reply)])


def test_gradients_coming_back_out_of_order_reach_the_right_micro_batch() -> None:
    split = [7, 14]
    x, y = _batch(8)
    parts = [build_partition("vgg11-nobn", split, i, seed=0) for i in range(3)]
    ctx = zmq.Context()
    last = _ReversingLastStage(SplitTrainingStage(parts[2], last=True, optimizer=OPT), ctx)
    broker = FogBroker(LOOPBACK, LOOPBACK, context=ctx)  # between source and middle stage
    frontend, backend = broker.bind()
    middle = StageRuntime(SplitTrainingStage(parts[1], last=False, optimizer=OPT, name="mid"),
                          backend, next_frontend=last.endpoint, context=ctx, slots=4)
    stop = threading.Event()
    threads = [threading.Thread(target=t.run, args=(stop,), daemon=True) for t in (broker, middle)]
    threads.append(threading.Thread(target=last.serve, args=(4,), daemon=True))
    for t in threads:
        t.start()
    try:
        with Master(frontend, context=ctx) as master:
            source = TrainingSource(master, first=parts[0], optimizer=OPT, micro_batches=4,
                                    timeout_s=TIMEOUT_S)
            source.train_batch(x, y, batch_id="b0")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        middle.close()
        broker.close()
        last.sock.close()
        ctx.term()
    assert last.order == [3, 2, 1, 0]
    _assert_same_state(parts, _unsplit_step("vgg11-nobn", x, y), split)


def test_last_stage_reports_a_wrong_label_shape_clearly() -> None:
    stage = SplitTrainingStage(build_partition("vgg11", [8], 1, seed=0), last=True)
    act = build_partition("vgg11", [8], 0, seed=0)(torch.randn(2, 3, 32, 32)).detach()
    with pytest.raises(ConfigError, match="labels 'y' of shape"):
        stage.process(Task("t", "train", {"x": act, "y": torch.zeros(2, 1, dtype=torch.int64)}, {}))
    result = stage.process(Task("t2", "train", {"x": act, "y": torch.tensor([1, 2])}, {}))
    assert result.meta["loss"] > 0  # the stage stays usable after a bad task


def _middle_task(task_id: str, batch: str, x: torch.Tensor) -> Task:
    meta = {"batch": batch, "micro": 0, "micros": 1, "scale": 1.0}
    return Task(task_id, "train", {"x": x}, meta)


def test_weight_stashing_lets_a_step_fall_between_another_forward_and_its_backward() -> (
    None
):
    x = torch.randn(4, 3, 32, 32)
    for stash in (False, True):
        stage = SplitTrainingStage(build_partition("vgg11-nobn", [7], 0, seed=0),
                                   last=False, optimizer=OPT, stash_weights=stash)
        with stage.serving():
            first = stage.process(_middle_task("a", "b0", x))
            second = stage.process(_middle_task("b", "b1", x))
            sent = [next(first), next(second)]  # both forwards before any backward
            grad = torch.ones_like(sent[0].tensors["x"])
            reply = Message(Kind.RESULT, "a", {"grad": grad}, {"loss": 1.0})
            with pytest.raises(StopIteration):
                first.send(reply)  # b0's backward, then its step
            assert stage.steps == 1
            if not stash:
                with pytest.raises(ConfigError, match="start it with --stash-weights"):
                    second.send(reply)
                continue
            with pytest.raises(StopIteration):
                second.send(reply)  # b1's backward uses the weights its forward saw
            assert stage.steps == 2


@pytest.mark.slow
def test_two_mini_batches_in_flight_through_an_intermediate_stage_train_without_errors() -> (
    None
):
    # Torch allows one weight-stashing context per process, and these stages
    # are threads of one process: one intermediate stage, as on a real host.
    split = [7]
    data = _dataset(4, 8)
    parts = [build_partition("vgg11-nobn", split, i, seed=0) for i in range(2)]
    stages = [SplitTrainingStage(p, last=i == 1, optimizer=OPT, name=f"p{i}",
                                 stash_weights=i == 0)
              for i, p in enumerate(parts)]
    with serve_pipeline(stages, slots=4) as pipe, Master(pipe.frontend) as master:
        source = TrainingSource(master, optimizer=OPT, micro_batches=2, in_flight=2,
                                timeout_s=TIMEOUT_S)
        report = source.train(data, batch_size=8, batches_total=4, seed=0)
    assert report.failed_batches == 0
    assert len(report.losses) == 4 and all(loss > 0 for loss in report.losses)
    assert [stage.steps for stage in stages] == [4, 4]

def _train_task(task_id: str, x: torch.Tensor, y: torch.Tensor | None, micro: int,
                micros: int) -> Task:
    tensors = {"x": x.clone()} if y is None else {"x": x.clone(), "y": y}
    meta = {"batch": "run-b0", "micro": micro, "micros": micros, "scale": 1 / micros,
            "grad": True}
    return Task(task_id, "train", tensors, meta)


def test_last_stage_answers_a_re_sent_micro_batch_but_applies_its_gradient_once() -> None:
    x, y = _batch(4)
    act = build_partition("vgg11-nobn", [7], 0, seed=0)(x).detach()
    stage = SplitTrainingStage(build_partition("vgg11-nobn", [7], 1, seed=0), last=True,
                               optimizer=OPT)
    once = SplitTrainingStage(build_partition("vgg11-nobn", [7], 1, seed=0), last=True,
                              optimizer=OPT)

    first = stage.process(_train_task("t1", act, y, 0, 2))
    again = stage.process(_train_task("t1-resent", act, y, 0, 2))
    assert stage.duplicates == 1 and stage.steps == 0
    torch.testing.assert_close(again.tensors["grad"], first.tensors["grad"])
    assert again.meta["loss"] == pytest.approx(first.meta["loss"])

    stage.process(_train_task("t2", act, y, 1, 2))
    stage.process(_train_task("t1-late", act, y, 0, 2))  # after the step: still once
    assert stage.steps == 1 and stage.duplicates == 2

    once.process(_train_task("t1", act, y, 0, 2))
    once.process(_train_task("t2", act, y, 1, 2))
    for (name, got), want in zip(stage.module.state_dict().items(),
                                 once.module.state_dict().values()):
        torch.testing.assert_close(got, want, msg=f"{name} differs")


def test_intermediate_stage_answers_a_re_sent_micro_batch_but_applies_its_gradient_once() -> (
    None
):
    x, _ = _batch(4)
    stage = SplitTrainingStage(build_partition("vgg11-nobn", [7], 0, seed=0), last=False,
                               optimizer=OPT)
    results = []
    for task_id in ("t1", "t1-resent"):
        generator = stage.process(_train_task(task_id, x, None, 0, 1))
        offload = next(generator)
        grad = torch.ones_like(offload.tensors["x"])
        with pytest.raises(StopIteration) as done:
            generator.send(Message(Kind.RESULT, task_id, {"grad": grad}, {"loss": 1.0}))
        results.append(done.value.value)
        if task_id == "t1":
            stepped = {k: v.clone() for k, v in stage.module.state_dict().items()}
    assert stage.steps == 1 and stage.duplicates == 1
    assert results[1].tensors["grad"].shape == x.shape  # the sender still gets its gradient
    for name, value in stage.module.state_dict().items():
        torch.testing.assert_close(value, stepped[name], msg=f"{name} changed again")


def test_weight_stash_held_open_for_many_steps_keeps_only_what_pending_graphs_need() -> None:
    x = torch.randn(2, 3, 32, 32)
    stage = SplitTrainingStage(build_partition("vgg11-nobn", [7], 0, seed=0), last=False,
                               optimizer=OPT, stash_weights=True)
    sizes = []
    with stage.serving() as stash:
        for step in range(12):
            ahead = stage.process(_middle_task(f"a{step}", f"b{step}", x))
            offload = next(ahead)
            grad = torch.ones_like(offload.tensors["x"])
            with pytest.raises(StopIteration):
                ahead.send(Message(Kind.RESULT, f"a{step}", {"grad": grad}, {"loss": 1.0}))
            sizes.append(len(stash.context.sid_to_tid))
    assert stage.steps == 12
    # Torch's own record would grow by every saved tensor of every step.
    assert sizes[-1] <= sizes[1], sizes
