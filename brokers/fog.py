"""The fog broker: pairs tasks from masters with free task slots of workers.

The broker knows nothing about models. It owns two bound ROUTER sockets, keeps
a queue of waiting tasks and a queue of free worker slots, pairs them in
arrival order, and routes each reply back along the envelope it came with.

Frames, as each socket sees them (see :mod:`sparse_zmq.protocol` for the
header and the tensor frames)::

    frontend (masters are DEALERs that connect)
        in   [master_id, b"", header(task), *tensors]
        out  [master_id, b"", header(result | error), *tensors]

    backend (workers are DEALERs that connect)
        in   [worker_id, b"", header(ready, meta={"slots": n})]
        in   [worker_id, b"", header(heartbeat | disconnect)]
        out  [worker_id, master_id, b"", header(task), *tensors]
        in   [worker_id, master_id, b"", header(result | error), *tensors]

A worker announces ``n`` free task slots with one ``ready`` (``n`` defaults
to 1); each reply it sends gives one slot back, with no further ``ready``.
``disconnect`` withdraws all of a worker's free slots, and the replies it
sends afterwards give none back until it sends ``ready`` again. Tasks go to
free slots first come first served, in the order the slots became free; a
task that finds no free slot waits in the queue, and queued tasks leave in
arrival order. A task arriving to a full queue is answered with an ``error`` whose
meta holds ``"busy": true``.

Forwarding never decodes tensors: frames are received with ``copy=False``
and the same :class:`zmq.Frame` objects are sent on. Only the header frame is
parsed, and the frame count and sizes are checked against it, on every
receive. A malformed message from a master is answered with an ``error``; a
malformed message from a worker is logged and dropped, except that a reply
to a task in flight on that worker, whose tensor frames do not match its
header, becomes an ``error`` for the master. Either way it is counted in
:attr:`FogBroker.stats` and the loop carries on.

Both ROUTERs are ``ROUTER_MANDATORY``: a send to a peer that has gone away
fails at once. A task that cannot reach its worker goes back to the front of
the queue and that worker's free slots are withdrawn; a reply that cannot
reach its master is dropped with a warning.

Limitations:
    Tasks in flight on a worker that dies are not re-queued: the broker does
    not yet watch worker heartbeats, so such tasks stay in flight and their
    masters see no reply. The frames of each task in flight stay referenced
    until its reply arrives (so it can be re-sent once that is added). A
    reply is only forwarded when it names a task in
    flight on the worker that sends it; any other reply is dropped with a
    warning, since the broker cannot tell where it belongs.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

import zmq

from sparse_zmq.errors import ConfigError, ProtocolError
from sparse_zmq.protocol import (
    Header,
    Kind,
    Limits,
    check_frames,
    error_frames,
    parse_header,
    split_envelope,
)
from sparse_zmq.security import CurveConfig, ServerGuard, secure_server

if TYPE_CHECKING:
    # Only for annotations: typing.Self exists from Python 3.11 on.
    from typing import Self

__all__ = ["BrokerConfig", "FogBroker", "main", "serve"]

logger = logging.getLogger(__name__)

# A task is known by the routing envelope of its master and its id: ids are
# only unique per master.
_TaskKey = tuple[tuple[bytes, ...], str]

_STAT_NAMES = (
    "tasks_received",
    "tasks_dispatched",
    "results_returned",
    "errors_returned",
    "malformed_frontend",
    "malformed_backend",
    "rejected_busy",
    "rejected_duplicate",
    "unmatched_replies",
    "heartbeats",
    "worker_unreachable",
    "master_unreachable",
    "socket_errors",
)


@dataclass(frozen=True)
class BrokerConfig:
    """Tunable limits and timings of a :class:`FogBroker`.

    Attributes:
        max_queued_tasks: Most tasks waiting for a free slot; a task arriving
            when this many wait is answered with a busy error. 0 means tasks
            are only accepted when a slot is free.
        max_worker_slots: Most free slots one worker may hold announced at
            once; a ``ready`` that would exceed it is refused, so one bad
            message cannot grow the slot queue without bound.
        poll_timeout_ms: Longest wait for a message before the stop event is
            checked again, in milliseconds.
        batch: Most messages read from one socket before the other socket
            gets its turn.
        linger_ms: How long closing waits for unsent messages, in
            milliseconds.
        limits: Header and frame limits checked on every receive.
    """

    max_queued_tasks: int = 1000
    max_worker_slots: int = 1024
    poll_timeout_ms: int = 100
    batch: int = 256
    linger_ms: int = 100
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        """Check every field.

        Raises:
            ConfigError: A field is not an integer or is below its minimum.
        """
        minimums = {
            "max_queued_tasks": 0,
            "max_worker_slots": 1,
            "poll_timeout_ms": 1,
            "batch": 1,
            "linger_ms": 0,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if type(value) is not int or value < minimum:
                raise ConfigError(
                    f"BrokerConfig.{name} must be an integer >= {minimum}, "
                    f"got {value!r}"
                )
        if not isinstance(self.limits, Limits):
            raise ConfigError(
                f"BrokerConfig.limits must be a Limits, "
                f"got {type(self.limits).__name__}"
            )


@dataclass(slots=True)
class _Task:
    """A task as received: the master's envelope, its id and its raw frames."""

    route: tuple[bytes, ...]
    task_id: str
    body: list[zmq.Frame]

    @property
    def key(self) -> _TaskKey:
        return (self.route, self.task_id)


