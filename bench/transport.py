"""Transport benchmark: round trips of one float32 tensor, four ways, side by side.

Run it as::

    python -m bench.transport [--quick] [--out DIR]

Each method echoes a float32 tensor of 1 KiB, 1 MiB and 16 MiB back to the
sender, with 1 and 8 requests in flight; every server runs in its own
process, the client in this one:

``raw-socket``
    Python sockets: one TCP connection per request in flight (a client
    thread each), a length prefix, ``recv_into`` a reused buffer and
    ``sendall`` back. What the kernel's loopback gives Python.
``zmq-direct``
    A pyzmq DEALER sends ``[b"", tensor]`` with ``copy=False`` to a ROUTER
    that sends the received frames straight back. No header, no codec.
``bare-broker``
    The floor of any brokered design written in Python: the same DEALER
    client, a ROUTER-to-ROUTER forwarder process and an echo worker process
    that move frames and nothing else (no header, codec, checks, queues,
    heartbeats or bookkeeping). It shows what the doubled hops cost by
    themselves, and so how much of the gap between ``sparse-zmq`` and
    ``zmq-direct`` is ours.
``sparse-zmq``
    Our real path: :class:`~sparse_zmq.master.Master` -> :class:`brokers.fog.FogBroker`
    -> :class:`~sparse_zmq.stage.StageRuntime` running an echo stage -> broker
    -> master, with our header, codec and checks; broker and worker each in
    their own process. Twice the hops of ``zmq-direct``, so about half its
    rate is the limit of the design for large tensors.
``seed-baseline``
    The Sparse prototype's transport (:mod:`bench.seed_baseline`): a new TCP
    connection per task, pickled request and reply, asyncio streams.

The cells are measured in rounds: each round visits every (payload, in
flight) pair and, within it, every method in turn, so slow drifts of the
machine's load touch all methods alike. A cell first completes one round
trip per request in flight (connections made, buffers warm), then counts
round trips until both a minimum time and a minimum count are reached, the
pipeline kept full all along. The reported rate is the median over rounds.

``transport.csv`` (in ``--out``, default the current folder) has the columns
``method, payload_bytes, in_flight, round_trips_per_s, mb_per_s``, where
``mb_per_s`` counts payload bytes carried both ways, in 10^6 bytes per
second. The table and a line of ratios (``sparse-zmq`` over ``zmq-direct``
and over ``seed-baseline``) go to standard output.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing.connection
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq

from bench._common import (
    LOOPBACK_TCP,
    Servers,
    median,
    render_table,
    serve_broker,
    stop_event_on_sigterm,
    write_csv,
)
from bench.seed_baseline import SeedClient
from bench.seed_baseline import serve as serve_seed_baseline
from sparse_zmq.master import Master
from sparse_zmq.stage import Result, Stage, StageRuntime, Task

__all__ = [
    "COLUMNS",
    "IN_FLIGHT",
    "METHODS",
    "PAYLOADS",
    "Cell",
    "EchoStage",
    "Settings",
    "main",
    "run",
]

logger = logging.getLogger(__name__)

PAYLOADS = (1024, 1024**2, 16 * 1024**2)
"""Tensor sizes in bytes: 1 KiB, 1 MiB and 16 MiB of float32."""

IN_FLIGHT = (1, 8)
"""Requests kept outstanding by the client."""

METHODS = ("raw-socket", "zmq-direct", "bare-broker", "sparse-zmq", "seed-baseline")

COLUMNS = ("method", "payload_bytes", "in_flight", "round_trips_per_s", "mb_per_s")

REPLY_TIMEOUT_S = 120.0
"""Longest wait for one reply before the benchmark gives up (noisy 2-core box)."""

# The goals of issue 5: (payload, in flight or None for both, minimum ratio).
GOALS_VS_DIRECT = ((16 * 1024**2, None, 0.45), (1024**2, None, 0.4))
GOALS_VS_SEED = ((16 * 1024**2, None, 3.5), (1024**2, None, 3.5), (1024, 8, 2.0))

_LENGTH = struct.Struct("!Q")


@dataclass(frozen=True)
class Settings:
    """How long each cell is measured.

    Attributes:
        rounds: Rounds over all cells; the median is reported.
        min_s: Least time a cell is timed for, in seconds.
        min_count: Least round trips a cell is timed for.
    """

    rounds: int
    min_s: float
    min_count: int


QUICK = Settings(rounds=3, min_s=0.2, min_count=3)
FULL = Settings(rounds=5, min_s=1.0, min_count=6)


@dataclass(frozen=True)
class Cell:
    """One measured line of the table."""

    method: str
    payload_bytes: int
    in_flight: int
    round_trips_per_s: float

    @property
    def mb_per_s(self) -> float:
        """Payload carried per second, both ways, in 10^6 bytes."""
        return self.round_trips_per_s * self.payload_bytes * 2 / 1e6

    def row(self) -> list[object]:
        """The cell as a CSV row."""
        return [
            self.method,
            self.payload_bytes,
            self.in_flight,
            round(self.round_trips_per_s, 3),
            round(self.mb_per_s, 3),
        ]


class _Clock:
    """Times the steady state of a cell.

    The first ``warm`` completions only fill the pipeline (connections made,
    every request in flight under way); the clock starts at the last of them
    and counts completions until both ``min_s`` and ``min_count`` are reached.
    Safe to call from several threads.
    """

    def __init__(self, settings: Settings, warm: int) -> None:
        self.settings = settings
        self.warm = warm
        self.completed = 0
        self.started = 0.0
        self.last = 0.0
        self._lock = threading.Lock()

    def done_one(self) -> None:
        now = time.perf_counter()
        with self._lock:
            self.completed += 1
            if self.completed == self.warm:
                self.started = now
            self.last = now

    @property
    def counted(self) -> int:
        return max(0, self.completed - self.warm)

    @property
    def running(self) -> bool:
        return (
            self.completed < self.warm
            or self.counted < self.settings.min_count
            or time.perf_counter() - self.started < self.settings.min_s
        )

    @property
    def rate(self) -> float:
        elapsed = self.last - self.started
        return self.counted / elapsed if self.counted and elapsed > 0 else 0.0


# Servers, one process each.


def _serve_raw(conn: multiprocessing.connection.Connection) -> None:
    """Echo length-prefixed messages, one thread per connection."""
    stop = stop_event_on_sigterm()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    conn.send(listener.getsockname())
    conn.close()
    while not stop.is_set():
        try:
            peer, _ = listener.accept()
        except TimeoutError:
            continue
        threading.Thread(target=_raw_echo, args=(peer,), daemon=True).start()
    listener.close()


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _raw_echo(peer: socket.socket) -> None:
    buffer = bytearray(_LENGTH.size)
    head = bytearray(_LENGTH.size)
    with peer:
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while _recv_exact(peer, memoryview(head)):
            (size,) = _LENGTH.unpack(head)
            if len(buffer) < size:
                buffer = bytearray(size)
            body = memoryview(buffer)[:size]
            if not _recv_exact(peer, body):
                return
            peer.sendall(head)
            peer.sendall(body)


def _serve_zmq_echo(conn: multiprocessing.connection.Connection) -> None:
    """A ROUTER that sends every message straight back, frames untouched."""
    stop = stop_event_on_sigterm()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(LOOPBACK_TCP)
    conn.send(router.getsockopt_string(zmq.LAST_ENDPOINT))
    conn.close()
    while not stop.is_set():
        if router.poll(100):
            router.send_multipart(router.recv_multipart(copy=False), copy=False)
    router.close()
    context.term()


def _serve_bare_broker(conn: multiprocessing.connection.Connection) -> None:
    """A ROUTER-to-ROUTER forwarder that moves frames and does nothing else.

    The worker announces itself with one frame; every client message goes to
    it with the client's identity in front, every reply back by that identity.
    Sends ``(frontend, backend)`` through ``conn``.
    """
    stop = stop_event_on_sigterm()
    context = zmq.Context()
    frontend = context.socket(zmq.ROUTER)
    backend = context.socket(zmq.ROUTER)
    for sock in (frontend, backend):
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(LOOPBACK_TCP)
    conn.send(
        tuple(s.getsockopt_string(zmq.LAST_ENDPOINT) for s in (frontend, backend))
    )
    conn.close()
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    worker = None
    while not stop.is_set():
        ready = dict(poller.poll(100))
        if backend in ready:
            frames = backend.recv_multipart(copy=False)
            if len(frames) == 2:
                worker = frames[0]
            else:
                frontend.send_multipart(frames[1:], copy=False)
        if frontend in ready and worker is not None:
            backend.send_multipart([worker, *frontend.recv_multipart(copy=False)], copy=False)
    frontend.close()
    backend.close()
    context.term()


def _serve_bare_worker(conn: multiprocessing.connection.Connection, backend: str) -> None:
    """A DEALER that announces itself once, then echoes every message as received."""
    stop = stop_event_on_sigterm()
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(backend)
    dealer.send(b"ready")
    conn.send(True)
    conn.close()
    while not stop.is_set():
        if dealer.poll(100):
            dealer.send_multipart(dealer.recv_multipart(copy=False), copy=False)
    dealer.close()
    context.term()


class EchoStage(Stage):
    """A last stage that answers every task with its own tensors."""

    name = "echo"

    def process(self, task: Task) -> Result:
        """Return the task's tensors unchanged."""
        return Result(task.tensors)


