"""Fault-injection soak: kill, stop, restart and flood a pipeline, and count.

::

    python -m bench.soak [--quick] [--out DIR] [--scenario NAME ...]

Every scenario runs real processes on loopback: a fog broker, echo workers
(each a :class:`~sparse_zmq.stage.StageRuntime`; a task's "computation" is a
short pause) and a :class:`~sparse_zmq.master.Master` in this process that
checks every result it gets.

============== ==============================================================
scenario       what is done to the pipeline
============== ==============================================================
kill9          a worker holding a task is killed with SIGKILL and a
               replacement of the same name started, once per trial
sigstop        a worker holding a task is stopped (SIGSTOP) past the
               broker's liveness timeout, its task is re-done elsewhere,
               then it is continued (SIGCONT): its late result must be
               dropped and it must be served again
broker-restart the broker is killed with SIGKILL mid-run and restarted on
               the same endpoints, once per trial
flood-broker   malformed messages (random bytes, truncated headers, wrong
               frame counts, unknown versions, pickles, oversized frames and
               messages...) at a broker frontend, then a real task
flood-worker   the same at a worker, from a fake broker, then a real task
overload       tasks offered at ten times the rate the workers can serve,
               against a broker with small queue bounds
============== ==============================================================

Each scenario reports: trials, tasks sent, completed, failed (by reason),
lost (sent and never ended), duplicates (a task ending twice at the master),
late results discarded (at the broker and at the master), malformed messages
sent and answered or counted, and the peak resident memory (RSS, sampled
every 20 ms) of the broker and of the largest worker. ``soak.json`` and
``soak.csv`` in ``--out`` hold the rows; a scenario passes when nothing was
lost, nothing ended twice, every result was right and every malformed
message was answered or counted.

Worker and broker processes are forked by a fork server that has imported
the library but never made a ZeroMQ context (``multiprocessing``'s
``forkserver`` start method), so a replacement worker starts in a fraction
of a second and no context crosses a fork.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import json
import logging
import multiprocessing as mp
import os
import pickle
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
import zmq

from brokers.fog import BrokerConfig, FogBroker
from sparse_zmq.errors import ConfigError
from sparse_zmq.master import Master, MasterConfig, Reply
from sparse_zmq.protocol import VERSION, Kind, Message, pack, split_envelope, unpack
from sparse_zmq.stage import Result, Stage, StageRuntime, Task

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "SCENARIOS",
    "ScenarioResult",
    "broker_restart",
    "flood_broker",
    "flood_worker",
    "kill9",
    "main",
    "overload",
    "run",
    "sigstop",
]

logger = logging.getLogger(__name__)

LOOPBACK = "tcp://127.0.0.1:*"
WAIT_S = 60.0
"""Longest wait for any one step (a process to start, a task to end)."""

HEARTBEAT_S = 0.2
LIVENESS = 3
"""The soak's broker declares a worker lost after 0.6 s of silence."""

_FORK = mp.get_context("forkserver")
# The server imports the heavy modules once (torch among them); this module
# itself is left out, so that "python -m bench.soak" children import it cleanly.
_FORK.set_forkserver_preload(["brokers.fog", "sparse_zmq.stage", "psutil"])


# What a scenario reports.


