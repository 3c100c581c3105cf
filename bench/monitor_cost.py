"""What the monitor costs a pipeline: the same training run with and without it.

Run::

    python -m bench.monitor_cost [--quick] [--out DIR] [--repeats N]
                                 [--batches N] [--batch-size N]

Each run trains the hybrid-off-device pipeline of ``bench/suites`` (VGG-11
cut at layer 8: source -> broker -> partition 0 -> broker -> partition 1)
on the bundled digits, every hop a real ZeroMQ socket on loopback. To keep
a run short the brokers, stages and source run as threads of this process
(``sparse-zmq run`` gives each its own process; the work per mini-batch is
the same). With the monitor, a real ``sparse-zmq monitor`` process samples
GPUs, host and network at its default interval and every role sends it its
task records; without it, the roles hold clients that send nothing.

Runs alternate in ABBA order (on, off, off, on, ...) after one unmeasured
warm-up, so a machine that speeds up or slows down during the benchmark
weighs on both sides alike. The figure is the source's training throughput
(samples per second over the training loop, start-up excluded); the result
is the ratio of the medians, with vs without. One CSV row per run goes to
``DIR/monitor_cost.csv``, and the monitors' run folders to ``DIR/runs/``.

On a noisy machine (the 2-core test VM is shared) single runs vary by
several percent, more than the monitor's cost: read the ratio with the
spread of the runs printed next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from sparse_zmq.errors import SparseError
from sparse_zmq.monitor import MonitorClient, default_endpoint

__all__ = ["RunResult", "main", "run_pipeline"]

logger = logging.getLogger("bench.monitor_cost")

LOOPBACK = "tcp://127.0.0.1:*"
MODEL = "vgg11"
SPLIT = [8]
"""The hybrid-off-device suite's model and cut (bench/suites/hybrid-off-device.json)."""

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
QUICK = {"repeats": 2, "batches": 8, "batch_size": 16}
"""``--quick``: two ABBA pairs of short runs, well under a minute on the 2-core VM."""
FULL = {"repeats": 3, "batches": 30, "batch_size": 32}

CSV_COLUMNS = (
    "run",
    "monitor",
    "batches",
    "batch_size",
    "samples",
    "seconds",
    "samples_per_s",
    "failed_batches",
    "task_rows",
    "monitor_cpu_s",
)


@dataclass
class RunResult:
    """One measured run.

    Attributes:
        run: Position in the measured sequence (0-based).
        monitor: "on" or "off".
        batches: Mini-batches trained.
        batch_size: Samples per mini-batch.
        samples: Samples trained.
        seconds: Duration of the training loop.
        samples_per_s: ``samples / seconds``.
        failed_batches: Mini-batches that failed (0 in a sound run).
        task_rows: Rows the monitor wrote to tasks.csv (-1 without monitor).
        monitor_cpu_s: CPU seconds the monitor process used (-1 without).
    """

    run: int
    monitor: str
    batches: int
    batch_size: int
    samples: int
    seconds: float
    samples_per_s: float
    failed_batches: int
    task_rows: int = -1
    monitor_cpu_s: float = -1.0


@contextmanager
def _monitor_process(
    folder: Path, run_info: dict[str, object]
) -> Iterator[dict[str, float]]:
    """A ``sparse-zmq monitor`` process on ``folder``, ready when the block starts.

    Yields a dict that receives ``cpu_s``, the monitor's CPU time, on exit.
    """
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / "monitor.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparse_zmq.cli", "monitor", "--out", str(folder),
         "--run-info", json.dumps(run_info)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    usage: dict[str, float] = {}
    try:
        # run.json is written once the monitor has bound its socket.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (folder / "run.json").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SparseError(
                    f"monitor for {folder} not ready (exit code {proc.poll()}); "
                    f"see {folder / 'monitor.log'}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.05)
        yield usage
        try:
            times = psutil.Process(proc.pid).cpu_times()
            usage["cpu_s"] = times.user + times.system
        except psutil.Error:
            usage["cpu_s"] = -1.0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def run_pipeline(
    endpoint: str | None, *, batches: int, batch_size: int, dataset: object
) -> dict[str, float]:
    """Train the hybrid-off-device pipeline in threads of this process.

    Args:
        endpoint: The monitor's endpoint, or None for clients that send nothing.
        batches: Mini-batches to train.
        batch_size: Samples per mini-batch.
        dataset: The training set (``stages.data.Dataset``), loaded once.

    Returns:
        The source's report (``samples``, ``seconds``, ``samples_per_s``,
        ``failed_batches``...).
    """
    from brokers.fog import FogBroker
    from sparse_zmq.master import Master
    from sparse_zmq.stage import StageRuntime
    from stages.source import TrainingSource
    from stages.training import Optimizer, SplitTrainingStage, build_partition

    brokers = [FogBroker(LOOPBACK, LOOPBACK, name=name) for name in ("fog", "cloud")]
    endpoints = [broker.bind() for broker in brokers]
    stop = threading.Event()
    runtimes = []
    for index, node in enumerate(("fog", "cloud")):
        last = index == len(SPLIT)
        name = f"partition-{index}"
        stage = SplitTrainingStage(
            build_partition(MODEL, SPLIT, index, seed=0),
            last=last,
            optimizer=Optimizer(),
            name=name,
        )
        runtimes.append(
            StageRuntime(
                stage,
                endpoints[index][1],
                next_frontend=None if last else endpoints[index + 1][0],
                node=node,
                monitor=MonitorClient(endpoint, node=node, stage=name, role="stage"),
            )
        )
    threads = [
        threading.Thread(target=broker.run, args=(stop,), daemon=True)
        for broker in brokers
    ] + [
        threading.Thread(target=runtime.run, args=(stop,), daemon=True)
        for runtime in runtimes
    ]
    for thread in threads:
        thread.start()
    monitor = MonitorClient(endpoint, node="edge", stage="source", role="source")
    try:
        with Master(endpoints[0][0], name="edge") as master:
            source = TrainingSource(master, optimizer=Optimizer(), monitor=monitor)
            report = source.train(dataset, batch_size=batch_size, batches_total=batches)  # type: ignore[arg-type]
    finally:
        monitor.close(linger_s=2.0)
        stop.set()
        for thread in threads:
            thread.join(STOP_TIMEOUT_S)
        for runtime in runtimes:
            runtime.close()
        for broker in brokers:
            broker.close()
    return report.as_dict()