def _serve_echo_stage(
    conn: multiprocessing.connection.Connection, backend: str, slots: int
) -> None:
    """A stage runtime serving :class:`EchoStage` as a worker of ``backend``."""
    torch.set_num_threads(1)
    stop = stop_event_on_sigterm()
    runtime = StageRuntime(EchoStage(), backend, node="bench-worker", slots=slots)
    conn.send(True)
    conn.close()
    try:
        runtime.run(stop)
    finally:
        runtime.close()


# Clients, in this process.


def _measure_raw(
    address: tuple[str, int], tensor: torch.Tensor, in_flight: int, settings: Settings
) -> float:
    payload = memoryview(tensor.numpy()).cast("B")
    head = _LENGTH.pack(payload.nbytes)
    socks = [socket.create_connection(address) for _ in range(in_flight)]
    clock = _Clock(settings, warm=in_flight)
    errors: list[BaseException] = []

    def client(sock: socket.socket) -> None:
        reply = memoryview(bytearray(_LENGTH.size + payload.nbytes))
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while clock.running:
                sock.sendall(head)
                sock.sendall(payload)
                if not _recv_exact(sock, reply):
                    raise ConnectionError(
                        "raw-socket echo server closed the connection"
                    )
                clock.done_one()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in socks]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(REPLY_TIMEOUT_S)
    finally:
        for sock in socks:
            sock.close()
    if errors:
        raise errors[0]
    return clock.rate