@dataclass
class ScenarioResult:
    """The counts of one scenario.

    Attributes:
        scenario: Its name.
        trials: Faults injected (kills, stops, restarts, malformed messages).
        sent: Distinct tasks submitted by the master.
        completed: Tasks that ended with a correct result.
        failed: Tasks that ended with an error, by reason class.
        lost: Tasks submitted that never ended.
        duplicates: Task ends beyond the first, per task, at the master.
        wrong: Results whose values were not the expected ones.
        discarded_at_broker: Late replies the broker dropped.
        discarded_at_master: Late replies the master dropped.
        malformed_sent: Malformed messages sent (flood scenarios).
        malformed_answered: Of those, answered with an error or counted.
        peak_rss_broker_mib: Highest RSS of a broker process seen.
        peak_rss_worker_mib: Highest RSS of one worker process seen.
        rss_growth_mib: Growth of the flooded process's RSS over the flood.
        seconds: Wall time of the scenario.
        notes: Other figures worth reading (counters of the broker, master).
    """

    scenario: str
    trials: int = 0
    sent: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    duplicates: int = 0
    wrong: int = 0
    discarded_at_broker: int = 0
    discarded_at_master: int = 0
    malformed_sent: int = 0
    malformed_answered: int = 0
    peak_rss_broker_mib: float = 0.0
    peak_rss_worker_mib: float = 0.0
    rss_growth_mib: float = 0.0
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing twice, every result right, every bad message seen."""
        return (
            self.lost == 0
            and self.duplicates == 0
            and self.wrong == 0
            and self.malformed_answered == self.malformed_sent
        )

    def row(self) -> dict[str, Any]:
        """A flat row for the CSV."""
        row = asdict(self)
        row["failed"] = ";".join(f"{k}={v}" for k, v in sorted(self.failed.items()))
        row["notes"] = json.dumps(self.notes, sort_keys=True)
        row["ok"] = self.ok
        return row


class _Tally:
    """Every task the master sent, and how each one ended."""

    def __init__(self) -> None:
        self.expected: dict[str, torch.Tensor] = {}
        self.ended: dict[str, str] = {}
        self.duplicates = 0
        self.wrong = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.served_by: collections.Counter[int] = collections.Counter()

    def sent(self, task_id: str, x: torch.Tensor) -> None:
        self.expected[task_id] = x * 2

    def end(self, reply: Reply) -> str:
        """Record one ended task; return how it ended."""
        task_id = reply.pending.task_id
        if task_id in self.ended:
            self.duplicates += 1
            return "duplicate"
        if reply.ok:
            y = reply.message.tensors.get("y")
            expected = self.expected[task_id]
            if y is None or not torch.equal(y, expected):
                self.wrong += 1
            self.served_by[int(reply.message.meta.get("pid", 0))] += 1
            status = "completed"
        elif reply.timed_out:
            status = "timeout"
        elif reply.busy:
            status = "busy"
        else:
            status = "error"
        self.ended[task_id] = status
        if status != "completed":
            self.failed[status] += 1
        return status

    def fill(self, result: ScenarioResult) -> None:
        result.sent = len(self.expected)
        result.completed = sum(1 for s in self.ended.values() if s == "completed")
        result.failed = dict(self.failed)
        result.lost = len(set(self.expected) - set(self.ended))
        result.duplicates = self.duplicates
        result.wrong = self.wrong


class _RssSampler:
    """Samples the RSS of processes in a thread and keeps each role's peak.

    Also keeps each role's largest growth over a process's first sample: the
    peaks include the pages a forked process shares with the fork server
    (torch among them), the growth only what the process added.
    """

    def __init__(self) -> None:
        self.pids: dict[int, str] = {}
        self.peaks: collections.Counter[str] = collections.Counter()
        self.growth: collections.Counter[str] = collections.Counter()
        self._first: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def watch(self, pid: int, role: str) -> None:
        self._first[pid] = self.rss_mib(pid)  # before the sampling thread sees it
        self.pids[pid] = role

    def rss_mib(self, pid: int) -> float:
        try:
            return psutil.Process(pid).memory_info().rss / 2**20
        except psutil.Error:
            return 0.0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid, role in list(self.pids.items()):
                rss = self.rss_mib(pid)
                self.peaks[role] = max(self.peaks[role], rss)
                if rss:
                    grown = rss - self._first[pid]
                    self.growth[role] = max(self.growth[role], grown)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)


# Processes (forked by the fork server).


class EchoStage(Stage):
    """Answers ``y = 2 x``, after a pause that stands for computation.

    ``state`` and ``hold`` are integers in shared memory, without locks (a
    lock held by a killed process would stop everyone else). ``state`` reads
    -1 while starting, 0 when idle, 1 while computing, 2 while holding a task: while ``hold`` is
    1, the next task is held until ``hold`` is back to 0, which lets the soak
    fault a worker that is known to hold a task.
    """

    name = "echo"

    def __init__(self, delay_s: float, state: Any, hold: Any) -> None:
        self.delay_s = delay_s
        self.state = state
        self.hold = hold

    def process(self, task: Task) -> Result:
        """Echo the task's ``x`` doubled, with this process's pid."""
        self.state.value = 1
        if self.hold.value:
            self.state.value = 2
            while self.hold.value:
                time.sleep(0.005)  # a held computation, until the soak lets go
        elif self.delay_s:
            time.sleep(self.delay_s)  # stands for the partition's compute
        self.state.value = 0
        return Result({"y": task.tensors["x"] * 2}, {"pid": os.getpid()})


def _quiet_logging() -> None:
    """Log errors only in child processes (SOAK_CHILD_LOG_LEVEL overrides)."""
    logging.basicConfig(
        level=os.environ.get("SOAK_CHILD_LOG_LEVEL", "ERROR"),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )


def _stop_event() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def worker_main(
    backend: str,
    name: str,
    delay_s: float,
    state: Any,
    hold: Any,
    report: Any,
    max_message_bytes: int,
) -> None:
    """Process entry: serve :class:`EchoStage` at ``backend`` until SIGTERM."""
    _quiet_logging()
    torch.set_num_threads(1)
    stop = _stop_event()
    state.value = 0  # up: SIGTERM now stops it cleanly
    with zmq.Context() as context:
        runtime = StageRuntime(
            EchoStage(delay_s, state, hold),
            backend,
            node=name,
            context=context,
            max_message_bytes=max_message_bytes,
        )
        try:
            runtime.run(stop)
        finally:
            runtime.close()
        report.put(
            {"name": name, "pid": os.getpid(), **runtime.stats, **runtime.link_stats}
        )


def broker_main(
    frontend: str, backend: str, config: BrokerConfig, ready: Any, report: Any
) -> None:
    """Process entry: run a broker until SIGTERM, reporting endpoints and counters."""
    _quiet_logging()
    stop = _stop_event()
    with FogBroker(frontend, backend, config=config, name="soak-broker") as broker:
        ready.put(broker.bind())
        broker.run(stop)
    report.put(dict(broker.stats))


@dataclass
class _WorkerProc:
    name: str
    process: Any
    state: Any
    hold: Any

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def alive(self) -> bool:
        return bool(self.process.is_alive())


class _Cluster:
    """A broker process and worker processes, stopped and reaped on exit."""

    def __init__(
        self,
        sampler: _RssSampler,
        *,
        config: BrokerConfig,
        delay_s: float = 0.01,
        max_message_bytes: int | None = None,
    ) -> None:
        self.sampler = sampler
        self.config = config
        self.delay_s = delay_s
        self.max_message_bytes = max_message_bytes or config.max_message_bytes
        self.report = _FORK.Queue()
        self.broker: Any = None
        self.broker_stats: list[dict[str, int]] = []
        self.frontend = LOOPBACK
        self.backend = LOOPBACK
        self.workers: list[_WorkerProc] = []
        self.worker_stats: list[dict[str, Any]] = []
        self.stop_seconds = 0.0
        self.unclean_exits = 0
        self._started = 0

    def start_broker(self) -> None:
        """Start the broker (on the endpoints of the previous one, if any)."""
        ready = _FORK.Queue()
        self.broker = _FORK.Process(
            target=broker_main,
            args=(self.frontend, self.backend, self.config, ready, self.report),
            name="soak-broker",
        )
        self.broker.start()
        self.frontend, self.backend = ready.get(timeout=WAIT_S)
        self.sampler.watch(self.broker.pid, "broker")

    def kill_broker(self) -> None:
        """SIGKILL the broker and reap it."""
        os.kill(self.broker.pid, signal.SIGKILL)
        self.broker.join(WAIT_S)

    def start_worker(self, name: str) -> _WorkerProc:
        """Start one echo worker connected to the broker's backend."""
        state = _FORK.RawValue("i", -1)  # -1 until its signal handlers are set
        hold = _FORK.RawValue("i", 0)
        process = _FORK.Process(
            target=worker_main,
            args=(
                self.backend,
                name,
                self.delay_s,
                state,
                hold,
                self.report,
                self.max_message_bytes,
            ),
            name=name,
        )
        process.start()
        worker = _WorkerProc(name, process, state, hold)
        self.workers.append(worker)
        self.sampler.watch(worker.pid, "worker")
        return worker

    def live_workers(self) -> list[_WorkerProc]:
        return [w for w in self.workers if w.alive()]

    def stop(self) -> None:
        """SIGTERM every process, collect their counters, SIGKILL stragglers."""
        procs = [w.process for w in self.workers if w.alive()]
        if self.broker is not None and self.broker.is_alive():
            procs.append(self.broker)
        for worker in self.workers:
            worker.hold.value = 0
        deadline = time.monotonic() + WAIT_S
        for worker in self.workers:
            while worker.alive() and worker.state.value == -1:
                if time.monotonic() > deadline:
                    break
                threading.Event().wait(0.01)  # a worker still starting up
        for proc in procs:
            try:
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        signalled = time.monotonic()
        deadline = signalled + WAIT_S
        for proc in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("%s did not stop on SIGTERM; killed", proc.name)
                proc.kill()
                proc.join(WAIT_S)
        self.stop_seconds = round(time.monotonic() - signalled, 2)
        self.unclean_exits = sum(1 for proc in procs if proc.exitcode != 0)
        while True:
            try:
                item = self.report.get(timeout=0.5)
            except queue.Empty:
                break
            if "name" in item:
                self.worker_stats.append(item)
            else:
                self.broker_stats.append(item)
        self.report.close()


