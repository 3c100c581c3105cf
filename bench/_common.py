"""What the benchmarks share: server processes, medians, tables and CSVs.

Every server a benchmark measures runs in its own process, started with the
``spawn`` method so it imports a clean interpreter (no sockets or threads
inherited across ``fork``). A server function receives one end of a
:func:`multiprocessing.Pipe`, binds its sockets to loopback ports the kernel
picks, sends what its clients need (usually endpoints) through the pipe, and
serves until SIGTERM. :class:`Servers` waits for that message with a timeout,
never a sleep, and stops its processes by their own handles when it closes.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from sparse_zmq.errors import SparseError

__all__ = [
    "LOOPBACK_TCP",
    "READY_TIMEOUT_S",
    "Servers",
    "serve_broker",
    "median",
    "render_table",
    "stop_event_on_sigterm",
    "write_csv",
]

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0
"""How long a server process may take to import torch and bind (a noisy 2-core box)."""

STOP_TIMEOUT_S = 10.0
"""How long a server gets to stop after SIGTERM before it is killed."""

LOOPBACK_TCP = "tcp://127.0.0.1:*"
"""Where every benchmark server binds: loopback, a port the kernel picks."""


def stop_event_on_sigterm() -> threading.Event:
    """Return an event that SIGTERM or SIGINT sets (call in a server's main thread)."""
    stop = threading.Event()

    def _handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop


def serve_broker(
    conn: multiprocessing.connection.Connection, name: str = "bench-broker"
) -> None:
    """Run a :class:`brokers.fog.FogBroker` on two loopback ports until SIGTERM.

    Sends ``(frontend, backend)`` through ``conn`` once both are bound.
    """
    from brokers.fog import FogBroker

    stop = stop_event_on_sigterm()
    with FogBroker(LOOPBACK_TCP, LOOPBACK_TCP, name=name) as broker:
        conn.send(broker.bind())
        conn.close()
        broker.run(stop)


class Servers:
    """Server processes of one benchmark, stopped together on exit.

    Example::

        with Servers() as servers:
            endpoint = servers.start("echo", serve_echo, 8)
            ...
    """

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._procs: list[tuple[str, multiprocessing.process.BaseProcess]] = []

    def start(self, name: str, target: Callable[..., None], *args: Any) -> Any:
        """Start ``target(conn, *args)`` in a new process; wait for its ready message.

        Args:
            name: Names the server in errors and logs.
            target: A module-level function; it must send one picklable value
                through ``conn`` once it serves, then serve until SIGTERM.
            *args: Further arguments, picklable.

        Returns:
            The value the server sent (its endpoints, usually).

        Raises:
            SparseError: The server exited, or sent nothing within
                :data:`READY_TIMEOUT_S`.
        """
        return self.start_all([(name, target, *args)])[0]

    def start_all(self, specs: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Start several servers at once, then wait for each one's ready message.

        Args:
            specs: ``(name, target, *args)`` per server, as for :meth:`start`.

        Returns:
            The values the servers sent, in the order of ``specs``.

        Raises:
            SparseError: A server exited, or sent nothing within
                :data:`READY_TIMEOUT_S`.
        """
        launched = [self._launch(name, target, args) for name, target, *args in specs]
        values = []
        for name, proc, conn in launched:
            try:
                values.append(self._ready(name, proc, conn))
            finally:
                conn.close()
        return values

    def start_with_pipe(
        self, name: str, target: Callable[..., None], *args: Any
    ) -> tuple[Any, multiprocessing.connection.Connection]:
        """Like :meth:`start`, but keep this end of the pipe to talk to the server.

        Returns:
            The value the server sent, and the open pipe end (the caller
            closes it).
        """
        name, proc, conn = self._launch(name, target, args)
        try:
            return self._ready(name, proc, conn), conn
        except BaseException:
            conn.close()
            raise

    def _launch(
        self, name: str, target: Callable[..., None], args: Sequence[Any]
    ) -> tuple[
        str, multiprocessing.process.BaseProcess, multiprocessing.connection.Connection
    ]:
        ours, theirs = self._context.Pipe()
        proc = self._context.Process(
            target=target, args=(theirs, *args), name=name, daemon=True
        )
        proc.start()
        theirs.close()
        self._procs.append((name, proc))
        return name, proc, ours

    @staticmethod
    def _ready(
        name: str,
        proc: multiprocessing.process.BaseProcess,
        conn: multiprocessing.connection.Connection,
    ) -> Any:
        try:
            if not conn.poll(READY_TIMEOUT_S):
                raise SparseError(
                    f"server {name} (pid {proc.pid}) did not report ready within "
                    f"{READY_TIMEOUT_S:.0f}s"
                )
            value = conn.recv()
        except EOFError as exc:
            raise SparseError(
                f"server {name} (pid {proc.pid}) exited with code {proc.exitcode} "
                "before it reported ready"
            ) from exc
        logger.debug("server %s (pid %d) ready: %r", name, proc.pid, value)
        return value

    @property
    def processes(self) -> list[tuple[str, multiprocessing.process.BaseProcess]]:
        """The servers started so far, oldest first, as ``(name, process)``."""
        return list(self._procs)

    def close(self) -> None:
        """SIGTERM every server, newest first; kill those still alive after a wait."""
        for name, proc in reversed(self._procs):
            if proc.is_alive():
                proc.terminate()
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                logger.warning(
                    "server %s (pid %d) ignored SIGTERM; killing it", name, proc.pid
                )
                proc.kill()
                proc.join(STOP_TIMEOUT_S)
        self._procs.clear()

    def __enter__(self) -> Servers:
        """Return the servers."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop every server."""
        self.close()


def median(values: Sequence[float]) -> float:
    """Median of ``values`` (0.0 for none)."""
    return float(statistics.median(values)) if values else 0.0


def render_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Align ``rows`` under ``columns`` as a plain-text table."""
    cells = [[str(c) for c in columns], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def write_csv(
    path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> Path:
    """Write ``rows`` under a header of ``columns``; create the folder if needed.

    Returns:
        The path written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
