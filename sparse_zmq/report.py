"""Summaries of a run folder: what ``sparse-zmq report DIR`` prints.

:func:`build_report` reads the files one monitor wrote (``tasks.csv``,
``gpu.csv``, ``host.csv``, ``net.csv``, ``run.json``) and returns, for each
node, stage and operation:

* ``tasks`` and ``errors``: rows with status ``ok`` and the others;
* ``samples/s``: samples of the ``ok`` tasks over the time from the first
  task's start to the last one's end (the rate the stage delivered, idle
  time included);
* latency p50, p95, p99 of ``duration_s`` (linear interpolation between
  ranks);
* bytes per sample: payload bytes received plus sent, per sample;
* CPU %: mean share of the machine taken by the stage's processes
  (``host.csv``);
* GPU %, power W: means over the stage's task windows, weighted by time, of
  the node's GPUs (utilization averaged over devices, power summed);
* J/sample: the node's GPU energy during the stage's task windows, per
  sample, from the energy counter where the devices have one, else from the
  power series integrated over each window (:func:`window_energy`); never
  from a single reading.

Every monitor records the whole machine, so GPU figures are those of all the
machine's GPUs during the windows; stages that run at the same time on one
machine share them, and a stage's window includes the time it waits for the
next stage. Task windows shorter than the sampling interval are interpolated
between two samples: the report flags them. Figures the run could not provide
are shown as ``-`` and explained on a line under the table.

Example::

    sys.stdout.write(render_report(Path("runs/demo")))
"""

from __future__ import annotations

import bisect
import csv
import itertools
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_zmq.errors import ConfigError

__all__ = [
    "RunReport",
    "Series",
    "StageFigures",
    "build_report",
    "percentile",
    "render_report",
    "window_energy",
]

logger = logging.getLogger(__name__)


# --- series arithmetic ---------------------------------------------------------


@dataclass
class Series:
    """A sampled quantity: times (Unix seconds, increasing) and values.

    Between two samples the value is taken to change linearly.
    """

    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, time_s: float, value: float) -> None:
        """Append one sample (samples must come in time order)."""
        if self.times and time_s <= self.times[-1]:
            return  # a repeated or out-of-order sample adds nothing
        self.times.append(time_s)
        self.values.append(value)

    def covers(self, start: float, end: float) -> bool:
        """Whether samples exist at or before ``start`` and at or after ``end``."""
        return len(self.times) >= 2 and self.times[0] <= start and end <= self.times[-1]

    def at(self, time_s: float) -> float:
        """The value at ``time_s`` (inside the covered span), interpolated."""
        i = bisect.bisect_left(self.times, time_s)
        if i < len(self.times) and self.times[i] == time_s:
            return self.values[i]
        t0, t1 = self.times[i - 1], self.times[i]
        v0, v1 = self.values[i - 1], self.values[i]
        return v0 + (v1 - v0) * (time_s - t0) / (t1 - t0)

    def integral(self, start: float, end: float) -> float | None:
        """Integral over ``[start, end]`` (trapezoids), or None if not covered."""
        if end < start or not self.covers(start, end):
            return None
        if end == start:
            return 0.0
        points = [(start, self.at(start))]
        lo = bisect.bisect_right(self.times, start)
        hi = bisect.bisect_left(self.times, end)
        points.extend(zip(self.times[lo:hi], self.values[lo:hi], strict=True))
        points.append((end, self.at(end)))
        return sum(
            0.5 * (v0 + v1) * (t1 - t0)
            for (t0, v0), (t1, v1) in itertools.pairwise(points)
        )


def window_energy(
    start: float, end: float, counter_j: Series, power_w: Series
) -> tuple[float, str] | None:
    """Energy of one device over a window, and how it was obtained.

    The energy counter's increase is used when the counter covers the window
    and did not go back (a driver reload restarts it); otherwise the power
    series is integrated over the window.

    Args:
        start: Window start, Unix seconds.
        end: Window end.
        counter_j: The device's energy-counter readings, joules.
        power_w: The device's power readings, watts.

    Returns:
        ``(joules, "energy counter" | "power integral")``, or None when
        neither series covers the window.
    """
    if counter_j.covers(start, end):
        delta = counter_j.at(end) - counter_j.at(start)
        if delta >= 0:
            return delta, "energy counter"
    integral = power_w.integral(start, end)
    if integral is not None:
        return integral, "power integral"
    return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), interpolating linearly between ranks.

    Returns:
        None for an empty sequence.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# --- reading the folder -------------------------------------------------------


