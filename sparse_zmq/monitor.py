"""The per-node monitor: a sidecar that turns fire-and-forget records into CSV files.

Every node runs one monitor process. The processes of the node (data source,
stages, brokers) each hold a :class:`MonitorClient` and send it one small record
per finished task over a local ``ipc://`` socket. Nothing ever waits on the
monitor: a client sends without blocking and drops the record when its queue is
full, so a slow, absent or dead monitor costs the pipeline nothing but the lost
records, which are counted.

Besides the records, the monitor samples the node itself at a fixed interval
(:data:`DEFAULT_SAMPLE_INTERVAL_S`), in a thread of its own: GPUs through NVML,
the machine's and the registered processes' CPU and memory, and the network
interfaces' byte counters (see :mod:`sparse_zmq.sampling` for the columns and
how wrapped or reset counters and unsupported NVML queries are handled).

Wire format. One record is one ZeroMQ message of exactly one frame, holding a
UTF-8 JSON object::

    field             type   meaning
    ----------------  -----  -----------------------------------------------
    v                 int    record format version, :data:`RECORD_VERSION`
    type              str    record type: "hello", or one that routes the
                             record to its CSV file ("task")
    dropped_before    int    optional: records this client dropped since its
                             last record that got through (added to
                             ``dropped_by_clients``)
    ...                      the fields of the record type (see below)

A ``task`` record carries every column of :data:`TASK_COLUMNS` except
``duration_s``, which the server derives as ``end_time - start_time``, and
optionally ``pid``, the sender's process id, which registers the sender for
host sampling. A ``hello`` record (``pid``, ``node``, ``stage``, ``role``)
writes no row: it registers a process, and is what a client sends when it
connects and what a launcher sends for processes without a client of their
own (brokers). Unknown extra fields are ignored, so a newer client can talk to
an older monitor.

Files. Each record type has one CSV file in the run's output folder
(``task``: ``tasks.csv``); the sampler writes ``gpu.csv``, ``host.csv`` and
``net.csv``. A row is written and flushed as soon as it exists, so a crash
leaves files that parse. Text fields have line breaks replaced by spaces, so
one row is always one line; a restarted monitor uses that to cut a
half-written last row off before it appends, in every CSV file. ``run.json``
describes the run (suite, configuration, versions, host, start and end, the
registered processes, what this machine could not measure, GPU energy over the
run); it is rewritten atomically when something in it changes and kept across
restarts. On a clean stop the monitor also writes ``monitor.json`` with its
counts (records written, malformed, dropped by clients) for that session.

Example, in a stage::

    with MonitorClient(endpoint, node="fog-1", stage="stage-1", role="worker") as mon:
        start = time.time()
        ...  # run the task
        mon.task(task_id, "forward", 32, start, time.time(), nbytes_in, nbytes_out)
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import socket as std_socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import zmq

from sparse_zmq.errors import ConfigError, ProtocolError
from sparse_zmq.lifecycle import stop_on_signals
from sparse_zmq.sampling import (
    GPU_COLUMNS,
    HOST_COLUMNS,
    NET_COLUMNS,
    GpuSampler,
    HostSampler,
    MissingMetrics,
    NetSampler,
    ProcessRegistry,
    describe_host,
    package_versions,
    processes_from_json,
)

__all__ = [
    "DEFAULT_SAMPLE_INTERVAL_S",
    "HELLO_RECORD",
    "RECORD_TYPES",
    "RECORD_VERSION",
    "RUN_FILE",
    "SAMPLE_FILES",
    "TASK_COLUMNS",
    "TASK_RECORD",
    "MonitorClient",
    "MonitorServer",
    "MonitorStats",
    "RecordType",
    "default_endpoint",
    "serve",
]

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
"""Version carried in every record as ``v``; the server refuses other values."""

TASK_COLUMNS: tuple[str, ...] = (
    "node",
    "stage",
    "role",
    "task_id",
    "op",
    "batch_size",
    "start_time",
    "end_time",
    "duration_s",
    "bytes_in",
    "bytes_out",
    "status",
    "detail",
)
"""Columns of ``tasks.csv``; start and end are wall-clock Unix seconds."""

MAX_TEXT_CHARS = 512
"""Longest text field kept in a row; longer values are cut (the client cuts
``detail`` itself so a long error message does not cost a large send)."""

MAX_RECORD_BYTES = 64 * 1024
"""Largest record accepted; a task record is a few hundred bytes."""

SUMMARY_FILE = "monitor.json"
"""File in the output folder that receives the counts on a clean stop."""

RUN_FILE = "run.json"
"""File in the output folder that describes the run (see :class:`MonitorServer`)."""

DEFAULT_SAMPLE_INTERVAL_S = 0.25
"""Seconds between two samples of GPUs, host and network: four per second, so
a mini-batch of a second or more spans several samples. NVML's power reading
is itself averaged over about a second on recent GPUs, so sampling much faster
adds rows, not information."""

SAMPLE_FILES: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "gpu": ("gpu.csv", GPU_COLUMNS),
    "host": ("host.csv", HOST_COLUMNS),
    "net": ("net.csv", NET_COLUMNS),
}
"""The sampler's CSV files and their columns, by sampler name."""

