"""Reliability: liveness, re-queueing, exactly-once results, back-pressure, floods.

Two kinds of tests. The fault-injection scenarios of :mod:`bench.soak` run
real processes (a broker, echo workers) that are killed with SIGKILL,
stopped with SIGSTOP, restarted and flooded, and count every task; here
they run at the sizes ``python -m bench.soak --quick`` uses. The other
tests drive a :class:`~sparse_zmq.master.Master` and stage runtimes in
threads against real brokers on loopback, to pin one behaviour each.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import zmq

from bench import soak
from brokers.fog import BrokerConfig, FogBroker
from sparse_zmq.errors import ConfigError, ProtocolError, TaskTimeout
from sparse_zmq.master import Master, MasterConfig
from sparse_zmq.protocol import Kind, Message, pack, split_envelope
from sparse_zmq.stage import Offload, Result, Stage, StageRuntime, Task

TIMEOUT_S = 60.0
LOOPBACK = "tcp://127.0.0.1:*"
FAST = BrokerConfig(heartbeat_interval_s=0.1, liveness=5)


# The soak scenarios, with counts.


def assert_nothing_lost(result: soak.ScenarioResult) -> None:
    """Every task ended exactly once with the right value; processes exited cleanly."""
    assert result.lost == 0, result
    assert result.duplicates == 0, result
    assert result.wrong == 0, result
    assert result.notes.get("unclean_exits", 0) == 0, result


@pytest.mark.slow
def test_kill9_of_workers_holding_tasks_twenty_times_loses_and_duplicates_nothing() -> (
    None
):
    result = soak.kill9(20)
    assert_nothing_lost(result)
    assert result.trials == 20
    assert result.notes["killed_while_holding"] == 20
    assert result.completed == result.sent and not result.failed
    broker = result.notes["broker"]
    assert broker["workers_lost"] >= 20
    assert broker["tasks_requeued"] >= 20  # each killed worker held a task
    # Replacements, started under the same names, were served at once.
    assert result.notes["replacements_served"] > 0


@pytest.mark.slow
def test_sigstopped_worker_task_is_redone_elsewhere_and_its_late_result_dropped() -> (
    None
):
    result = soak.sigstop(2)
    assert_nothing_lost(result)
    assert result.completed == result.sent
    assert result.notes["redone_elsewhere"] == 2
    assert result.discarded_at_broker >= 2  # one late result per stop
    assert result.notes["served_again"] == 2  # and each came back as a worker


@pytest.mark.slow
def test_broker_killed_and_restarted_mid_run_loses_nothing() -> None:
    result = soak.broker_restart(2)
    assert_nothing_lost(result)
    assert result.completed == result.sent
    assert result.notes["master"]["broker_restarts"] == 2


@pytest.mark.slow
def test_broker_survives_ten_thousand_malformed_messages_in_bounded_memory() -> None:
    result = soak.flood_broker(10_000)
    assert_nothing_lost(result)
    assert result.malformed_sent >= 10_000
    assert result.malformed_answered == result.malformed_sent
    assert result.completed == 1  # a real task afterwards
    assert not result.notes["unpickled"]
    assert result.rss_growth_mib < 64


@pytest.mark.slow
def test_worker_survives_ten_thousand_malformed_messages_in_bounded_memory() -> None:
    result = soak.flood_worker(10_000)
    assert result.malformed_answered == result.malformed_sent == 10_000
    assert result.completed == 1  # a real task afterwards
    assert not result.notes["unpickled"]
    assert result.rss_growth_mib < 64
    assert result.notes["unclean_exits"] == 0


@pytest.mark.slow
def test_ten_times_the_capacity_ends_every_task_as_done_or_busy_in_bounded_queues() -> (
    None
):
    result = soak.overload(3.0)
    assert_nothing_lost(result)
    assert result.completed > 0
    assert set(result.failed) <= {"busy"} and result.failed["busy"] > 0
    assert result.completed + result.failed["busy"] == result.sent
    notes = result.notes
    assert notes["peak_queued"] <= notes["queue_limit_tasks"]
    assert notes["peak_queued_bytes"] <= notes["queue_limit_bytes"]
    assert notes["rss_growth_broker_mib"] < 64


# Masters against brokers in threads.


class Echo(Stage):
    """Answers ``y = 2 x`` naming itself and the task's stream.

    It sleeps ``delay_s`` first, standing for a long computation.
    """

    name = "echo"

    def __init__(self, delay_s: float = 0.0, label: str = "echo") -> None:
        self.delay_s = delay_s
        self.label = label

    def process(self, task: Task) -> Result:
        if self.delay_s:
            time.sleep(self.delay_s)  # a long computation, not a wait for readiness
        meta = {"stream": task.meta.get("stream"), "worker": self.label}
        return Result({"y": task.tensors["x"] * 2}, meta)


@contextmanager
def serving(target: Any) -> Iterator[threading.Event]:
    """Run ``target.run(stop)`` in a thread until the block exits."""
    stop = threading.Event()
    thread = threading.Thread(target=target.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
        assert not thread.is_alive()


@contextmanager
def broker_at(
    frontend: str = LOOPBACK, backend: str = LOOPBACK, config: BrokerConfig = FAST
) -> Iterator[FogBroker]:
    """A broker serving in a thread."""
    with FogBroker(frontend, backend, config=config) as broker:
        broker.bind()
        with serving(broker):
            yield broker


@contextmanager
def worker_at(backend: str, stage: Stage, name: str = "node") -> Iterator[StageRuntime]:
    """A stage runtime serving in a thread, with its own context."""
    context: zmq.Context[Any] = zmq.Context()
    runtime = StageRuntime(stage, backend, node=name, context=context)
    try:
        with serving(runtime):
            yield runtime
    finally:
        runtime.close()
        context.term()


def master_config(**fields: Any) -> MasterConfig:
    return MasterConfig(**{"heartbeat_interval_s": 0.1, "liveness": 3, **fields})


def test_master_started_before_its_broker_waits_then_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sparse_zmq.master")
    with broker_at() as first:  # only to find two free ports
        frontend, backend = first.bind()
    with Master(frontend, config=master_config()) as master:
        x = torch.arange(4.0)
        task_id = master.submit("echo", {"x": x})
        assert master.receive(1.0) is None  # nothing there yet
        assert any("waiting for it" in r.getMessage() for r in caplog.records)
        with broker_at(frontend, backend), worker_at(backend, Echo()):
            reply = master.receive(TIMEOUT_S)
    assert reply is not None and reply.pending.task_id == task_id
    assert torch.equal(reply.raise_for_error().tensors["y"], x * 2)
    assert any("is up" in r.getMessage() for r in caplog.records)


def test_master_resends_pending_tasks_when_its_broker_restarts() -> None:
    with broker_at() as first:
        frontend, backend = first.bind()
        master = Master(frontend, config=master_config(retry_after_s=600.0))
        assert master.receive(0.5) is None  # learns the first instance
        task_id = master.submit("echo", {"x": torch.ones(2)})
    # The broker went away with the task: a new one, and a worker, arrive.
    with master, broker_at(frontend, backend), worker_at(backend, Echo()):
        reply = master.receive(TIMEOUT_S)
    assert reply is not None and reply.ok and reply.pending.task_id == task_id
    assert master.stats["broker_restarts"] == 1
    assert master.stats["resent"] >= 1


def test_busy_broker_makes_the_master_back_off_then_fail_the_task_as_busy() -> None:
    config = BrokerConfig(heartbeat_interval_s=0.1, max_queued_tasks=0)
    with broker_at(config=config) as broker:
        frontend, _ = broker.bind()
        master_cfg = master_config(max_retries=2, busy_backoff_s=0.01)
        with Master(frontend, config=master_cfg) as master:
            master.submit("echo", {"x": torch.ones(2)})
            reply = master.receive(TIMEOUT_S)
    assert reply is not None and reply.busy and not reply.ok
    assert "max_queued_tasks" in reply.reason
    assert master.stats["busy"] == 3  # the first answer and two retries
    assert master.stats["resent"] == 2
    assert not master.pending


def test_master_refuses_a_task_above_its_size_limit_before_sending() -> None:
    config = master_config(max_message_bytes=128 * 1024)
    with Master("tcp://127.0.0.1:9", config=config) as master:
        with pytest.raises(
            ProtocolError, match=r"above the message size limit .* 131072"
        ):
            master.submit("echo", {"x": torch.zeros(64 * 1024)})
        assert not master.pending and master.stats["sent"] == 0


def test_master_config_refuses_a_size_limit_too_small_for_a_header() -> None:
    with pytest.raises(ConfigError, match="max_message_bytes of 100 is too small"):
        MasterConfig(max_message_bytes=100)


def test_a_task_ends_exactly_once_even_when_its_result_comes_after_the_timeout() -> (
    None
):
    context: zmq.Context[Any] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(LOOPBACK)
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        with Master(endpoint, context=context, config=master_config()) as master:
            task_id = master.submit("echo", {"x": torch.ones(1)}, timeout_s=0.3)
            ended = master.receive(TIMEOUT_S)
            assert ended is not None and ended.timed_out
            with pytest.raises(TaskTimeout, match="got no reply"):
                ended.raise_for_error()

            # The answer arrives late: discarded by task id, not a second end.
            while True:
                assert router.poll(int(TIMEOUT_S * 1000))
                frames = router.recv_multipart()
                envelope, body = split_envelope(frames)
                if b"task" in body[0]:
                    break
            late = Message(Kind.RESULT, task_id, {"y": torch.ones(1)})
            router.send_multipart([*envelope, b"", *pack(late)])
            while master.stats["discarded"] == 0:
                assert master.receive(0.1) is None
    finally:
        router.close()
        context.term()


# Stage runtimes.


def test_worker_computing_past_the_liveness_timeout_is_not_declared_lost() -> None:
    with broker_at() as broker:  # lost after 0.5 s of silence
        frontend, backend = broker.bind()
        with (
            worker_at(backend, Echo(delay_s=1.5)),
            Master(frontend, config=master_config()) as master,
        ):
            reply = master.request("echo", {"x": torch.ones(3)}, timeout_s=TIMEOUT_S)
            # Checked before the worker leaves: its going may count as a loss.
            assert broker.stats["workers_lost"] == 0
    assert torch.equal(reply.message.tensors["y"], torch.full((3,), 2.0))
    assert broker.stats["tasks_dispatched"] == 1


class Forward(Stage):
    """An intermediate stage: hands ``x`` to the next stage unchanged."""

    name = "forward"

    def process(self, task: Task):
        reply = yield Offload("echo", {"x": task.tensors["x"]})
        return Result(reply.tensors, reply.meta)


def test_stream_is_carried_to_the_next_broker_and_pinned_to_one_worker() -> None:
    with broker_at() as first, broker_at() as second:
        frontend, backend = first.bind()
        next_frontend, next_backend = second.bind()
        context: zmq.Context[Any] = zmq.Context()
        middle = StageRuntime(
            Forward(),
            backend,
            next_frontend=next_frontend,
            node="middle",
            slots=4,
            context=context,
        )
        try:
            with (
                serving(middle),
                worker_at(next_backend, Echo(label="a")),
                worker_at(next_backend, Echo(label="b")),
                Master(frontend, config=master_config()) as master,
            ):
                for i in range(12):
                    master.submit(
                        "train",
                        {"x": torch.full((2,), float(i))},
                        {"stream": "run-7/train"},
                    )
                replies = [master.receive(TIMEOUT_S) for _ in range(12)]
        finally:
            middle.close()
            context.term()
    assert all(r is not None and r.ok for r in replies)
    assert {r.message.meta["stream"] for r in replies} == {"run-7/train"}
    # Every task reached the second broker with the stream and went to the
    # one worker serving it there, though the other was free.
    assert len({r.message.meta["worker"] for r in replies}) == 1
    assert second.stats["tasks_dispatched"] == 12


class Huge(Stage):
    """Answers with a result larger than the worker's message size limit."""

    name = "huge"

    def process(self, task: Task) -> Result:
        return Result({"y": torch.zeros(64 * 1024)})


def test_result_above_the_size_limit_becomes_a_clear_error() -> None:
    with broker_at() as broker:
        frontend, backend = broker.bind()
        context: zmq.Context[Any] = zmq.Context()
        runtime = StageRuntime(
            Huge(), backend, context=context, max_message_bytes=128 * 1024
        )
        try:
            with serving(runtime), Master(frontend, config=master_config()) as master:
                master.submit("huge", {"x": torch.ones(1)})
                reply = master.receive(TIMEOUT_S)
        finally:
            runtime.close()
            context.term()
    assert reply is not None and not reply.ok
    assert "above the message size limit" in reply.reason and "131072" in reply.reason