@contextmanager
def _cluster(sampler: _RssSampler, **kwargs: Any) -> Iterator[_Cluster]:
    cluster = _Cluster(sampler, **kwargs)
    try:
        yield cluster
    finally:
        cluster.stop()


def _broker_config(**overrides: Any) -> BrokerConfig:
    return BrokerConfig(
        heartbeat_interval_s=HEARTBEAT_S, liveness=LIVENESS, **overrides
    )


def _master(endpoint: str, context: zmq.Context[Any], **overrides: Any) -> Master:
    config = MasterConfig(
        **{
            "task_timeout_s": 120.0,
            "retry_after_s": 10.0,
            "heartbeat_interval_s": HEARTBEAT_S,
            "liveness": LIVENESS,
            **overrides,
        }
    )
    return Master(endpoint, name="soak", context=context, config=config)


def _drive(
    master: Master,
    tally: _Tally,
    *,
    window: int,
    more: Callable[[], bool],
    on_round: Callable[[], None] = lambda: None,
    on_end: Callable[[Reply], None] = lambda reply: None,
    payload: int = 16,
) -> None:
    """Keep ``window`` tasks pending while ``more()``; then wait for every end.

    ``on_round`` runs between receives (fault injection); it must not block.
    """
    deadline = time.monotonic() + 10 * WAIT_S
    counter = 0
    while True:
        submitting = more()
        if not submitting and not master.pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(master.pending)} tasks still pending after {10 * WAIT_S:.0f}s"
            )
        while submitting and len(master.pending) < window:
            counter += 1
            x = torch.full((payload,), float(counter))
            tally.sent(master.submit("echo", {"x": x}), x)
        reply = master.receive(0.05)
        while reply is not None:
            tally.end(reply)
            on_end(reply)
            reply = master.receive(0)
        on_round()


