"""Tests of ``sparse-zmq report``: figures from run folders with known contents."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from sparse_zmq.errors import ConfigError
from sparse_zmq.monitor import (
    TASK_COLUMNS,
    MonitorClient,
    MonitorServer,
    default_endpoint,
)
from sparse_zmq.report import Series, build_report, percentile, window_energy
from sparse_zmq.sampling import GPU_COLUMNS, HOST_COLUMNS, NET_COLUMNS

CLI = [sys.executable, "-m", "sparse_zmq.cli"]
DEADLINE_S = 60.0

T0 = 1000.0
"""Start of the sampled span of the hand-made runs, Unix seconds."""


def _write(
    path: Path, columns: Sequence[str], rows: Iterable[dict[str, object]]
) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _task(
    node: str, stage: str, start: float, end: float, **extra: object
) -> dict[str, object]:
    row: dict[str, object] = {
        "node": node,
        "stage": stage,
        "role": "stage",
        "task_id": f"{stage}-{start}",
        "op": "train",
        "batch_size": 10,
        "start_time": start,
        "end_time": end,
        "duration_s": end - start,
        "bytes_in": 1000,
        "bytes_out": 500,
        "status": "ok",
        "detail": "",
    }
    row.update(extra)
    return row


def _make_run(folder: Path, *, counter: bool = True, gpu: bool = True) -> Path:
    """A run: one GPU sampled every 0.5 s for 10 s at 100 W and 50 % busy.

    The energy counter (when present) grows at 200 J/s, deliberately not what
    the power readings say, so the tests see which source the report used.
    """
    folder.mkdir()
    (folder / "run.json").write_text(
        json.dumps(
            {
                "suite": "hand-made",
                "node": "vm",
                "sample_interval_s": 0.5,
                "start_utc": "2026-01-01T00:00:00+00:00",
                "end_utc": "2026-01-01T00:00:10+00:00",
                "missing": []
                if gpu
                else [
                    {
                        "metric": "gpu",
                        "where": "this machine",
                        "reason": "NVML init failed",
                    }
                ],
            }
        )
    )
    _write(
        folder / "tasks.csv",
        TASK_COLUMNS,
        [
            _task("fog", "partition-0", T0 + 1, T0 + 2),
            _task("fog", "partition-0", T0 + 2, T0 + 3),
            _task("fog", "partition-0", T0 + 3, T0 + 4),
            _task("fog", "partition-0", T0 + 4, T0 + 4.2),  # shorter than 0.5 s
            _task("fog", "partition-0", T0 + 5, T0 + 6, status="error", detail="boom"),
            _task("edge", "source", T0 - 10, T0 - 9),  # before sampling began
        ],
    )
    samples = [T0 + 0.5 * i for i in range(21)]
    _write(
        folder / "gpu.csv",
        GPU_COLUMNS,
        [
            {
                "time": t,
                "node": "vm",
                "index": 0,
                "uuid": "GPU-1",
                "name": "Test GPU",
                "gpu_util_percent": 50,
                "power_w": 100.0,
                "energy_counter_j": 200.0 * (t - T0) if counter else "",
            }
            for t in samples
        ]
        if gpu
        else [],
    )
    _write(
        folder / "host.csv",
        HOST_COLUMNS,
        [
            *(
                {"time": t, "node": "vm", "scope": "machine", "cpu_percent": 60.0}
                for t in samples
            ),
            {"time": T0, "node": "fog", "scope": "process", "pid": 7,
             "stage": "partition-0", "role": "stage", "cpu_percent": 50.0},
            {"time": T0 + 0.5, "node": "fog", "scope": "process", "pid": 7,
             "stage": "partition-0", "role": "stage", "cpu_percent": 30.0},
            {"time": T0, "node": "vm", "scope": "process", "pid": 8, "stage": "monitor",
             "role": "monitor", "cpu_percent": 1.0},
        ],
    )  # fmt: skip
    _write(
        folder / "net.csv",
        NET_COLUMNS,
        [
            {"time": T0, "node": "vm", "interface": "lo", "event": "new"},
            {"time": T0 + 1, "node": "vm", "interface": "lo", "sent_bytes_per_s": 2e6,
             "recv_bytes_per_s": 2e6, "interval_s": 1.0},
        ],
    )  # fmt: skip
    return folder


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)


def test_window_energy_prefers_the_counter_and_integrates_power_otherwise() -> None:
    times = [0.0, 1.0, 2.0, 3.0]
    power = Series(times, [100.0, 100.0, 300.0, 300.0])
    counter = Series(times, [0.0, 150.0, 350.0, 650.0])
    assert window_energy(0.5, 2.5, counter, power) == (
        pytest.approx(425.0),
        "energy counter",
    )
    # Trapezoids between samples, interpolated at the window's edges.
    assert window_energy(0.5, 2.5, Series(), power) == (
        pytest.approx(400.0),
        "power integral",
    )
    # A counter that went back (driver reload) is not trusted for the window.
    reloaded = Series(times, [900.0, 950.0, 5.0, 300.0])
    assert window_energy(0.5, 2.5, reloaded, power)[1] == "power integral"  # type: ignore[index]
    assert window_energy(-1.0, 0.5, counter, power) is None, "not covered by samples"
    assert window_energy(1.2, 1.3, Series(), power) == (
        pytest.approx(15.0),
        "power integral",
    )


def test_report_gives_each_stage_throughput_latency_bytes_and_energy(
    tmp_path: Path,
) -> None:
    report = build_report(_make_run(tmp_path / "run"))
    fog, edge = (
        next(s for s in report.stages if s.stage == name)
        for name in ("partition-0", "source")
    )
    assert (fog.node, fog.op, fog.tasks, fog.errors, fog.samples) == (
        "fog",
        "train",
        4,
        1,
        40,
    )
    assert fog.samples_per_s == pytest.approx(40 / 3.2)
    assert fog.latency_s[0] == pytest.approx(1.0)
    assert fog.latency_s[2] == pytest.approx(percentile([1.0, 1.0, 1.0, 0.2], 99))
    assert fog.bytes_per_sample == pytest.approx(150.0)
    assert fog.cpu_percent == pytest.approx(40.0)
    assert fog.gpu_util_percent == pytest.approx(50.0)
    assert fog.power_w == pytest.approx(100.0)
    # 3.2 s of windows at the counter's 200 J/s, over 40 samples.
    assert fog.energy_per_sample_j == pytest.approx(200.0 * 3.2 / 40)
    assert fog.energy_method == "energy counter"
    assert fog.short_windows == 1

    assert edge.energy_per_sample_j is None and edge.uncovered_windows == 1
    text = report.render()
    assert "16.000*" in text, "an energy made of short windows is flagged"
    assert "1 of 4 task windows are shorter than the 0.5 s sampling interval" in text
    assert "1 task windows lie outside the sampled span" in text
    assert "vm/monitor 1.0" in text
    assert "lo 2.0 MB sent" in text
    assert "not available: nothing" in text


def test_report_without_the_energy_counter_integrates_the_power(tmp_path: Path) -> None:
    report = build_report(_make_run(tmp_path / "run", counter=False))
    fog = next(s for s in report.stages if s.stage == "partition-0")
    assert fog.energy_per_sample_j == pytest.approx(100.0 * 3.2 / 40)
    assert fog.energy_method == "power integral"
    assert "energy from: power integral" in report.render()


def test_report_without_gpu_says_which_figures_are_missing_and_why(
    tmp_path: Path,
) -> None:
    report = build_report(_make_run(tmp_path / "run", gpu=False))
    assert all(
        s.energy_per_sample_j is None and s.power_w is None for s in report.stages
    )
    text = report.render()
    assert "not available: GPU %, power, J/sample (NVML init failed)" in text
    fog_row = next(line for line in text.splitlines() if line.startswith("fog"))
    assert fog_row.split()[-3:] == ["-", "-", "-"], "missing figures are '-', never 0"


def test_report_of_a_real_monitor_run_via_the_command_line(tmp_path: Path) -> None:
    endpoint = default_endpoint(tmp_path)
    stop = threading.Event()
    server = MonitorServer(tmp_path, endpoint, sample_interval_s=0.05)
    thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
    thread.start()
    try:
        with MonitorClient(
            endpoint, node="edge", stage="source", role="source"
        ) as client:
            now = time.time()
            for i in range(20):
                client.task(
                    f"b{i}", "train", 32, now + 0.01 * i, now + 0.01 * i + 0.3, 9000, 70
                )
            client.close(linger_s=DEADLINE_S)
        deadline = time.monotonic() + DEADLINE_S
        tick = threading.Event()
        while server.stats.records_written < 20 and time.monotonic() < deadline:
            tick.wait(0.02)
    finally:
        stop.set()
        thread.join(DEADLINE_S)
        server.close()

    proc = subprocess.run(
        [*CLI, "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if line.startswith("edge"))
    assert row.split()[:5] == ["edge", "source", "train", "20", "0"]
    assert row.split()[9] == "283", "bytes per sample: (9000 + 70) / 32"
    assert any(line.startswith("not available:") for line in lines)


def test_report_refuses_a_folder_without_tasks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no tasks\.csv"):
        build_report(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        build_report(tmp_path / "nowhere")
    proc = subprocess.run(
        [*CLI, "report", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_report_skips_malformed_rows_and_says_so(tmp_path: Path) -> None:
    folder = _make_run(tmp_path / "run")
    with (folder / "tasks.csv").open("a", encoding="utf-8") as fh:
        fh.write("fog,partition-0,stage,cut-short\n")
    report = build_report(folder)
    assert "tasks.csv: 1 malformed rows skipped" in report.render()
    assert next(s for s in report.stages if s.stage == "partition-0").tasks == 4
