"""Tests of the monitor sidecar: real ipc sockets, real spawned processes."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from sparse_zmq.errors import ConfigError, ProtocolError
from sparse_zmq.monitor import (
    RECORD_VERSION,
    TASK_COLUMNS,
    MonitorClient,
    MonitorServer,
    default_endpoint,
    serve,
)

SPAWN = multiprocessing.get_context("spawn")
DEADLINE_S = 60.0
"""Upper bound for any wait; generous because the test box is a noisy 2-core VM."""


# --- helpers -----------------------------------------------------------------


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` every 20 ms until it holds, failing after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    tick = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE_S} s waiting for {what}")
        tick.wait(0.02)


def _complete_rows(path: Path) -> int:
    """Data rows whose line is complete (the header excluded)."""
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def _holds(path: Path, text: bytes) -> bool:
    """Whether ``path`` exists and contains ``text``."""
    try:
        return text in path.read_bytes()
    except FileNotFoundError:
        return False


def _read_tasks(path: Path) -> list[dict[str, str]]:
    """Parse tasks.csv strictly: one header, every row with exactly the columns."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == list(TASK_COLUMNS)
    for row in rows:
        assert None not in row, f"row with extra fields: {row}"
        assert None not in row.values(), f"row with missing fields: {row}"
        assert list(row.values()) != list(TASK_COLUMNS), "second header row"
    return rows


@contextlib.contextmanager
def _running_server(
    out_dir: Path, endpoint: str, **kwargs: Any
) -> Iterator[MonitorServer]:
    """A MonitorServer running in a thread until the block ends."""
    server = MonitorServer(out_dir, endpoint, **kwargs)
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=DEADLINE_S)
        assert not thread.is_alive(), "monitor did not stop"
        server.close()


def _send(client: MonitorClient, task_id: object, **fields: Any) -> bool:
    now = time.time()
    args: dict[str, Any] = {
        "op": "forward",
        "batch_size": 32,
        "start_time": now - 0.25,
        "end_time": now,
        "bytes_in": 1024,
        "bytes_out": 2048,
    }
    args.update(fields)
    return client.task(task_id, **args)


def _raw_record(**fields: Any) -> bytes:
    record = {
        "v": RECORD_VERSION,
        "type": "task",
        "node": "edge",
        "stage": "source",
        "role": "source",
        "task_id": "t",
        "op": "forward",
        "batch_size": 1,
        "start_time": 1.0,
        "end_time": 2.0,
        "bytes_in": 0,
        "bytes_out": 0,
        "status": "ok",
        "detail": "",
    }
    record.update(fields)
    return json.dumps(record).encode()


# --- targets of spawned processes (importable by name) ---------------------------


def _send_from_process(endpoint: str, node: str, count: int, results: Any) -> None:
    client = MonitorClient(endpoint, node=node, stage="stage-1", role="worker")
    for i in range(count):
        _send(client, f"task-{i}")
    results.put((node, client.dropped))
    client.close(linger_s=DEADLINE_S)


def _serve_in_process(out_dir: str, endpoint: str, interval_s: float = 0.25) -> None:
    serve(Path(out_dir), endpoint, sample_interval_s=interval_s)


# --- tests -----------------------------------------------------------------------


def test_client_records_land_as_rows_with_the_task_columns(tmp_path: Path) -> None:
    endpoint = default_endpoint(tmp_path)
    with (
        _running_server(tmp_path, endpoint) as server,
        MonitorClient(endpoint, node="fog-1", stage="stage-2", role="worker") as client,
    ):
        assert _send(client, "a", start_time=100.0, end_time=100.5)
        assert _send(client, 7, op="train", batch_size=8)
        assert _send(
            client, "c", status="error", detail='shape mismatch, "x"\nline two'
        )
        _wait_for(lambda: _complete_rows(tmp_path / "tasks.csv") == 3, "3 rows")
    assert not Path(endpoint[len("ipc://") :]).exists(), "ipc socket file left behind"

    rows = _read_tasks(tmp_path / "tasks.csv")
    assert [row["task_id"] for row in rows] == ["a", "7", "c"]
    first = rows[0]
    assert (first["node"], first["stage"], first["role"]) == (
        "fog-1",
        "stage-2",
        "worker",
    )
    assert (first["op"], first["batch_size"], first["status"]) == (
        "forward",
        "32",
        "ok",
    )
    assert (first["bytes_in"], first["bytes_out"], first["detail"]) == (
        "1024",
        "2048",
        "",
    )
    assert float(first["start_time"]) == 100.0
    assert float(first["end_time"]) == 100.5
    assert float(first["duration_s"]) == pytest.approx(0.5)
    assert rows[1]["op"] == "train" and rows[1]["batch_size"] == "8"
    assert rows[2]["status"] == "error"
    assert rows[2]["detail"] == 'shape mismatch, "x" line two'

    summary = json.loads((tmp_path / "monitor.json").read_text())
    assert summary == {"records_written": 3, "malformed": 0, "dropped_by_clients": 0}
    assert server.stats.records_written == 3