def _wait(
    predicate: Callable[[], bool],
    what: str,
    master: Master | None = None,
    tally: _Tally | None = None,
) -> None:
    """Wait until ``predicate()``; keep the master's tasks moving meanwhile."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            state = ""
            if master is not None:
                retries = collections.Counter(
                    p.retries for p in master.pending.values()
                )
                state = (
                    f"; {len(master.pending)} tasks pending (by retries {dict(retries)}),"
                    f" master {master.stats}, broker {master.broker_stats}"
                )
            raise TimeoutError(f"timed out waiting for {what}{state}")
        if master is not None and tally is not None:
            reply = master.receive(0.02)
            if reply is not None:
                tally.end(reply)
        else:
            threading.Event().wait(0.02)


# Scenarios.


def kill9(trials: int = 20, *, workers: int = 3) -> ScenarioResult:
    """SIGKILL a worker holding a task, ``trials`` times; start a replacement each time."""
    result = ScenarioResult("kill9")
    tally = _Tally()
    started = time.monotonic()
    with (
        _RssSampler() as sampler,
        zmq.Context() as context,
        _cluster(sampler, config=_broker_config()) as cluster,
    ):
        cluster.start_broker()
        for i in range(workers):
            cluster.start_worker(f"echo-{i}")
        victim: _WorkerProc | None = None
        victims: list[int] = []
        armed_at = 0.0

        def inject() -> None:
            nonlocal victim, armed_at
            if result.trials >= trials:
                return
            if victim is None:
                live = cluster.live_workers()
                if len(live) < 2:
                    return  # keep one worker to redo the task
                victim = live[result.trials % len(live)]
                victim.hold.value = 1
                armed_at = time.monotonic()
                return
            if victim.state.value == 2:
                os.kill(victim.pid, signal.SIGKILL)
                victim.process.join(WAIT_S)
                victims.append(victim.pid)
                result.trials += 1
                cluster.start_worker(victim.name)  # restarted under the same name
                victim = None
            elif time.monotonic() - armed_at > WAIT_S:
                raise TimeoutError(f"worker {victim.name} never took a task to hold")

        with _master(cluster.frontend, context) as master:
            _drive(
                master,
                tally,
                window=2 * workers,
                more=lambda: result.trials < trials,
                on_round=inject,
            )
            result.discarded_at_master = master.discarded
            result.notes["master"] = dict(master.stats)
        result.notes["replacements_served"] = sum(
            1 for w in cluster.workers[workers:] if tally.served_by[w.pid]
        )
    _finish(result, tally, cluster, sampler, started)
    result.notes["killed_while_holding"] = len(victims)
    return result


def sigstop(trials: int = 3, *, workers: int = 2) -> ScenarioResult:
    """SIGSTOP a worker holding a task past the liveness timeout, then SIGCONT it."""
    result = ScenarioResult("sigstop")
    tally = _Tally()
    started = time.monotonic()
    with (
        _RssSampler() as sampler,
        zmq.Context() as context,
        _cluster(sampler, config=_broker_config()) as cluster,
    ):
        cluster.start_broker()
        for i in range(workers):
            cluster.start_worker(f"echo-{i}")
        with _master(cluster.frontend, context) as master:
            redone_elsewhere = 0
            served_again = 0
            for trial in range(trials):
                victim = cluster.workers[trial % workers]
                redone, served = _stop_and_continue(victim, master, tally, workers)
                redone_elsewhere += redone
                served_again += served
                result.trials += 1
            _drain(master, tally)
            result.discarded_at_master = master.discarded
            result.notes["master"] = dict(master.stats)
            result.notes["redone_elsewhere"] = redone_elsewhere
            result.notes["served_again"] = served_again
    _finish(result, tally, cluster, sampler, started)
    return result


def _stop_and_continue(
    victim: _WorkerProc, master: Master, tally: _Tally, workers: int
) -> tuple[bool, bool]:
    """One sigstop trial; returns (held task re-done elsewhere, victim served again)."""

    def fill() -> None:
        while len(master.pending) < 2 * workers:
            x = torch.full((16,), float(len(tally.expected) + 1))
            tally.sent(master.submit("echo", {"x": x}), x)

    def victim_holds() -> bool:
        fill()  # keep tasks coming until the victim has taken one
        return bool(victim.state.value == 2)

    victim.hold.value = 1
    _wait(victim_holds, "the victim to hold a task", master, tally)
    os.kill(victim.pid, signal.SIGSTOP)
    unmatched = master.broker_stats.get("unmatched_replies", 0)
    stopped_with = set(master.pending)
    # Every task pending when the victim stopped ends, the one it holds
    # included: another worker re-did that one.
    _wait(
        lambda: not stopped_with & set(master.pending),
        "the held task to be re-done",
        master,
        tally,
    )
    redone = all(tally.ended[t] == "completed" for t in stopped_with)
    os.kill(victim.pid, signal.SIGCONT)
    victim.hold.value = 0
    _wait(lambda: victim.state.value != 2, "the victim to resume")
    # Its late result is dropped by the broker...
    _wait(
        lambda: master.broker_stats.get("unmatched_replies", 0) > unmatched,
        "the late result to be dropped",
        master,
        tally,
    )
    # ...and it is served again, under a new identity.
    before = tally.served_by[victim.pid]

    def victim_served() -> bool:
        fill()
        return tally.served_by[victim.pid] > before

    _wait(victim_served, "the victim to be served again", master, tally)
    return redone, True


def _drain(master: Master, tally: _Tally) -> None:
    _wait(lambda: not master.pending, "every task to end", master, tally)


def broker_restart(trials: int = 3, *, workers: int = 3) -> ScenarioResult:
    """SIGKILL the broker mid-run and restart it on the same endpoints."""
    result = ScenarioResult("broker-restart")
    tally = _Tally()
    started = time.monotonic()
    with (
        _RssSampler() as sampler,
        zmq.Context() as context,
        _cluster(sampler, config=_broker_config()) as cluster,
    ):
        cluster.start_broker()
        for i in range(workers):
            cluster.start_worker(f"echo-{i}")
        with _master(cluster.frontend, context) as master:
            # A restart after every `between` tasks ended, and as many after
            # the last one, so that the run goes on across each restart.
            between = 50
            last_restart = 0

            def inject() -> None:
                nonlocal last_restart
                if (
                    result.trials < trials
                    and len(tally.ended) >= last_restart + between
                ):
                    cluster.kill_broker()
                    result.trials += 1
                    cluster.start_broker()
                    last_restart = len(tally.ended)

            def more() -> bool:
                return (
                    result.trials < trials or len(tally.ended) < last_restart + between
                )

            _drive(master, tally, window=2 * workers, more=more, on_round=inject)
            result.discarded_at_master = master.discarded
            result.notes["master"] = dict(master.stats)
    _finish(result, tally, cluster, sampler, started)
    return result


def overload(
    seconds: float = 3.0,
    *,
    workers: int = 2,
    factor: float = 10.0,
    delay_s: float = 0.02,
) -> ScenarioResult:
    """Offer ``factor`` times what the workers can serve to a broker with small bounds."""
    result = ScenarioResult("overload")
    tally = _Tally()
    started = time.monotonic()
    queue_tasks, queue_bytes = 50, 2 * 1024**2
    config = _broker_config(
        max_queued_tasks=queue_tasks,
        max_queued_bytes=queue_bytes,
        max_message_bytes=1024**2,
        receive_hwm=100,
    )
    capacity = workers / delay_s  # tasks per second, at best
    offered = factor * capacity
    with (
        _RssSampler() as sampler,
        zmq.Context() as context,
        _cluster(sampler, config=config, delay_s=delay_s) as cluster,
    ):
        cluster.start_broker()
        for i in range(workers):
            cluster.start_worker(f"echo-{i}")
        # A master that lags behind its answers has some dropped by the
        # broker (its queue to the master full): retry_after_s recovers them.
        with _master(
            cluster.frontend,
            context,
            max_retries=2,
            busy_backoff_s=0.05,
            retry_after_s=2.0,
        ) as master:
            _wait(
                lambda: master.broker_stats.get("workers", 0) == workers,
                "the workers to join",
                master,
                tally,
            )
            begin = time.monotonic()
            counter = 0
            while time.monotonic() - begin < seconds:
                due = int((time.monotonic() - begin) * offered)
                while counter < due:
                    counter += 1
                    x = torch.full((16384,), float(counter))  # 64 KiB
                    tally.sent(master.submit("echo", {"x": x}), x)
                reply = master.receive(0.001)
                while reply is not None:
                    tally.end(reply)
                    reply = master.receive(0)
            _drain(master, tally)
            elapsed = time.monotonic() - begin
            result.trials = counter
            result.discarded_at_master = master.discarded
            completed = sum(1 for s in tally.ended.values() if s == "completed")
            result.notes.update(
                offered_per_s=round(offered),
                served_per_s=round(completed / elapsed, 1),
                master=dict(master.stats),
            )
    _finish(result, tally, cluster, sampler, started)
    broker = cluster.broker_stats[-1]
    result.notes.update(
        queue_limit_tasks=queue_tasks,
        queue_limit_bytes=queue_bytes,
        peak_queued=broker.get("peak_queued"),
        peak_queued_bytes=broker.get("peak_queued_bytes"),
        rejected_busy=broker.get("rejected_busy"),
        answers_not_delivered=broker.get("master_unreachable"),
    )
    return result


# Floods.


class _TouchOnUnpickle:
    """Pickles into a payload that would create a file if unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mknod, (self.path,))


