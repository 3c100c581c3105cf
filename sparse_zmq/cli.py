"""The ``sparse-zmq`` command: one subcommand per role of a pipeline.

::

    sparse-zmq broker  --frontend tcp://127.0.0.1:5555 --backend tcp://127.0.0.1:5556
    sparse-zmq stage   --backend tcp://127.0.0.1:5556 --partition 0 --split 8 \\
                       [--next tcp://127.0.0.1:5557]
    sparse-zmq source  --frontend tcp://127.0.0.1:5555 --split 8 [--on-device]
    sparse-zmq monitor --out runs/demo [--interval 0.25] [--run-info @info.json]
    sparse-zmq report  runs/demo
    sparse-zmq run hybrid-off-device --out runs/demo [--curve]
    sparse-zmq keys    keys/ --name edge --name fog --name cloud

Every long-running role stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparse_zmq.errors import ConfigError, SparseError
from sparse_zmq.lifecycle import atomic_write_text, configure_logging, stop_on_signals

if TYPE_CHECKING:
    from sparse_zmq.security import CurveConfig

__all__ = ["main", "build_parser"]

logger = logging.getLogger("sparse_zmq.cli")

DEFAULT_MODEL = "vgg11"
DEFAULT_SEED = 0


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    parser.add_argument(
        "--split",
        default="",
        help="layer indices where the model is cut, e.g. '8' or '8,15' "
        "(default: no split, one partition)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED,
        help="seed every process builds the model from (default: %(default)s)",
    )
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: %(default)s)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch intra-op threads for this process (default: torch's choice)",
    )


def _add_monitor_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--monitor", default=None,
        help="ipc endpoint of this node's monitor (default: no task records)",
    )
    parser.add_argument("--node", default="node", help="name of this node in logs and CSVs")


def _add_curve_options(parser: argparse.ArgumentParser, *, client: bool) -> None:
    parser.add_argument(
        "--curve-keys", type=Path, default=None,
        help="key folder made by 'sparse-zmq keys': encrypt and authenticate every "
        "tcp connection with CURVE (default: off)",
    )
    if client:
        parser.add_argument(
            "--curve-name", default=None,
            help="this client's key pair in --curve-keys (default: the --node name)",
        )


def _curve(args: argparse.Namespace) -> CurveConfig | None:
    from sparse_zmq.security import CurveConfig

    if args.curve_keys is None:
        return None
    name = getattr(args, "curve_name", None) or getattr(args, "node", None)
    return CurveConfig.from_folder(args.curve_keys, name)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sparse-zmq``."""
    parser = argparse.ArgumentParser(
        prog="sparse-zmq", description="Split deep learning pipelines over ZeroMQ fog brokers."
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    broker = sub.add_parser("broker", help="run a fog broker")
    broker.add_argument("--frontend", required=True, help="endpoint masters connect to")
    broker.add_argument("--backend", required=True, help="endpoint workers connect to")
    broker.add_argument("--max-queued", type=int, default=1000, help="bound of the task queue")
    broker.add_argument("--max-queued-bytes", default="1GiB",
                        help="bound of the task queue in bytes (default: %(default)s)")
    broker.add_argument("--max-message-bytes", default="256MiB",
                        help="largest task accepted, all frames (default: %(default)s)")
    broker.add_argument("--heartbeat-interval", type=float, default=1.0,
                        help="seconds between heartbeats to workers (default: %(default)s)")
    broker.add_argument("--liveness", type=int, default=3,
                        help="heartbeat intervals a worker may miss before its tasks go "
                        "to another worker (default: %(default)s)")
    broker.add_argument("--ready-file", type=Path, help="write the bound endpoints here as JSON")
    broker.add_argument("--name", default="broker", help="name in logs")
    _add_curve_options(broker, client=False)

    stage = sub.add_parser("stage", help="run one partition as a worker of a broker")
    stage.add_argument("--backend", required=True, help="broker backend to take tasks from")
    stage.add_argument("--next", default=None, help="next broker's frontend (intermediate stage)")
    stage.add_argument("--partition", type=int, required=True, help="which partition (0-based)")
    stage.add_argument("--slots", type=int, default=1, help="tasks held at once (default: 1)")
    stage.add_argument("--name", default=None, help="stage name (default: partition-N)")
    stage.add_argument(
        "--checkpoint", type=Path, default=None,
        help="folder for this stage's checkpoint; an existing checkpoint of the same "
        "model, split and partition there is resumed from (default: no checkpoints)",
    )
    stage.add_argument(
        "--checkpoint-every", type=int, default=50,
        help="optimizer steps between checkpoints; a crash loses the steps since the "
        "last one (default: %(default)s)",
    )
    stage.add_argument(
        "--stash-weights", action="store_true",
        help="keep, for each pending backward, the weights its forward used, so that "
        "several mini-batches may be in flight through this intermediate stage (the "
        "source's --in-flight above 1); costs a copy of the stepped parameters",
    )
    _add_model_options(stage)
    _add_monitor_option(stage)
    _add_curve_options(stage, client=True)

    source = sub.add_parser("source", help="feed data into a pipeline (the edge node)")
    source.add_argument("--frontend", required=True, help="first broker's frontend")
    source.add_argument("--on-device", action="store_true", help="run partition 0 on this node")
    source.add_argument("--batches", type=int, default=150, help="mini-batches to train")
    source.add_argument("--batch-size", type=int, default=32, help="samples per mini-batch")
    source.add_argument("--micro-batches", type=int, default=1, help="micro-batches per mini-batch")
    source.add_argument(
        "--in-flight", type=int, default=1,
        help="mini-batches under way at once (default: 1, exact GPipe; more keeps the "
        "stages busy but no longer equals sequential training, and needs "
        "--stash-weights on every intermediate stage)",
    )
    source.add_argument("--data", default=None, help="CIFAR-10 folder (default: bundled digits)")
    source.add_argument("--summary", type=Path, default=None, help="write the run summary JSON here")
    source.add_argument("--timeout", type=float, default=600.0, help="seconds one mini-batch may take")
    _add_model_options(source)
    _add_monitor_option(source)
    _add_curve_options(source, client=True)

    monitor = sub.add_parser("monitor", help="collect this node's records into CSVs")
    monitor.add_argument("--out", type=Path, required=True, help="run folder for the CSVs")
    monitor.add_argument("--endpoint", default=None, help="ipc endpoint (default: in --out)")
    monitor.add_argument(
        "--interval", type=float, default=None,
        help="seconds between GPU, host and network samples; 0: no sampling "
        "(default: 0.25)",
    )
    monitor.add_argument("--node", default=None, help="node name in the sampled rows (default: host name)")
    monitor.add_argument(
        "--run-info", default=None,
        help="suite and configuration to record in run.json: a JSON object, or @FILE holding one",
    )

    report = sub.add_parser("report", help="summarise a run folder: throughput, latency, energy")
    report.add_argument("folder", type=Path, help="the run folder (--out of run or monitor)")

    run = sub.add_parser("run", help="run a whole suite on this machine")
    run.add_argument("suite", help="cloudlet, hybrid-on-device or hybrid-off-device")
    run.add_argument("--out", type=Path, required=True, help="run folder for CSVs and logs")
    run.add_argument("--batches", type=int, default=None, help="mini-batches to train")
    run.add_argument("--batch-size", type=int, default=None, help="samples per mini-batch")
    run.add_argument("--micro-batches", type=int, default=None, help="micro-batches per mini-batch")
    run.add_argument(
        "--in-flight", type=int, default=None,
        help="mini-batches under way at once (default: 1; see 'source --help')",
    )
    run.add_argument("--data", default=None, help="CIFAR-10 folder (default: bundled digits)")
    run.add_argument("--model", default=None, help="model name (default: the suite's)")
    run.add_argument("--split", default=None, help="split points (default: the suite's)")
    run.add_argument(
        "--curve", action="store_true",
        help="generate CURVE keys under OUT/keys and secure every tcp connection",
    )

    keys = sub.add_parser("keys", help="generate CURVE key pairs (brokers, clients)")
    keys.add_argument("folder", type=Path, help="key folder (created with mode 0700)")
    keys.add_argument(
        "--name", action="append", default=[],
        help="a client (node) to create a key pair for and authorize; repeatable. "
        "The brokers' pair is created once; existing pairs are kept",
    )
    return parser


def _torch_setup(args: argparse.Namespace) -> None:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)