_IPC_PATH_MAX = 100
"""Longest ipc socket path used as is. ``sockaddr_un.sun_path`` holds 108 bytes
on Linux and 104 on macOS including the terminating NUL; 100 leaves a margin."""

_POLL_MS = 100
"""How long one poll of the server waits, which bounds how late it sees ``stop``."""

_RUN_FILE_EVERY_S = 10.0
"""Longest time between two writes of ``run.json`` while the monitor runs."""

_DRAIN_MAX = 10_000
"""Most records handled between two checks of ``stop`` (and on the final drain)."""


@dataclass(frozen=True)
class RecordType:
    """How one record type is checked and which CSV file its rows go to.

    Attributes:
        name: Value of the record's ``type`` field.
        file_name: CSV file in the output folder.
        columns: Header row of that file.
        to_row: Checks a decoded record and returns its row, one string per
            column; raises :class:`~sparse_zmq.errors.ProtocolError` naming the
            faulty field.
    """

    name: str
    file_name: str
    columns: tuple[str, ...]
    to_row: Callable[[Mapping[str, Any]], list[str]]


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise ProtocolError(_field_fault(record, name, "a string"))
    # One row must stay one line: the crash repair cuts back to the last newline.
    if "\n" in value or "\r" in value:
        value = value.replace("\r", " ").replace("\n", " ")
    return value[:MAX_TEXT_CHARS]


def _count(record: Mapping[str, Any], name: str) -> int:
    value = record.get(name)
    if type(value) is not int or value < 0:
        raise ProtocolError(_field_fault(record, name, "a non-negative integer"))
    return value


def _seconds(record: Mapping[str, Any], name: str) -> float:
    value = record.get(name)
    seconds = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):
            seconds = float(value)
    if not math.isfinite(seconds):
        raise ProtocolError(_field_fault(record, name, "a finite number of seconds"))
    return seconds


def _field_fault(record: Mapping[str, Any], name: str, allowed: str) -> str:
    if name not in record:
        return f"{record.get('type')!r:.20} record has no field {name!r}"
    return (
        f"{record.get('type')!r:.20} record field {name!r} must be {allowed}, "
        f"got {record[name]!r:.40}"
    )


def _task_row(record: Mapping[str, Any]) -> list[str]:
    start = _seconds(record, "start_time")
    end = _seconds(record, "end_time")
    return [
        _text(record, "node"),
        _text(record, "stage"),
        _text(record, "role"),
        _text(record, "task_id"),
        _text(record, "op"),
        str(_count(record, "batch_size")),
        repr(start),
        repr(end),
        f"{end - start:.6f}",
        str(_count(record, "bytes_in")),
        str(_count(record, "bytes_out")),
        _text(record, "status"),
        _text(record, "detail"),
    ]


TASK_RECORD = RecordType("task", "tasks.csv", TASK_COLUMNS, _task_row)
"""One row per finished task, sent by :meth:`MonitorClient.task`."""


def _pid(record: Mapping[str, Any]) -> int:
    value = record.get("pid")
    if type(value) is not int or value <= 0:
        raise ProtocolError(_field_fault(record, "pid", "a positive integer"))
    return value


def _hello_row(record: Mapping[str, Any]) -> list[str]:
    return [
        str(_pid(record)),
        _text(record, "node"),
        _text(record, "stage"),
        _text(record, "role"),
    ]


HELLO_RECORD = RecordType("hello", "", ("pid", "node", "stage", "role"), _hello_row)
"""Registers a process for host sampling; always accepted, writes no file."""

RECORD_TYPES: Mapping[str, RecordType] = {TASK_RECORD.name: TASK_RECORD}
"""Record types a server writes by default, by ``type`` value."""


@dataclass
class MonitorStats:
    """Counts kept by a :class:`MonitorServer` over its own run.

    Attributes:
        records_written: Rows written, all files together.
        malformed: Messages refused (not JSON, not an object, unknown type or
            version, missing or mistyped fields, more than one frame, too large).
        dropped_by_clients: Sum of the ``dropped_before`` fields received: records
            clients dropped because their queue was full.
    """

    records_written: int = 0
    malformed: int = 0
    dropped_by_clients: int = 0


