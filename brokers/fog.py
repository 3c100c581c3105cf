"""The fog broker: pairs tasks from masters with free task slots of workers.

The broker knows nothing about models. It owns two bound ROUTER sockets, keeps
a queue of waiting tasks and a queue of free worker slots, pairs them in
arrival order, and routes each reply back along the envelope it came with.

Frames, as each socket sees them (see :mod:`sparse_zmq.protocol` for the
header and the tensor frames)::

    frontend (masters are DEALERs that connect)
        in   [master_id, b"", header(task), *tensors]
        out  [master_id, b"", header(result | error), *tensors]
        in   [master_id, b"", header(heartbeat)]
        out  [master_id, b"", header(heartbeat, meta=broker, interval_s,
                                               liveness, stats)]

    backend (workers are DEALERs that connect)
        in   [worker_id, b"", header(ready, meta={"slots": n})]
        in   [worker_id, b"", header(heartbeat | disconnect)]
        out  [worker_id, b"", header(heartbeat, meta=broker, interval_s, liveness)]
        out  [worker_id, b"", header(disconnect)]
        out  [worker_id, master_id, b"", header(task), *tensors]
        in   [worker_id, master_id, b"", header(result | error), *tensors]

Scheduling. A worker announces ``n`` free task slots with one ``ready`` (``n``
defaults to 1); each reply it sends gives one slot back, with no further
``ready``. ``disconnect`` withdraws all of a worker's free slots, and the
replies it sends afterwards give none back until it sends ``ready`` again.
Tasks go to free slots first come first served, in the order the slots
became free; a task that finds no free slot waits, and waiting tasks leave in
arrival order.

Training streams are pinned. A task whose meta holds a ``stream`` (a string
naming a training stream; the source and every intermediate stage set one)
goes to the worker that served the first task of that stream, for as long as
that worker lives, because a training stage keeps parameters and optimizer
state in its memory. While that worker has no free slot, the stream's tasks
wait for it even if other workers are idle. Tasks without a ``stream``
(inference) go to any free slot. When the pinned worker is lost, the stream
is pinned afresh to whichever worker takes its next task; that worker's
parameters are not the lost worker's, so training carries on from another
replica's state (or a checkpoint, if the new worker loaded one). A stream is
named by its string alone, so a master restarted under the same stream name
reaches the same worker. The broker remembers at most
``BrokerConfig.max_streams`` pins and forgets the least recently used.

Liveness. The broker sends each known worker a ``heartbeat`` every
``heartbeat_interval_s`` and expects any message from it at least every
``heartbeat_interval_s * liveness`` seconds; the heartbeat tells the worker
both numbers. A worker silent for longer (killed, stopped, cut off), or one
that a send finds gone (``ROUTER_MANDATORY`` reports it at once), is declared
lost: its free slots are withdrawn, its tasks in flight and the tasks waiting
for it go back to the front of the queue, in their arrival order, and its
streams are unpinned. A worker that talks to the broker without being known
(it was declared lost, or the broker restarted) gets ``disconnect`` back and
re-announces itself under a new identity. Masters ask for a ``heartbeat`` on
the frontend; the answer carries the broker's instance id (new at every
start, so masters see a restart), its timings and its counters.

At-least-once delivery to workers. The broker keeps every task's frames until
its reply arrives, so a task whose worker is lost is sent again. A reply is
only forwarded when it names a task in flight on the worker that sends it;
any other reply (a late answer from a worker declared lost, for a task
already re-sent) is dropped and counted in ``unmatched_replies``. A task is
known by its master's identity and its id: a task arriving with the id of a
task still queued or in flight from the same master is not run twice; it is
answered with an ``error`` whose meta holds ``"duplicate": true``, which
masters that re-send tasks ignore.

Back-pressure and size limits. Waiting tasks are bounded in number
(``max_queued_tasks``) and in bytes (``max_queued_bytes``); a task that
cannot start at once and would exceed either bound is answered with an
``error`` whose meta holds ``"busy": true``. Tasks put back after a worker is
lost were already accepted and are never refused, so they may take the queue
over its bounds for a while. A message larger than ``max_message_bytes`` in
total is answered with an ``error`` whose meta holds ``"too_large": true``;
a single frame larger than that never reaches the broker, since ZeroMQ
(``MAXMSGSIZE``) drops the connection of a peer that sends one before
reading it into memory. Such drops are counted in ``*_disconnects``.

Forwarding never decodes tensors: frames are received with ``copy=False``
and the same :class:`zmq.Frame` objects are sent on. Only the header frame is
parsed, and the frame count and sizes are checked against it, on every
receive. A malformed message from a master is answered with an ``error``; a
malformed message from a worker is logged and dropped, except that a reply
to a task in flight on that worker, whose tensor frames do not match its
header, becomes an ``error`` for the master. Either way it is counted in
:attr:`FogBroker.stats` and the loop carries on. A reply that cannot reach
its master (gone, or not reading) is dropped with a warning; the master's
retry brings the task back.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import re
import string
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from sparse_zmq.errors import ConfigError, ProtocolError
from sparse_zmq.lifecycle import atomic_write_text, stop_on_signals
from sparse_zmq.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    NOBLOCK,
    Header,
    Kind,
    Limits,
    Message,
    check_frames,
    error_frames,
    pack,
    parse_header,
    recv_frames,
    send_frames,
    split_envelope,
)
from sparse_zmq.security import CurveConfig, ServerGuard, secure_server

if TYPE_CHECKING:
    # Only for annotations: typing.Self exists from Python 3.11 on.
    from typing import Self

__all__ = ["BrokerConfig", "FogBroker", "main", "parse_bytes", "serve"]

logger = logging.getLogger(__name__)

# A task is known by the routing envelope of its master and its id: ids are
# only unique per master.
_TaskKey = tuple[tuple[bytes, ...], str]

WARN_FIRST = 100
WARN_EVERY = 1000
"""Faults of one kind logged one by one, then one in this many."""

_STAT_NAMES = (
    "tasks_received",
    "tasks_dispatched",
    "results_returned",
    "errors_returned",
    "malformed_frontend",
    "malformed_backend",
    "rejected_busy",
    "rejected_duplicate",
    "rejected_too_large",
    "unmatched_replies",
    "heartbeats",
    "master_heartbeats",
    "unknown_workers",
    "workers_lost",
    "tasks_requeued",
    "streams_repinned",
    "worker_unreachable",
    "master_unreachable",
    "frontend_disconnects",
    "backend_disconnects",
    "socket_errors",
    "peak_queued",
    "peak_queued_bytes",
)


@dataclass(frozen=True)
class BrokerConfig:
    """Tunable limits and timings of a :class:`FogBroker`.

    Attributes:
        max_queued_tasks: Most tasks waiting for a free slot; a task that
            cannot start at once when this many wait is answered with a busy
            error. 0 means tasks are only accepted when a slot is free.
        max_queued_bytes: Most bytes of waiting tasks (their frames, as
            received); a task that cannot start at once and would take the
            total over this bound is answered with a busy error. Must be at
            least ``max_message_bytes``. Tasks in flight are bounded
            separately, by the slots workers announce.
        max_message_bytes: Largest message accepted, all its frames
            together. Larger messages are answered with an error; a single
            frame above it gets its sender disconnected by ZeroMQ before it
            is read. Must be at least ``limits.max_header_bytes``, so that
            every well-formed header fits.
        max_worker_slots: Most free slots one worker may hold announced at
            once; a ``ready`` that would exceed it is refused, so one bad
            message cannot grow the slot queue without bound.
        max_streams: Most training streams pinned at once; the least
            recently used pin is forgotten beyond that.
        receive_hwm: Messages ZeroMQ may buffer per peer before the broker
            reads them (the sockets' receive high-water mark). Together with
            ``max_message_bytes`` it bounds the memory held for unread
            messages: a master sending faster than the broker reads is held
            back by TCP once this many of its messages wait. Sends keep
            ZeroMQ's default of 1000 messages per peer.
        heartbeat_interval_s: Seconds between the heartbeats the broker
            sends to each worker; workers use the same interval for theirs.
        liveness: Heartbeat intervals a worker may stay silent before it is
            declared lost (its tasks are then re-queued).
        poll_timeout_ms: Longest wait for a message before the stop event is
            checked again, in milliseconds.
        batch: Most messages read from one socket before the other socket
            gets its turn.
        linger_ms: How long closing waits for unsent messages, in
            milliseconds.
        limits: Header and frame limits checked on every receive.
    """

    max_queued_tasks: int = 1000
    max_queued_bytes: int = 1024 * 1024**2
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_worker_slots: int = 1024
    max_streams: int = 4096
    receive_hwm: int = 1000
    heartbeat_interval_s: float = 1.0
    liveness: int = 3
    poll_timeout_ms: int = 100
    batch: int = 256
    linger_ms: int = 100
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        """Check every field.

        Raises:
            ConfigError: A field has the wrong type or is out of range, or a
                size limit is too small to carry the messages it must carry.
        """
        minimums = {
            "max_queued_tasks": 0,
            "max_queued_bytes": 1,
            "max_message_bytes": 1,
            "max_worker_slots": 1,
            "max_streams": 1,
            "receive_hwm": 1,
            "liveness": 1,
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
        interval = self.heartbeat_interval_s
        if (
            type(interval) not in (int, float)
            or not math.isfinite(interval)
            or not 0.01 <= interval <= 3600
        ):
            raise ConfigError(
                f"BrokerConfig.heartbeat_interval_s must be a number of seconds "
                f"from 0.01 to 3600, got {interval!r}"
            )
        if not isinstance(self.limits, Limits):
            raise ConfigError(
                f"BrokerConfig.limits must be a Limits, "
                f"got {type(self.limits).__name__}"
            )
        if self.max_message_bytes < self.limits.max_header_bytes:
            raise ConfigError(
                f"BrokerConfig.max_message_bytes of {self.max_message_bytes} is too "
                f"small: a message must at least carry a header of up to "
                f"limits.max_header_bytes = {self.limits.max_header_bytes} bytes"
            )
        if self.max_queued_bytes < self.max_message_bytes:
            raise ConfigError(
                f"BrokerConfig.max_queued_bytes of {self.max_queued_bytes} is too "
                f"small: it must hold at least one message of max_message_bytes = "
                f"{self.max_message_bytes}"
            )

    @property
    def silence_limit_s(self) -> float:
        """Seconds of silence after which a worker is declared lost."""
        return self.heartbeat_interval_s * self.liveness


@dataclass(slots=True)
class _Task:
    """A task as received: the master's envelope, its id and its raw frames.

    ``seq`` orders tasks by arrival, so that a worker with a free slot takes
    the older of the next task pinned to it and the next unpinned one.
    """

    route: tuple[bytes, ...]
    task_id: str
    body: list[zmq.Frame]
    stream: str | None
    size: int
    seq: int

    @property
    def key(self) -> _TaskKey:
        return (self.route, self.task_id)


@dataclass(slots=True, eq=False)
class _Worker:
    """What the broker knows of one worker (one routing identity).

    Attributes:
        identity: Its routing identity.
        last_seen: Monotonic time of its last message.
        free: Free slots it has announced and not yet been given a task for.
        tasks: Its tasks in flight, by key.
        pinned: Tasks of streams pinned to it, waiting for a free slot of it.
        streams: The streams pinned to it.
        departed: It sent ``disconnect``: its replies give no slot back.
    """

    identity: bytes
    last_seen: float
    free: int = 0
    tasks: dict[_TaskKey, _Task] = field(default_factory=dict)
    pinned: collections.deque[_Task] = field(default_factory=collections.deque)
    streams: set[str] = field(default_factory=set)
    departed: bool = False


_PRINTABLE = set(string.ascii_letters + string.digits + string.punctuation)


def _peer(identity: bytes | Sequence[bytes]) -> str:
    """Readable form of a routing identity or envelope for log lines.

    Printable identities (workers and masters of sparse-zmq name themselves
    ``node/stage/pid/random``) are shown as text, others in hex.
    """
    if isinstance(identity, bytes):
        text = identity.decode("ascii", "replace")
        if identity and all(c in _PRINTABLE for c in text):
            return text
        return identity.hex()
    return "|".join(_peer(part) for part in identity)


_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def _stream_of(header: Header, limits: Limits) -> str | None:
    """The ``stream`` a task's meta names, or None.

    Raises:
        ProtocolError: ``stream`` is present but not a non-empty string of
            at most ``limits.max_id_chars`` characters.
    """
    stream = header.meta.get("stream")
    if stream is None:
        return None
    if not isinstance(stream, str) or not 0 < len(stream) <= limits.max_id_chars:
        raise ProtocolError(
            f"task meta 'stream' must be a non-empty string of at most "
            f"{limits.max_id_chars} characters, got {stream!r:.60}"
        )
    return stream


class FogBroker:
    """Routes tasks from masters to worker slots and replies back.

    One thread uses a broker at a time: call :meth:`bind`, then :meth:`run`
    in any single thread, then :meth:`close` once :meth:`run` has returned.

    Attributes:
        name: Names the broker in every log line.
        config: Limits and timings.
        instance: Random id of this broker instance, sent in heartbeats.
        stats: Counters, each starting at 0: ``tasks_received`` (well-formed
            tasks, including those then refused), ``tasks_dispatched`` (sends
            to a worker, a re-sent task counting again), ``results_returned``
            and ``errors_returned`` (worker replies forwarded to masters),
            ``malformed_frontend``, ``malformed_backend``, ``rejected_busy``
            (queue full in tasks or bytes), ``rejected_duplicate`` (task id
            already queued or in flight from the same master),
            ``rejected_too_large`` (message above ``max_message_bytes``),
            ``unmatched_replies`` (replies naming no task in flight on their
            worker, dropped), ``heartbeats`` (from workers),
            ``master_heartbeats`` (answered), ``unknown_workers`` (messages
            from workers the broker does not know, answered with
            ``disconnect``), ``workers_lost`` (declared dead),
            ``tasks_requeued`` (put back after their worker was lost),
            ``streams_repinned`` (streams unpinned because their worker left,
            lost or at the end of a run),
            ``worker_unreachable`` and ``master_unreachable`` (sends that
            failed because the peer was gone or its queue full),
            ``frontend_disconnects`` and ``backend_disconnects`` (connections
            that closed, including those ZeroMQ dropped for an oversized
            frame), ``socket_errors`` (other ZeroMQ errors around one
            message); and two high-water marks, ``peak_queued`` and
            ``peak_queued_bytes``.

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
        self.instance = uuid.uuid4().hex[:16]
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
        # Connection events only: ZeroMQ says nothing else when it drops a
        # peer for an oversized frame.
        self._monitors = {
            self._frontend.get_monitor_socket(zmq.EVENT_DISCONNECTED): (
                "frontend_disconnects"
            ),
            self._backend.get_monitor_socket(zmq.EVENT_DISCONNECTED): (
                "backend_disconnects"
            ),
        }

        self._seq = 0
        self._queue: collections.deque[_Task] = collections.deque()
        self._queued_keys: set[_TaskKey] = set()
        self._waiting = 0
        self._waiting_bytes = 0
        self._free_slots: collections.deque[bytes] = collections.deque()
        self._workers: dict[bytes, _Worker] = {}
        self._in_flight: dict[_TaskKey, bytes] = {}
        self._streams: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        # Streams whose worker left, until a task pins them again (warned then).
        self._left: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._heartbeat = pack(
            Message(
                Kind.HEARTBEAT,
                meta={
                    "broker": self.instance,
                    "interval_s": self.config.heartbeat_interval_s,
                    "liveness": self.config.liveness,
                },
            )
        )
        self._disconnect = pack(Message(Kind.DISCONNECT))

    def _router(self) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer reconnecting under its identity (after a network cut) takes
        # over the old connection instead of being refused.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, self.config.receive_hwm)
        sock.setsockopt(zmq.LINGER, self.config.linger_ms)
        return sock

    @property
    def queued(self) -> int:
        """Tasks waiting for a free slot (pinned ones included)."""
        return self._waiting

    @property
    def queued_bytes(self) -> int:
        """Bytes of the tasks waiting for a free slot."""
        return self._waiting_bytes

    @property
    def free_slots(self) -> int:
        """Free task slots announced by workers and not yet used."""
        return len(self._free_slots)

    @property
    def in_flight(self) -> int:
        """Tasks dispatched to a worker and not yet answered."""
        return len(self._in_flight)

    @property
    def workers(self) -> int:
        """Workers the broker knows and watches."""
        return len(self._workers)

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
        logger.info(
            "%s: bound frontend %s, backend %s (instance %s)",
            self.name,
            bound[0],
            bound[1],
            self.instance,
        )
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
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)
        logger.info(
            "%s: running, masters at %s, workers at %s, heartbeat every %.3gs, "
            "workers lost after %.3gs of silence",
            self.name,
            frontend,
            backend,
            self.config.heartbeat_interval_s,
            self.config.silence_limit_s,
        )

        interval = self.config.heartbeat_interval_s
        next_beat = time.monotonic() + interval
        while not stop.is_set():
            wait_ms = min(
                self.config.poll_timeout_ms,
                max(0, int((next_beat - time.monotonic()) * 1000) + 1),
            )
            ready = dict(poller.poll(wait_ms))
            # Replies first: each one frees a slot a waiting task can use.
            if self._backend in ready:
                self._drain(self._backend, self._on_backend)
            if self._frontend in ready:
                self._drain(self._frontend, self._on_frontend)
            for monitor, counter in self._monitors.items():
                if monitor in ready:
                    self._count_disconnects(monitor, counter)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + interval
                self._watch_workers(now)

        logger.info(
            "%s: stopped with %d queued, %d in flight; %s",
            self.name,
            self.queued,
            self.in_flight,
            " ".join(f"{k}={v}" for k, v in self.stats.items()),
        )

    def close(self) -> None:
        """Close every socket, waiting at most ``config.linger_ms`` for sends."""
        if self._closed:
            return
        self._closed = True
        for sock in (self._frontend, self._backend):
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        for monitor in self._monitors:
            monitor.close(linger=0)
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
                frames = recv_frames(sock, NOBLOCK)
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
            if not sock.get(_EVENTS) & _POLLIN:
                return  # drained, without the cost of a zmq.Again

    def _count_disconnects(self, monitor: zmq.Socket[Any], counter: str) -> None:
        while monitor.poll(0):
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except (zmq.ZMQError, ValueError):
                return
            self.stats[counter] += 1
            logger.debug(
                "%s: %s: a peer at %s disconnected",
                self.name,
                counter,
                event.get("endpoint"),
            )

    def _parse_header(self, body: Sequence[zmq.Frame]) -> Header:
        """Parse the header frame of ``[header, *tensors]``."""
        if not body:
            raise ProtocolError("message has no header frame after its delimiter")
        return parse_header(body[0], self.config.limits)

    def _on_frontend(self, frames: list[zmq.Frame]) -> None:
        """Check a message from a master, then answer it or queue its task."""
        route: tuple[bytes, ...] = (frames[0].bytes,)
        task_id = ""
        try:
            envelope, body = split_envelope(frames)
            route = tuple(frame.bytes for frame in envelope)
            header = self._parse_header(body)
            task_id = header.task_id
            if header.kind not in (Kind.TASK, Kind.HEARTBEAT):
                raise ProtocolError(
                    f"masters may only send {Kind.TASK.value!r} or "
                    f"{Kind.HEARTBEAT.value!r} messages, got {header.kind.value!r}"
                )
            if header.kind is Kind.TASK and not task_id:
                raise ProtocolError("a task needs a non-empty id, got ''")
            check_frames(header, body[1:], self.config.limits)
            stream = _stream_of(header, self.config.limits)
        except ProtocolError as exc:
            self._warn_counted(
                "malformed_frontend",
                "malformed message from master %s (task %r): %s",
                _peer(route),
                task_id,
                exc,
            )
            self._send_master(route, task_id, error_frames(task_id, str(exc)))
            return
        if header.kind is Kind.HEARTBEAT:
            self._answer_master_heartbeat(route)
            return

        self.stats["tasks_received"] += 1
        size = sum(len(frame) for frame in body)
        self._seq += 1
        task = _Task(route, task_id, body, stream, size, self._seq)
        refusal = self._refusal(task)
        if refusal is not None:
            counter, reason, flag = refusal
            self._warn_counted(
                counter,
                "task %r of master %s refused: %s",
                task_id,
                _peer(route),
                reason,
            )
            self._send_master(route, task_id, error_frames(task_id, reason, **flag))
            return

        self._enqueue(task)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s: task %r of master %s (%d bytes, %d tensors, stream %s) queued "
                "(%d waiting)",
                self.name,
                task_id,
                _peer(route),
                size,
                len(body) - 1,
                stream,
                self._waiting,
            )
        self._dispatch()

    def _refusal(self, task: _Task) -> tuple[str, str, dict[str, bool]] | None:
        """Why ``task`` is refused, as (counter, reason, error meta), or None."""
        if task.key in self._queued_keys or task.key in self._in_flight:
            return (
                "rejected_duplicate",
                (
                    f"task id {task.task_id!r} is already queued or in flight for "
                    f"this master"
                ),
                {"duplicate": True},
            )
        limit = self.config.max_message_bytes
        if task.size > limit:
            return (
                "rejected_too_large",
                (
                    f"task {task.task_id!r} is {task.size} bytes, above the broker's "
                    f"message size limit (max_message_bytes) of {limit}"
                ),
                {"too_large": True},
            )
        if self._can_start_now(task):
            return None
        if self._waiting >= self.config.max_queued_tasks:
            return (
                "rejected_busy",
                (
                    f"broker {self.name} is busy: {self._waiting} tasks wait for a "
                    f"worker, the queue limit (max_queued_tasks) is "
                    f"{self.config.max_queued_tasks}"
                ),
                {"busy": True},
            )
        if self._waiting_bytes + task.size > self.config.max_queued_bytes:
            return (
                "rejected_busy",
                (
                    f"broker {self.name} is busy: {self._waiting_bytes} bytes of "
                    f"tasks wait for a worker and this task adds {task.size}, the "
                    f"queue limit (max_queued_bytes) is {self.config.max_queued_bytes}"
                ),
                {"busy": True},
            )
        return None

    def _can_start_now(self, task: _Task) -> bool:
        """Whether a free slot takes ``task`` at once (so it never waits).

        After every dispatch, either no slot is free or no unpinned task
        waits, and a worker with a free slot has no pinned task waiting.
        """
        owner = self._streams.get(task.stream) if task.stream else None
        if owner is None:
            return bool(self._free_slots)
        return self._workers[owner].free > 0

    def _answer_master_heartbeat(self, route: tuple[bytes, ...]) -> None:
        self.stats["master_heartbeats"] += 1
        meta = {
            "broker": self.instance,
            "interval_s": self.config.heartbeat_interval_s,
            "liveness": self.config.liveness,
            "stats": {
                **self.stats,
                "queued": self._waiting,
                "queued_bytes": self._waiting_bytes,
                "in_flight": len(self._in_flight),
                "workers": len(self._workers),
            },
        }
        self._send_master(route, "", pack(Message(Kind.HEARTBEAT, meta=meta)))

    def _on_backend(self, frames: list[zmq.Frame]) -> None:
        """Check a message from a worker and act on its kind."""
        identity = frames[0].bytes
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
            self._backend_fault(identity, str(exc))
            return

        worker = self._workers.get(identity)
        if worker is not None:
            worker.last_seen = time.monotonic()
        if is_reply:
            self._on_reply(identity, envelope, header, body)
        elif header.kind is Kind.READY:
            self._on_ready(identity, worker, header)
        elif header.kind is Kind.HEARTBEAT:
            self.stats["heartbeats"] += 1
            if worker is None:
                self._unknown_worker(identity, "heartbeat")
            else:
                logger.debug("%s: heartbeat from worker %s", self.name, _peer(identity))
        elif header.kind is Kind.DISCONNECT:
            if worker is not None:
                self._on_disconnect(worker)
        else:
            self._backend_fault(
                identity, f"workers may not send {header.kind.value!r} messages"
            )

    def _backend_fault(self, identity: bytes, reason: str) -> None:
        self._warn_counted(
            "malformed_backend",
            "malformed message from worker %s: %s",
            _peer(identity),
            reason,
        )

    def _warn_counted(self, counter: str, message: str, *args: Any) -> None:
        """Count a fault in ``stats[counter]`` and log it, sparingly under a flood.

        The first ``WARN_FIRST`` faults of each counter are logged, then one
        in ``WARN_EVERY``, so that a flood cannot fill the disk with logs.
        """
        self.stats[counter] += 1
        count = self.stats[counter]
        if count <= WARN_FIRST or count % WARN_EVERY == 0:
            more = ""
            if count > WARN_FIRST:
                more = f" ({counter}={count}, 1 in {WARN_EVERY} logged)"
            logger.warning("%s: " + message + "%s", self.name, *args, more)

    def _unknown_worker(self, identity: bytes, what: str) -> None:
        """Tell a worker the broker does not know to announce itself again."""
        self.stats["unknown_workers"] += 1
        logger.info(
            "%s: %s from unknown worker %s (declared lost, or this broker "
            "restarted); told it to reconnect",
            self.name,
            what,
            _peer(identity),
        )
        self._send_worker(identity, self._disconnect)

    def _on_ready(
        self, identity: bytes, worker: _Worker | None, header: Header
    ) -> None:
        """Add the slots a ``ready`` announces to the back of the slot queue."""
        slots = header.meta.get("slots", 1)
        held = worker.free if worker is not None else 0
        limit = self.config.max_worker_slots
        if type(slots) is not int or slots < 1 or held + slots > limit:
            self._backend_fault(
                identity,
                f"ready must announce an integer number of slots >= 1, keeping the "
                f"worker's free slots at most {limit} (it holds {held}), "
                f"got slots={slots!r:.40}",
            )
            return
        if worker is None:
            worker = _Worker(identity, time.monotonic())
            self._workers[identity] = worker
            logger.info(
                "%s: worker %s joined with %d slots", self.name, _peer(identity), slots
            )
            # The first heartbeat tells the worker the broker's timings.
            self._send_worker(identity, self._heartbeat)
            if identity not in self._workers:
                return
        worker.departed = False
        worker.free += slots
        self._free_slots.extend([identity] * slots)
        logger.debug(
            "%s: worker %s ready with %d slots", self.name, _peer(identity), slots
        )
        self._dispatch()

    def _on_disconnect(self, worker: _Worker) -> None:
        withdrawn = self._withdraw_slots(worker)
        logger.info(
            "%s: worker %s disconnected, %d free slots withdrawn, %d tasks still in "
            "flight on it",
            self.name,
            _peer(worker.identity),
            withdrawn,
            len(worker.tasks),
        )
        if worker.tasks:
            worker.departed = True
        else:
            self._forget(worker)

    def _on_reply(
        self,
        identity: bytes,
        envelope: list[zmq.Frame],
        header: Header,
        body: list[zmq.Frame],
    ) -> None:
        """Forward a worker's reply to its master; give the slot back if it stays."""
        route = tuple(frame.bytes for frame in envelope)
        key = (route, header.task_id)
        worker = self._workers.get(identity)
        if worker is None or self._in_flight.get(key) != identity:
            self.stats["unmatched_replies"] += 1
            logger.warning(
                "%s: worker %s sent a %s for task %r of master %s, which is not in "
                "flight on that worker (late, or already re-sent elsewhere); dropped",
                self.name,
                _peer(identity),
                header.kind.value,
                header.task_id,
                _peer(route),
            )
            return
        del self._in_flight[key]
        del worker.tasks[key]
        if not worker.departed:
            worker.free += 1
            self._free_slots.append(identity)
        elif not worker.tasks:
            self._forget(worker)

        try:
            check_frames(header, body[1:], self.config.limits)
        except ProtocolError as exc:
            # The worker did answer, so its slot was given back; the master
            # learns that the task failed instead of waiting for it.
            self._backend_fault(
                identity, f"{header.kind.value} for task {header.task_id!r}: {exc}"
            )
            reason = (
                f"worker {_peer(identity)} sent a malformed {header.kind.value}: {exc}"
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
                        _peer(identity),
                        _peer(route),
                    )
        self._dispatch()

    # Queues and liveness.

    def _enqueue(self, task: _Task) -> None:
        """Add an accepted task to the queue of its stream's worker, or the main one."""
        owner = self._streams.get(task.stream) if task.stream else None
        if owner is not None:
            self._streams.move_to_end(task.stream)  # type: ignore[arg-type]
            self._workers[owner].pinned.append(task)
        else:
            self._queue.append(task)
        self._count_waiting(task)

    def _count_waiting(self, task: _Task) -> None:
        """Count a task just queued in the totals and their peaks."""
        self._queued_keys.add(task.key)
        self._waiting += 1
        self._waiting_bytes += task.size
        self.stats["peak_queued"] = max(self.stats["peak_queued"], self._waiting)
        self.stats["peak_queued_bytes"] = max(
            self.stats["peak_queued_bytes"], self._waiting_bytes
        )

    def _next_task_for(self, worker: _Worker) -> _Task | None:
        """Take the task ``worker``'s free slot serves next, if any.

        That is the older of the next task pinned to it and the next
        unpinned task; an unpinned task whose stream was pinned to another
        worker meanwhile moves to that worker's queue instead.
        """
        while True:
            pinned = worker.pinned[0] if worker.pinned else None
            shared = self._queue[0] if self._queue else None
            if pinned is not None and (shared is None or pinned.seq < shared.seq):
                return worker.pinned.popleft()
            if shared is None:
                return None
            self._queue.popleft()
            if shared.stream is None:
                return shared
            owner = self._streams.get(shared.stream)
            if owner is None:
                self._pin(shared.stream, worker)
                return shared
            if owner == worker.identity:
                return shared
            self._workers[owner].pinned.append(shared)

    def _pin(self, stream: str, worker: _Worker) -> None:
        self._streams[stream] = worker.identity
        worker.streams.add(stream)
        left = self._left.pop(stream, None)
        if left is not None:
            logger.warning(
                "%s: stream %r was pinned to worker %s, which left; it goes on at "
                "worker %s, whose parameters differ",
                self.name,
                stream,
                _peer(left),
                _peer(worker.identity),
            )
            return
        logger.info(
            "%s: stream %r pinned to worker %s",
            self.name,
            stream,
            _peer(worker.identity),
        )
        if len(self._streams) > self.config.max_streams:
            old, identity = self._streams.popitem(last=False)
            holder = self._workers.get(identity)
            if holder is not None:
                holder.streams.discard(old)
            logger.info(
                "%s: stream %r unpinned, %d streams pinned is the limit (max_streams)",
                self.name,
                old,
                self.config.max_streams,
            )

    def _watch_workers(self, now: float) -> None:
        """Heartbeat every known worker; declare lost those silent too long."""
        limit = self.config.silence_limit_s
        for worker in list(self._workers.values()):
            silent = now - worker.last_seen
            if silent > limit:
                self._lose(worker, f"silent for {silent:.1f}s (limit {limit:.3g}s)")
            else:
                self._send_worker(worker.identity, self._heartbeat)
        self._dispatch()

    def _lose(self, worker: _Worker, reason: str) -> None:
        """Declare ``worker`` dead: re-queue its tasks at the front, unpin streams."""
        if self._workers.get(worker.identity) is not worker:
            return
        self.stats["workers_lost"] += 1
        self._withdraw_slots(worker)
        requeued = sorted([*worker.tasks.values(), *worker.pinned], key=lambda t: t.seq)
        for task in worker.tasks.values():
            del self._in_flight[task.key]
        for task in worker.pinned:
            # Counted again by _requeue below.
            self._queued_keys.discard(task.key)
            self._waiting -= 1
            self._waiting_bytes -= task.size
        worker.tasks.clear()
        worker.pinned.clear()
        self._forget(worker)
        self._requeue(requeued)
        self.stats["tasks_requeued"] += len(requeued)
        logger.warning(
            "%s: worker %s lost (%s); %d of its tasks put back at the front of the "
            "queue",
            self.name,
            _peer(worker.identity),
            reason,
            len(requeued),
        )

    def _requeue(self, tasks: list[_Task]) -> None:
        """Put accepted tasks back at the front of the main queue, in order."""
        for task in reversed(tasks):
            self._queue.appendleft(task)
            self._count_waiting(task)

    def _forget(self, worker: _Worker) -> None:
        """Drop a worker with no tasks left, and its stream pins."""
        self._workers.pop(worker.identity, None)
        for stream in worker.streams:
            if self._streams.get(stream) == worker.identity:
                del self._streams[stream]
                self.stats["streams_repinned"] += 1
                self._left[stream] = worker.identity
                while len(self._left) > self.config.max_streams:
                    self._left.popitem(last=False)
                # Normal at the end of a run; a warning only if the stream goes on.
                logger.info(
                    "%s: stream %r unpinned: its worker %s left",
                    self.name,
                    stream,
                    _peer(worker.identity),
                )
        worker.streams.clear()

    # Sending.

    def _dispatch(self) -> None:
        """Pair waiting tasks with free slots, oldest with oldest.

        Each free slot, in the order slots became free, takes the next task
        its worker may serve; slots that find none stay free, in order.
        """
        if not self._waiting or not self._free_slots:
            return
        unused: collections.deque[bytes] = collections.deque()
        while self._waiting and self._free_slots:
            identity = self._free_slots.popleft()
            worker = self._workers[identity]
            task = self._next_task_for(worker)
            if task is None:
                unused.append(identity)
                continue
            worker.free -= 1
            self._queued_keys.discard(task.key)
            self._waiting -= 1
            self._waiting_bytes -= task.size
            self._send_task(worker, task)
        # A failed send may have withdrawn the slots of a worker met earlier.
        unused = collections.deque(
            i for i in unused if i in self._workers and self._workers[i].free
        )
        unused.extend(self._free_slots)
        self._free_slots = unused

    def _send_task(self, worker: _Worker, task: _Task) -> None:
        """Send ``task`` to ``worker``; on failure put it back at the front."""
        try:
            send_frames(
                self._backend, [worker.identity, *task.route, b"", *task.body], NOBLOCK
            )
        except zmq.ZMQError as exc:
            self.stats["worker_unreachable"] += 1
            self._requeue([task])
            logger.warning(
                "%s: cannot reach worker %s (%s); task %r of master %s put back at "
                "the front of the queue",
                self.name,
                _peer(worker.identity),
                exc,
                task.task_id,
                _peer(task.route),
            )
            if exc.errno == zmq.EHOSTUNREACH:
                self._lose(worker, "its connection is gone")
            else:
                # Not reading (EAGAIN): its other free slots are no good either.
                self._withdraw_slots(worker)
            return
        self._in_flight[task.key] = worker.identity
        worker.tasks[task.key] = task
        self.stats["tasks_dispatched"] += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s: task %r of master %s sent to worker %s",
                self.name,
                task.task_id,
                _peer(task.route),
                _peer(worker.identity),
            )

    def _send_worker(self, identity: bytes, body: Sequence[Any]) -> None:
        """Send a control message to a worker; a vanished one is declared lost."""
        try:
            send_frames(self._backend, [identity, b"", *body], NOBLOCK)
        except zmq.ZMQError as exc:
            self.stats["worker_unreachable"] += 1
            worker = self._workers.get(identity)
            if exc.errno == zmq.EHOSTUNREACH and worker is not None:
                self._lose(worker, "its connection is gone")
            else:
                logger.debug(
                    "%s: control message to worker %s not sent: %s",
                    self.name,
                    _peer(identity),
                    exc,
                )

    def _withdraw_slots(self, worker: _Worker) -> int:
        """Remove every free slot of ``worker``; return how many there were."""
        count = worker.free
        if count:
            worker.free = 0
            self._free_slots = collections.deque(
                w for w in self._free_slots if w != worker.identity
            )
        return count

    def _send_master(
        self, route: tuple[bytes, ...], task_id: str, body: Sequence[Any]
    ) -> bool:
        """Send ``body`` to the master at ``route``; False if it cannot be reached."""
        try:
            send_frames(self._frontend, [*route, b"", *body], NOBLOCK)
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
    with stop_on_signals() as stop, FogBroker(
        frontend, backend, config=config, name=name, curve=curve
    ) as broker:
        bound_frontend, bound_backend = broker.bind()
        if ready_file is not None:
            atomic_write_text(
                ready_file,
                json.dumps(
                    {"frontend": bound_frontend, "backend": bound_backend, "pid": os.getpid()}
                ),
            )
        broker.run(stop)
        logger.info("%s: got %s, stopping", name, stop.signal_name)
        return dict(broker.stats)


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_bytes(text: str) -> int:
    """Parse a byte size such as ``4096``, ``64KiB``, ``256MiB`` or ``1GiB``.

    Raises:
        ConfigError: ``text`` is not a whole number with an optional unit.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ConfigError(
            f"byte size must be a whole number with an optional unit B, KiB, MiB "
            f"or GiB, got {text!r}"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def _byte_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of :class:`BrokerConfig` to a command-line parser."""
    defaults = BrokerConfig()
    parser.add_argument(
        "--max-queued-tasks",
        "--max-queued",
        dest="max_queued_tasks",
        type=int,
        default=defaults.max_queued_tasks,
        help="tasks that may wait for a worker before new ones get a busy error "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-queued-bytes",
        type=_byte_size,
        default=defaults.max_queued_bytes,
        help="bytes of tasks that may wait for a worker before new ones get a busy "
        "error, e.g. 512MiB (default: 1GiB)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=_byte_size,
        default=defaults.max_message_bytes,
        help="largest message accepted, all frames together (default: 256MiB)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=float,
        default=defaults.heartbeat_interval_s,
        help="seconds between heartbeats to each worker (default: %(default)s)",
    )
    parser.add_argument(
        "--liveness",
        type=int,
        default=defaults.liveness,
        help="heartbeat intervals a worker may stay silent before its tasks go to "
        "another worker (default: %(default)s)",
    )


def config_from_options(args: argparse.Namespace) -> BrokerConfig:
    """Build a :class:`BrokerConfig` from options added by :func:`add_config_options`.

    Raises:
        ConfigError: A value is out of range.
    """
    return BrokerConfig(
        max_queued_tasks=args.max_queued_tasks,
        max_queued_bytes=args.max_queued_bytes,
        max_message_bytes=args.max_message_bytes,
        heartbeat_interval_s=args.heartbeat_interval,
        liveness=args.liveness,
    )


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
    add_config_options(parser)
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
            config=config_from_options(args),
            ready_file=args.ready_file,
            name=args.name,
        )
    except ConfigError as exc:
        logger.error("%s: %s", args.name, exc)
        return 2
    return 0
