"""Fog broker: scheduling, routing, bad input and back-pressure.

Every test uses real ZeroMQ sockets on loopback ports the kernel picks. The
broker runs in a thread (``run(stop)``) or, in one test, in its own process.
Echo workers and the two-master test's masters are spawned processes that
speak the protocol with ``pack``/``unpack``; the other tests drive the broker
from DEALER sockets in the test process so that they can order events
exactly. Nothing waits on sleeps: each step waits for a reply, a handshake or
a process, with a generous timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import pickle
import pickletools
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from brokers.fog import BrokerConfig, FogBroker
from sparse_zmq.errors import ConfigError
from sparse_zmq.protocol import (
    VERSION,
    Kind,
    Message,
    pack,
    split_envelope,
    unpack,
)

TIMEOUT_S = 60.0  # generous: the test machine is a noisy 2-core box
TIMEOUT_MS = int(TIMEOUT_S * 1000)
LOOPBACK = "tcp://127.0.0.1:*"
REPO_ROOT = Path(__file__).resolve().parents[1]
SPAWN = mp.get_context("spawn")


# Protocol helpers shared by the test process and the spawned peers.


def send(sock: zmq.Socket[Any], message: Message) -> None:
    """Send ``message`` from a DEALER, delimiter first."""
    sock.send_multipart([b"", *pack(message)])


def send_task(sock: zmq.Socket[Any], task_id: str, x: torch.Tensor) -> None:
    """Send a task carrying one tensor ``x``."""
    send(sock, Message(Kind.TASK, task_id, {"x": x}))


def receive(
    sock: zmq.Socket[Any], timeout_s: float = TIMEOUT_S, *, skip_heartbeats: bool = True
) -> tuple[list[bytes], Message]:
    """Receive one message on a DEALER: its routing envelope and the message.

    Heartbeats from the broker are answered with one (so a worker socket
    stays alive) and skipped, unless ``skip_heartbeats`` is False.

    Raises:
        AssertionError: Nothing arrived within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0 or not sock.poll(remaining_ms):
            raise AssertionError(f"no message within {timeout_s}s")
        envelope, body = split_envelope(sock.recv_multipart())
        message = unpack(body)
        if skip_heartbeats and message.kind is Kind.HEARTBEAT:
            send(sock, Message(Kind.HEARTBEAT))
            continue
        return envelope, message


def receive_reply(sock: zmq.Socket[Any]) -> Message:
    """Receive a reply on a master's DEALER, which carries no envelope."""
    envelope, message = receive(sock)
    assert envelope == []
    return message


def echo_worker(
    backend: str,
    name: str,
    stop: Event,
    slots: int = 1,
    barrier: Barrier | None = None,
) -> None:
    """Worker process: answer each task with ``x * 2``, naming itself in meta.

    With a ``barrier``, the first task is held until every party of the
    barrier holds one, so each worker is known to take part.
    """
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 200  # enough for the disconnect to leave
        sock.connect(backend)
        send(sock, Message(Kind.READY, meta={"slots": slots}))
        waiting_at_barrier = barrier is not None
        while not stop.is_set():
            if not sock.poll(100):
                continue
            envelope, body = split_envelope(sock.recv_multipart())
            task = unpack(body)
            if task.kind is Kind.HEARTBEAT:
                send(sock, Message(Kind.HEARTBEAT))
                continue
            if waiting_at_barrier:
                assert barrier is not None
                barrier.wait(TIMEOUT_S)
                waiting_at_barrier = False
            reply = Message(
                Kind.RESULT,
                task.task_id,
                {"y": task.tensors["x"] * 2},
                meta={"worker": name},
            )
            sock.send_multipart([*envelope, b"", *pack(reply)])
        send(sock, Message(Kind.DISCONNECT))


def echo_master(frontend: str, name: str, count: int, base: float, report: Any) -> None:
    """Master process: send ``count`` tasks, check every reply is its own.

    Puts a summary dict on ``report``: replies received, any reply that was
    wrong or not its own, and the workers named in the replies.
    """
    expected: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    wrong: list[str] = []
    workers: set[str] = set()
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.linger = 0
        sock.connect(frontend)
        for i in range(count):
            task_id = f"{name}-{i}"
            x = torch.full((3,), base + i)
            expected[task_id] = x * 2
            send_task(sock, task_id, x)
        for _ in range(count):
            if not sock.poll(TIMEOUT_MS):
                break
            envelope, body = split_envelope(sock.recv_multipart())
            reply = unpack(body)
            if (
                envelope
                or reply.kind is not Kind.RESULT
                or reply.task_id not in expected
                or reply.task_id in seen
                or not torch.equal(reply.tensors["y"], expected[reply.task_id])
            ):
                wrong.append(f"{reply.kind.value} {reply.task_id!r} {reply.meta}")
            seen.add(reply.task_id)
            workers.add(str(reply.meta.get("worker")))
    report.put(
        {
            "name": name,
            "replies": len(seen) + len(wrong),
            "wrong": wrong,
            "workers": sorted(workers),
        }
    )