def _number(text: str | None) -> float | None:
    """A cell as a finite number, or None for an empty or unreadable cell."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _read_csv(path: Path, skipped: dict[str, int]) -> list[dict[str, str]]:
    """Rows of a monitor CSV file; rows of the wrong width are counted, not kept."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh)
        rows = []
        for row in reader:
            if None in row or None in row.values():
                skipped[path.name] = skipped.get(path.name, 0) + 1
                continue
            rows.append(row)
    return rows


@dataclass
class _Task:
    start: float
    end: float
    samples: int
    nbytes: int


@dataclass
class _Device:
    util: Series = field(default_factory=Series)
    power: Series = field(default_factory=Series)
    counter: Series = field(default_factory=Series)


@dataclass
class StageFigures:
    """The figures of one node, stage and operation (None: not available).

    Attributes:
        node: Node name.
        stage: Stage name.
        op: Operation ("train", "infer"...).
        tasks: Tasks that finished with status ``ok``.
        errors: Tasks with another status.
        samples: Samples in the ``ok`` tasks.
        samples_per_s: Samples over the span of the ``ok`` tasks.
        latency_s: p50, p95 and p99 of the ``ok`` tasks' durations.
        bytes_per_sample: Payload bytes in plus out, per sample.
        cpu_percent: Mean machine share of the stage's processes.
        gpu_util_percent: Time-weighted mean GPU utilization in the windows.
        power_w: Time-weighted mean GPU power (all devices) in the windows.
        energy_per_sample_j: GPU energy in the windows per sample.
        energy_method: How the energy was obtained (counter, power integral).
        short_windows: Tasks shorter than the sampling interval.
        uncovered_windows: Tasks outside the sampled span (no energy).
    """

    node: str
    stage: str
    op: str
    tasks: int = 0
    errors: int = 0
    samples: int = 0
    samples_per_s: float | None = None
    latency_s: tuple[float | None, float | None, float | None] = (None, None, None)
    bytes_per_sample: float | None = None
    cpu_percent: float | None = None
    gpu_util_percent: float | None = None
    power_w: float | None = None
    energy_per_sample_j: float | None = None
    energy_method: str = ""
    short_windows: int = 0
    uncovered_windows: int = 0


@dataclass
class RunReport:
    """Everything :func:`render_report` prints about one run folder.

    Attributes:
        folder: The run folder.
        run: The contents of ``run.json`` (empty if absent).
        stages: Figures per node, stage and operation.
        unavailable: Figures that could not be given, with the reason.
        notes: Further remarks (flagged windows, skipped rows, network).
    """

    folder: Path
    run: dict[str, Any]
    stages: list[StageFigures]
    unavailable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        """The report as a table with a few lines of context, for a terminal."""
        lines = [f"run folder {self.folder}"]
        suite = self.run.get("suite")
        start, end = self.run.get("start_utc"), self.run.get("end_utc")
        if suite or start:
            lines.append(
                f"suite {suite or '-'}, node {self.run.get('node', '-')}, "
                f"from {start or '-'} to {end or '(monitor did not stop cleanly)'}"
            )
        lines.append("")
        lines.extend(_table(self.stages))
        lines.append("")
        if self.unavailable:
            lines.append("not available: " + "; ".join(self.unavailable))
        else:
            lines.append("not available: nothing, every figure was measured")
        lines.extend(self.notes)
        return "\n".join(lines)