def _header(**fields: Any) -> bytes:
    header = {
        "v": VERSION,
        "kind": "task",
        "id": "bad",
        "meta": {"op": "echo"},
        "tensors": [{"name": "x", "dtype": "float32", "shape": [4]}],
    }
    header.update(fields)
    return json.dumps(header).encode()


def _malformed_bodies(
    rng: random.Random, limit: int, marker: str
) -> list[tuple[str, Callable[[], list[bytes]]]]:
    """Makers of malformed message bodies (after the delimiter), by name.

    ``limit`` is the receiver's ``max_message_bytes``: the oversized cases
    stay below it frame by frame but exceed it in total, or exceed the header
    limit, so that the receiver reads and answers them.
    """
    good = _header()
    half = limit // 2 + 1024
    return [
        ("random_bytes", lambda: [rng.randbytes(rng.randint(1, 64))]),
        (
            "random_frames",
            lambda: [
                rng.randbytes(rng.randint(1, 32)) for _ in range(rng.randint(2, 5))
            ],
        ),
        (
            "truncated_header",
            lambda: [good[: rng.randint(1, len(good) - 1)], bytes(16)],
        ),
        ("wrong_frame_count", lambda: [good, bytes(16), bytes(16)]),
        ("missing_tensor_frame", lambda: [good]),
        ("short_tensor_frame", lambda: [good, bytes(rng.randint(0, 15))]),
        ("unknown_version", lambda: [_header(v=rng.randint(2, 1000)), bytes(16)]),
        ("boolean_version", lambda: [_header(v=True), bytes(16)]),
        ("unknown_kind", lambda: [_header(kind="gossip"), bytes(16)]),
        (
            "unknown_dtype",
            lambda: [
                _header(tensors=[{"name": "x", "dtype": "float7", "shape": [4]}]),
                bytes(16),
            ],
        ),
        (
            "negative_shape",
            lambda: [
                _header(tensors=[{"name": "x", "dtype": "float32", "shape": [-4]}]),
                bytes(16),
            ],
        ),
        (
            "huge_shape",
            lambda: [
                _header(
                    tensors=[{"name": "x", "dtype": "float32", "shape": [2**40, 2**40]}]
                ),
                bytes(16),
            ],
        ),
        ("not_an_object", lambda: [b"[1, 2, 3]"]),
        ("deep_nesting", lambda: [b"[" * 20_000]),
        ("pickle", lambda: [pickle.dumps(_TouchOnUnpickle(marker))]),
        ("oversized_header", lambda: [b'{"v": 1, "pad": "' + b"x" * 70_000 + b'"}']),
        (
            "oversized_message",
            lambda: [
                _header(
                    tensors=[
                        {"name": n, "dtype": "uint8", "shape": [half]}
                        for n in ("a", "b")
                    ]
                ),
                bytes(half),
                bytes(half),
            ],
        ),
    ]