def _count_rows(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def _order(repeats: int) -> list[str]:
    """ABBA: on, off, off, on, on, off, ... (``repeats`` pairs)."""
    return [
        side
        for pair in range(repeats)
        for side in (("on", "off") if pair % 2 == 0 else ("off", "on"))
    ]


def measure(
    out: Path, *, repeats: int, batches: int, batch_size: int
) -> list[RunResult]:
    """Warm up, then run with and without the monitor in ABBA order.

    Args:
        out: Folder for the CSV and the monitors' run folders.
        repeats: Pairs of runs (one with, one without the monitor).
        batches: Mini-batches per run.
        batch_size: Samples per mini-batch.

    Returns:
        One result per measured run, in the order they ran.
    """
    import torch

    from stages.data import load_dataset

    torch.set_num_threads(
        os.cpu_count() or 1
    )  # one mini-batch in flight, as the launcher
    dataset = load_dataset(None, train=True)
    logger.info("warm-up run (not measured)")
    run_pipeline(None, batches=2, batch_size=batch_size, dataset=dataset)

    results = []
    for index, side in enumerate(_order(repeats)):
        logger.info("run %d: monitor %s", index, side)
        if side == "off":
            report = run_pipeline(
                None, batches=batches, batch_size=batch_size, dataset=dataset
            )
            rows, cpu = -1, -1.0
        else:
            folder = out / "runs" / f"run-{index}"
            configuration = {"model": MODEL, "split": SPLIT, "batches": batches,
                             "batch_size": batch_size, "run": index}  # fmt: skip
            info: dict[str, object] = {
                "suite": "bench.monitor_cost",
                "configuration": configuration,
            }
            with _monitor_process(folder, info) as usage:
                report = run_pipeline(
                    default_endpoint(folder), batches=batches, batch_size=batch_size,
                    dataset=dataset,
                )  # fmt: skip
            rows, cpu = _count_rows(folder / "tasks.csv"), usage.get("cpu_s", -1.0)
        results.append(
            RunResult(
                index, side, batches, batch_size, int(report["samples"]),
                float(report["seconds"]), float(report["samples_per_s"]),
                int(report["failed_batches"]), rows, round(cpu, 3),
            )
        )  # fmt: skip
        logger.info("run %d: %.2f samples/s", index, results[-1].samples_per_s)
    return results


def summarise(results: Sequence[RunResult]) -> str:
    """The runs side by side and the ratio of median throughputs (with / without)."""
    on = [r.samples_per_s for r in results if r.monitor == "on"]
    off = [r.samples_per_s for r in results if r.monitor == "off"]
    lines = ["run  monitor  samples/s  task rows  monitor CPU s"]
    for r in results:
        rows = str(r.task_rows) if r.task_rows >= 0 else "-"
        cpu = f"{r.monitor_cpu_s:.2f}" if r.monitor_cpu_s >= 0 else "-"
        lines.append(
            f"{r.run:>3}  {r.monitor:>7}  {r.samples_per_s:>9.2f}  {rows:>9}  {cpu:>13}"
        )
    med_on, med_off = statistics.median(on), statistics.median(off)
    lines.append(
        f"median samples/s: with monitor {med_on:.2f} "
        f"(runs {min(on):.2f}-{max(on):.2f}), "
        f"without {med_off:.2f} (runs {min(off):.2f}-{max(off):.2f})"
    )
    lines.append(f"ratio with/without: {med_on / med_off:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.monitor_cost``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.monitor_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="two short ABBA pairs (under a minute)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/monitor-cost"),
        help="folder for monitor_cost.csv and run folders",
    )
    parser.add_argument("--repeats", type=int, default=None, help="ABBA pairs of runs")
    parser.add_argument(
        "--batches", type=int, default=None, help="mini-batches per run"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="samples per mini-batch"
    )
    parser.add_argument("--log-level", default="WARNING", help="INFO shows each run")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = dict(QUICK if args.quick else FULL)
    for key in ("repeats", "batches", "batch_size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if min(settings.values()) < 1:
        parser.error(
            f"repeats, batches and batch size must be at least 1, got {settings}"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    results = measure(args.out, **settings)
    path = args.out / "monitor_cost.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    sys.stdout.write(summarise(results) + f"\nCSV: {path}\n")
    return 0 if all(r.failed_batches == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