@pytest.mark.slow
def test_three_processes_sending_at_once_land_every_record_exactly_once(
    tmp_path: Path,
) -> None:
    endpoint = default_endpoint(tmp_path)
    count = 4000
    nodes = ["node-a", "node-b", "node-c"]
    results = SPAWN.Queue()
    with _running_server(tmp_path, endpoint) as server:
        senders = [
            SPAWN.Process(
                target=_send_from_process, args=(endpoint, node, count, results)
            )
            for node in nodes
        ]
        for sender in senders:
            sender.start()
        try:
            dropped = dict(results.get(timeout=DEADLINE_S) for _ in nodes)
            _wait_for(
                lambda: _complete_rows(tmp_path / "tasks.csv") >= count * len(nodes),
                f"{count * len(nodes)} rows",
            )
        finally:
            for sender in senders:
                sender.join(timeout=DEADLINE_S)
    assert all(sender.exitcode == 0 for sender in senders)
    assert dropped == dict.fromkeys(nodes, 0)

    rows = _read_tasks(tmp_path / "tasks.csv")
    assert len(rows) == count * len(nodes)
    pairs = {(row["node"], row["task_id"]) for row in rows}
    assert pairs == {(node, f"task-{i}") for node in nodes for i in range(count)}
    assert server.stats.records_written == count * len(nodes)
    assert server.stats.malformed == 0


def test_client_without_a_monitor_never_blocks(tmp_path: Path) -> None:
    hwm = 1000
    total = 50_000
    client = MonitorClient(
        f"ipc://{tmp_path}/nobody.sock",
        node="edge",
        stage="source",
        role="source",
        hwm=hwm,
    )
    accepted = []

    def flood() -> None:
        accepted.append(sum(_send(client, f"t{i}") for i in range(total)))
        client.close()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    thread.join(timeout=DEADLINE_S)
    assert not thread.is_alive(), "sending to an absent monitor blocked"
    assert 0 < accepted[0] <= hwm
    assert client.dropped == total - accepted[0]
    assert not client.enabled


def test_dropped_records_are_reported_to_the_server(tmp_path: Path) -> None:
    endpoint = default_endpoint(tmp_path)
    client = MonitorClient(endpoint, node="edge", stage="source", role="source", hwm=5)
    with client:
        # No monitor yet: the queue fills at 5 records and the rest are dropped.
        queued = sum(_send(client, f"early-{i}") for i in range(50))
        assert client.dropped == 50 - queued > 0

        with _running_server(tmp_path, endpoint) as server:
            _wait_for(
                lambda: _complete_rows(tmp_path / "tasks.csv") == queued, "queued rows"
            )
            assert _send(client, "late"), (
                "queue still full after the monitor drained it"
            )
            _wait_for(
                lambda: _complete_rows(tmp_path / "tasks.csv") == queued + 1, "late row"
            )
    assert server.stats.dropped_by_clients == client.dropped
    summary = json.loads((tmp_path / "monitor.json").read_text())
    assert summary["dropped_by_clients"] == client.dropped