@dataclass(slots=True)
class _InFlight:
    """A dispatched task and the worker holding it.

    The frames are kept so that a task whose worker dies can be sent again
    once worker liveness is watched.
    """

    worker: bytes
    task: _Task


def _peer(identity: bytes | Sequence[bytes]) -> str:
    """Readable form of a routing identity or envelope for log lines."""
    if isinstance(identity, bytes):
        return identity.hex()
    return "/".join(part.hex() for part in identity)


class FogBroker:
    """Routes tasks from masters to worker slots and replies back.

    One thread uses a broker at a time: call :meth:`bind`, then :meth:`run`
    in any single thread, then :meth:`close` once :meth:`run` has returned.

    Attributes:
        name: Names the broker in every log line.
        config: Limits and timings.
        stats: Counters, each starting at 0: ``tasks_received`` (well-formed
            tasks, including those then refused as busy or duplicate),
            ``tasks_dispatched`` (sends to a worker, a re-sent task counting
            again), ``results_returned`` and ``errors_returned`` (worker
            replies forwarded to masters), ``malformed_frontend``,
            ``malformed_backend``, ``rejected_busy`` (full queue),
            ``rejected_duplicate`` (task id already queued or in flight from
            the same master), ``unmatched_replies`` (replies naming no task
            in flight on their worker), ``heartbeats``,
            ``worker_unreachable`` and ``master_unreachable`` (sends that
            failed because the peer was gone or its queue full),
            ``socket_errors`` (other ZeroMQ errors around one message).

    Example::

        with FogBroker("tcp://127.0.0.1:*", "tcp://127.0.0.1:*") as broker:
            frontend, backend = broker.bind()
            broker.run(stop_event)
    """

    def __init__(
        self,
        frontend: str,
        backend: str,
        *,
        config: BrokerConfig | None = None,
        name: str = "broker",
        context: zmq.Context[Any] | None = None,
        curve: CurveConfig | None = None,
    ) -> None:
        """Create the broker's sockets; nothing is bound yet.

        Args:
            frontend: Endpoint to bind for masters, e.g. ``tcp://*:5555``;
                ``tcp://127.0.0.1:*`` picks a free port.
            backend: Endpoint to bind for workers.
            config: Limits and timings; defaults to :class:`BrokerConfig`.
            name: Names the broker in log lines.
            context: ZeroMQ context to use; when omitted the broker makes its
                own and terminates it on :meth:`close`.
            curve: CURVE keys: both sockets then encrypt and accept only the
                listed client keys (see :mod:`sparse_zmq.security`).
        """
        self.name = name
        self.config = config if config is not None else BrokerConfig()
        self.stats: dict[str, int] = dict.fromkeys(_STAT_NAMES, 0)
        self._requested = (frontend, backend)
        self._endpoints: tuple[str, str] | None = None
        self._closed = False

        self._own_context = context is None
        self._context: zmq.Context[Any] = zmq.Context() if context is None else context
        self._frontend = self._router()
        self._backend = self._router()
        self._curve: list[ServerGuard] = []
        if curve is not None:
            self._curve = [
                secure_server(sock, curve) for sock in (self._frontend, self._backend)
            ]

        self._queue: collections.deque[_Task] = collections.deque()
        self._queued_keys: set[_TaskKey] = set()
        self._free_slots: collections.deque[bytes] = collections.deque()
        self._slot_count: collections.Counter[bytes] = collections.Counter()
        # Tasks in flight per worker, and the workers that sent disconnect
        # while holding tasks: their replies give no slot back.
        self._busy: collections.Counter[bytes] = collections.Counter()
        self._departed: set[bytes] = set()
        self._in_flight: dict[_TaskKey, _InFlight] = {}

    def _router(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, self.config.linger_ms)
        return sock

    @property
    def queued(self) -> int:
        """Tasks waiting for a free slot."""
        return len(self._queue)

    @property
    def free_slots(self) -> int:
        """Free task slots announced by workers and not yet used."""
        return len(self._free_slots)

    @property
    def in_flight(self) -> int:
        """Tasks dispatched to a worker and not yet answered."""
        return len(self._in_flight)

    def bind(self) -> tuple[str, str]:
        """Bind both sockets; a second call returns the same endpoints.

        Returns:
            The endpoints actually bound, ``(frontend, backend)``, with any
            wildcard port resolved.

        Raises:
            ConfigError: An endpoint is malformed or cannot be bound.
        """
        if self._endpoints is not None:
            return self._endpoints
        if self._closed:
            raise ConfigError(f"broker {self.name} is closed and cannot bind")
        bound = []
        for role, sock, endpoint in (
            ("frontend", self._frontend, self._requested[0]),
            ("backend", self._backend, self._requested[1]),
        ):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                raise ConfigError(
                    f"broker {self.name} cannot bind its {role} to {endpoint!r}: {exc}"
                ) from exc
            bound.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._endpoints = (bound[0], bound[1])
        logger.info("%s: bound frontend %s, backend %s", self.name, bound[0], bound[1])
        return self._endpoints

    def run(self, stop: threading.Event) -> None:
        """Route messages until ``stop`` is set (binding first if needed).

        Args:
            stop: Checked at least every ``config.poll_timeout_ms``.

        Raises:
            ConfigError: The broker is closed or cannot bind.
        """
        if self._closed:
            raise ConfigError(f"broker {self.name} is closed and cannot run")
        frontend, backend = self.bind()
        poller = zmq.Poller()
        poller.register(self._frontend, zmq.POLLIN)
        poller.register(self._backend, zmq.POLLIN)
        logger.info(
            "%s: running, masters at %s, workers at %s", self.name, frontend, backend
        )

        while not stop.is_set():
            ready = dict(poller.poll(self.config.poll_timeout_ms))
            # Replies first: each one frees a slot a waiting task can use.
            if self._backend in ready:
                self._drain(self._backend, self._on_backend)
            if self._frontend in ready:
                self._drain(self._frontend, self._on_frontend)

        logger.info(
            "%s: stopped with %d queued, %d in flight; %s",
            self.name,
            self.queued,
            self.in_flight,
            " ".join(f"{k}={v}" for k, v in self.stats.items()),
        )

    def close(self) -> None:
        """Close both sockets, waiting at most ``config.linger_ms`` for sends."""
        if self._closed:
            return
        self._closed = True
        self._frontend.close(linger=self.config.linger_ms)
        self._backend.close(linger=self.config.linger_ms)
        for guard in self._curve:
            guard.release()
        if self._own_context:
            self._context.term()
        logger.info("%s: closed", self.name)

    def __enter__(self) -> Self:
        """Return the broker itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the broker."""
        self.close()

    # Receiving.

    def _drain(
        self, sock: zmq.Socket[Any], handle: Callable[[list[zmq.Frame]], None]
    ) -> None:
        """Handle up to ``config.batch`` waiting messages from ``sock``."""
        for _ in range(self.config.batch):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                handle(frames)
            except (ProtocolError, zmq.ZMQError) as exc:
                # The handlers answer protocol faults themselves; this only
                # keeps the loop alive if one slips through.
                self.stats["socket_errors"] += 1
                logger.warning(
                    "%s: message from %s dropped: %s: %s",
                    self.name,
                    _peer(frames[0].bytes),
                    exc.__class__.__name__,
                    exc,
                )

    def _parse_header(self, body: Sequence[zmq.Frame]) -> Header:
        """Parse the header frame of ``[header, *tensors]``."""
        if not body:
            raise ProtocolError("message has no header frame after its delimiter")
        return parse_header(body[0], self.config.limits)

    def _on_frontend(self, frames: list[zmq.Frame]) -> None:
        """Check a message from a master, then queue and dispatch its task."""
        route: tuple[bytes, ...] = (frames[0].bytes,)
        task_id = ""
        try:
            envelope, body = split_envelope(frames)
            route = tuple(frame.bytes for frame in envelope)
            header = self._parse_header(body)
            task_id = header.task_id
            if header.kind is not Kind.TASK:
                raise ProtocolError(
                    f"masters may only send {Kind.TASK.value!r} messages, "
                    f"got {header.kind.value!r}"
                )
            if not task_id:
                raise ProtocolError("a task needs a non-empty id, got ''")
            check_frames(header, body[1:], self.config.limits)
        except ProtocolError as exc:
            self.stats["malformed_frontend"] += 1
            logger.warning(
                "%s: malformed message from master %s (task %r): %s",
                self.name,
                _peer(route),
                task_id,
                exc,
            )
            self._send_master(route, task_id, error_frames(task_id, str(exc)))
            return

        self.stats["tasks_received"] += 1
        task = _Task(route, task_id, body)
        if task.key in self._queued_keys or task.key in self._in_flight:
            self.stats["rejected_duplicate"] += 1
            reason = (
                f"task id {task_id!r} is already queued or in flight for this master"
            )
            logger.warning("%s: master %s: %s", self.name, _peer(route), reason)
            self._send_master(route, task_id, error_frames(task_id, reason))
            return
        if not self._free_slots and len(self._queue) >= self.config.max_queued_tasks:
            self.stats["rejected_busy"] += 1
            reason = (
                f"broker {self.name} is busy: {len(self._queue)} tasks wait for a "
                f"worker, the queue limit (max_queued_tasks) is "
                f"{self.config.max_queued_tasks}"
            )
            logger.warning(
                "%s: task %r of master %s refused, queue full (%d)",
                self.name,
                task_id,
                _peer(route),
                len(self._queue),
            )
            self._send_master(route, task_id, error_frames(task_id, reason, busy=True))
            return

        self._queue.append(task)
        self._queued_keys.add(task.key)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s: task %r of master %s with %d tensors queued (%d waiting)",
                self.name,
                task_id,
                _peer(route),
                len(body) - 1,
                len(self._queue),
            )
        self._dispatch()

    def _on_backend(self, frames: list[zmq.Frame]) -> None:
        """Check a message from a worker and act on its kind."""
        worker = frames[0].bytes
        try:
            envelope, body = split_envelope(frames[1:])
            header = self._parse_header(body)
            is_reply = header.kind in (Kind.RESULT, Kind.ERROR)
            if not is_reply:
                if envelope:
                    raise ProtocolError(
                        f"a {header.kind.value!r} message must not carry a routing "
                        f"envelope, got {len(envelope)} envelope frames"
                    )
                check_frames(header, body[1:], self.config.limits)
        except ProtocolError as exc:
            self._backend_fault(worker, str(exc))
            return

        if is_reply:
            self._on_reply(worker, envelope, header, body)
        elif header.kind is Kind.READY:
            self._on_ready(worker, header)
        elif header.kind is Kind.HEARTBEAT:
            self.stats["heartbeats"] += 1
            logger.debug("%s: heartbeat from worker %s", self.name, _peer(worker))
        elif header.kind is Kind.DISCONNECT:
            withdrawn = self._withdraw_slots(worker)
            if self._busy[worker]:
                self._departed.add(worker)
            logger.info(
                "%s: worker %s disconnected, %d free slots withdrawn, %d tasks "
                "still in flight on it",
                self.name,
                _peer(worker),
                withdrawn,
                self._busy[worker],
            )
        else:
            self._backend_fault(
                worker, f"workers may not send {header.kind.value!r} messages"
            )

    def _backend_fault(self, worker: bytes, reason: str) -> None:
        self.stats["malformed_backend"] += 1
        logger.warning(
            "%s: malformed message from worker %s: %s", self.name, _peer(worker), reason
        )

    def _on_ready(self, worker: bytes, header: Header) -> None:
        """Add the slots a ``ready`` announces to the back of the slot queue."""
        slots = header.meta.get("slots", 1)
        held = self._slot_count[worker]
        limit = self.config.max_worker_slots
        if type(slots) is not int or slots < 1 or held + slots > limit:
            self._backend_fault(
                worker,
                f"ready must announce an integer number of slots >= 1, keeping the "
                f"worker's free slots at most {limit} (it holds {held}), "
                f"got slots={slots!r:.40}",
            )
            return
        self._departed.discard(worker)
        self._free_slots.extend([worker] * slots)
        self._slot_count[worker] += slots
        logger.debug(
            "%s: worker %s ready with %d slots", self.name, _peer(worker), slots
        )
        self._dispatch()

    def _on_reply(
        self,
        worker: bytes,
        envelope: list[zmq.Frame],
        header: Header,
        body: list[zmq.Frame],
    ) -> None:
        """Forward a worker's reply to its master; give the slot back if it stays."""
        route = tuple(frame.bytes for frame in envelope)
        key = (route, header.task_id)
        flight = self._in_flight.get(key)
        if flight is None or flight.worker != worker:
            self.stats["unmatched_replies"] += 1
            logger.warning(
                "%s: worker %s sent a %s for task %r of master %s, which is not in "
                "flight on that worker; dropped",
                self.name,
                _peer(worker),
                header.kind.value,
                header.task_id,
                _peer(route),
            )
            return
        del self._in_flight[key]
        self._busy[worker] -= 1
        if not self._busy[worker]:
            del self._busy[worker]
        if worker not in self._departed:
            self._free_slots.append(worker)
            self._slot_count[worker] += 1
        elif worker not in self._busy:
            self._departed.discard(worker)

        try:
            check_frames(header, body[1:], self.config.limits)
        except ProtocolError as exc:
            # The worker did answer, so its slot was given back; the master
            # learns that the task failed instead of waiting for it.
            self._backend_fault(
                worker, f"{header.kind.value} for task {header.task_id!r}: {exc}"
            )
            reason = (
                f"worker {_peer(worker)} sent a malformed {header.kind.value}: {exc}"
            )
            self._send_master(
                route, header.task_id, error_frames(header.task_id, reason)
            )
        else:
            if self._send_master(route, header.task_id, body):
                counter = (
                    "results_returned"
                    if header.kind is Kind.RESULT
                    else "errors_returned"
                )
                self.stats[counter] += 1
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug(
                        "%s: %s for task %r from worker %s returned to master %s",
                        self.name,
                        header.kind.value,
                        header.task_id,
                        _peer(worker),
                        _peer(route),
                    )
        self._dispatch()

    # Sending.

    def _dispatch(self) -> None:
        """Pair queued tasks with free slots, oldest with oldest."""
        while self._queue and self._free_slots:
            worker = self._free_slots.popleft()
            self._slot_count[worker] -= 1
            if not self._slot_count[worker]:
                del self._slot_count[worker]
            task = self._queue.popleft()
            self._queued_keys.discard(task.key)
            try:
                self._backend.send_multipart(
                    [worker, *task.route, b"", *task.body], zmq.NOBLOCK, copy=False
                )
            except zmq.ZMQError as exc:
                # Gone (EHOSTUNREACH) or not reading (EAGAIN): either way its
                # other free slots are no good, and the task is next in line.
                self.stats["worker_unreachable"] += 1
                withdrawn = self._withdraw_slots(worker)
                self._queue.appendleft(task)
                self._queued_keys.add(task.key)
                logger.warning(
                    "%s: cannot reach worker %s (%s); task %r of master %s put back "
                    "at the front of the queue, %d more free slots of that worker "
                    "withdrawn",
                    self.name,
                    _peer(worker),
                    exc,
                    task.task_id,
                    _peer(task.route),
                    withdrawn,
                )
                continue
            self._in_flight[task.key] = _InFlight(worker, task)
            self._busy[worker] += 1
            self.stats["tasks_dispatched"] += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "%s: task %r of master %s sent to worker %s",
                    self.name,
                    task.task_id,
                    _peer(task.route),
                    _peer(worker),
                )

    def _withdraw_slots(self, worker: bytes) -> int:
        """Remove every free slot of ``worker``; return how many there were."""
        count = self._slot_count.pop(worker, 0)
        if count:
            self._free_slots = collections.deque(
                w for w in self._free_slots if w != worker
            )
        return count

    def _send_master(
        self, route: tuple[bytes, ...], task_id: str, body: Sequence[Any]
    ) -> bool:
        """Send ``body`` to the master at ``route``; False if it cannot be reached."""
        try:
            self._frontend.send_multipart([*route, b"", *body], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            self.stats["master_unreachable"] += 1
            logger.warning(
                "%s: cannot reach master %s (%s); reply for task %r dropped",
                self.name,
                _peer(route),
                exc,
                task_id,
            )
            return False
        return True


def _write_ready_file(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as JSON so that readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content), encoding="utf-8")
    os.replace(tmp, path)


