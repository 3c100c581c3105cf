"""Run a whole suite on this machine, every role in its own process.

:func:`run_suite` reads a suite description (``bench/suites/<name>.json``),
then starts, in order: the node's monitor, the brokers (each binds loopback
ports the kernel picks and reports them through a ready file), the stages,
and the source. It waits for the source to finish, stopping everything early
if another process dies, then stops stages, brokers and the monitor with
SIGTERM (SIGKILL after a bounded wait), and summarises the run.

Each process logs to ``<out>/logs/<name>.log``; the source's log is also
echoed to this process's stderr so a user watches training progress. Each
stage checkpoints its partition under ``<out>/checkpoints/<name>/`` (see
:mod:`stages.checkpoint`), so a stage restarted by hand with the same command
line resumes; a new run in the same folder starts from the seed again and
first removes the checkpoints of the previous one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

from sparse_zmq.errors import ConfigError, SparseError

__all__ = ["RunOptions", "RunSummary", "load_suite", "run_suite", "SUITES"]

logger = logging.getLogger(__name__)

SUITES = ("cloudlet", "hybrid-on-device", "hybrid-off-device")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
LOOPBACK_ANY = "tcp://127.0.0.1:*"


@dataclass
class RunOptions:
    """Overrides of a suite's defaults (None keeps the suite's value)."""

    batches: int | None = None
    batch_size: int | None = None
    micro_batches: int | None = None
    in_flight: int | None = None
    data: str | None = None
    model: str | None = None
    split: str | None = None
    curve: bool = False  # generate keys under <out>/keys and secure every tcp hop


@dataclass
class RunSummary:
    """The outcome of a local run."""

    suite: str
    out: Path
    ok: bool
    source: dict[str, Any] = field(default_factory=dict)
    rows_per_stage: dict[str, int] = field(default_factory=dict)
    problem: str = ""

    def render(self) -> str:
        """Human-readable summary lines."""
        lines = [f"suite {self.suite}: {'finished' if self.ok else 'FAILED'}"]
        if self.problem:
            lines.append(f"  problem: {self.problem}")
        s = self.source
        if s:
            lines.append(f"  data: {s.get('dataset')}, batch size {s.get('batch_size')}, "
                         f"{s.get('batches')} mini-batches ({s.get('failed_batches')} failed)")
            lines.append(f"  throughput: {s.get('samples_per_s')} samples/s at the source")
            if s.get("loss_start") is not None:
                lines.append(f"  loss: {s['loss_start']:.4f} at start -> {s['loss_end']:.4f} at end "
                             "(means over the first and last tenth of the mini-batches)")
            if s.get("test_accuracy") is not None:
                lines.append(f"  held-out accuracy: {100 * s['test_accuracy']:.1f}% "
                             f"on {s['test_samples']} samples (chance is 10%)")
        for stage, rows in sorted(self.rows_per_stage.items()):
            lines.append(f"  tasks.csv: {rows} rows from {stage}")
        lines.append(f"  CSVs and logs in {self.out}; figures per stage: sparse-zmq report {self.out}")
        return "\n".join(lines)


def load_suite(name: str) -> dict[str, Any]:
    """Read a suite description by name.

    Raises:
        ConfigError: No suite of that name ships with sparse-zmq.
    """
    path = resources.files("bench") / "suites" / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"unknown suite {name!r}; available: {', '.join(SUITES)}")
    return json.loads(path.read_text(encoding="utf-8"))


class _Processes:
    """The child processes of a run, stopped in reverse order of start."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._files: list[IO[bytes]] = []

    def start(self, name: str, args: list[str], *, echo: bool = False) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self._files.append(log)
        cmd = [sys.executable, "-m", "sparse_zmq.cli", *args]
        logger.debug("starting %s: %s", name, " ".join(cmd))
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.PIPE if echo else log, start_new_session=True,
        )
        if echo:
            threading.Thread(target=_tee, args=(proc.stderr, log), daemon=True).start()
        self.children.append((name, proc))
        return proc

    def dead(self) -> list[tuple[str, int]]:
        """Children that have exited, with their exit codes."""
        return [(n, p.returncode) for n, p in self.children if p.poll() is not None]

    def stop(self, names: list[str]) -> None:
        """SIGTERM the named children, wait, SIGKILL any that outlive the wait."""
        procs = [(n, p) for n, p in self.children if n in names and p.poll() is None]
        for _, proc in procs:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for name, proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0fs of SIGTERM; killing it",
                               name, STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        """Stop every child, newest first, and close the log files."""
        for name, _ in reversed(self.children):
            self.stop([name])
        for fh in self._files:
            fh.close()


