"""Pipeline benchmark: split VGG training over real sockets against one process.

Run it as::

    python -m bench.pipeline [--quick] [--out DIR]

Every mode trains the same model (CIFAR VGG-11 with batch norm, built from
seed 0) on the same data (the bundled digits, as 3x32x32 images) with the
same mini-batch size and optimizer, using the machine's whole thread budget
(``os.cpu_count()`` torch threads in all):

``single-process``
    The unsplit model in one process with every thread.
``split``
    Two stages, each its own process behind its own fog broker (source ->
    broker -> stage 0 -> broker -> stage 1), the source feeding raw images
    from this process. One mini-batch in flight and no micro-batches, so the
    stages take turns and each may use every thread.
``split-microbatch``
    The same pipeline, each mini-batch cut into micro-batches that flow
    through the stages back to back (GPipe; one mini-batch in flight, exact
    gradient accumulation), the thread budget divided among the stages (one
    thread each on two cores): any speed-up can only come from the stages
    working at the same time. The pipeline fills and drains once per
    mini-batch, so with ``S`` stages and ``M`` micro-batches the stages idle
    ``(S - 1) / (M + S - 1)`` of the time at best.
``split-microbatch-2-in-flight``
    As ``split-microbatch`` with two mini-batches in flight (and two
    micro-batches each, see :class:`Settings`), which removes that idle
    time. Not exact GPipe any more: a mini-batch may run forward on weights
    the previous one has not updated yet (stale by one step), and the
    intermediate stage keeps, for each backward, the weights its forward
    used (weight stashing: ``SplitTrainingStage(stash_weights=True)``).

All processes of all modes are started first; then each mode trains a few
untimed mini-batches (thread pools and buffers warm), and the modes take
turns in rounds of timed mini-batches, so that drifts of the machine's load
touch all modes alike. Throughput is samples per second at the source (or in
the single process), the median over the rounds. The source runs in this
process and only slices data; stages, brokers and the single-process run
each have a process of their own, idle while another mode runs.

Bytes: over all mini-batches, each stage adds up the frames of every task
it receives and every reply it sends, exactly as it hands them to ZeroMQ
(routing envelope, header and tensor frames; ZeroMQ's own 2 to 9 bytes of
framing per frame are not included), which counts every hop once in each
direction. The payload is
what split learning has to move: activations (raw images on the first hop),
gradients and labels. ``pipeline.csv`` (in ``--out``) has the columns
``mode, samples_per_s, wire_bytes_per_sample, payload_bytes_per_sample``;
the table (with CPU milliseconds per sample, see :func:`render`), the
ratios to ``single-process`` and the framing overhead
``(wire - payload) / wire`` go to standard output.

Batch norm takes its statistics per micro-batch (as in GPipe), so
``split-microbatch`` trains a slightly different model than the other two
modes; the work per sample is the same.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import multiprocessing.connection
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from bench._common import (
    Servers,
    median,
    render_table,
    serve_broker,
    stop_event_on_sigterm,
    write_csv,
)
from sparse_zmq.errors import ConfigError, SparseError
from sparse_zmq.master import Master
from sparse_zmq.stage import StageRuntime
from stages.data import Dataset, batches, load_dataset
from stages.models import build_model
from stages.source import TrainingSource
from stages.training import Optimizer, SplitTrainingStage, build_partition

__all__ = ["COLUMNS", "MODES", "Row", "Settings", "main", "run"]

logger = logging.getLogger(__name__)

COLUMNS = ("mode", "samples_per_s", "wire_bytes_per_sample", "payload_bytes_per_sample")
MODES = ("single-process", "split", "split-microbatch", "split-microbatch-2-in-flight")

MODEL = "vgg11"
BATCH_SIZE = 32
SPLIT = [18]
"""Cut before the sixth convolution, where the two partitions take about the
same time per sample (measured here with one thread: about 12 ms each for
micro-batches of 8 or 16). Splitting by multiply-adds (after the third pooling
layer, index 15) leaves the second partition 1.5 to 2.6 times slower, because
small 512-channel convolutions run far below peak. The activation sent is
512x4x4 floats (32 KiB) per sample."""

OPTIMIZER = Optimizer(lr=0.01, momentum=0.9, weight_decay=5e-4)
TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Settings:
    """How much each mode trains.

    Attributes:
        warm_batches: Untimed mini-batches each mode trains first.
        rounds: Rounds over all modes; each mode's rate is the median.
        batches_per_round: Mini-batches each mode trains, timed, per round.
        micro_batches: Micro-batches per mini-batch in ``split-microbatch``.
        micro_batches_in_flight: Micro-batches per mini-batch in
            ``split-microbatch-2-in-flight``. With the pipeline kept full by
            the second mini-batch, fewer and larger micro-batches cost less
            per sample; with one in flight, more of them shorten the fill
            and drain. Measured here (batch 32): 4 is best with one in
            flight, 2 with two.
    """

    warm_batches: int
    rounds: int
    batches_per_round: int
    micro_batches: int
    micro_batches_in_flight: int = 2

    @property
    def total_batches(self) -> int:
        """Mini-batches each mode trains in all."""
        return self.warm_batches + self.rounds * self.batches_per_round


QUICK = Settings(warm_batches=1, rounds=2, batches_per_round=1, micro_batches=4)
FULL = Settings(warm_batches=3, rounds=5, batches_per_round=10, micro_batches=4)


@dataclass(frozen=True)
class Row:
    """One mode's result."""

    mode: str
    samples_per_s: float
    wire_bytes_per_sample: float
    payload_bytes_per_sample: float
    cpu_ms_per_sample: float = 0.0

    @property
    def framing_overhead(self) -> float | None:
        """Share of the wire bytes that is not payload (None without a wire)."""
        if not self.wire_bytes_per_sample:
            return None
        return 1.0 - self.payload_bytes_per_sample / self.wire_bytes_per_sample

    def row(self) -> list[object]:
        """The row as written to the CSV."""
        return [
            self.mode,
            round(self.samples_per_s, 3),
            round(self.wire_bytes_per_sample, 1),
            round(self.payload_bytes_per_sample, 1),
        ]