# Fixtures: a broker thread, worker processes, sockets in the test process.


@dataclass
class RunningBroker:
    """A broker serving in a thread, with its bound endpoints."""

    broker: FogBroker
    frontend: str
    backend: str


# Scheduling tests drive workers step by step and do not heartbeat between
# steps: a long interval keeps the broker from declaring them lost.
QUIET = BrokerConfig(heartbeat_interval_s=600.0)


@contextlib.contextmanager
def broker_thread(
    config: BrokerConfig | None = QUIET,
    before_run: Callable[[FogBroker], None] | None = None,
) -> Iterator[RunningBroker]:
    """Bind a broker and run it in a thread; stop, join and close on exit.

    ``before_run`` is called with the bound broker before its thread starts.
    An exception raised by ``run`` fails the test when the block exits.
    """
    failures: list[BaseException] = []
    stop = threading.Event()
    with FogBroker(LOOPBACK, LOOPBACK, config=config, name="test-broker") as broker:
        frontend, backend = broker.bind()
        if before_run is not None:
            before_run(broker)

        def serve() -> None:
            try:
                broker.run(stop)
            except BaseException as exc:
                failures.append(exc)
                raise

        thread = threading.Thread(target=serve, name="test-broker", daemon=True)
        thread.start()
        try:
            yield RunningBroker(broker, frontend, backend)
        finally:
            stop.set()
            thread.join(TIMEOUT_S)
        assert not thread.is_alive(), "broker thread did not stop"
    assert not failures, f"broker loop raised {failures[0]!r}"


@dataclass
class WorkerProcesses:
    """Starts echo workers in spawned processes and stops them at teardown."""

    started: list[tuple[Any, Event]] = field(default_factory=list)

    def start(
        self, backend: str, name: str, slots: int = 1, barrier: Barrier | None = None
    ) -> None:
        """Start one echo worker process connected to ``backend``."""
        stop = SPAWN.Event()
        process = SPAWN.Process(
            target=echo_worker,
            args=(backend, name, stop, slots, barrier),
            name=name,
        )
        process.start()
        self.started.append((process, stop))

    def stop_all(self) -> list[int | None]:
        """Ask every worker to stop, join them, return their exit codes."""
        for _, stop in self.started:
            stop.set()
        codes = []
        for process, _ in self.started:
            process.join(TIMEOUT_S)
            if process.is_alive():
                process.terminate()
                process.join(TIMEOUT_S)
            codes.append(process.exitcode)
        self.started.clear()
        return codes


@pytest.fixture
def workers() -> Iterator[WorkerProcesses]:
    """Echo worker processes; each must have exited cleanly by teardown."""
    procs = WorkerProcesses()
    try:
        yield procs
    finally:
        codes = procs.stop_all()
    assert all(code == 0 for code in codes), f"worker exit codes {codes}"


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    """Give the test its own context for sockets, closed without lingering."""
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def dealer(
    ctx: zmq.Context[Any], endpoint: str, routing_id: bytes | None = None
) -> zmq.Socket[Any]:
    """Connect a DEALER to ``endpoint``, optionally with a fixed identity."""
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if routing_id is not None:
        sock.routing_id = routing_id
    sock.connect(endpoint)
    return sock


def round_trip(master: zmq.Socket[Any]) -> None:
    """Wait until the broker has handled everything ``master`` sent so far.

    Sends a frame that is not a header and waits for its error reply; one
    DEALER's messages are handled in order, so the earlier ones are done.
    The broker counts this as one malformed frontend message.
    """
    master.send_multipart([b"", b"round trip"])
    reply = receive_reply(master)
    assert reply.kind is Kind.ERROR


@dataclass
class FakeWorker:
    """A worker driven step by step from the test."""

    sock: zmq.Socket[Any]

    def ready(self, slots: int = 1) -> None:
        """Announce ``slots`` free slots."""
        send(self.sock, Message(Kind.READY, meta={"slots": slots}))

    def take(self) -> tuple[list[bytes], Message]:
        """Receive the next task with its master envelope."""
        envelope, task = receive(self.sock)
        assert task.kind is Kind.TASK
        return envelope, task

    def answer(self, envelope: list[bytes], task: Message) -> None:
        """Reply to ``task`` with ``x * 2``."""
        reply = Message(Kind.RESULT, task.task_id, {"y": task.tensors["x"] * 2})
        self.sock.send_multipart([*envelope, b"", *pack(reply)])


def ones(n: int = 4) -> torch.Tensor:
    """Return a small tensor for tasks whose values do not matter."""
    return torch.ones(n)


# Scheduling and routing across processes.