def _tee(pipe: IO[bytes], log: IO[bytes]) -> None:
    for line in iter(pipe.readline, b""):
        log.write(line)
        log.flush()
        sys.stderr.buffer.write(line)
        sys.stderr.flush()


def _wait_ready(path: Path, proc: subprocess.Popen[bytes], name: str) -> dict[str, str]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        if proc.poll() is not None:
            raise SparseError(f"{name} exited with code {proc.returncode} before binding; see its log")
        try:
            proc.wait(0.05)
        except subprocess.TimeoutExpired:
            pass
    raise SparseError(f"{name} did not report its endpoints within {READY_TIMEOUT_S:.0f}s")


def run_suite(name: str, out: Path, options: RunOptions) -> RunSummary:
    """Run suite ``name`` on this machine, writing CSVs and logs under ``out``.

    Raises:
        ConfigError: Unknown suite or invalid option.
    """
    suite = load_suite(name)
    defaults = suite["defaults"]
    batches = options.batches or defaults["batches"]
    batch_size = options.batch_size or defaults["batch_size"]
    micro = options.micro_batches or defaults["micro_batches"]
    in_flight = options.in_flight or defaults.get("in_flight", 1)
    model = options.model or suite["model"]
    split = options.split if options.split is not None else ",".join(map(str, suite["split"]))
    for label, value in (("batches", batches), ("batch size", batch_size), ("micro-batches", micro),
                         ("mini-batches in flight", in_flight)):
        if value < 1:
            raise ConfigError(f"{label} must be at least 1, got {value}")

    _check_split(suite, model, split)
    if options.data is not None and not Path(options.data).is_dir():
        raise ConfigError(f"--data {options.data!r} is not a folder; expected a CIFAR-10 folder")

    out.mkdir(parents=True, exist_ok=True)
    _clear_previous_run(out)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    from sparse_zmq.monitor import MonitorClient, default_endpoint

    monitor_endpoint = default_endpoint(out)
    # With one mini-batch in flight and no micro-batches the stages take turns, so
    # each may use every core; otherwise they work at once and share the cores.
    computing = len(suite["stages"]) + int(suite["source"]["on_device"])
    cores = os.cpu_count() or 1
    threads = cores if micro == 1 and in_flight == 1 else max(1, cores // computing)
    common = ["--model", model, "--split", split, "--seed", "0", "--threads", str(threads),
              "--monitor", monitor_endpoint]

    checkpoints = out / "checkpoints"
    if checkpoints.exists():
        logger.info("removing the checkpoints of an earlier run in %s", checkpoints)
        shutil.rmtree(checkpoints)
    curve: list[str] = []
    if options.curve:
        from sparse_zmq.security import generate_keys

        # One pair per client node (its --node name picks it); kept across runs.
        nodes = [suite["source"]["node"], *(spec["node"] for spec in suite["stages"])]
        generate_keys(out / "keys", nodes)
        curve = ["--curve-keys", str(out / "keys")]
        common += curve
    procs = _Processes(logs)
    summary = RunSummary(name, out, ok=False)
    summary_path = out / "summary.json"
    summary_path.unlink(missing_ok=True)
    # The monitor is the one writer of run.json; it gets the run's description here.
    run_info = {"suite": name, "configuration": {
        "model": model, "split": split, "batches": batches, "batch_size": batch_size,
        "micro_batches": micro, "in_flight": in_flight, "data": options.data or "bundled digits", "seed": 0,
        "threads_per_process": threads, "topology": {
            key: suite[key] for key in ("description", "source", "brokers", "stages")
            if key in suite}}}
    # Brokers hold no monitor client: the launcher registers them for host sampling.
    launcher = MonitorClient(monitor_endpoint, node="local", stage="launcher", role="launcher")
    try:
        procs.start("monitor", ["monitor", "--out", str(out), "--endpoint", monitor_endpoint,
                                "--run-info", json.dumps(run_info)])
        endpoints: dict[str, dict[str, str]] = {}
        for broker in suite["brokers"]:
            ready = out / f"broker-{broker['name']}.json"
            ready.unlink(missing_ok=True)
            proc = procs.start(f"broker-{broker['name']}", [
                "broker", "--name", broker["name"], "--frontend", LOOPBACK_ANY,
                "--backend", LOOPBACK_ANY, "--ready-file", str(ready), *curve])
            endpoints[broker["name"]] = _wait_ready(ready, proc, f"broker {broker['name']}")
            ready.unlink()
            launcher.register(proc.pid, node=broker["name"], stage=f"broker-{broker['name']}",
                              role="broker")
        stage_names = []
        for spec in suite["stages"]:
            stage_name = f"stage-{spec['node']}"
            args = ["stage", "--node", spec["node"], "--partition", str(spec["partition"]),
                    "--backend", endpoints[spec["broker"]]["backend"],
                    "--slots", str(micro * in_flight), "--checkpoint", str(checkpoints / stage_name),
                    *common]
            if spec.get("next"):
                args += ["--next", endpoints[spec["next"]]["frontend"]]
                if in_flight > 1:
                    args.append("--stash-weights")
            procs.start(stage_name, args)
            stage_names.append(stage_name)
        src = suite["source"]
        args = ["source", "--node", src["node"],
                "--frontend", endpoints[src["broker"]]["frontend"],
                "--batches", str(batches), "--batch-size", str(batch_size),
                "--micro-batches", str(micro), "--in-flight", str(in_flight),
                "--summary", str(summary_path), *common]
        if src["on_device"]:
            args.append("--on-device")
        if options.data:
            args += ["--data", options.data]
        source = procs.start("source", args, echo=True)

        while source.poll() is None:
            others = [(n, c) for n, c in procs.dead() if n != "source"]
            if others:
                summary.problem = "; ".join(
                    f"{n} exited with code {c}{_last_error(logs / f'{n}.log')}" for n, c in others
                )
                summary.problem += f" before the source finished; see {logs}"
                break
            try:
                source.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        else:
            if source.returncode != 0:
                summary.problem = f"source exited with code {source.returncode}; see {logs / 'source.log'}"
        procs.stop(["source"])
        procs.stop(stage_names)
        procs.stop([f"broker-{b['name']}" for b in suite["brokers"]])
        launcher.close(linger_s=1.0)
        procs.stop(["monitor"])
    finally:
        launcher.close()
        procs.stop_all()

    if summary_path.exists():
        summary.source = json.loads(summary_path.read_text(encoding="utf-8"))
    summary.rows_per_stage = _rows_per_stage(out / "tasks.csv")
    summary.ok = not summary.problem and bool(summary.source)
    return summary


def _check_split(suite: dict[str, Any], model: str, split: str) -> None:
    """Refuse a split that does not fit the suite, before any process starts."""
    from stages.models import build_model, parse_split, partition

    points = parse_split(split) if split else []
    needed = len(suite["stages"]) + int(suite["source"]["on_device"])
    if len(points) + 1 != needed:
        raise ConfigError(
            f"split {points} gives {len(points) + 1} partitions, but suite "
            f"{suite['name']!r} runs {needed}; give {needed - 1} split point(s)"
        )
    partition(build_model(model), points)  # raises ConfigError with the allowed range


# What a run writes into its folder; a new run in the same folder replaces them.
RUN_OUTPUTS = ("tasks.csv", "gpu.csv", "host.csv", "net.csv", "run.json", "monitor.json",
               "summary.json")


def _clear_previous_run(out: Path) -> None:
    old = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if old:
        logger.info("replacing the earlier run in %s", out)
    for path in old:
        path.unlink()


def _last_error(log: Path) -> str:
    """The last ERROR line of a child's log, to show why it exited."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if " ERROR " in line]
    return f" ({errors[-1].split(': ', 1)[-1]})" if errors else ""


def _rows_per_stage(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        counts = Counter(f"{row['node']}/{row['stage']}" for row in csv.DictReader(fh))
    return dict(counts)