def _optimizer(args: argparse.Namespace):  # noqa: ANN202 - lazy torch import
    from stages.training import Optimizer

    return Optimizer(lr=args.lr, momentum=args.momentum)


def _cmd_broker(args: argparse.Namespace) -> int:
    from brokers.fog import BrokerConfig, parse_bytes, serve
    from sparse_zmq.security import warn_if_exposed

    curve = _curve(args)
    for endpoint in (args.frontend, args.backend):
        warn_if_exposed(endpoint, curve, args.name)
    config = BrokerConfig(max_queued_tasks=args.max_queued,
                          max_queued_bytes=parse_bytes(args.max_queued_bytes),
                          max_message_bytes=parse_bytes(args.max_message_bytes),
                          heartbeat_interval_s=args.heartbeat_interval, liveness=args.liveness)
    serve(args.frontend, args.backend, config=config,
          ready_file=args.ready_file, name=args.name, curve=curve)
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from sparse_zmq.monitor import MonitorClient
    from sparse_zmq.stage import StageRuntime
    from stages.models import parse_split
    from stages.training import SplitTrainingStage, build_partition

    _torch_setup(args)
    split = parse_split(args.split) if args.split else []
    module = build_partition(args.model, split, args.partition, seed=args.seed)
    name = args.name or f"partition-{args.partition}"
    last = args.partition == len(split)
    if not last and not args.next:
        raise SparseError(
            f"partition {args.partition} of split {split} is not the last one: "
            "give --next, the frontend of the broker in front of the next stage"
        )
    checkpoint = None
    if args.checkpoint is not None:
        from stages.checkpoint import Checkpointer, PartitionId

        checkpoint = Checkpointer(args.checkpoint, PartitionId(args.model, tuple(split),
                                  args.partition), every=args.checkpoint_every)
    stage = SplitTrainingStage(module, last=last, optimizer=_optimizer(args), name=name,
                               checkpoint=checkpoint, stash_weights=args.stash_weights)
    monitor = MonitorClient(args.monitor, node=args.node, stage=name, role="stage")
    runtime = StageRuntime(stage, args.backend, next_frontend=args.next, node=args.node,
                           slots=args.slots, monitor=monitor, curve=_curve(args))
    try:
        with stop_on_signals() as stop:
            runtime.run(stop)
    finally:
        runtime.close()
    return 0