def _keep_in_flight(
    send: Callable[[], None],
    receive: Callable[[], None],
    in_flight: int,
    settings: Settings,
) -> float:
    """Keep ``in_flight`` requests outstanding on one socket; return the steady rate."""
    clock = _Clock(settings, warm=in_flight)
    for _ in range(in_flight):
        send()
    outstanding = in_flight
    while outstanding:
        receive()
        outstanding -= 1
        clock.done_one()
        if clock.running:
            send()
            outstanding += 1
    return clock.rate


def _measure_zmq(
    endpoint: str,
    context: zmq.Context,
    tensor: torch.Tensor,
    in_flight: int,
    settings: Settings,
) -> float:
    payload = memoryview(tensor.numpy()).cast("B")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)

    def send() -> None:
        dealer.send_multipart([b"", payload], copy=False)

    def receive() -> None:
        if not dealer.poll(int(REPLY_TIMEOUT_S * 1000)):
            raise TimeoutError(f"echo at {endpoint} did not answer")
        frames = dealer.recv_multipart(copy=False)
        if len(frames[-1]) != payload.nbytes:
            raise ValueError(
                f"echo of {payload.nbytes} bytes came back as {len(frames[-1])}"
            )

    try:
        return _keep_in_flight(send, receive, in_flight, settings)
    finally:
        dealer.close()


def _measure_sparse(
    master: Master, tensor: torch.Tensor, in_flight: int, settings: Settings
) -> float:
    def send() -> None:
        master.submit("echo", {"x": tensor})

    def receive() -> None:
        reply = master.receive(REPLY_TIMEOUT_S)
        if reply is None:
            raise TimeoutError(f"sparse-zmq echo via {master.endpoint} did not answer")
        echoed = reply.raise_for_error().tensors["x"]
        if echoed.shape != tensor.shape:
            raise ValueError(
                f"echo of shape {list(tensor.shape)} came back as {list(echoed.shape)}"
            )

    return _keep_in_flight(send, receive, in_flight, settings)


def _measure_seed(
    address: tuple[str, int], tensor: torch.Tensor, in_flight: int, settings: Settings
) -> float:
    client = SeedClient(*address)
    labels = torch.empty(0, dtype=torch.int64)

    async def one() -> None:
        gradient, _ = await client.train(tensor, labels)
        if gradient.shape != tensor.shape:
            raise ValueError(
                f"echo of shape {list(tensor.shape)} came back as "
                f"{list(gradient.shape)}"
            )

    async def worker(clock: _Clock) -> None:
        while clock.running:
            await one()
            clock.done_one()

    async def measure() -> float:
        clock = _Clock(settings, warm=in_flight)
        await asyncio.wait_for(
            asyncio.gather(*(worker(clock) for _ in range(in_flight))),
            REPLY_TIMEOUT_S * 10,
        )
        return clock.rate

    return asyncio.run(measure())


# The run.


