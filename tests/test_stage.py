"""Stage runtime and master: task matching, error replies, bad input."""

from __future__ import annotations

import threading

import pytest
import torch
import zmq

from sparse_zmq.errors import RemoteError, TaskTimeout
from sparse_zmq.master import Master
from sparse_zmq.protocol import Kind, Message, pack, split_envelope, unpack
from sparse_zmq.stage import Offload, Result, Stage, StageRuntime, Task
from tests.conftest import serve_pipeline

TIMEOUT_S = 30.0


class Scale(Stage):
    """Last stage: multiplies ``x`` by a factor; fails on request."""

    name = "scale"

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def process(self, task: Task) -> Result:
        if task.meta.get("fail"):
            raise ValueError("asked to fail")
        return Result({"x": task.tensors["x"] * self.factor}, {"seen": task.task_id})


class AddThenOffload(Stage):
    """Intermediate stage: adds one, lets the next stage finish the work."""

    name = "add"

    def process(self, task: Task):
        reply = yield Offload("scale", {"x": task.tensors["x"] + 1}, dict(task.meta))
        return Result({"x": reply.tensors["x"]}, {"downstream": reply.meta["seen"]})


def test_intermediate_stage_offloads_and_returns_the_downstream_result() -> None:
    with serve_pipeline([AddThenOffload(), Scale(3.0)]) as pipe, Master(pipe.frontend) as master:
        reply = master.request("go", {"x": torch.arange(4.0)}, timeout_s=TIMEOUT_S)
        assert torch.equal(reply.message.tensors["x"], (torch.arange(4.0) + 1) * 3)
        assert reply.message.meta["downstream"] != reply.message.task_id


def test_many_tasks_in_flight_are_each_matched_to_their_own_input() -> None:
    with serve_pipeline([AddThenOffload(), Scale(2.0)], slots=4) as pipe, \
            Master(pipe.frontend) as master:
        sent = {master.submit("go", {"x": torch.full((3,), float(i))}): i for i in range(20)}
        got = {}
        while len(got) < len(sent):
            reply = master.receive(TIMEOUT_S)
            assert reply is not None, f"only {len(got)} of {len(sent)} replies came back"
            got[reply.pending.task_id] = reply.message.tensors["x"]
        for task_id, i in sent.items():
            assert torch.equal(got[task_id], torch.full((3,), (i + 1) * 2.0))


def test_a_failing_task_gets_an_error_reply_and_the_stage_keeps_serving() -> None:
    with serve_pipeline([AddThenOffload(), Scale(2.0)]) as pipe, Master(pipe.frontend) as master:
        with pytest.raises(RemoteError) as err:
            master.request("go", {"x": torch.zeros(2, 5)}, {"fail": True}, timeout_s=TIMEOUT_S)
        reason = err.value.reason
        assert "node-1/scale" in reason and "ValueError: asked to fail" in reason
        assert "[2, 5]" in reason  # the shapes, to reproduce the fault
        assert "node-0/add" in reason  # the intermediate stage passed the failure up
        reply = master.request("go", {"x": torch.ones(2)}, timeout_s=TIMEOUT_S)
        assert torch.equal(reply.message.tensors["x"], torch.full((2,), 4.0))
        assert pipe.runtimes[1].stats["errors"] == 1