class MonitorClient:
    """Sends task records to the node's monitor without ever waiting for it.

    A PUSH socket connects to the monitor's endpoint. Each record is one
    non-blocking send; when the queue (``hwm`` records) is full, because the
    monitor is slow, not started yet or dead, the record is dropped and counted,
    and the count travels in the next record that gets through as
    ``dropped_before``. Records sent before the monitor binds wait in the queue.
    On connecting, the client sends a ``hello`` record naming its process, so
    the monitor samples that process's CPU and memory; every task record also
    carries the pid.
    :meth:`close` discards what is still queued unless given a ``linger_s``,
    so a process that wants its last records kept closes with e.g. ``1.0``.

    A client is safe to share between threads. It must not be carried across
    ``fork``; create one in each process.

    Args:
        endpoint: The monitor's ZeroMQ endpoint, usually from
            :func:`default_endpoint`. ``None`` or ``""`` gives a client that
            sends nothing, so a stage runs the same without a monitor.
        node: Name of this node, written in every row.
        stage: Name of the sending stage (or "source", "broker-1"...).
        role: What the sender does ("source", "worker", "broker"...).
        hwm: Most records queued before new ones are dropped (at least 1).
        context: ZeroMQ context to use. By default the client makes its own
            and terminates it on :meth:`close`, which is what lets
            ``close(linger_s)`` wait for queued records to leave.

    Raises:
        ConfigError: ``hwm`` is below 1, or ZeroMQ refuses the endpoint.
    """

    def __init__(
        self,
        endpoint: str | None,
        *,
        node: str,
        stage: str,
        role: str,
        hwm: int = 10_000,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        if type(hwm) is not int or hwm < 1:
            raise ConfigError(
                f"monitor client hwm must be an integer >= 1, got {hwm!r}"
            )
        self.endpoint = endpoint or None
        self.node = node
        self.stage = stage
        self.role = role
        self.pid = os.getpid()
        self.dropped = 0
        self._unreported = 0
        self._last_errno: int | None = None
        self._lock = threading.Lock()
        self._socket: zmq.Socket[Any] | None = None
        self._context: zmq.Context[Any] | None = None
        if self.endpoint is None:
            return

        if context is None:
            self._context = context = zmq.Context()
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, hwm)
        try:
            socket.connect(self.endpoint)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            if self._context is not None:
                self._context.term()
            raise ConfigError(
                f"monitor endpoint {self.endpoint!r} refused by ZeroMQ ({exc}); "
                f"expected e.g. 'ipc:///path/monitor.sock'"
            ) from exc
        self._socket = socket
        logger.debug(
            "node %s stage %s: monitor client connected to %s", node, stage, endpoint
        )
        self.register(self.pid)

    @property
    def enabled(self) -> bool:
        """Whether records are sent (an endpoint was given and the client is open)."""
        return self._socket is not None

    def task(
        self,
        task_id: object,
        op: str,
        batch_size: int,
        start_time: float,
        end_time: float,
        bytes_in: int,
        bytes_out: int,
        status: str = "ok",
        detail: str = "",
    ) -> bool:
        """Send one finished task's record; never blocks.

        Args:
            task_id: The task's id (written with ``str``).
            op: What was done ("forward", "train", "route"...).
            batch_size: Samples in the task.
            start_time: Wall-clock start, Unix seconds (``time.time()``).
            end_time: Wall-clock end, Unix seconds.
            bytes_in: Payload bytes received for the task.
            bytes_out: Payload bytes sent for it.
            status: "ok", "error"...
            detail: A short reason when the task failed, else "".

        Returns:
            True if the record was queued, False if it was dropped or the
            client sends nothing.

        Raises:
            ProtocolError: A value cannot be turned into the record's type
                (a count that is not an integer, a time that is not a number).
        """
        if self._socket is None:
            return False
        try:
            record = {
                "v": RECORD_VERSION,
                "type": "task",
                "pid": self.pid,
                "node": self.node,
                "stage": self.stage,
                "role": self.role,
                "task_id": str(task_id),
                "op": str(op),
                "batch_size": int(batch_size),
                "start_time": float(start_time),
                "end_time": float(end_time),
                "bytes_in": int(bytes_in),
                "bytes_out": int(bytes_out),
                "status": str(status),
                "detail": str(detail)[:MAX_TEXT_CHARS],
            }
        except (TypeError, ValueError) as exc:
            raise ProtocolError(
                f"node {self.node} stage {self.stage}: task {task_id!r:.60} record has "
                f"a value of the wrong type ({exc}); counts must be integers and "
                f"times numbers of seconds"
            ) from exc
        return self._send(record)

    def register(
        self,
        pid: int,
        *,
        node: str | None = None,
        stage: str | None = None,
        role: str | None = None,
    ) -> bool:
        """Ask the monitor to sample a process's CPU and memory; never blocks.

        A client registers its own process when it connects; a launcher calls
        this for the processes it starts that hold no client (brokers).

        Args:
            pid: The process id.
            node: Its node name (default: this client's).
            stage: Its name in ``host.csv`` (default: this client's stage).
            role: What it does (default: this client's role).

        Returns:
            True if the record was queued, False if it was dropped or the
            client sends nothing.

        Raises:
            ProtocolError: ``pid`` is not a positive integer.
        """
        if type(pid) is not int or pid <= 0:
            raise ProtocolError(f"pid must be a positive integer, got {pid!r:.40}")
        if self._socket is None:
            return False
        return self._send(
            {
                "v": RECORD_VERSION,
                "type": HELLO_RECORD.name,
                "pid": pid,
                "node": self.node if node is None else str(node),
                "stage": self.stage if stage is None else str(stage),
                "role": self.role if role is None else str(role),
            }
        )

    def _send(self, record: dict[str, Any]) -> bool:
        with self._lock:
            socket = self._socket
            if socket is None:
                return False
            if self._unreported:
                record["dropped_before"] = self._unreported
            try:
                socket.send(
                    json.dumps(record, separators=(",", ":")).encode(), zmq.NOBLOCK
                )
            except zmq.Again:
                self._drop()
                return False
            except zmq.ZMQError as exc:
                # Any other failure (context terminated...) must not reach the pipeline.
                if exc.errno != self._last_errno:
                    logger.warning(
                        "node %s stage %s: monitor send to %s failed (%s); "
                        "record dropped",
                        self.node,
                        self.stage,
                        self.endpoint,
                        exc,
                    )
                self._last_errno = exc.errno
                self._drop()
                return False
            self._unreported = 0
            return True

    def _drop(self) -> None:
        self.dropped += 1
        self._unreported += 1
        if self.dropped == 1:
            logger.warning(
                "node %s stage %s: monitor queue at %s full, dropping records "
                "(counted in the records that follow)",
                self.node,
                self.stage,
                self.endpoint,
            )

    def close(self, linger_s: float = 0.0) -> None:
        """Close the socket; later records are not sent.

        Args:
            linger_s: How long queued records may still take to leave. With the
                default 0 they are discarded at once; a positive value blocks up
                to that long when the client owns its context (with a shared
                context, the wait happens when that context is terminated).
        """
        with self._lock:
            if self._socket is not None:
                self._socket.close(linger=max(0, round(linger_s * 1000)))
                self._socket = None
                if self._context is not None:
                    self._context.term()
                    self._context = None
                if self.dropped:
                    logger.info(
                        "node %s stage %s: monitor client closed after dropping "
                        "%d records",
                        self.node,
                        self.stage,
                        self.dropped,
                    )

    def __enter__(self) -> MonitorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def default_endpoint(out_dir: Path | str) -> str:
    """The monitor endpoint for a run's output folder: ``ipc://<out_dir>/monitor.sock``.

    Unix socket paths are limited to about 100 bytes. When the path in the
    folder is longer, a short path under :func:`tempfile.gettempdir` is used
    instead, named after a hash of the folder's resolved path, so every process
    of the node computes the same endpoint from the same folder.

    Args:
        out_dir: The run's output folder.

    Returns:
        A ZeroMQ ``ipc://`` endpoint.

    Raises:
        ConfigError: Even the fallback path is too long (a very long temp dir).
    """
    folder = Path(out_dir).resolve()
    path = str(folder / "monitor.sock")
    if len(path.encode()) <= _IPC_PATH_MAX:
        return f"ipc://{path}"

    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    short = os.path.join(tempfile.gettempdir(), f"sparse-zmq-monitor-{digest}.sock")
    if len(short.encode()) > _IPC_PATH_MAX:
        raise ConfigError(
            f"monitor socket path {short!r} is {len(short.encode())} bytes; ipc paths "
            f"are limited to {_IPC_PATH_MAX}: set TMPDIR to a shorter folder"
        )
    logger.info(
        "monitor socket path in %s is %d bytes, above %d; using %s instead",
        folder,
        len(path.encode()),
        _IPC_PATH_MAX,
        short,
    )
    return f"ipc://{short}"