def test_malformed_records_are_counted_and_the_server_keeps_going(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = default_endpoint(tmp_path)
    missing_op = json.loads(_raw_record())
    del missing_op["op"]
    bad = [
        [os.urandom(64) + b"\xff"],
        [b"[1, 2, 3]"],
        [json.dumps(missing_op).encode()],
        [_raw_record(type="gpu-sample")],
        [_raw_record(v=99)],
        [_raw_record(batch_size="many")],
        [_raw_record(start_time=float("nan"))],
        [_raw_record(dropped_before=-1)],
        [b"1" * 5000],
        [b"[" * 50_000],
        [_raw_record(), b"second frame"],
    ]
    caplog.set_level(logging.WARNING, logger="sparse_zmq.monitor")
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        with _running_server(tmp_path, endpoint) as server:
            push.connect(endpoint)
            for frames in bad:
                push.send_multipart(frames)
            push.send(_raw_record(task_id="valid-after-garbage"))
            _wait_for(lambda: _complete_rows(tmp_path / "tasks.csv") == 1, "valid row")
    finally:
        push.close()
        context.term()

    assert server.stats.malformed == len(bad)
    assert server.stats.records_written == 1
    assert [row["task_id"] for row in _read_tasks(tmp_path / "tasks.csv")] == [
        "valid-after-garbage"
    ]
    warnings = [r for r in caplog.records if "refused a record" in r.getMessage()]
    assert len(warnings) == 1, "malformed records are logged once per 1000, not each"
    summary = json.loads((tmp_path / "monitor.json").read_text())
    assert summary["malformed"] == len(bad)


def test_restart_appends_without_a_second_header_and_cuts_a_half_written_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = default_endpoint(tmp_path)
    tasks = tmp_path / "tasks.csv"
    with MonitorClient(endpoint, node="edge", stage="source", role="source") as client:
        with _running_server(tmp_path, endpoint):
            for i in range(3):
                _send(client, f"first-{i}")
            _wait_for(lambda: _complete_rows(tasks) == 3, "3 rows")

        # A crash in the middle of a write leaves a row without its newline.
        with tasks.open("ab") as fh:
            fh.write(b"edge,source,source,half-writ")

        caplog.set_level(logging.WARNING, logger="sparse_zmq.monitor")
        with _running_server(tmp_path, endpoint):
            for i in range(2):
                _send(client, f"second-{i}")
            _wait_for(lambda: _complete_rows(tasks) == 5, "5 rows")

    assert any("half-written" in r.getMessage() for r in caplog.records)
    assert tasks.read_bytes().count(b"node,stage,role") == 1
    rows = _read_tasks(tasks)
    assert [row["task_id"] for row in rows] == [
        "first-0",
        "first-1",
        "first-2",
        "second-0",
        "second-1",
    ]


def test_file_cut_inside_its_header_gets_a_fresh_header(tmp_path: Path) -> None:
    (tmp_path / "tasks.csv").write_bytes(b"node,sta")
    endpoint = default_endpoint(tmp_path)
    with (
        MonitorClient(endpoint, node="edge", stage="source", role="source") as client,
        _running_server(tmp_path, endpoint),
    ):
        _send(client, "only")
        _wait_for(lambda: _complete_rows(tmp_path / "tasks.csv") == 1, "1 row")
    assert [row["task_id"] for row in _read_tasks(tmp_path / "tasks.csv")] == ["only"]


def test_existing_file_with_other_columns_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tasks.csv").write_text("when,what\n1,2\n")
    with pytest.raises(ConfigError, match="header"):
        MonitorServer(tmp_path, default_endpoint(tmp_path))
    assert (tmp_path / "tasks.csv").read_text() == "when,what\n1,2\n"


def test_second_monitor_on_a_busy_folder_or_endpoint_is_refused(tmp_path: Path) -> None:
    endpoint = default_endpoint(tmp_path / "one")
    with MonitorServer(tmp_path / "one", endpoint):
        with pytest.raises(ConfigError, match="locked by another monitor"):
            MonitorServer(tmp_path / "one", f"ipc://{tmp_path}/other.sock")
        with pytest.raises(ConfigError, match="live process"):
            MonitorServer(tmp_path / "two", endpoint)


class _Steady:
    """A client that keeps sending task records from a thread until stopped.

    It stands for the pipeline: if a send ever blocked, ``sent`` would stop
    growing, so tests wait on its progress (with a deadline), never on time.
    """

    def __init__(self, endpoint: str) -> None:
        self.client = MonitorClient(
            endpoint, node="steady", stage="stage-9", role="worker"
        )
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        tick = threading.Event()
        while not self._stop.is_set():
            _send(self.client, f"steady-{self.sent}")
            self.sent += 1
            if self.sent % 10 == 0:
                tick.wait(0.001)  # a pipeline's pace, not a flood

    def progressed_by(self, count: int, what: str) -> None:
        target = self.sent + count
        _wait_for(lambda: self.sent >= target, what)

    def landed_after(self, path: Path, index: int) -> bool:
        """Whether a record numbered ``index`` or later is in ``path``.

        Any later record will do: one given record may be dropped while the
        client's queue is full, which is the point of never blocking.
        """
        numbers = re.findall(rb",steady-(\d+),", path.read_bytes())
        return any(int(n) >= index for n in numbers)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=DEADLINE_S)
        assert not self._thread.is_alive(), "the sending thread blocked"
        self.client.close()