def run(
    settings: Settings,
    *,
    payloads: Sequence[int] = PAYLOADS,
    in_flights: Sequence[int] = IN_FLIGHT,
    methods: Sequence[str] = METHODS,
) -> list[Cell]:
    """Start the servers, measure every cell in interleaved rounds, stop the servers.

    Returns:
        One :class:`Cell` per method, payload and in-flight count, each the
        median of ``settings.rounds`` measurements.
    """
    tensors = {size: torch.randn(size // 4) for size in payloads}
    samples: dict[tuple[str, int, int], list[float]] = {}
    context = zmq.Context()
    with Servers() as servers:
        raw, echo, bare, (frontend, backend), seed = servers.start_all(
            [
                ("raw-socket", _serve_raw),
                ("zmq-direct", _serve_zmq_echo),
                ("bare-broker", _serve_bare_broker),
                ("broker", serve_broker),
                ("seed-baseline", serve_seed_baseline),
            ]
        )
        servers.start_all(
            [
                ("bare-worker", _serve_bare_worker, bare[1]),
                ("worker", _serve_echo_stage, backend, max(in_flights)),
            ]
        )
        master = Master(
            frontend, name="bench", context=context, task_timeout_s=REPLY_TIMEOUT_S
        )
        measure: dict[str, Callable[[torch.Tensor, int], float]] = {
            "raw-socket": lambda t, k: _measure_raw(raw, t, k, settings),
            "zmq-direct": lambda t, k: _measure_zmq(echo, context, t, k, settings),
            "bare-broker": lambda t, k: _measure_zmq(bare[0], context, t, k, settings),
            "sparse-zmq": lambda t, k: _measure_sparse(master, t, k, settings),
            "seed-baseline": lambda t, k: _measure_seed(seed, t, k, settings),
        }
        try:
            for round_index in range(settings.rounds):
                for size in payloads:
                    for in_flight in in_flights:
                        for method in methods:
                            rate = measure[method](tensors[size], in_flight)
                            samples.setdefault((method, size, in_flight), []).append(
                                rate
                            )
                            logger.info(
                                "round %d %s %d B x%d: %.1f round trips/s",
                                round_index,
                                method,
                                size,
                                in_flight,
                                rate,
                            )
        finally:
            master.close()
            context.destroy(linger=0)
    return [
        Cell(method, size, in_flight, median(samples[(method, size, in_flight)]))
        for size in payloads
        for in_flight in in_flights
        for method in methods
    ]


def ratios(cells: Sequence[Cell]) -> list[tuple[str, int, int, float, float | None]]:
    """``sparse-zmq`` over ``zmq-direct`` and ``seed-baseline``, per cell.

    Returns:
        ``(versus, payload_bytes, in_flight, ratio, goal)`` per pair found,
        ``goal`` being the minimum issue 5 asks for, or None.
    """
    by_key = {
        (c.method, c.payload_bytes, c.in_flight): c.round_trips_per_s for c in cells
    }
    out = []
    for versus, goals in (
        ("zmq-direct", GOALS_VS_DIRECT),
        ("bare-broker", ()),
        ("seed-baseline", GOALS_VS_SEED),
    ):
        for (method, size, in_flight), rate in by_key.items():
            other = by_key.get((versus, size, in_flight))
            if method != "sparse-zmq" or not other:
                continue
            goal = next(
                (g for s, k, g in goals if s == size and k in (None, in_flight)), None
            )
            out.append((versus, size, in_flight, rate / other, goal))
    return out


def _size(n: int) -> str:
    return f"{n // 1024**2} MiB" if n >= 1024**2 else f"{n // 1024} KiB"


def render(cells: Sequence[Cell]) -> str:
    """The table and the ratio lines, as printed."""
    table = render_table(
        ("method", "payload", "in flight", "round trips/s", "MB/s (both ways)"),
        [
            (
                c.method,
                _size(c.payload_bytes),
                c.in_flight,
                c.round_trips_per_s,
                c.mb_per_s,
            )
            for c in cells
        ],
    )
    lines = [table, ""]
    for versus, size, in_flight, ratio, goal in ratios(cells):
        verdict = (
            ""
            if goal is None
            else f" (goal >= {goal:g}: {'met' if ratio >= goal else 'MISSED'})"
        )
        lines.append(
            f"ratio sparse-zmq/{versus} {_size(size)} x{in_flight}: "
            f"{ratio:.2f}{verdict}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: measure, print table and ratios, write ``transport.csv``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.transport", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="short cells and 3 rounds (about a minute)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("."), help="folder for transport.csv"
    )
    parser.add_argument("--log-level", default="WARNING", help="(default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cells = run(QUICK if args.quick else FULL)
    path = write_csv(args.out / "transport.csv", COLUMNS, [c.row() for c in cells])
    sys.stdout.write(render(cells) + f"\n\nwrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