@pytest.mark.slow
def test_two_masters_tasks_spread_over_two_workers_and_return_to_their_master(
    workers: WorkerProcesses,
) -> None:
    count = 12
    # Each worker holds its first task until the other holds one too, so
    # both take part whatever the start-up order.
    barrier = SPAWN.Barrier(2)
    report = SPAWN.Queue()
    with broker_thread() as running:
        workers.start(running.backend, "worker-a", barrier=barrier)
        workers.start(running.backend, "worker-b", barrier=barrier)
        masters = [
            SPAWN.Process(
                target=echo_master,
                args=(running.frontend, name, count, base, report),
            )
            for name, base in (("master-1", 0.0), ("master-2", 1000.0))
        ]
        for master in masters:
            master.start()
        summaries = {
            s["name"]: s for s in (report.get(timeout=2 * TIMEOUT_S) for _ in masters)
        }
        for master in masters:
            master.join(TIMEOUT_S)
            assert master.exitcode == 0
        assert workers.stop_all() == [0, 0]

    for summary in summaries.values():
        assert summary["wrong"] == []
        assert summary["replies"] == count
    assert set().union(*(s["workers"] for s in summaries.values())) == {
        "worker-a",
        "worker-b",
    }
    stats = running.broker.stats
    assert stats["tasks_received"] == 2 * count
    assert stats["tasks_dispatched"] == 2 * count
    assert stats["results_returned"] == 2 * count
    assert stats["malformed_frontend"] == stats["malformed_backend"] == 0
    assert running.broker.in_flight == running.broker.queued == 0


@pytest.mark.slow
def test_queued_tasks_go_to_a_worker_that_arrives_later(
    workers: WorkerProcesses, zctx: zmq.Context[Any]
) -> None:
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        for i in range(4):
            send_task(master, f"t{i}", torch.full((2,), float(i)))
        round_trip(master)
        assert running.broker.queued == 4
        assert running.broker.free_slots == 0

        workers.start(running.backend, "late-worker")
        replies = [receive_reply(master) for _ in range(4)]

    assert sorted(r.task_id for r in replies) == ["t0", "t1", "t2", "t3"]
    for reply in replies:
        value = 2 * float(reply.task_id[1:])
        assert torch.equal(reply.tensors["y"], torch.full((2,), value))
        assert reply.meta["worker"] == "late-worker"
    assert running.broker.stats["tasks_dispatched"] == 4


def test_tasks_fill_free_slots_in_the_order_the_slots_became_free(
    zctx: zmq.Context[Any],
) -> None:
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        a = FakeWorker(dealer(zctx, running.backend, b"worker-a"))
        b = FakeWorker(dealer(zctx, running.backend, b"worker-b"))

        a.ready(2)
        send_task(master, "t1", ones())
        env1, t1 = a.take()  # the broker has seen a's ready
        b.ready(1)
        send_task(master, "t2", ones())
        env2, t2 = a.take()  # a's second slot is older than b's
        send_task(master, "t3", ones())
        env3, t3 = b.take()

        # Free b's slot, then a's: the next two tasks go to b, then a.
        b.answer(env3, t3)
        assert receive_reply(master).task_id == "t3"
        a.answer(env1, t1)
        assert receive_reply(master).task_id == "t1"
        send_task(master, "t4", ones())
        send_task(master, "t5", ones())
        env4, t4 = b.take()
        env5, t5 = a.take()
        assert (t4.task_id, t5.task_id) == ("t4", "t5")

        # No slot free: tasks wait and leave in arrival order.
        send_task(master, "t6", ones())
        send_task(master, "t7", ones())
        round_trip(master)
        assert running.broker.queued == 2
        a.answer(env5, t5)
        assert receive_reply(master).task_id == "t5"
        assert a.take()[1].task_id == "t6"
        b.answer(env4, t4)
        assert receive_reply(master).task_id == "t4"
        assert b.take()[1].task_id == "t7"
        assert (t1.task_id, t2.task_id) == ("t1", "t2")
        assert env1 == env2  # both tasks carry the one master's identity


def test_disconnect_withdraws_free_slots_and_slots_of_later_replies(
    zctx: zmq.Context[Any],
) -> None:
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        worker = FakeWorker(dealer(zctx, running.backend))
        worker.ready(1)
        send_task(master, "t1", ones())
        envelope, task = worker.take()

        # Sent on one pipe, so handled in this order before the reply arrives.
        worker.ready(3)
        send(worker.sock, Message(Kind.DISCONNECT))
        worker.answer(envelope, task)
        assert receive_reply(master).task_id == "t1"
        assert running.broker.free_slots == 0

        send_task(master, "t2", ones())
        round_trip(master)
        assert running.broker.queued == 1
        worker.ready(1)  # a worker may come back
        assert worker.take()[1].task_id == "t2"