class _ReversingRouter:
    """A bare ROUTER that answers a batch of tasks in reverse arrival order."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    def answer_reversed(self, count: int) -> None:
        tasks = []
        for _ in range(count):
            assert self.sock.poll(int(TIMEOUT_S * 1000)), "task did not arrive"
            envelope, body = split_envelope(self.sock.recv_multipart())
            tasks.append((envelope, unpack(body)))
        for envelope, task in reversed(tasks):
            reply = Message(Kind.RESULT, task.task_id, {"x": task.tensors["x"] * 10})
            self.sock.send_multipart([*envelope, b"", *pack(reply)])


def test_master_matches_out_of_order_replies_by_task_id() -> None:
    ctx = zmq.Context()
    router = _ReversingRouter(ctx)
    with Master(router.endpoint, context=ctx) as master:
        sent = {master.submit("go", {"x": torch.tensor([float(i)])}): i for i in range(5)}
        router.answer_reversed(5)
        order = []
        for _ in range(5):
            reply = master.receive(TIMEOUT_S)
            assert reply is not None
            order.append(reply.pending.task_id)
            assert reply.message.tensors["x"].item() == sent[reply.pending.task_id] * 10
        assert order == list(reversed(list(sent)))
    router.sock.close()
    ctx.term()


def test_master_discards_and_counts_a_reply_for_a_task_not_pending() -> None:
    ctx = zmq.Context()
    router = _ReversingRouter(ctx)
    with Master(router.endpoint, context=ctx) as master:
        first = master.submit("go", {"x": torch.tensor([1.0])})
        envelope, _ = split_envelope(router.sock.recv_multipart())
        for task_id in (first, first):  # the second copy is a duplicate
            reply = Message(Kind.RESULT, task_id, {"x": torch.tensor([2.0])})
            router.sock.send_multipart([*envelope, b"", *pack(reply)])
        assert master.receive(TIMEOUT_S) is not None
        assert master.receive(1.0) is None
        assert master.discarded == 1
    router.sock.close()
    ctx.term()


def test_master_request_times_out_with_a_clear_error() -> None:
    ctx = zmq.Context()
    router = _ReversingRouter(ctx)
    with Master(router.endpoint, context=ctx) as master:
        with pytest.raises(TaskTimeout, match="got no reply"):
            master.request("go", {"x": torch.zeros(1)}, timeout_s=0.5)
        assert not master.pending
    router.sock.close()
    ctx.term()


def test_stage_answers_malformed_tasks_with_errors_and_counts_them() -> None:
    ctx = zmq.Context()
    backend = ctx.socket(zmq.ROUTER)
    backend.setsockopt(zmq.LINGER, 0)
    backend.bind("tcp://127.0.0.1:*")
    runtime = StageRuntime(Scale(2.0), backend.getsockopt(zmq.LAST_ENDPOINT).decode(),
                           context=ctx)
    stop = threading.Event()
    thread = threading.Thread(target=runtime.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert backend.poll(int(TIMEOUT_S * 1000))
        worker_id, _, ready = backend.recv_multipart()
        assert unpack([ready]).kind is Kind.READY

        bad = [
            [b"\x80\x04\x95pickle"],
            [b'{"v":1,"kind":"task","id":"t","tensors":[{"name":"x","dtype":"float32","shape":[4]}]}', b"short"],
            [b'{"v":7,"kind":"task","id":"t"}'],
            pack(Message(Kind.RESULT, "t")),
            pack(Message(Kind.TASK, "t", {"x": torch.zeros(2)})),  # no 'op'
        ]
        for body in bad:
            backend.send_multipart([worker_id, b"master", b"", *body])
            assert backend.poll(int(TIMEOUT_S * 1000))
            frames = backend.recv_multipart()
            assert frames[1] == b"master"
            assert unpack(frames[3:]).kind is Kind.ERROR
        backend.send_multipart([worker_id, b"no-delimiter"])  # unroutable: dropped, counted

        good = pack(Message(Kind.TASK, "ok", {"x": torch.ones(2)}, {"op": "scale"}))
        backend.send_multipart([worker_id, b"master", b"", *good])
        assert backend.poll(int(TIMEOUT_S * 1000))
        reply = unpack(backend.recv_multipart()[3:])
        assert reply.kind is Kind.RESULT and torch.equal(reply.tensors["x"], torch.full((2,), 2.0))
        assert runtime.stats["malformed"] == len(bad) + 1
    finally:
        stop.set()
        thread.join(10)
        runtime.close()
        backend.close()
        ctx.term()