class _CsvFile:
    """One append-only CSV file: locked, repaired if a crash cut its last row."""

    def __init__(self, path: Path, columns: tuple[str, ...]) -> None:
        self.path = path
        handle = open(path, "a+b")  # noqa: SIM115 - kept open for the server's life
        try:
            self._lock(handle)
            self._repair(handle)
            self._check_header(handle, columns)
            # "replace": a lone surrogate sent as a JSON escape must not stop us.
            text = io.TextIOWrapper(
                handle, encoding="utf-8", errors="replace", newline=""
            )
        except BaseException:
            handle.close()
            raise
        self._text = text
        self._writer = csv.writer(text, lineterminator="\n")
        if handle.tell() == 0:
            self.write(list(columns))

    def _lock(self, handle: io.BufferedRandom) -> None:
        # The lock dies with its process: a killed monitor never blocks a successor.
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(
                f"{self.path} is locked by another monitor; one monitor per output "
                f"folder is allowed"
            ) from exc

    def _repair(self, handle: io.BufferedRandom) -> None:
        size = handle.seek(0, io.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return

        # Walk back in blocks to the last newline; everything after it is a cut row.
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - 64 * 1024)
            handle.seek(start)
            block = handle.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        handle.truncate(keep)
        handle.seek(0, io.SEEK_END)
        logger.warning(
            "%s ended in a half-written row (%d bytes); cut back to the last complete "
            "line at byte %d",
            self.path,
            size - keep,
            keep,
        )

    def _check_header(
        self, handle: io.BufferedRandom, columns: tuple[str, ...]
    ) -> None:
        end = handle.seek(0, io.SEEK_END)
        if end == 0:
            return
        handle.seek(0)
        first = handle.readline()
        handle.seek(0, io.SEEK_END)
        expected = ",".join(columns)
        if first.rstrip(b"\r\n") != expected.encode():
            raise ConfigError(
                f"{self.path} exists with header {first[:200]!r}; "
                f"expected {expected!r}. "
                f"Move the old file away or use another output folder"
            )

    def write(self, row: list[str]) -> None:
        self._writer.writerow(row)
        self._text.flush()

    def close(self) -> None:
        self._text.close()