def test_heartbeats_from_workers_are_counted_and_change_nothing(
    zctx: zmq.Context[Any],
) -> None:
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        worker = FakeWorker(dealer(zctx, running.backend))
        worker.ready(1)
        assert receive(worker.sock, skip_heartbeats=False)[1].kind is Kind.HEARTBEAT
        send(worker.sock, Message(Kind.HEARTBEAT))
        send_task(master, "t1", ones())
        envelope, task = worker.take()
        send(worker.sock, Message(Kind.HEARTBEAT))
        worker.answer(envelope, task)
        assert receive_reply(master).task_id == "t1"
        assert running.broker.stats["heartbeats"] == 2
        assert running.broker.free_slots == 1
        assert running.broker.stats["unknown_workers"] == 0


def test_new_worker_is_welcomed_with_the_broker_timings_and_instance(
    zctx: zmq.Context[Any],
) -> None:
    config = BrokerConfig(heartbeat_interval_s=600.0, liveness=4)
    with broker_thread(config) as running:
        worker = FakeWorker(dealer(zctx, running.backend))
        worker.ready(1)
        envelope, welcome = receive(worker.sock, skip_heartbeats=False)
    assert envelope == [] and welcome.kind is Kind.HEARTBEAT
    assert welcome.meta == {
        "broker": running.broker.instance,
        "interval_s": 600.0,
        "liveness": 4,
    }


def test_heartbeat_from_an_unknown_worker_is_answered_with_disconnect(
    zctx: zmq.Context[Any],
) -> None:
    with broker_thread() as running:
        stranger = dealer(zctx, running.backend, b"stranger")
        send(stranger, Message(Kind.HEARTBEAT))
        envelope, answer = receive(stranger, skip_heartbeats=False)
        assert (envelope, answer.kind) == ([], Kind.DISCONNECT)
        assert running.broker.workers == 0
    assert running.broker.stats["unknown_workers"] == 1


def test_master_heartbeat_is_answered_with_instance_and_counters(
    zctx: zmq.Context[Any],
) -> None:
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        send_task(master, "t1", ones())
        send(master, Message(Kind.HEARTBEAT))
        answer = receive(master, skip_heartbeats=False)[1]
    assert answer.kind is Kind.HEARTBEAT
    assert answer.meta["broker"] == running.broker.instance
    assert answer.meta["stats"]["tasks_received"] == 1
    assert answer.meta["stats"]["queued"] == 1
    assert running.broker.stats["master_heartbeats"] == 1


def test_large_tensor_frames_pass_through_unchanged(zctx: zmq.Context[Any]) -> None:
    x = torch.randn(2048, 1024)  # 8 MiB
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        worker = FakeWorker(dealer(zctx, running.backend))
        worker.ready()
        send_task(master, "big", x)
        envelope, task = worker.take()
        assert torch.equal(task.tensors["x"], x)
        worker.answer(envelope, task)
        reply = receive_reply(master)
    assert torch.equal(reply.tensors["y"], x * 2)


# Bad input from masters.