def _end(process: Any) -> None:
    """Join a spawned monitor; one a failed wait left running is killed first."""
    process.join(timeout=DEADLINE_S)
    if process.is_alive():
        process.kill()
        process.join(timeout=DEADLINE_S)


def _read_strict(path: Path) -> list[dict[str, str]]:
    """Parse any monitor CSV: one header, every row as wide as the header."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    header = reader.fieldnames
    assert header, f"{path.name} has no header"
    assert path.read_bytes().count(",".join(header).encode()) == 1, (
        f"two headers in {path.name}"
    )
    for row in rows:
        assert None not in row and None not in row.values(), f"{path.name}: {row}"
    return rows


@pytest.mark.slow
def test_killed_monitor_restarts_on_the_same_folder_and_the_csv_still_parses(
    tmp_path: Path,
) -> None:
    endpoint = default_endpoint(tmp_path)
    tasks = tmp_path / "tasks.csv"
    client = MonitorClient(endpoint, node="edge", stage="source", role="source")
    steady = _Steady(endpoint)
    with client:
        # Queued before the monitor exists; they arrive once it binds.
        for i in range(100):
            _send(client, f"warm-{i}")
        first = SPAWN.Process(
            target=_serve_in_process, args=(str(tmp_path), endpoint, 0.02)
        )
        first.start()
        try:
            _wait_for(lambda: _holds(tasks, b",warm-99,"), "first monitor's rows")
            # Kill it while the burst is still being sent and written.
            assert first.pid is not None
            killed = False
            for i in range(5000):
                _send(client, f"burst-{i}")
                if not killed and i % 100 == 99 and _complete_rows(tasks) >= 200:
                    os.kill(first.pid, signal.SIGKILL)
                    killed = True
            if not killed:
                _wait_for(lambda: _complete_rows(tasks) >= 200, "the burst to land")
                os.kill(first.pid, signal.SIGKILL)
        finally:
            _end(first)
        assert first.exitcode == -signal.SIGKILL

        # No monitor at all now: the pipeline's sends go on regardless.
        steady.progressed_by(5_000, "sends while the monitor is dead")

        second = SPAWN.Process(
            target=_serve_in_process, args=(str(tmp_path), endpoint, 0.02)
        )
        second.start()
        try:
            for i in range(100):
                _send(client, f"after-{i}")
            _wait_for(lambda: b",after-99," in tasks.read_bytes(), "rows after restart")
            restarted_at = steady.sent
            _wait_for(
                lambda: steady.landed_after(tasks, restarted_at),
                "the steady sender's records after the restart",
            )
            second.terminate()  # SIGTERM: serve() stops cleanly
        finally:
            _end(second)
            steady.stop()
    assert second.exitcode == 0

    rows = _read_tasks(tasks)
    assert tasks.read_bytes().count(b"node,stage,role") == 1
    ids = [row["task_id"] for row in rows]
    assert len(ids) == len(set(ids)), "a record landed twice"
    assert {f"warm-{i}" for i in range(100)} <= set(ids)
    assert {f"after-{i}" for i in range(100)} <= set(ids)
    for name in ("host.csv", "net.csv", "gpu.csv"):
        _read_strict(tmp_path / name)
    host = _read_strict(tmp_path / "host.csv")
    # Both clients live in this process: it is sampled under one of their names.
    assert any(
        row["pid"] == str(os.getpid()) and row["stage"] in {"stage-9", "source"}
        for row in host
    ), "senders are sampled"
    run = json.loads((tmp_path / "run.json").read_text())
    assert len(run["monitor_sessions"]) == 2
    assert run["monitor_sessions"][0]["end_time"] is None, (
        "the killed session never ended"
    )
    assert run["end_time"] == run["monitor_sessions"][1]["end_time"] is not None
    summary = json.loads((tmp_path / "monitor.json").read_text())
    assert summary["records_written"] >= 100
    assert summary["malformed"] == 0
    assert not Path(endpoint[len("ipc://") :]).exists(), "ipc socket file left behind"


def test_default_endpoint_uses_the_folder_or_a_short_temp_path(tmp_path: Path) -> None:
    short = tmp_path / "run"
    assert default_endpoint(short) == f"ipc://{short.resolve()}/monitor.sock"

    deep = tmp_path / ("x" * 60) / ("y" * 60)
    other = tmp_path / ("x" * 60) / ("z" * 60)
    endpoint = default_endpoint(deep)
    path = endpoint[len("ipc://") :]
    assert endpoint.startswith("ipc://")
    assert os.path.dirname(path) == tempfile.gettempdir()
    assert len(path.encode()) <= 100
    assert default_endpoint(deep) == endpoint, (
        "every process must compute the same path"
    )
    assert default_endpoint(other) != endpoint


def test_client_without_endpoint_sends_nothing() -> None:
    with MonitorClient(None, node="edge", stage="source", role="source") as client:
        assert not client.enabled
        assert not _send(client, "t")
    assert client.dropped == 0


def test_client_refuses_values_of_the_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hwm"):
        MonitorClient(f"ipc://{tmp_path}/m.sock", node="n", stage="s", role="r", hwm=0)
    with pytest.raises(ConfigError, match="endpoint"):
        MonitorClient("nowhere://x", node="n", stage="s", role="r")
    endpoint = f"ipc://{tmp_path}/m.sock"
    with (
        MonitorClient(endpoint, node="n", stage="s", role="r") as client,
        pytest.raises(ProtocolError, match="wrong type"),
    ):
        _send(client, "t", batch_size="many")


# --- sampling, registration and run.json -------------------------------------------


def test_every_sampled_csv_is_repaired_and_appended_on_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    endpoint = default_endpoint(tmp_path)
    names = ("gpu.csv", "host.csv", "net.csv")
    with _running_server(tmp_path, endpoint, sample_interval_s=0.02):
        _wait_for(lambda: _complete_rows(tmp_path / "host.csv") >= 3, "host rows")
    before = {name: _complete_rows(tmp_path / name) for name in names}
    for name in names:
        with (tmp_path / name).open("ab") as fh:
            fh.write(b"1796400000.123456,vm,half-writ")

    caplog.set_level(logging.WARNING, logger="sparse_zmq.monitor")
    with _running_server(tmp_path, endpoint, sample_interval_s=0.02):
        _wait_for(
            lambda: _complete_rows(tmp_path / "host.csv") >= before["host.csv"] + 3,
            "host rows after the restart",
        )
    repaired = {
        r.getMessage().split()[0]
        for r in caplog.records
        if "half-written" in r.getMessage()
    }
    assert repaired == {str(tmp_path / name) for name in names}
    for name in names:
        rows = _read_strict(tmp_path / name)
        assert all("half-writ" not in ",".join(row.values()) for row in rows)
    assert _complete_rows(tmp_path / "net.csv") > before["net.csv"]


def test_hello_registers_processes_for_host_sampling(tmp_path: Path) -> None:
    endpoint = default_endpoint(tmp_path)
    results = SPAWN.Queue()
    with _running_server(tmp_path, endpoint, sample_interval_s=0.02) as server:
        sender = SPAWN.Process(
            target=_send_from_process, args=(endpoint, "node-a", 10, results)
        )
        sender.start()
        with MonitorClient(
            endpoint, node="local", stage="launcher", role="launcher"
        ) as launcher:
            # A launcher registers a child that holds no client of its own.
            child = subprocess.Popen(
                [sys.executable, "-c", "import sys; sys.stdin.read()"],
                stdin=subprocess.PIPE,
            )
            try:
                assert launcher.register(
                    child.pid, node="fog", stage="broker-fog", role="broker"
                )
                _wait_for(
                    lambda: (
                        f",{child.pid},broker-fog,broker,".encode()
                        in (tmp_path / "host.csv").read_bytes()
                    ),
                    "the registered child's host rows",
                )
            finally:
                child.kill()
                child.wait(DEADLINE_S)
            results.get(timeout=DEADLINE_S)
            sender.join(timeout=DEADLINE_S)
            _wait_for(
                lambda: _complete_rows(tmp_path / "tasks.csv") == 10, "sender rows"
            )
            with pytest.raises(ProtocolError, match="pid"):
                launcher.register(0)
    assert server.stats.malformed == 0
    assert server.stats.records_written == 10, "hello records write no task row"
    run = json.loads((tmp_path / "run.json").read_text())
    stages = {(p["stage"], p["role"]) for p in run["processes"]}
    assert {
        ("broker-fog", "broker"),
        ("stage-1", "worker"),
        ("monitor", "monitor"),
    } <= stages
    broker = next(p for p in run["processes"] if p["stage"] == "broker-fog")
    assert broker["pid"] == child.pid and broker["running"] is False


def test_run_json_records_the_run_and_survives_a_restart(tmp_path: Path) -> None:
    from test_sampling import fake_nvml  # the NVML substitute, see its module docstring

    nvml, _ = fake_nvml([], init_error="LibraryNotFound")
    info = {
        "suite": "hybrid-off-device",
        "configuration": {"batches": 20, "model": "vgg11"},
    }
    endpoint = default_endpoint(tmp_path)
    with _running_server(tmp_path, endpoint, run_info=info, nvml=nvml, node="fog"):
        pass
    first = json.loads((tmp_path / "run.json").read_text())
    assert first["suite"] == "hybrid-off-device"
    assert first["configuration"] == {"batches": 20, "model": "vgg11"}
    assert first["node"] == "fog" and first["sample_interval_s"] == 0.25
    assert set(first["versions"]) >= {
        "python",
        "torch",
        "pyzmq",
        "sparse-zmq",
        "libzmq",
    }
    assert first["host"]["cpu_logical"] >= 1 and first["host"]["memory_total_bytes"] > 0
    assert first["start_time"] <= first["end_time"]
    assert first["start_utc"].endswith("+00:00")
    assert first["missing"] == [
        {
            "metric": "gpu",
            "where": "this machine",
            "reason": "NVML init failed: NVMLError_LibraryNotFound (code 12)",
        }
    ]

    # A restart without run info keeps the run's description and first start.
    with _running_server(tmp_path, endpoint, nvml=nvml, node="fog"):
        pass
    second = json.loads((tmp_path / "run.json").read_text())
    assert second["suite"] == first["suite"]
    assert second["configuration"] == first["configuration"]
    assert second["start_time"] == first["start_time"]
    assert second["end_time"] >= first["end_time"]
    assert len(second["monitor_sessions"]) == 2
    assert second["missing"] == first["missing"]


def test_monitor_refuses_a_bad_sample_interval(tmp_path: Path) -> None:
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ConfigError, match="sample interval"):
            MonitorServer(tmp_path, default_endpoint(tmp_path), sample_interval_s=bad)


@pytest.mark.slow
def test_monitor_command_takes_run_info_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"suite": "cloudlet", "configuration": {"batches": 3}}))
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "sparse_zmq.cli"]
    proc = subprocess.Popen(
        [*cli, "monitor", "--out", str(out), "--interval", "0.05", "--node", "edge",
         "--run-info", f"@{info}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _wait_for(lambda: _complete_rows(out / "host.csv") >= 2, "host rows")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(DEADLINE_S)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert (run["suite"], run["configuration"], run["node"]) == (
        "cloudlet",
        {"batches": 3},
        "edge",
    )
    assert run["end_time"] is not None

    bad = subprocess.run(
        [*cli, "monitor", "--out", str(out), "--run-info", "[1, 2]"],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert bad.returncode == 2 and "JSON object" in bad.stderr