class _RunFile:
    """``run.json``: what the run was, written atomically whenever it changes.

    A monitor restarted on the same folder keeps the first session's start
    time, suite and configuration (unless given new ones), appends a session,
    and takes back the processes registered before that are still alive.
    """

    def __init__(
        self,
        path: Path,
        *,
        node: str,
        interval_s: float,
        run_info: Mapping[str, Any] | None,
        missing: MissingMetrics,
        registry: ProcessRegistry,
    ) -> None:
        self.path = path
        self.missing = missing
        self.registry = registry
        self.gpu: GpuSampler | None = None
        self._lock = threading.Lock()
        self._seen = (-1, -1)
        self._written = time.monotonic()
        previous = self._read_previous()
        self._earlier_processes: dict[int, dict[str, Any]] = {}
        for earlier in processes_from_json(previous.get("processes") or []):
            if not registry.restore(earlier):
                self._earlier_processes[earlier.pid] = {
                    **asdict(earlier),
                    "running": False,
                }

        now = time.time()
        info = dict(run_info or {})
        suite = info.pop("suite", previous.get("suite"))
        if "configuration" in info:
            configuration = info.pop("configuration")
        elif info:
            configuration = info
        else:
            configuration = previous.get("configuration", {})
        start = previous.get("start_time")
        if not isinstance(start, (int, float)):
            start = now
        sessions = [
            s for s in previous.get("monitor_sessions") or [] if isinstance(s, dict)
        ]
        sessions.append({"pid": os.getpid(), "start_time": now, "end_time": None})
        earlier_missing = [
            m for m in previous.get("missing") or [] if isinstance(m, dict)
        ]
        self.data: dict[str, Any] = {
            "suite": suite,
            "configuration": configuration,
            "node": node,
            "versions": package_versions(),
            "host": describe_host(),
            "sample_interval_s": interval_s,
            "start_time": start,
            "start_utc": _utc(start),
            "end_time": None,
            "end_utc": None,
            "monitor_sessions": sessions,
            "missing": earlier_missing,
            "gpu_energy": _energy_over_sessions(sessions),
            "processes": [],
        }

    def _read_previous(self) -> dict[str, Any]:
        try:
            previous = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("%s unreadable (%s); starting a new one", self.path, exc)
            return {}
        return previous if isinstance(previous, dict) else {}

    def refresh(self, *, force: bool = False) -> None:
        """Rewrite the file if something in it changed, or every little while.

        Missing metrics and registered processes are written as soon as they
        change; the GPU energy so far every :data:`_RUN_FILE_EVERY_S`, so a
        killed monitor leaves it at most that stale.
        """
        seen = (self.missing.changes, self.registry.changes)
        due = time.monotonic() >= self._written + _RUN_FILE_EVERY_S
        if not force and not due and seen == self._seen:
            return
        self._seen = seen
        self.write()

    def write(self, *, end_time: float | None = None) -> None:
        """Write the file atomically; ``end_time`` marks a clean stop."""
        with self._lock:
            self._written = time.monotonic()
            data = self.data
            missing = {(m.get("metric"), m.get("where")): m for m in data["missing"]}
            for item in self.missing.as_list():
                missing[(item["metric"], item["where"])] = item
            data["missing"] = list(missing.values())
            running = {info.pid for info in self.registry.snapshot()}
            processes = dict(self._earlier_processes)
            for info in self.registry.history():
                processes[info.pid] = {**asdict(info), "running": info.pid in running}
            data["processes"] = [processes[pid] for pid in sorted(processes)]
            if self.gpu is not None:
                data["host"]["gpus"] = self.gpu.describe()
                data["versions"]["nvml-driver"] = self.gpu.driver_version
                data["monitor_sessions"][-1]["gpu_energy"] = self.gpu.energy()
                data["gpu_energy"] = _energy_over_sessions(data["monitor_sessions"])
            if end_time is not None:
                data["end_time"] = end_time
                data["end_utc"] = _utc(end_time)
                data["monitor_sessions"][-1]["end_time"] = end_time
            partial = self.path.with_name(self.path.name + ".tmp")
            try:
                partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
                os.replace(partial, self.path)
            except OSError as exc:
                logger.warning("could not write %s: %s", self.path, exc)