class TouchOnUnpickle:
    """Pickles into a payload whose unpickling creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.path,))


def raw_header(**fields: Any) -> bytes:
    """Build a task header for one float32 [4] tensor, ``fields`` replaced."""
    header = {
        "v": VERSION,
        "kind": "task",
        "id": "t-bad",
        "tensors": [{"name": "x", "dtype": "float32", "shape": [4]}],
        "meta": {},
    }
    header.update(fields)
    return json.dumps(header).encode()


FOUR_FLOATS = bytes(16)

# name -> (frames a master sends, task id the error must name, reason fragment)
MALFORMED: dict[str, tuple[list[bytes], str, str]] = {
    "no_delimiter": ([raw_header(), FOUR_FLOATS], "", "delimiter"),
    "no_header": ([b""], "", "no header"),
    "bad_json": ([b"", b'{"v": 1, "kind": '], "", "JSON"),
    "deeply_nested_json": ([b"", b"[" * 50_000], "", "RecursionError"),
    "wrong_frame_count": (
        [b"", raw_header(), FOUR_FLOATS, FOUR_FLOATS],
        "t-bad",
        "tensor frames",
    ),
    "truncated_tensor_buffer": ([b"", raw_header(), bytes(15)], "t-bad", "15 bytes"),
    "unknown_version": ([b"", raw_header(v=VERSION + 98), FOUR_FLOATS], "", "version"),
    "unknown_kind": ([b"", raw_header(kind="gossip"), FOUR_FLOATS], "", "kind"),
    "result_instead_of_task": (
        [b"", raw_header(kind="result"), FOUR_FLOATS],
        "t-bad",
        "may only send",
    ),
    "empty_task_id": ([b"", raw_header(id=""), FOUR_FLOATS], "", "non-empty id"),
}


def pickle_payload(marker: Path) -> bytes:
    """Build a pickle that would create ``marker`` if anything unpickled it."""
    payload = pickle.dumps(TouchOnUnpickle(marker))
    opcodes = {op.name for op, _, _ in pickletools.genops(payload)}
    assert "REDUCE" in opcodes and b"touch" in payload
    return payload


def test_broker_code_never_decodes_or_rebuilds_tensor_frames() -> None:
    import ast

    import brokers.fog

    tree = ast.parse(Path(brokers.fog.__file__).read_text(encoding="utf-8"))
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    # Tensor frames are forwarded as the zmq.Frame objects received: the broker
    # reads headers only, and has nothing that could decode or join payloads.
    assert not imported & {"unpack", "decode_tensor", "encode_tensor", "torch", "numpy"}
    assert "sparse_zmq.codec" not in modules
    calls = {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    # Frames move through recv_frames / send_frames (copy=False), never through
    # pyzmq's copying defaults or a conversion of a frame to bytes.
    assert not calls & {"send_multipart", "recv_multipart", "tobytes"}


def test_pickle_payload_used_below_does_create_its_marker(tmp_path: Path) -> None:
    control = tmp_path / "control-marker"
    pickle.loads(pickle_payload(control))  # our own payload, to show it is live
    assert control.exists()


@pytest.mark.parametrize("case", [*MALFORMED, "pickle_payload"])
def test_malformed_master_message_gets_an_error_reply_and_is_counted(
    case: str, zctx: zmq.Context[Any], tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled-marker"
    if case == "pickle_payload":
        frames, task_id, fragment = [b"", pickle_payload(marker)], "", "JSON"
    else:
        frames, task_id, fragment = MALFORMED[case]
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        master.send_multipart(frames)
        reply = receive_reply(master)
    assert reply.kind is Kind.ERROR
    assert reply.task_id == task_id
    assert fragment in reply.meta["reason"]
    assert running.broker.stats["malformed_frontend"] == 1
    assert running.broker.stats["tasks_received"] == 0
    assert not marker.exists()


@pytest.mark.slow
def test_broker_keeps_serving_after_malformed_master_messages(
    workers: WorkerProcesses, zctx: zmq.Context[Any], tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled-marker"
    bad = [frames for frames, _, _ in MALFORMED.values()]
    bad.append([b"", pickle_payload(marker)])
    with broker_thread() as running:
        workers.start(running.backend, "worker")
        master = dealer(zctx, running.frontend)
        for frames in bad:
            master.send_multipart(frames)
            assert receive_reply(master).kind is Kind.ERROR
        send_task(master, "good", torch.arange(3.0))
        reply = receive_reply(master)
    assert reply.kind is Kind.RESULT
    assert torch.equal(reply.tensors["y"], torch.arange(3.0) * 2)
    assert running.broker.stats["malformed_frontend"] == len(bad)
    assert running.broker.stats["results_returned"] == 1
    assert not marker.exists()


def test_task_id_already_pending_for_the_same_master_is_refused(
    zctx: zmq.Context[Any],
) -> None:
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        other = dealer(zctx, running.frontend)
        send_task(master, "t1", ones())
        send_task(other, "t1", ones())  # ids are per master: accepted
        send_task(master, "t1", ones())
        reply = receive_reply(master)
        round_trip(other)
        assert reply.kind is Kind.ERROR and reply.task_id == "t1"
        assert "already queued or in flight" in reply.meta["reason"]
        assert reply.meta["duplicate"] is True
        assert running.broker.queued == 2
    assert running.broker.stats["rejected_duplicate"] == 1


@pytest.mark.slow
def test_full_queue_answers_busy_and_drops_nothing(
    workers: WorkerProcesses, zctx: zmq.Context[Any]
) -> None:
    config = BrokerConfig(max_queued_tasks=3)
    with broker_thread(config) as running:
        master = dealer(zctx, running.frontend)
        for i in range(5):
            send_task(master, f"t{i}", torch.full((2,), float(i)))
        busy = [receive_reply(master) for _ in range(2)]
        assert running.broker.queued == 3

        workers.start(running.backend, "worker")
        results = [receive_reply(master) for _ in range(3)]

    assert [r.task_id for r in busy] == ["t3", "t4"]
    for reply in busy:
        assert reply.kind is Kind.ERROR
        assert reply.meta["busy"] is True
        assert "max_queued_tasks" in reply.meta["reason"]
        assert "3" in reply.meta["reason"]
    assert sorted(r.task_id for r in results) == ["t0", "t1", "t2"]
    assert all(r.kind is Kind.RESULT for r in results)
    stats = running.broker.stats
    assert stats["rejected_busy"] == 2
    assert stats["tasks_received"] == 5
    assert stats["results_returned"] == 3


# Bad input and vanished peers on the backend.


def test_malformed_worker_messages_are_counted_and_logged_with_the_worker_id(
    zctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="brokers.fog")
    worker_id = b"bad-worker"
    ready = pack(Message(Kind.READY))[0]
    bad: list[list[bytes]] = [
        [b"no delimiter"],
        [b"", b"not json"],
        [b"", pack(Message(Kind.READY, meta={"slots": 0}))[0]],
        [b"", pack(Message(Kind.READY, meta={"slots": "two"}))[0]],
        [b"", pack(Message(Kind.READY, meta={"slots": 10**9}))[0]],
        [b"someone", b"", ready],  # control messages carry no envelope
        [b"", ready, b"extra frame"],
        [b"", *pack(Message(Kind.TASK, "t0", {"x": ones()}))],
    ]
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        worker = FakeWorker(dealer(zctx, running.backend, worker_id))
        for frames in bad:
            worker.sock.send_multipart(frames)
        # A reply naming a task that is not in flight is dropped, not sent on.
        unknown = Message(Kind.RESULT, "t9", {"y": ones()})
        worker.sock.send_multipart([b"nobody", b"", *pack(unknown)])
        worker.ready(1)
        send_task(master, "t1", ones())
        envelope, task = worker.take()  # everything sent before was handled
        assert running.broker.stats["malformed_backend"] == len(bad)
        assert running.broker.stats["unmatched_replies"] == 1

        worker.answer(envelope, task)
        assert receive_reply(master).task_id == "t1"

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    naming_worker = [m for m in warnings if "bad-worker" in m]
    assert len(naming_worker) == len(bad) + 1
    assert all(m.startswith("test-broker: ") for m in warnings)


def test_malformed_reply_becomes_an_error_for_the_master_and_frees_the_slot(
    zctx: zmq.Context[Any],
) -> None:
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        worker = FakeWorker(dealer(zctx, running.backend))
        worker.ready(1)
        send_task(master, "t1", ones())
        envelope, _ = worker.take()
        header = pack(Message(Kind.RESULT, "t1", {"y": ones()}))[0]
        worker.sock.send_multipart([*envelope, b"", header])  # tensor frame missing
        reply = receive_reply(master)
        assert reply.kind is Kind.ERROR and reply.task_id == "t1"
        assert "malformed result" in reply.meta["reason"]

        send_task(master, "t2", ones())
        assert worker.take()[1].task_id == "t2"
    assert running.broker.stats["malformed_backend"] == 1


def inject_frames(broker: FogBroker, on: str, frames: list[bytes]) -> None:
    """Hand ``frames`` to the broker as if received on socket ``on``.

    A peer that has gone away at a known moment cannot be produced with real
    sockets: the ROUTER notices a disconnect asynchronously. So these tests
    feed the broker one message from an identity that never connected,
    before its loop starts.
    """
    handler = broker._on_backend if on == "backend" else broker._on_frontend
    handler([zmq.Frame(frame) for frame in frames])


def test_worker_gone_before_its_welcome_is_lost_and_tasks_wait_for_a_live_one(
    zctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="brokers.fog")

    def queue_two_tasks_then_lose_a_worker(broker: FogBroker) -> None:
        for task_id in ("g1", "g2"):
            task = pack(Message(Kind.TASK, task_id, {"x": ones()}))
            inject_frames(broker, "frontend", [b"ghost-master", b"", *task])
        ready = pack(Message(Kind.READY, meta={"slots": 2}))
        inject_frames(broker, "backend", [b"ghost-worker", b"", *ready])

    with broker_thread(before_run=queue_two_tasks_then_lose_a_worker) as running:
        assert running.broker.queued == 2
        assert running.broker.free_slots == 0
        assert running.broker.workers == 0
        assert running.broker.stats["worker_unreachable"] == 1
        assert running.broker.stats["workers_lost"] == 1

        worker = FakeWorker(dealer(zctx, running.backend))
        worker.ready(1)
        envelope, task = worker.take()
        assert task.task_id == "g1"
        worker.answer(envelope, task)
        assert worker.take()[1].task_id == "g2"
    assert any(
        "ghost-worker" in r.getMessage() and "lost" in r.getMessage()
        for r in caplog.records
    )


def test_reply_for_a_vanished_master_is_dropped_and_the_slot_freed(
    zctx: zmq.Context[Any],
) -> None:
    ghost_task = [b"ghost-master", b"", *pack(Message(Kind.TASK, "g1", {"x": ones()}))]
    with broker_thread(
        before_run=lambda b: inject_frames(b, "frontend", ghost_task)
    ) as running:
        worker = FakeWorker(dealer(zctx, running.backend))
        worker.ready(1)
        envelope, task = worker.take()
        assert (envelope, task.task_id) == ([b"ghost-master"], "g1")
        worker.answer(envelope, task)

        master = dealer(zctx, running.frontend)
        send_task(master, "t1", ones())
        envelope, task = worker.take()  # the slot came back
        worker.answer(envelope, task)
        assert receive_reply(master).task_id == "t1"
    stats = running.broker.stats
    assert stats["master_unreachable"] == 1
    assert stats["results_returned"] == 1


# Configuration, binding and the broker as its own process.


@pytest.mark.parametrize(
    "fields",
    [
        {"max_queued_tasks": -1},
        {"max_worker_slots": 0},
        {"poll_timeout_ms": 0},
        {"batch": 0},
        {"linger_ms": -5},
        {"max_queued_tasks": 2.5},
        {"max_queued_tasks": True},
        {"max_queued_bytes": 0},
        {"max_streams": 0},
        {"liveness": 0},
        {"heartbeat_interval_s": 0},
        {"heartbeat_interval_s": float("nan")},
        {"heartbeat_interval_s": "1s"},
    ],
)
def test_config_refuses_out_of_range_values(fields: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(fields))):
        BrokerConfig(**fields)


def test_bind_resolves_wildcard_ports() -> None:
    with FogBroker(LOOPBACK, LOOPBACK) as broker:
        frontend, backend = broker.bind()
        assert broker.bind() == (frontend, backend)
    for endpoint in (frontend, backend):
        assert endpoint.startswith("tcp://127.0.0.1:")
        assert int(endpoint.rsplit(":", 1)[1]) > 0


def test_bind_to_a_bad_endpoint_raises_config_error() -> None:
    with (
        FogBroker("tcp://not-an-endpoint", LOOPBACK) as broker,
        pytest.raises(ConfigError, match="not-an-endpoint"),
    ):
        broker.bind()


def wait_for_file(path: Path, proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``path`` exists, failing if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        try:
            code = proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            assert time.monotonic() < deadline, f"{path} not written in {TIMEOUT_S}s"
            continue
        raise AssertionError(f"broker exited with {code} before writing {path}")


@pytest.mark.slow
def test_broker_process_reports_endpoints_serves_and_stops_on_sigterm(
    workers: WorkerProcesses, zctx: zmq.Context[Any], tmp_path: Path
) -> None:
    ready_file = tmp_path / "broker.json"
    log_file = tmp_path / "broker.log"
    command = [
        sys.executable,
        "-c",
        "import sys; from brokers.fog import main; sys.exit(main(sys.argv[1:]))",
        "--frontend",
        LOOPBACK,
        "--backend",
        LOOPBACK,
        "--ready-file",
        str(ready_file),
        "--name",
        "sub-broker",
    ]
    with log_file.open("wb") as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stderr=log, stdout=log)
    try:
        wait_for_file(ready_file, proc)
        endpoints = json.loads(ready_file.read_text())
        assert endpoints["pid"] == proc.pid

        master = dealer(zctx, endpoints["frontend"])
        send_task(master, "t1", torch.arange(4.0))
        round_trip(master)  # queued before any worker exists
        workers.start(endpoints["backend"], "worker")
        reply = receive_reply(master)
        assert reply.kind is Kind.RESULT
        assert torch.equal(reply.tensors["y"], torch.arange(4.0) * 2)
        assert workers.stop_all() == [0]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT_S)
    log_text = log_file.read_text()
    assert "sub-broker: got SIGTERM, stopping" in log_text
    assert "results_returned=1" in log_text


# Liveness, pinned streams, byte bounds and size limits.


def wait_for_stat(
    broker: FogBroker, name: str, value: int, idle: zmq.Socket[Any]
) -> None:
    """Wait until ``broker.stats[name]`` reaches ``value``.

    Each round polls ``idle`` (a master socket) and fails if anything
    arrives on it, so the wait also shows that no reply slipped through.
    """
    deadline = time.monotonic() + TIMEOUT_S
    while broker.stats[name] < value:
        assert time.monotonic() < deadline, f"{name} stayed at {broker.stats[name]}"
        assert not idle.poll(20), f"unexpected message while waiting for {name}"
    assert broker.stats[name] == value


def send_stream_task(sock: zmq.Socket[Any], task_id: str, stream: str | None) -> None:
    """Send a small task, in training stream ``stream`` when one is given."""
    meta = {} if stream is None else {"stream": stream}
    send(sock, Message(Kind.TASK, task_id, {"x": ones()}, meta))


def test_silent_worker_is_lost_its_task_redone_elsewhere_and_late_reply_dropped(
    zctx: zmq.Context[Any],
) -> None:
    config = BrokerConfig(heartbeat_interval_s=0.1, liveness=10)
    with broker_thread(config) as running:
        master = dealer(zctx, running.frontend)
        stalled = FakeWorker(dealer(zctx, running.backend, b"stalled"))
        stalled.ready(1)
        send_stream_task(master, "t1", "train-1")
        stalled_env, stalled_task = stalled.take()  # then it stays silent

        healthy = FakeWorker(dealer(zctx, running.backend, b"healthy"))
        healthy.ready(1)
        envelope, task = healthy.take()  # answers heartbeats while it waits
        assert task.task_id == "t1"
        assert running.broker.stats["workers_lost"] == 1
        assert running.broker.stats["tasks_requeued"] == 1
        assert running.broker.stats["streams_repinned"] == 1

        stalled.answer(stalled_env, stalled_task)  # too late: dropped
        wait_for_stat(running.broker, "unmatched_replies", 1, master)
        healthy.answer(envelope, task)
        reply = receive_reply(master)
        assert (reply.kind, reply.task_id) == (Kind.RESULT, "t1")

        # The stream now lives on the healthy worker.
        send_stream_task(master, "t2", "train-1")
        assert healthy.take()[1].task_id == "t2"
    assert running.broker.stats["results_returned"] == 1


def test_stream_tasks_wait_for_their_worker_while_inference_goes_anywhere(
    zctx: zmq.Context[Any],
) -> None:
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        a = FakeWorker(dealer(zctx, running.backend, b"worker-a"))
        b = FakeWorker(dealer(zctx, running.backend, b"worker-b"))
        a.ready(1)
        send_stream_task(master, "s1", "train")
        env1, s1 = a.take()  # the stream is pinned to a
        b.ready(1)

        send_stream_task(master, "s2", "train")
        send_stream_task(master, "i1", None)
        assert b.take()[1].task_id == "i1"  # b is free, but s2 waits for a
        round_trip(master)
        assert running.broker.queued == 1

        a.answer(env1, s1)
        assert receive_reply(master).task_id == "s1"
        env2, s2 = a.take()
        assert s2.task_id == "s2"

        # a leaves: once its last task is answered the stream is re-pinned.
        send(a.sock, Message(Kind.DISCONNECT))
        a.answer(env2, s2)
        assert receive_reply(master).task_id == "s2"
        round_trip(master)
        assert running.broker.stats["streams_repinned"] == 1
        b.ready(1)
        send_stream_task(master, "s3", "train")
        assert b.take()[1].task_id == "s3"


def test_stream_that_is_not_a_string_is_refused(zctx: zmq.Context[Any]) -> None:
    with broker_thread() as running:
        master = dealer(zctx, running.frontend)
        send(master, Message(Kind.TASK, "t1", {"x": ones()}, {"stream": 7}))
        reply = receive_reply(master)
    assert reply.kind is Kind.ERROR and "'stream'" in reply.meta["reason"]
    assert running.broker.stats["malformed_frontend"] == 1


def test_queue_bounded_in_bytes_answers_busy(zctx: zmq.Context[Any]) -> None:
    limit = 128 * 1024
    config = BrokerConfig(
        heartbeat_interval_s=600.0, max_message_bytes=limit, max_queued_bytes=limit
    )
    x = torch.zeros(10 * 1024)  # 40 KiB: three fit in 128 KiB, not four
    with broker_thread(config) as running:
        master = dealer(zctx, running.frontend)
        for i in range(4):
            send_task(master, f"t{i}", x)
        busy = receive_reply(master)
        assert running.broker.queued == 3
    assert busy.task_id == "t3" and busy.meta["busy"] is True
    assert "max_queued_bytes" in busy.meta["reason"]
    assert running.broker.stats["peak_queued_bytes"] <= limit


def test_message_above_the_size_limit_gets_a_clear_error(
    zctx: zmq.Context[Any],
) -> None:
    limit = 128 * 1024
    config = BrokerConfig(max_message_bytes=limit, max_queued_bytes=limit)
    with broker_thread(config) as running:
        master = dealer(zctx, running.frontend)
        frames = pack(
            Message(
                Kind.TASK, "big", {"a": torch.zeros(20_000), "b": torch.zeros(20_000)}
            )
        )
        master.send_multipart([b"", *frames])  # 160 KB, each frame below the limit
        reply = receive_reply(master)
    assert reply.kind is Kind.ERROR and reply.meta["too_large"] is True
    assert (
        str(limit) in reply.meta["reason"]
        and "max_message_bytes" in reply.meta["reason"]
    )
    assert running.broker.stats["rejected_too_large"] == 1


def test_single_frame_above_the_size_limit_drops_its_sender_only(
    zctx: zmq.Context[Any],
) -> None:
    limit = 128 * 1024
    config = BrokerConfig(max_message_bytes=limit, max_queued_bytes=limit)
    with broker_thread(config) as running:
        rogue = dealer(zctx, running.frontend)
        rogue.send_multipart([b"", bytes(limit + 1)])
        master = dealer(zctx, running.frontend)
        wait_for_stat(running.broker, "frontend_disconnects", 1, master)
        worker = FakeWorker(dealer(zctx, running.backend))
        worker.ready(1)
        send_task(master, "t1", ones())
        envelope, task = worker.take()
        worker.answer(envelope, task)
        assert receive_reply(master).task_id == "t1"
    assert running.broker.stats["malformed_frontend"] == 0


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"max_message_bytes": 1000}, "max_message_bytes of 1000 is too small"),
        (
            {"max_message_bytes": 1 << 20, "max_queued_bytes": 1 << 19},
            "max_queued_bytes of 524288 is too small",
        ),
    ],
)
def test_config_refuses_size_limits_too_small_to_work(
    fields: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        BrokerConfig(**fields)
