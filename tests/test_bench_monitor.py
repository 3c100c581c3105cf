"""The monitor-cost benchmark runs end to end (its figures are not checked)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

RUN_TIMEOUT_S = 600


@pytest.mark.slow
def test_monitor_cost_quick_runs_both_sides_and_writes_its_csv(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.monitor_cost", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "ratio with/without:" in proc.stdout

    with (tmp_path / "monitor_cost.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["monitor"] for row in rows] == ["on", "off", "off", "on"], "ABBA order"
    for row in rows:
        assert int(row["failed_batches"]) == 0 and float(row["samples_per_s"]) > 0
    for row in rows:
        if row["monitor"] == "on":
            # Every role's record of every mini-batch reached the monitor.
            assert int(row["task_rows"]) == 3 * int(row["batches"])
            folder = tmp_path / "runs" / f"run-{row['run']}"
            assert (folder / "host.csv").is_file() and (folder / "run.json").is_file()
