"""End to end: every role as its own OS process, started from the command line."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

CLI = [sys.executable, "-m", "sparse_zmq.cli"]
RUN_TIMEOUT_S = 600
STOP_TIMEOUT_S = 30


def _descendants_alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def _wait_for(predicate, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    """Wait until ``predicate()`` holds, failing early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        try:
            code = proc.wait(0.05)
        except subprocess.TimeoutExpired:
            continue
        if not predicate():
            raise AssertionError(f"process exited with code {code} before {what}")


@pytest.mark.slow
def test_run_hybrid_off_device_writes_one_task_row_per_batch_for_each_stage(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run([*CLI, "run", "hybrid-off-device", "--batches", "10", "--out", str(out)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "held-out accuracy" in proc.stdout and "samples/s" in proc.stdout

    with (out / "tasks.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    train = Counter((r["node"], r["stage"]) for r in rows if r["op"] == "train")
    assert train == {("edge", "source"): 10, ("fog", "partition-0"): 10, ("cloud", "partition-1"): 10}
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert float(r["duration_s"]) >= 0 and int(r["bytes_in"]) > 0 and int(r["bytes_out"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batches"] == 10 and summary["failed_batches"] == 0
    assert summary["test_samples"] > 0
    assert not list(out.glob("*.sock"))


@pytest.mark.slow
def test_run_with_two_mini_batches_in_flight_through_an_intermediate_stage(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run([*CLI, "run", "hybrid-off-device", "--batches", "6", "--micro-batches",
                           "2", "--in-flight", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batches"] == 6 and summary["failed_batches"] == 0
    with (out / "tasks.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["op"] == "train"]
    # Two micro-batches per mini-batch through each remote stage, none failed.
    assert Counter(r["stage"] for r in rows if r["node"] != "edge") == {
        "partition-0": 12, "partition-1": 12}
    assert all(r["status"] == "ok" for r in rows)


def _start(args: list[str], tmp_path: Path, name: str) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "wb")
    return subprocess.Popen([*CLI, *args], stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_each_role_exits_promptly_on_a_stop_signal(tmp_path: Path, sig: signal.Signals) -> None:
    ready = tmp_path / "ready.json"
    monitor = _start(["monitor", "--out", str(tmp_path)], tmp_path, "monitor")
    broker = _start(["broker", "--frontend", "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                     "--ready-file", str(ready)], tmp_path, "broker")
    _wait_for(ready.exists, broker, 60, "the broker's ready file")
    endpoints = json.loads(ready.read_text())
    stage = _start(["stage", "--partition", "0", "--backend", endpoints["backend"]], tmp_path, "stage")
    _wait_for(lambda: (tmp_path / "monitor.sock").exists(), monitor, 60, "the monitor socket")
    _wait_for(lambda: b"stage connected" in (tmp_path / "stage.log").read_bytes(), stage, 120, "the stage")

    procs = {"monitor": monitor, "broker": broker, "stage": stage}
    for proc in procs.values():
        assert proc.poll() is None
        proc.send_signal(sig)
    for name, proc in procs.items():
        assert proc.wait(STOP_TIMEOUT_S) == 0, (tmp_path / f"{name}.log").read_text()
    assert not (tmp_path / "monitor.sock").exists()


@pytest.mark.slow
def test_interrupted_run_stops_every_process_it_started(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = subprocess.Popen([*CLI, "run", "hybrid-off-device", "--batches", "100000", "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    launcher = psutil.Process(run.pid)
    tasks = out / "tasks.csv"
    _wait_for(lambda: tasks.exists() and tasks.read_text().count("\n") > 3, run, 300, "first task rows")
    children = [p.pid for p in launcher.children(recursive=True)]
    assert len(children) >= 5  # monitor, two brokers, two stages, source
    run.send_signal(signal.SIGINT)
    run.wait(STOP_TIMEOUT_S * 3)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for pid in children:
        try:
            psutil.Process(pid).wait(max(0.1, deadline - time.monotonic()))
        except psutil.NoSuchProcess:
            pass
    assert not _descendants_alive(children)
    assert not list(out.glob("*.sock"))
    assert os.path.exists(out / "tasks.csv")


def test_python_dash_m_brokers_runs_a_broker_that_stops_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    with open(tmp_path / "broker.log", "wb") as log:
        broker = subprocess.Popen([sys.executable, "-m", "brokers", "--frontend",
                                   "tcp://127.0.0.1:*", "--backend", "tcp://127.0.0.1:*",
                                   "--ready-file", str(ready)],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(ready.exists, broker, 60, "the broker's ready file")
            endpoints = json.loads(ready.read_text())
            assert endpoints["frontend"].startswith("tcp://127.0.0.1:")
            broker.send_signal(signal.SIGTERM)
            assert broker.wait(STOP_TIMEOUT_S) == 0, (tmp_path / "broker.log").read_text()
        finally:
            if broker.poll() is None:
                broker.kill()