def _energy_over_sessions(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """GPU energy per device summed over monitor sessions (a killed one counts
    up to its last write of ``run.json``)."""
    total: dict[str, dict[str, Any]] = {}
    for session in sessions:
        energy = session.get("gpu_energy")
        if not isinstance(energy, dict):
            continue
        for device, figures in energy.items():
            if not isinstance(figures, dict) or "energy_j" not in figures:
                continue
            entry = total.setdefault(device, {"energy_j": 0.0, "method": set()})
            entry["energy_j"] += float(figures["energy_j"])
            entry["method"].add(str(figures.get("method")))
    return {
        device: {
            "energy_j": round(entry["energy_j"], 3),
            "method": " and ".join(sorted(entry["method"])),
        }
        for device, entry in total.items()
    }


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


class _Sampling:
    """The sampler thread's state: the three samplers and their CSV files."""

    def __init__(
        self,
        out_dir: Path,
        node: str,
        interval_s: float,
        registry: ProcessRegistry,
        missing: MissingMetrics,
        nvml: ModuleType | None,
    ) -> None:
        self.node = node
        self.interval_s = interval_s
        self.samples = 0
        self._failures: set[str] = set()
        self.files: dict[str, _CsvFile] = {}
        self.gpu: GpuSampler | None = None
        try:
            for name, (file_name, columns) in SAMPLE_FILES.items():
                self.files[name] = _CsvFile(out_dir / file_name, columns)
            self.gpu = GpuSampler(node, missing, nvml)
        except BaseException:
            self.close()
            raise
        self.samplers: dict[str, GpuSampler | HostSampler | NetSampler] = {
            "gpu": self.gpu,
            "host": HostSampler(node, registry, missing),
            "net": NetSampler(node),
        }

    def sample_once(self) -> None:
        """Take one sample of everything and write the rows."""
        now = time.time()
        for name, sampler in self.samplers.items():
            try:
                rows = sampler.sample(now)
                for row in rows:
                    self.files[name].write(row)
            except Exception as exc:  # noqa: BLE001 - sampling must never stop the monitor
                kind = f"{name}:{type(exc).__name__}"
                if kind not in self._failures:
                    self._failures.add(kind)
                    logger.warning(
                        "node %s: %s sample failed (%r); skipped, logged once per "
                        "kind of failure",
                        self.node,
                        name,
                        exc,
                    )
        self.samples += 1

    def run(self, stop: threading.Event, on_tick: Callable[[], None]) -> None:
        """Sample every ``interval_s`` until ``stop`` is set; late ticks are skipped."""
        due = time.monotonic()
        while not stop.is_set():
            self.sample_once()
            on_tick()
            due += self.interval_s
            now = time.monotonic()
            if due < now:
                due = now + self.interval_s  # fell behind: skip, do not burst
            stop.wait(due - now)

    def close(self) -> None:
        if self.gpu is not None:
            self.gpu.close()
        for csv_file in self.files.values():
            csv_file.close()
        self.files.clear()


class MonitorServer:
    """Receives monitor records on a PULL socket, samples the node, writes CSVs.

    The records are written by the thread that calls :meth:`run`; the samples
    by a second thread that :meth:`run` starts, each thread to its own files.
    ``run.json`` is written when the server starts, whenever the list of
    missing metrics or registered processes changes, and on a clean stop
    (with the end time and the GPU energy over the run).

    Args:
        out_dir: The run's output folder (created if missing).
        endpoint: Endpoint to bind; :func:`default_endpoint` when ``None``.
        record_types: The record types to accept and their files.
        warn_every: A WARNING is logged for the first malformed record and
            then for every ``warn_every``-th one.
        node: Name of this node in the sampled rows (default: the host name).
        sample_interval_s: Seconds between samples; 0 turns sampling off
            (no ``gpu.csv``, ``host.csv``, ``net.csv``).
        run_info: What the launcher knows of the run, copied into
            ``run.json``: ``suite`` and ``configuration`` (any other keys
            become the configuration).
        nvml: The NVML binding for GPU sampling; None imports ``pynvml``.

    Raises:
        ConfigError: Another monitor holds the folder's files or the socket,
            an existing CSV file has other columns, the endpoint cannot be
            bound, or ``sample_interval_s`` is negative or not finite.
    """

    def __init__(
        self,
        out_dir: Path | str,
        endpoint: str | None = None,
        *,
        record_types: Mapping[str, RecordType] = RECORD_TYPES,
        warn_every: int = 1000,
        node: str | None = None,
        sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
        run_info: Mapping[str, Any] | None = None,
        nvml: ModuleType | None = None,
    ) -> None:
        if (
            isinstance(sample_interval_s, bool)
            or not isinstance(sample_interval_s, (int, float))
            or not math.isfinite(sample_interval_s)
            or sample_interval_s < 0
        ):
            raise ConfigError(
                f"sample interval must be a finite number of seconds >= 0 "
                f"(0: no sampling), got {sample_interval_s!r}"
            )
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = endpoint or default_endpoint(self.out_dir)
        self.node = node or std_socket.gethostname()
        self.stats = MonitorStats()
        self.registry = ProcessRegistry()
        self.missing = MissingMetrics(self.node)
        self._types = dict(record_types)
        self._warn_every = max(1, warn_every)
        self._files: dict[str, _CsvFile] = {}
        self._sampling: _Sampling | None = None
        self._run_file: _RunFile | None = None
        self._ipc_path: str | None = None
        self._ipc_inode: int | None = None
        self._context: zmq.Context[Any] = zmq.Context()
        self._socket: zmq.Socket[Any] | None = None

        try:
            for record_type in self._types.values():
                path = self.out_dir / record_type.file_name
                self._files[record_type.name] = _CsvFile(path, record_type.columns)
            self._run_file = _RunFile(
                self.out_dir / RUN_FILE,
                node=self.node,
                interval_s=float(sample_interval_s),
                run_info=run_info,
                missing=self.missing,
                registry=self.registry,
            )
            if sample_interval_s > 0:
                self._sampling = _Sampling(
                    self.out_dir,
                    self.node,
                    float(sample_interval_s),
                    self.registry,
                    self.missing,
                    nvml,
                )
                self._run_file.gpu = self._sampling.gpu
            self._bind()
        except BaseException:
            self.close()
            raise
        self.registry.register(os.getpid(), self.node, "monitor", "monitor")
        self._run_file.refresh(force=True)
        logger.info(
            "monitor for %s listening on %s, sampling every %s",
            self.out_dir,
            self.endpoint,
            f"{sample_interval_s} s" if sample_interval_s else "never",
        )

    def _bind(self) -> None:
        ipc_path = _ipc_file(self.endpoint)
        if ipc_path is not None and _socket_is_live(ipc_path):
            raise ConfigError(
                f"monitor endpoint {self.endpoint!r} is served by a live process; "
                f"one monitor per endpoint is allowed"
            )
        socket = self._context.socket(zmq.PULL)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.bind(self.endpoint)
        except zmq.ZMQError as exc:
            socket.close(linger=0)
            raise ConfigError(
                f"monitor cannot bind {self.endpoint!r} ({exc}); expected a free "
                f"'ipc://' path or 'tcp://host:port'"
            ) from exc
        self._socket = socket
        if ipc_path is not None:
            self._ipc_path = ipc_path
            with contextlib.suppress(OSError):
                self._ipc_inode = os.stat(ipc_path).st_ino

    def run(self, stop: threading.Event) -> MonitorStats:
        """Write records and samples until ``stop`` is set, then the summaries.

        Polls with a short timeout, so ``stop`` is seen within about 0.1 s;
        the sampler thread sees it at once. On return ``monitor.json`` holds
        the counts and ``run.json`` the end time.
        Records already queued when ``stop`` is set are still written (up to
        10,000). A malformed record is counted and skipped; nothing a client
        sends ends the loop.

        Args:
            stop: Set it (from a signal handler or another thread) to stop.

        Returns:
            The counts, also written to ``monitor.json``.
        """
        socket = self._require_socket()
        run_file = self._run_file
        assert run_file is not None  # set whenever the socket is
        sampler = None
        if self._sampling is not None:
            sampler = threading.Thread(
                target=self._sampling.run,
                args=(stop, run_file.refresh),
                name="monitor-sampler",
                daemon=True,
            )
            sampler.start()
        try:
            while not stop.is_set():
                if socket.poll(_POLL_MS, zmq.POLLIN):
                    self._drain(socket)
                if sampler is None:
                    run_file.refresh()
            self._drain(socket)
        finally:
            stop.set()
            if sampler is not None:
                sampler.join()
            self._write_summary()
            run_file.write(end_time=time.time())
        logger.info(
            "monitor for %s stopped: %d records written, %d malformed, "
            "%d dropped by clients",
            self.out_dir,
            self.stats.records_written,
            self.stats.malformed,
            self.stats.dropped_by_clients,
        )
        return self.stats

    def _require_socket(self) -> zmq.Socket[Any]:
        if self._socket is None:
            raise ConfigError(f"monitor for {self.out_dir} is closed; create a new one")
        return self._socket

    def _drain(self, socket: zmq.Socket[Any]) -> None:
        for _ in range(_DRAIN_MAX):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle(frames)

    def handle(self, frames: list[bytes]) -> bool:
        """Check one received message and write its row or register its process.

        Args:
            frames: The message's frames as received.

        Returns:
            True if the record was accepted (a row written, or a process
            registered), False if the message was malformed.
        """
        try:
            record_type, record = self._parse(frames)
            row = record_type.to_row(record)
        except ProtocolError as exc:
            self._malformed(str(exc))
            return False
        except (ValueError, TypeError, RecursionError) as exc:
            # A record type's check that trips over odd input must not stop us.
            self._malformed(f"record refused by its check: {exc!r:.200}")
            return False
        if record_type is HELLO_RECORD:
            pid, node, stage, role = row
            # A client inside the monitor's own process (tests) keeps it "monitor".
            if int(pid) != os.getpid() and self.registry.register(
                int(pid), node, stage, role
            ):
                logger.info(
                    "monitor for %s: sampling process %s (%s/%s, %s)",
                    self.out_dir,
                    pid,
                    node,
                    stage,
                    role,
                )
            return True
        self._files[record_type.name].write(row)
        self.stats.records_written += 1
        self._register_sender(record)
        return True

    def _register_sender(self, record: Mapping[str, Any]) -> None:
        # A record's pid lets a restarted monitor sample senders it never greeted.
        pid = record.get("pid")
        if (
            type(pid) is not int
            or pid <= 0
            or pid == os.getpid()
            or self.registry.known(pid)
        ):
            return
        names = [record.get(key) for key in ("node", "stage", "role")]
        if all(isinstance(name, str) for name in names):
            self.registry.register(pid, *(str(n)[:MAX_TEXT_CHARS] for n in names))

    def _parse(self, frames: list[bytes]) -> tuple[RecordType, Mapping[str, Any]]:
        if len(frames) != 1:
            raise ProtocolError(f"record must be one frame, got {len(frames)}")
        raw = frames[0]
        if len(raw) > MAX_RECORD_BYTES:
            raise ProtocolError(
                f"record of {len(raw)} bytes exceeds {MAX_RECORD_BYTES}"
            )
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            # ValueError covers bad UTF-8, bad JSON and integers of over 4300 digits.
            raise ProtocolError(
                f"record is not UTF-8 JSON, starts {raw[:24]!r}"
            ) from exc
        if not isinstance(record, dict):
            raise ProtocolError(
                f"record must be a JSON object, got {type(record).__name__}"
            )

        # Count reported drops even when the rest of the record is refused.
        dropped = record.get("dropped_before", 0)
        if type(dropped) is not int or dropped < 0:
            raise ProtocolError(
                f"'dropped_before' must be a non-negative integer, got {dropped!r:.40}"
            )
        self.stats.dropped_by_clients += dropped

        if record.get("v") != RECORD_VERSION:
            raise ProtocolError(
                f"record version {record.get('v')!r:.20} not supported; "
                f"expected {RECORD_VERSION}"
            )
        kind = record.get("type")
        record_type = self._types.get(kind) if isinstance(kind, str) else None
        if record_type is None and kind == HELLO_RECORD.name:
            record_type = HELLO_RECORD
        if record_type is None:
            raise ProtocolError(
                f"unknown record type {kind!r:.40}; "
                f"expected one of {sorted([*self._types, HELLO_RECORD.name])}"
            )
        return record_type, record

    def _malformed(self, reason: str) -> None:
        self.stats.malformed += 1
        count = self.stats.malformed
        if count == 1 or count % self._warn_every == 0:
            logger.warning(
                "monitor for %s refused a record (%d malformed so far, logged once per "
                "%d): %s",
                self.out_dir,
                count,
                self._warn_every,
                reason,
            )

    def _write_summary(self) -> None:
        path = self.out_dir / SUMMARY_FILE
        partial = path.with_name(path.name + ".tmp")
        try:
            partial.write_text(json.dumps(asdict(self.stats), indent=2) + "\n")
            os.replace(partial, path)
        except OSError as exc:
            logger.warning(
                "monitor for %s could not write %s: %s", self.out_dir, path, exc
            )

    def close(self) -> None:
        """Close the socket and files, and remove the ipc socket file it created."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._ipc_path is not None:
            # Remove only our own socket file, not one a successor has bound since.
            with contextlib.suppress(OSError):
                if os.stat(self._ipc_path).st_ino == self._ipc_inode:
                    os.unlink(self._ipc_path)
            self._ipc_path = None
        for csv_file in self._files.values():
            csv_file.close()
        self._files.clear()
        if self._sampling is not None:
            self._sampling.close()
            self._sampling = None
        self._context.term()

    def __enter__(self) -> MonitorServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _ipc_file(endpoint: str) -> str | None:
    """The filesystem path of an ``ipc://`` endpoint (None for tcp or abstract ones)."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://") :]
    if not path or path.startswith("@") or path == "*":
        return None
    return path


def _socket_is_live(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path``."""
    if not os.path.exists(path):
        return False
    probe = std_socket.socket(std_socket.AF_UNIX, std_socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        return False  # refused: a stale file left by a killed monitor
    finally:
        probe.close()
    return True


def serve(
    out_dir: Path | str,
    endpoint: str | None = None,
    *,
    node: str | None = None,
    sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
    run_info: Mapping[str, Any] | None = None,
    nvml: ModuleType | None = None,
) -> MonitorStats:
    """Run a monitor on ``out_dir`` until SIGINT or SIGTERM.

    This is what ``sparse-zmq monitor --out DIR`` runs. It must be called from
    the main thread (signal handlers can only be installed there); the previous
    handlers are restored before it returns.

    Args:
        out_dir: The run's output folder.
        endpoint: Endpoint to bind; :func:`default_endpoint` when ``None``.
        node: Name of this node in the sampled rows (default: the host name).
        sample_interval_s: Seconds between samples; 0 turns sampling off.
        run_info: Suite and configuration to record in ``run.json``.
        nvml: The NVML binding; None imports ``pynvml``.

    Returns:
        The counts written to ``monitor.json``.

    Raises:
        ConfigError: As :class:`MonitorServer`, or when not called from the
            main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        raise ConfigError(
            f"serve() must run in the main thread to install signal handlers, "
            f"got thread {threading.current_thread().name!r}"
        )
    with stop_on_signals() as stop, MonitorServer(
        out_dir,
        endpoint,
        node=node,
        sample_interval_s=sample_interval_s,
        run_info=run_info,
        nvml=nvml,
    ) as server:
        return server.run(stop)