def _cmd_source(args: argparse.Namespace) -> int:
    from sparse_zmq.master import Master
    from sparse_zmq.monitor import MonitorClient
    from stages.data import load_dataset
    from stages.models import parse_split
    from stages.source import TrainingSource
    from stages.training import build_partition

    _torch_setup(args)
    # SIGTERM ends the source like Ctrl-C: the main loop unwinds and closes sockets.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    split = parse_split(args.split) if args.split else []
    first = build_partition(args.model, split, 0, seed=args.seed) if args.on_device else None
    train = load_dataset(args.data, train=True)
    test = load_dataset(args.data, train=False)
    monitor = MonitorClient(args.monitor, node=args.node, stage="source", role="source")
    with Master(args.frontend, name=args.node, curve=_curve(args)) as master:
        source = TrainingSource(master, first=first, optimizer=_optimizer(args),
                                micro_batches=args.micro_batches, in_flight=args.in_flight,
                                monitor=monitor,
                                timeout_s=args.timeout)
        logger.info("source: training %d mini-batches of %d on %s (%d samples)",
                    args.batches, args.batch_size, train.name, len(train.labels))
        report = source.train(train, batch_size=args.batch_size, batches_total=args.batches,
                              seed=args.seed)
        report.test_samples, report.test_correct = source.evaluate(test, batch_size=256)
    monitor.close(linger_s=2.0)  # let the last records reach the monitor
    summary = {"dataset": train.name, "batch_size": args.batch_size, **report.as_dict()}
    logger.info("source: done %s", json.dumps(summary))
    if args.summary:
        atomic_write_text(args.summary, json.dumps(summary, indent=2))
    return 0 if report.failed_batches == 0 else 1


def _cmd_monitor(args: argparse.Namespace) -> int:
    from sparse_zmq.monitor import default_endpoint, serve

    args.out.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"node": args.node, "run_info": _run_info(args.run_info)}
    if args.interval is not None:
        options["sample_interval_s"] = args.interval
    serve(args.out, args.endpoint or default_endpoint(args.out), **options)
    return 0


def _run_info(value: str | None) -> dict[str, Any] | None:
    """The ``--run-info`` value: inline JSON, or ``@FILE`` naming a JSON file."""
    if value is None:
        return None
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--run-info file {value[1:]!r} unreadable: {exc}") from exc
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--run-info is not JSON ({exc}): {text[:80]!r}") from exc
    if not isinstance(info, dict):
        raise ConfigError(f"--run-info must be a JSON object, got {type(info).__name__}")
    return info


def _cmd_report(args: argparse.Namespace) -> int:
    from sparse_zmq.report import render_report

    sys.stdout.write(render_report(args.folder) + "\n")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from sparse_zmq.launch import RunOptions, run_suite

    # SIGTERM unwinds like Ctrl-C, so the launcher stops every process it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    options = RunOptions(batches=args.batches, batch_size=args.batch_size,
                         micro_batches=args.micro_batches, in_flight=args.in_flight,
                         data=args.data,
                         model=args.model, split=args.split, curve=args.curve)
    summary = run_suite(args.suite, args.out, options)
    sys.stdout.write(summary.render() + "\n")
    return 0 if summary.ok else 1


def _cmd_keys(args: argparse.Namespace) -> int:
    from sparse_zmq.security import generate_keys

    for path in generate_keys(args.folder, args.name):
        sys.stdout.write(f"{path}\n")
    return 0


COMMANDS = {
    "broker": _cmd_broker,
    "stage": _cmd_stage,
    "source": _cmd_source,
    "monitor": _cmd_monitor,
    "report": _cmd_report,
    "run": _cmd_run,
    "keys": _cmd_keys,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparse-zmq`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return COMMANDS[args.command](args)
    except SparseError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        logger.info("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