def _dataset() -> Dataset:
    return load_dataset(None, train=True)


def _threads() -> int:
    return os.cpu_count() or 1


# One process per mode or stage.


def _serve_single_process(conn: multiprocessing.connection.Connection) -> None:
    """Train the unsplit model with every thread, a chunk of mini-batches per request.

    Reports ready, then answers each ``(batches, seed)`` received with the
    samples per second of that many mini-batches; ``None`` ends it.
    """
    torch.set_num_threads(_threads())
    data = _dataset()
    model = build_model(MODEL, seed=0)
    optimizer = OPTIMIZER.build(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    conn.send(True)
    while (request := conn.recv()) is not None:
        count, seed = request
        started = time.perf_counter()
        for images, labels in itertools.islice(_endless(data, seed), count):
            loss_fn(model(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        conn.send(count * BATCH_SIZE / (time.perf_counter() - started))
    conn.close()


def _endless(data: Dataset, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``data``, epoch after epoch, shuffled from ``seed``."""
    for epoch in itertools.count():
        yield from batches(data, BATCH_SIZE, shuffle=True, seed=seed + epoch)


class _ByteCounter:
    """Stands in for a monitor client: adds up the bytes of every task record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.totals = {"tasks": 0, "bytes_in": 0, "bytes_out": 0}

    def task(
        self,
        task_id: object,
        op: str,
        batch_size: int,
        start: float,
        end: float,
        bytes_in: int,
        bytes_out: int,
        **fields: Any,
    ) -> bool:
        """Count one task's bytes (its other fields are not needed here)."""
        self.totals["tasks"] += 1
        self.totals["bytes_in"] += bytes_in
        self.totals["bytes_out"] += bytes_out
        return True

    def close(self, linger_s: float = 0.0) -> None:
        """Write the totals as JSON for the benchmark to read."""
        self.path.write_text(json.dumps(self.totals), encoding="utf-8")


def _serve_stage(
    conn: multiprocessing.connection.Connection,
    backend: str,
    next_frontend: str | None,
    index: int,
    threads: int,
    slots: int,
    stash_weights: bool,
    totals: str,
) -> None:
    """Serve one partition as a worker of ``backend`` until SIGTERM.

    With ``stash_weights`` the stage keeps, for each backward, the weights its
    forward used (see :meth:`stages.training.SplitTrainingStage.serving`),
    which lets an intermediate stage hold graphs of two mini-batches across a
    step. On the way out the stage writes its byte totals to the file
    ``totals``.
    """
    torch.set_num_threads(threads)
    stop = stop_event_on_sigterm()
    module = build_partition(MODEL, SPLIT, index, seed=0)
    stage = SplitTrainingStage(
        module,
        last=index == len(SPLIT),
        optimizer=OPTIMIZER,
        name=f"partition-{index}",
        stash_weights=stash_weights,
    )
    counter = _ByteCounter(Path(totals))
    runtime = StageRuntime(
        stage,
        backend,
        next_frontend=next_frontend,
        node=f"stage-{index}",
        slots=slots,
        monitor=counter,  # type: ignore[arg-type]
    )
    conn.send(True)
    conn.close()
    try:
        runtime.run(stop)
    finally:
        runtime.close()


class _Pipeline:
    """A running split pipeline: brokers and stages in their processes, a source here.

    Args:
        servers: Where the processes are started (and stopped).
        folder: Where the stages write their byte totals on the way out.
        micro_batches: Micro-batches per mini-batch.
        threads: Torch threads of each stage.
        in_flight: Mini-batches under way at once.
    """

    def __init__(
        self,
        servers: Servers,
        folder: Path,
        *,
        micro_batches: int,
        threads: int,
        in_flight: int = 1,
    ) -> None:
        stages = len(SPLIT) + 1
        self.totals = [folder / f"stage-{i}.json" for i in range(stages)]
        brokers = servers.start_all(
            [(f"broker-{i}", serve_broker, f"broker-{i}") for i in range(stages)]
        )
        servers.start_all(
            [
                (
                    f"stage-{i}",
                    _serve_stage,
                    brokers[i][1],
                    brokers[i + 1][0] if i + 1 < stages else None,
                    i,
                    threads,
                    micro_batches * in_flight,
                    in_flight > 1,
                    str(self.totals[i]),
                )
                for i in range(stages)
            ]
        )
        self.master = Master(
            brokers[0][0], name="bench-source", task_timeout_s=TIMEOUT_S
        )
        self.source = TrainingSource(
            self.master,
            optimizer=OPTIMIZER,
            micro_batches=micro_batches,
            in_flight=in_flight,
            timeout_s=TIMEOUT_S,
        )

    def train(self, data: Dataset, batches_total: int, seed: int) -> float:
        """Train ``batches_total`` mini-batches; return samples per second.

        Raises:
            SparseError: A mini-batch failed in the pipeline.
        """
        report = self.source.train(
            data, batch_size=BATCH_SIZE, batches_total=batches_total, seed=seed
        )
        if report.failed_batches:
            raise SparseError(
                f"{report.failed_batches} of {batches_total} mini-batches failed in "
                "the pipeline; see the stages' log lines above"
            )
        return report.samples_per_s

    def close(self) -> None:
        """Close the source's socket (the processes stop with their servers)."""
        self.master.close()

    def counted(self) -> dict[str, int]:
        """The stages' byte totals, once their processes have stopped."""
        counted = {"tasks": 0, "bytes_in": 0, "bytes_out": 0}
        for path in self.totals:
            for key, value in json.loads(path.read_text(encoding="utf-8")).items():
                counted[key] += value
        return counted


def _payload_bytes_per_sample() -> float:
    """Activations, gradients and labels that split learning moves, per sample.

    Hop 0 carries the images and labels in, and only the loss back (raw data
    needs no gradient); every later hop carries an activation and the labels
    in, and the activation's gradient back.
    """
    with torch.no_grad():
        sample = torch.zeros(1, 3, 32, 32)
        label_bytes = torch.zeros(1, dtype=torch.int64).element_size()
        total = sample.numel() * sample.element_size() + label_bytes
        x = sample
        for index in range(len(SPLIT)):
            x = build_partition(MODEL, SPLIT, index, seed=0).eval()(x)
            total += 2 * x.numel() * x.element_size() + label_bytes
    return float(total)


def run(settings: Settings, modes: Sequence[str] = MODES) -> list[Row]:
    """Start every mode's processes, then measure the modes in interleaved rounds.

    Each mode first trains ``settings.warm_batches`` untimed mini-batches;
    then every round trains ``settings.batches_per_round`` with each mode in
    turn, so that drifts of the machine's load touch all modes alike.

    Returns:
        One :class:`Row` per mode, in the order of ``modes``, with the median
        rate over the rounds.
    """
    torch.set_num_threads(1)  # the source here only slices data
    data = _dataset()
    payload = _payload_bytes_per_sample()
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    pids: dict[str, list[int]] = {}
    pipelines: dict[str, _Pipeline] = {}
    single: multiprocessing.connection.Connection | None = None
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        with Servers() as servers:
            try:
                for mode in modes:
                    started = len(servers.processes)
                    if mode == "single-process":
                        _, single = servers.start_with_pipe(mode, _serve_single_process)
                    else:
                        folder = Path(tmp) / mode
                        folder.mkdir()
                        pipelines[mode] = _Pipeline(
                            servers, folder, **_split_options(mode, settings)
                        )
                    # This process too: it is the source of the split modes.
                    pids[mode] = [os.getpid()] + [
                        proc.pid for _, proc in servers.processes[started:] if proc.pid
                    ]

                def train(mode: str, count: int, seed: int) -> float:
                    if mode in pipelines:
                        return pipelines[mode].train(data, count, seed)
                    assert single is not None
                    single.send((count, seed))
                    return float(single.recv())

                for mode in modes:
                    train(mode, settings.warm_batches, seed=0)
                for index in range(settings.rounds):
                    for mode in modes:
                        before = _cpu_seconds(pids[mode])
                        rate = train(mode, settings.batches_per_round, seed=1 + index)
                        used = _cpu_seconds(pids[mode]) - before
                        rates[mode].append(rate)
                        cpu[mode].append(
                            1000 * used / (settings.batches_per_round * BATCH_SIZE)
                        )
                        logger.info("round %d %s: %.1f samples/s", index, mode, rate)
            finally:
                if single is not None:
                    single.send(None)
                    single.close()
                for pipeline in pipelines.values():
                    pipeline.close()
        samples = settings.total_batches * BATCH_SIZE
        rows = []
        for mode in modes:
            if mode not in pipelines:
                rows.append(Row(mode, median(rates[mode]), 0.0, 0.0, median(cpu[mode])))
                continue
            counted = pipelines[mode].counted()
            wire = (counted["bytes_in"] + counted["bytes_out"]) / samples
            rows.append(
                Row(mode, median(rates[mode]), wire, payload, median(cpu[mode]))
            )
    return rows


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User and system CPU seconds used so far by the processes ``pids``."""
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def _split_options(mode: str, settings: Settings) -> dict[str, int]:
    """Micro-batches, threads per stage and mini-batches in flight of a split mode."""
    stages = len(SPLIT) + 1
    if mode == "split":
        return {"micro_batches": 1, "threads": _threads(), "in_flight": 1}
    shared = max(1, _threads() // stages)
    if mode == "split-microbatch":
        return {
            "micro_batches": settings.micro_batches,
            "threads": shared,
            "in_flight": 1,
        }
    if mode == "split-microbatch-2-in-flight":
        return {
            "micro_batches": settings.micro_batches_in_flight,
            "threads": shared,
            "in_flight": 2,
        }
    raise ConfigError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")


def render(rows: Sequence[Row]) -> str:
    """The table, the ratios to ``single-process`` and the framing overhead.

    The CPU column (milliseconds of CPU used by all of the mode's processes,
    this one included, per sample) depends much less than samples per second
    on what else the machine runs, so on a shared machine it is the fairer
    measure of what splitting costs; threads that spin at a barrier while
    their sibling waits for a core still count, which inflates it for the
    modes with several threads per process.
    """
    table = render_table(
        ("mode", "samples/s", "CPU ms/sample", "wire B/sample", "payload B/sample"),
        [
            (
                r.mode,
                r.samples_per_s,
                r.cpu_ms_per_sample,
                r.wire_bytes_per_sample,
                r.payload_bytes_per_sample,
            )
            for r in rows
        ],
    )
    lines = [table, ""]
    single = next((r for r in rows if r.mode == "single-process"), None)
    for r in rows:
        if r.mode == "single-process":
            continue
        if single is not None and single.samples_per_s:
            ratio = r.samples_per_s / single.samples_per_s
            verdict = "met" if ratio >= 0.9 else "MISSED"
            lines.append(
                f"{r.mode}/single-process: {ratio:.2f} (goal >= 0.9: {verdict})"
            )
        if single is not None and single.cpu_ms_per_sample:
            extra = r.cpu_ms_per_sample / single.cpu_ms_per_sample - 1
            lines.append(
                f"{r.mode} CPU per sample: {100 * extra:+.1f}% of single-process"
            )
        overhead = r.framing_overhead
        if overhead is not None:
            verdict = "met" if overhead < 0.02 else "MISSED"
            lines.append(
                f"{r.mode} framing overhead: {100 * overhead:.3f}% of the wire bytes "
                f"(goal < 2%: {verdict})"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: measure, print the table, write ``pipeline.csv``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few mini-batches and 4 micro-batches (about a minute)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("."), help="folder for pipeline.csv"
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help=f"micro-batches per mini-batch of {BATCH_SIZE} in the micro-batch modes "
        f"(default: {FULL.micro_batches})",
    )
    parser.add_argument("--log-level", default="WARNING", help="(default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = QUICK if args.quick else FULL
    if args.micro_batches is not None:
        settings = dataclasses.replace(settings, micro_batches=args.micro_batches)
    rows = run(settings)
    path = write_csv(args.out / "pipeline.csv", COLUMNS, [r.row() for r in rows])
    sys.stdout.write(render(rows) + f"\n\nwrote {path}\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