def serve(
    frontend: str,
    backend: str,
    *,
    config: BrokerConfig | None = None,
    ready_file: Path | None = None,
    name: str = "broker",
    curve: CurveConfig | None = None,
) -> dict[str, int]:
    """Run a broker in this process until SIGINT or SIGTERM.

    Must be called from the main thread (signal handlers can only be
    installed there); the previous handlers are restored on return.

    Args:
        frontend: Endpoint to bind for masters.
        backend: Endpoint to bind for workers.
        config: Limits and timings.
        ready_file: If given, once both sockets are bound this file receives
            ``{"frontend": ..., "backend": ..., "pid": ...}`` as JSON,
            written atomically, so a launcher can wait for it.
        name: Names the broker in log lines.
        curve: CURVE keys for both sockets; None for plain sockets.

    Returns:
        The broker's final counters.

    Raises:
        ConfigError: An endpoint cannot be bound or the config is invalid.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("%s: got %s, stopping", name, signal.Signals(signum).name)
        stop.set()

    previous = {
        sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        with FogBroker(
            frontend, backend, config=config, name=name, curve=curve
        ) as broker:
            bound_frontend, bound_backend = broker.bind()
            if ready_file is not None:
                _write_ready_file(
                    Path(ready_file),
                    {
                        "frontend": bound_frontend,
                        "backend": bound_backend,
                        "pid": os.getpid(),
                    },
                )
            broker.run(stop)
            return dict(broker.stats)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: parse options, set up logging and :func:`serve`.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` if None.

    Returns:
        The process exit status: 0 after a signal stopped the broker, 2 when
        an option or endpoint is invalid.
    """
    parser = argparse.ArgumentParser(
        description="Run a sparse-zmq fog broker until SIGINT or SIGTERM."
    )
    parser.add_argument(
        "--frontend", required=True, help="endpoint to bind for masters"
    )
    parser.add_argument("--backend", required=True, help="endpoint to bind for workers")
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="write the bound endpoints here as JSON once listening",
    )
    parser.add_argument(
        "--max-queued-tasks",
        type=int,
        default=BrokerConfig.max_queued_tasks,
        help="tasks that may wait for a worker before new ones get a busy error "
        "(default: %(default)s)",
    )
    parser.add_argument("--name", default="broker", help="names the broker in logs")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        serve(
            args.frontend,
            args.backend,
            config=BrokerConfig(max_queued_tasks=args.max_queued_tasks),
            ready_file=args.ready_file,
            name=args.name,
        )
    except ConfigError as exc:
        logger.error("%s: %s", args.name, exc)
        return 2
    return 0