_HEADERS = (
    "node", "stage", "op", "tasks", "err", "samples/s", "p50 ms", "p95 ms", "p99 ms",
    "B/sample", "CPU %", "GPU %", "power W", "J/sample",
)  # fmt: skip


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _table(stages: Sequence[StageFigures]) -> list[str]:
    rows = [list(_HEADERS)]
    for s in stages:
        p50, p95, p99 = (None if v is None else v * 1000 for v in s.latency_s)
        energy = _fmt(s.energy_per_sample_j, 3)
        if s.energy_per_sample_j is not None and s.short_windows:
            energy += "*"
        rows.append(
            [
                s.node,
                s.stage,
                s.op,
                str(s.tasks),
                str(s.errors),
                _fmt(s.samples_per_s, 2),
                _fmt(p50),
                _fmt(p95),
                _fmt(p99),
                _fmt(s.bytes_per_sample, 0),
                _fmt(s.cpu_percent),
                _fmt(s.gpu_util_percent),
                _fmt(s.power_w),
                energy,
            ]
        )
    if len(rows) == 1:
        return ["no task records in tasks.csv"]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    text_columns = 3  # node, stage, op: left-aligned; figures right-aligned
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(widths[i]) if i < text_columns else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def build_report(folder: Path | str) -> RunReport:
    """Read a run folder and compute the figures of every node, stage and op.

    Args:
        folder: A folder a monitor wrote.

    Returns:
        The report.

    Raises:
        ConfigError: ``folder`` is not a folder, or holds no ``tasks.csv``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"run folder {str(folder)!r} does not exist or is no folder")
    if not (folder / "tasks.csv").is_file():
        raise ConfigError(
            f"{str(folder)!r} holds no tasks.csv; expected the --out folder of "
            f"'sparse-zmq run' or 'sparse-zmq monitor'"
        )
    run = _read_run_json(folder / "run.json")
    skipped: dict[str, int] = {}
    task_rows = _read_csv(folder / "tasks.csv", skipped)
    gpu_rows = _read_csv(folder / "gpu.csv", skipped)
    host_rows = _read_csv(folder / "host.csv", skipped)
    net_rows = _read_csv(folder / "net.csv", skipped)
    interval = _number(str(run.get("sample_interval_s", ""))) or _median_step(host_rows)

    devices = _gpu_devices(gpu_rows)
    cpu = _process_cpu(host_rows)
    stages = []
    for (node, stage, op), rows in sorted(_group_tasks(task_rows).items()):
        figures = StageFigures(node, stage, op)
        tasks = _task_windows(rows, figures)
        _throughput(figures, tasks)
        figures.cpu_percent = cpu.get((node, stage))
        _gpu_figures(figures, tasks, devices, interval)
        stages.append(figures)

    report = RunReport(folder, run, stages)
    others = sorted(
        key for key in cpu if key not in {(s.node, s.stage) for s in stages}
    )
    if others:
        report.notes.append(
            "processes without tasks, mean CPU %: "
            + ", ".join(
                f"{node}/{stage} {cpu[(node, stage)]:.1f}" for node, stage in others
            )
        )
    _explain_gaps(report, devices, gpu_rows, host_rows, interval)
    _run_energy(report, devices)
    _network(report, net_rows)
    for name, count in sorted(skipped.items()):
        report.notes.append(f"{name}: {count} malformed rows skipped")
    return report


def render_report(folder: Path | str) -> str:
    """:func:`build_report` rendered as text (what ``sparse-zmq report`` prints)."""
    return build_report(folder).render()


def _read_run_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("%s unreadable (%s); reporting without it", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _median_step(host_rows: Sequence[Mapping[str, str]]) -> float | None:
    times = sorted(
        {t for r in host_rows if r["scope"] == "machine" and (t := _number(r["time"]))}
    )
    steps = [b - a for a, b in itertools.pairwise(times)]
    return percentile(steps, 50)


def _group_tasks(
    rows: Iterable[Mapping[str, str]],
) -> dict[tuple[str, str, str], list[Mapping[str, str]]]:
    groups: dict[tuple[str, str, str], list[Mapping[str, str]]] = defaultdict(list)
    for row in rows:
        groups[(row["node"], row["stage"], row["op"])].append(row)
    return groups


def _task_windows(
    rows: Sequence[Mapping[str, str]], figures: StageFigures
) -> list[_Task]:
    tasks = []
    for row in rows:
        if row["status"] != "ok":
            figures.errors += 1
            continue
        start, end = _number(row["start_time"]), _number(row["end_time"])
        samples = _number(row["batch_size"])
        nbytes = (_number(row["bytes_in"]) or 0) + (_number(row["bytes_out"]) or 0)
        if start is None or end is None or samples is None or end < start:
            figures.errors += 1
            continue
        tasks.append(_Task(start, end, int(samples), int(nbytes)))
    figures.tasks = len(tasks)
    return tasks


def _throughput(figures: StageFigures, tasks: Sequence[_Task]) -> None:
    if not tasks:
        return
    figures.samples = sum(t.samples for t in tasks)
    span = max(t.end for t in tasks) - min(t.start for t in tasks)
    if span > 0:
        figures.samples_per_s = figures.samples / span
    durations = [t.end - t.start for t in tasks]
    figures.latency_s = (
        percentile(durations, 50),
        percentile(durations, 95),
        percentile(durations, 99),
    )
    if figures.samples:
        figures.bytes_per_sample = sum(t.nbytes for t in tasks) / figures.samples


def _process_cpu(rows: Iterable[Mapping[str, str]]) -> dict[tuple[str, str], float]:
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        if row["scope"] != "process":
            continue
        value = _number(row["cpu_percent"])
        if value is not None:
            values[(row["node"], row["stage"])].append(value)
    return {key: sum(v) / len(v) for key, v in values.items()}


def _gpu_devices(rows: Iterable[Mapping[str, str]]) -> dict[str, _Device]:
    """Series per whole GPU (MIG devices add their utilization to their GPU's)."""
    devices: dict[str, _Device] = {}
    mig_util: dict[tuple[str, float], list[float]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: _number(r["time"]) or 0.0):
        now = _number(row["time"])
        if now is None:
            continue
        key = f"{row['node']}/GPU {row['index']}"
        device = devices.setdefault(key, _Device())
        util = _number(row["gpu_util_percent"])
        if row["mig_index"]:
            if util is not None:
                mig_util[(key, now)].append(util)
            continue
        if util is not None:
            device.util.add(now, util)
        power = _number(row["power_w"])
        if power is not None:
            device.power.add(now, power)
        counter = _number(row["energy_counter_j"])
        if counter is not None:
            device.counter.add(now, counter)
    for (key, now), values in sorted(mig_util.items(), key=lambda kv: kv[0][1]):
        if not devices[key].util.times or devices[key].util.times[-1] < now:
            devices[key].util.add(now, sum(values) / len(values))
    return devices


def _gpu_figures(
    figures: StageFigures,
    tasks: Sequence[_Task],
    devices: Mapping[str, _Device],
    interval: float | None,
) -> None:
    if interval is not None:
        figures.short_windows = sum(1 for t in tasks if t.end - t.start < interval)
    util_devices = [d for d in devices.values() if d.util.times]
    power_devices = [d for d in devices.values() if d.power.times or d.counter.times]

    util_sum = util_time = 0.0
    power_sum = power_time = 0.0
    energy = 0.0
    energy_samples = 0
    methods: set[str] = set()
    for task in tasks:
        length = task.end - task.start
        utils = [d.util.integral(task.start, task.end) for d in util_devices]
        if util_devices and length > 0 and None not in utils:
            util_sum += sum(u for u in utils if u is not None) / len(utils)
            util_time += length
        powers = [d.power.integral(task.start, task.end) for d in power_devices]
        if power_devices and length > 0 and None not in powers:
            power_sum += sum(p for p in powers if p is not None)
            power_time += length
        parts = [
            window_energy(task.start, task.end, d.counter, d.power)
            for d in power_devices
        ]
        if not power_devices:
            continue
        if None in parts:
            figures.uncovered_windows += 1
            continue
        energy += sum(p[0] for p in parts if p is not None)
        methods.update(p[1] for p in parts if p is not None)
        energy_samples += task.samples

    figures.gpu_util_percent = util_sum / util_time if util_time > 0 else None
    figures.power_w = power_sum / power_time if power_time > 0 else None
    if energy_samples:
        figures.energy_per_sample_j = energy / energy_samples
        figures.energy_method = " and ".join(sorted(methods))


def _explain_gaps(
    report: RunReport,
    devices: Mapping[str, _Device],
    gpu_rows: Sequence[Mapping[str, str]],
    host_rows: Sequence[Mapping[str, str]],
    interval: float | None,
) -> None:
    missing = [m for m in report.run.get("missing") or [] if isinstance(m, dict)]
    reasons = {str(m.get("metric")): str(m.get("reason")) for m in missing}
    if not (report.folder / "gpu.csv").is_file():
        report.unavailable.append(
            "GPU %, power, J/sample (no gpu.csv: sampling was off)"
        )
    elif not gpu_rows:
        why = reasons.get("gpu", "no GPU rows in gpu.csv")
        report.unavailable.append(f"GPU %, power, J/sample ({why})")
    else:
        for label, metric, present in (
            ("GPU %", "gpu_util_percent", any(d.util.times for d in devices.values())),
            ("power", "power_w", any(d.power.times for d in devices.values())),
            (
                "J/sample",
                "energy_counter_j",
                any(d.power.times or d.counter.times for d in devices.values()),
            ),
        ):
            if not present:
                report.unavailable.append(
                    f"{label} ({metric}: {reasons.get(metric, 'empty in gpu.csv')})"
                )
    if not host_rows:
        report.unavailable.append("CPU % (no host.csv rows)")
    elif not any(r["scope"] == "process" for r in host_rows):
        report.unavailable.append("CPU % (no registered process was sampled)")
    partial: dict[str, list[str]] = defaultdict(list)
    for m in missing:
        if m.get("metric") != "gpu":
            partial[str(m.get("metric"))].append(f"{m.get('where')}: {m.get('reason')}")
    for metric, places in partial.items():
        report.notes.append(f"{metric} missing on " + "; ".join(places))

    short = sum(
        s.short_windows for s in report.stages if s.energy_per_sample_j is not None
    )
    windows = sum(s.tasks for s in report.stages if s.energy_per_sample_j is not None)
    if short and interval is not None:
        report.notes.append(
            f"*: {short} of {windows} task windows are shorter than the {interval:g} s "
            f"sampling interval; their energy is interpolated between two samples"
        )
    uncovered = sum(s.uncovered_windows for s in report.stages)
    if uncovered:
        report.notes.append(
            f"{uncovered} task windows lie outside the sampled span and have no energy"
        )
    methods = sorted({s.energy_method for s in report.stages if s.energy_method})
    if methods:
        report.notes.append(f"energy from: {', '.join(methods)}")


def _run_energy(report: RunReport, devices: Mapping[str, _Device]) -> None:
    total = 0.0
    methods = set()
    for device in devices.values():
        series = device.counter if len(device.counter.times) >= 2 else device.power
        if len(series.times) < 2:
            continue
        start, end = series.times[0], series.times[-1]
        result = window_energy(start, end, device.counter, device.power)
        if result is not None:
            total += result[0]
            methods.add(result[1])
    if methods:
        report.notes.append(
            f"GPU energy over the sampled run: {total:,.1f} J "
            f"({', '.join(sorted(methods))}, {len(devices)} device(s))"
        )


def _network(report: RunReport, rows: Iterable[Mapping[str, str]]) -> None:
    sent: dict[str, float] = defaultdict(float)
    recv: dict[str, float] = defaultdict(float)
    span: dict[str, float] = defaultdict(float)
    for row in rows:
        dt = _number(row["interval_s"])
        up, down = _number(row["sent_bytes_per_s"]), _number(row["recv_bytes_per_s"])
        if dt is None or up is None or down is None:
            continue
        sent[row["interface"]] += up * dt
        recv[row["interface"]] += down * dt
        span[row["interface"]] += dt
    busy = [name for name in sorted(span) if sent[name] or recv[name]]
    if busy:
        report.notes.append(
            "network, all traffic of each interface: "
            + "; ".join(
                f"{name} {sent[name] / 1e6:,.1f} MB sent, {recv[name] / 1e6:,.1f} MB "
                f"received ({(sent[name] + recv[name]) / span[name] / 1e6:,.2f} MB/s "
                f"over {span[name]:,.0f} s)"
                for name in busy
            )
        )