def _flood_plan(count: int, rng: random.Random, makers: list[Any]) -> list[int]:
    """Which maker each of ``count`` messages uses: each cheap one alike, big ones rare."""
    heavy = {"oversized_header", "oversized_message", "oversized_frame"}
    cheap = [i for i, (name, _) in enumerate(makers) if name not in heavy]
    plan = [cheap[i % len(cheap)] for i in range(count)]
    for i, (name, _) in enumerate(makers):
        if name in heavy:
            for slot in rng.sample(range(count), max(1, count // 200)):
                plan[slot] = i
    return plan


def flood_broker(
    messages: int = 10_000, *, oversized_frames: int = 5
) -> ScenarioResult:
    """Flood a broker frontend with malformed messages, then send a real task."""
    result = ScenarioResult("flood-broker")
    tally = _Tally()
    started = time.monotonic()
    rng = random.Random(3)
    limit = 1024**2
    marker = os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"soak-unpickled-{os.getpid()}"
    )
    config = _broker_config(max_message_bytes=limit, max_queued_bytes=8 * limit)
    with (
        _RssSampler() as sampler,
        zmq.Context() as context,
        _cluster(sampler, config=config) as cluster,
    ):
        cluster.start_broker()
        cluster.start_worker("echo-0")
        broker_pid = cluster.broker.pid
        with _master(cluster.frontend, context) as master:
            _wait(
                lambda: master.broker_stats.get("workers", 0) == 1,
                "the worker to join",
                master,
                tally,
            )
            rss_before = sampler.rss_mib(broker_pid)
            makers = _malformed_bodies(rng, limit, marker)
            plan = _flood_plan(messages, rng, makers)
            answered = _flood(context, cluster.frontend, makers, plan)
            # A frame above the limit: ZeroMQ drops the sender unread.
            disconnects = master.broker_stats.get("frontend_disconnects", 0)
            for n in range(1, oversized_frames + 1):
                rogue = context.socket(zmq.DEALER)
                rogue.linger = 0
                rogue.connect(cluster.frontend)
                rogue.send_multipart([b"", bytes(limit + 1)])
                _wait(
                    functools.partial(_disconnects_reach, master, disconnects + n),
                    "the rogue to be dropped",
                    master,
                    tally,
                )
                rogue.close()
            result.rss_growth_mib = round(sampler.rss_mib(broker_pid) - rss_before, 1)
            x = torch.arange(8.0)
            tally.sent(master.submit("echo", {"x": x}), x)
            _drain(master, tally)
            result.notes["master"] = dict(master.stats)
    _finish(result, tally, cluster, sampler, started)
    stats = cluster.broker_stats[-1]
    counted = stats["malformed_frontend"] + stats["rejected_too_large"]
    result.trials = messages + oversized_frames
    result.malformed_sent = messages + oversized_frames
    # Each message was answered (or, if its sender stopped reading, counted),
    # each oversized frame counted as a dropped connection.
    result.malformed_answered = min(counted, messages) + min(
        stats["frontend_disconnects"], oversized_frames
    )
    result.notes.update(
        replies_received=answered,
        broker_counted=counted,
        master_unreachable=stats["master_unreachable"],
        frontend_disconnects=stats["frontend_disconnects"],
        unpickled=os.path.exists(marker),
        by_case=collections.Counter(makers[i][0] for i in plan),
    )
    if os.path.exists(marker):
        result.wrong += 1
    return result


def _disconnects_reach(master: Master, count: int) -> bool:
    return master.broker_stats.get("frontend_disconnects", 0) >= count


def _flood(
    context: zmq.Context[Any], endpoint: str, makers: list[Any], plan: list[int]
) -> int:
    """Send the planned messages from a DEALER, reading answers as they come.

    Random bytes go without the delimiter frame; every other body after it.

    Returns:
        The number of answers received.
    """
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    answered = 0
    try:
        for n, index in enumerate(plan):
            name, make = makers[index]
            raw = name in ("random_bytes", "random_frames")
            sock.send_multipart(make() if raw else [b"", *make()])
            if n % 50 == 0:
                while sock.poll(0):
                    sock.recv_multipart()
                    answered += 1
        deadline = time.monotonic() + WAIT_S
        while answered < len(plan) and time.monotonic() < deadline:
            if not sock.poll(500):
                break
            sock.recv_multipart()
            answered += 1
    finally:
        sock.close()
    return answered


def flood_worker(messages: int = 10_000) -> ScenarioResult:
    """Flood a worker with malformed messages from a fake broker, then a real task."""
    result = ScenarioResult("flood-worker")
    started = time.monotonic()
    rng = random.Random(5)
    limit = 1024**2
    marker = os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"soak-unpickled-w{os.getpid()}"
    )
    config = _broker_config(max_message_bytes=limit, max_queued_bytes=8 * limit)
    makers = _malformed_bodies(rng, limit, marker)
    # An oversized frame, which a worker reads and answers (the broker is
    # the one that refuses such frames unread).
    makers.append(
        (
            "oversized_frame",
            lambda: [
                _header(
                    tensors=[{"name": "x", "dtype": "uint8", "shape": [limit + 1]}]
                ),
                bytes(limit + 1),
            ],
        )
    )
    plan = _flood_plan(messages, rng, makers)
    plan[-1] = len(makers) - 1
    answered = 0
    unroutable = 0
    with _RssSampler() as sampler, zmq.Context() as context:
        cluster = _Cluster(sampler, config=config, max_message_bytes=limit)
        fake = context.socket(zmq.ROUTER)
        fake.linger = 0
        # A full queue to the worker then says so instead of dropping.
        fake.setsockopt(zmq.ROUTER_MANDATORY, 1)
        fake.bind(LOOPBACK)
        cluster.backend = fake.getsockopt_string(zmq.LAST_ENDPOINT)
        try:
            worker = cluster.start_worker("echo-0")
            identity, ready = _recv_from_worker(fake)
            assert ready.kind is Kind.READY
            rss_before = sampler.rss_mib(worker.pid)
            for index in plan:
                name, make = makers[index]
                if name == "random_bytes":
                    frames = [identity, *make()]  # no envelope: counted, unanswered
                    unroutable += 1
                else:
                    frames = [identity, b"master", b"", *make()]
                while True:
                    try:
                        fake.send_multipart(frames, zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        answered += _drain_errors(fake, 10)  # the worker is behind
            while answered < messages - unroutable:
                got = _drain_errors(fake, 2000)
                if not got:
                    break
                answered += got
            result.rss_growth_mib = round(sampler.rss_mib(worker.pid) - rss_before, 1)
            task = pack(
                Message(Kind.TASK, "real", {"x": torch.arange(8.0)}, {"op": "echo"})
            )
            fake.send_multipart([identity, b"master", b"", *task])
            _, reply = _recv_from_worker(fake)
            real_ok = reply.kind is Kind.RESULT and torch.equal(
                reply.tensors["y"], torch.arange(8.0) * 2
            )
        finally:
            cluster.stop()
            fake.close()
    stats = cluster.worker_stats[-1]
    result.trials = messages
    result.sent = 1
    result.completed = int(real_ok)
    result.lost = 1 - int(real_ok)
    result.malformed_sent = messages
    result.malformed_answered = min(stats["malformed"], messages)
    result.peak_rss_worker_mib = round(sampler.peaks["worker"], 1)
    result.seconds = round(time.monotonic() - started, 1)
    result.notes.update(
        replies_received=answered,
        unroutable_counted_not_answered=unroutable,
        worker_counted=stats["malformed"],
        unpickled=os.path.exists(marker),
        by_case=collections.Counter(makers[i][0] for i in plan),
        rss_growth_worker_mib=round(sampler.growth["worker"], 1),
        stop_seconds=cluster.stop_seconds,
        unclean_exits=cluster.unclean_exits,
    )
    if os.path.exists(marker):
        result.wrong += 1
    return result


def _recv_from_worker(fake: zmq.Socket[Any]) -> tuple[bytes, Message]:
    """The next message from the worker that is not a heartbeat."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if not fake.poll(500):
            continue
        frames = fake.recv_multipart()
        _, body = split_envelope(frames[1:])
        message = unpack(body)
        if message.kind is not Kind.HEARTBEAT:
            return frames[0], message
    raise TimeoutError("the worker sent nothing")


def _drain_errors(fake: zmq.Socket[Any], timeout_ms: int) -> int:
    got = 0
    while fake.poll(timeout_ms if got == 0 else 0):
        frames = fake.recv_multipart()
        _, body = split_envelope(frames[1:])
        if unpack(body).kind is Kind.ERROR:
            got += 1
    return got


def _finish(
    result: ScenarioResult,
    tally: _Tally,
    cluster: _Cluster,
    sampler: _RssSampler,
    started: float,
) -> None:
    tally.fill(result)
    result.discarded_at_broker = sum(
        s.get("unmatched_replies", 0) for s in cluster.broker_stats
    )
    result.peak_rss_broker_mib = round(sampler.peaks["broker"], 1)
    result.peak_rss_worker_mib = round(sampler.peaks["worker"], 1)
    result.notes["rss_growth_broker_mib"] = round(sampler.growth["broker"], 1)
    result.notes["rss_growth_worker_mib"] = round(sampler.growth["worker"], 1)
    result.notes["stop_seconds"] = cluster.stop_seconds
    result.notes["unclean_exits"] = cluster.unclean_exits
    result.seconds = round(time.monotonic() - started, 1)
    if cluster.broker_stats:
        keys = (
            "workers_lost",
            "tasks_requeued",
            "unmatched_replies",
            "rejected_busy",
            "rejected_duplicate",
            "unknown_workers",
        )
        result.notes["broker"] = {
            k: sum(s.get(k, 0) for s in cluster.broker_stats) for k in keys
        }


# The command.

SCENARIOS: dict[str, Callable[[bool], ScenarioResult]] = {
    "kill9": lambda quick: kill9(20 if quick else 100),
    "sigstop": lambda quick: sigstop(2 if quick else 5),
    "broker-restart": lambda quick: broker_restart(2 if quick else 5),
    "flood-broker": lambda quick: flood_broker(10_000 if quick else 50_000),
    "flood-worker": lambda quick: flood_worker(10_000 if quick else 50_000),
    "overload": lambda quick: overload(3.0 if quick else 10.0),
}
"""Each scenario with its trial counts; ``--quick`` keeps the minimums."""


def run(names: list[str], *, quick: bool, out: Path | None) -> list[ScenarioResult]:
    """Run the named scenarios; write ``soak.json`` and ``soak.csv`` to ``out``.

    Raises:
        ConfigError: An unknown scenario name.
    """
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise ConfigError(f"unknown scenarios {unknown}; known: {sorted(SCENARIOS)}")
    results = []
    for name in names:
        logger.info("soak: %s ...", name)
        result = SCENARIOS[name](quick)
        logger.info(
            "soak: %s %s: %s",
            name,
            "ok" if result.ok else "FAILED",
            json.dumps(result.row()),
        )
        results.append(result)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        rows = [r.row() for r in results]
        machine = {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "quick": quick,
        }
        (out / "soak.json").write_text(
            json.dumps({"machine": machine, "scenarios": rows}, indent=2),
            encoding="utf-8",
        )
        with (out / "soak.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return results


def main(argv: list[str] | None = None) -> int:
    """Command-line entry of ``python -m bench.soak``.

    Returns:
        0 when every scenario passed, 1 otherwise, 2 for a bad option.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer trials (the minimums the tests use)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for soak.json and soak.csv"
    )
    parser.add_argument(
        "--scenario",
        action="append",
        default=None,
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("brokers.fog", "sparse_zmq.master", "sparse_zmq.stage"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        results = run(args.scenario or list(SCENARIOS), quick=args.quick, out=args.out)
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    header = (
        f"{'scenario':<15}{'trials':>7}{'sent':>7}{'done':>7}{'failed':>8}"
        f"{'lost':>6}{'dups':>6}{'late':>6}{'broker MiB':>12}{'worker MiB':>12}"
    )
    lines = [header]
    for r in results:
        lines.append(
            f"{r.scenario:<15}{r.trials:>7}{r.sent:>7}{r.completed:>7}"
            f"{sum(r.failed.values()):>8}{r.lost:>6}{r.duplicates:>6}"
            f"{r.discarded_at_broker + r.discarded_at_master:>6}"
            f"{r.peak_rss_broker_mib:>12}{r.peak_rss_worker_mib:>12}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
