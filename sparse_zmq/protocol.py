"""The sparse-zmq wire protocol, frame by frame.

Every message is a ZeroMQ multipart message::

    frame 0 .. k-1   routing envelope: peer identities pushed by ROUTER sockets
    frame k          empty delimiter b""
    frame k+1        header: UTF-8 JSON object (at most ``Limits.max_header_bytes``)
    frame k+2 ..     one raw buffer per tensor, in the order the header lists them

A DEALER talking to a broker sends ``[b"", header, *tensors]``; the broker's
ROUTER prepends the sender's identity, and a reply travels back by popping
identities off the front. Nothing but the header is ever parsed: tensor frames
are raw element bytes (see :mod:`sparse_zmq.codec`), and no frame is ever
unpickled.

The header object has these fields:

========== =========== =====================================================
field      type        meaning
========== =========== =====================================================
``v``      int         protocol version, :data:`VERSION`; others are refused
``kind``   str         one of :class:`Kind`
``id``     str         task id, unique per master (empty for control kinds)
``tensors`` list       per tensor: ``{"name", "dtype", "shape"}``
``meta``   object      small JSON values (operation, loss, error reason...)
========== =========== =====================================================

Receiving checks the delimiter, the header's size, JSON syntax and every field
type, the version, the kind, the number of tensor frames against the header,
and each tensor frame's size against ``numel * itemsize``. A failed check
raises :class:`~sparse_zmq.errors.ProtocolError`; the loops that call
:func:`unpack` answer the sender with an ``error`` message, count the fault,
and carry on.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from sparse_zmq.codec import DTYPES, ITEMSIZES, decode_tensor, encode_tensor
from sparse_zmq.errors import ProtocolError

__all__ = [
    "VERSION",
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "NOBLOCK",
    "Kind",
    "Limits",
    "Header",
    "Message",
    "split_envelope",
    "parse_header",
    "check_frames",
    "pack",
    "unpack",
    "error_frames",
    "recv_frames",
    "send_frames",
]

VERSION = 1
"""Protocol version carried in every header; bumped on incompatible change."""


class Kind(str, enum.Enum):
    """What a message is."""

    READY = "ready"  # worker -> broker: one more task slot is free
    TASK = "task"  # master -> broker -> worker: work to do
    RESULT = "result"  # worker -> broker -> master: the task's outcome
    ERROR = "error"  # anyone -> sender: the task or message failed, with a reason
    HEARTBEAT = "heartbeat"  # liveness, both ways
    DISCONNECT = "disconnect"  # worker -> broker: withdraw all free slots


_KINDS = {k.value: k for k in Kind}


@dataclass(frozen=True)
class Limits:
    """Upper bounds checked on every receive.

    Attributes:
        max_header_bytes: Largest header frame accepted.
        max_tensors: Most tensor frames in one message.
        max_tensor_bytes: Largest single tensor buffer.
        max_id_chars: Longest task id.
    """

    max_header_bytes: int = 64 * 1024
    max_tensors: int = 64
    max_tensor_bytes: int = 2 * 1024**3
    max_id_chars: int = 256


DEFAULT_LIMITS = Limits()

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024**2
"""Default largest message (all frames) masters, brokers and workers accept.

Chosen to hold the largest activations of the shipped suites (VGG on CIFAR-10
at batch 256 after the first block is 64 MiB) with room to spare.
"""


@dataclass(frozen=True)
class Header:
    """A parsed, checked header (tensor buffers not yet looked at)."""

    kind: Kind
    task_id: str
    tensors: list[dict[str, Any]]
    meta: dict[str, Any]

    @property
    def tensor_bytes(self) -> list[int]:
        """Byte size each tensor frame must have."""
        return [math.prod(t["shape"]) * ITEMSIZES[t["dtype"]] for t in self.tensors]


@dataclass
class Message:
    """One protocol message, decoded.

    Attributes:
        kind: What the message is.
        task_id: The task it belongs to ('' for control messages).
        tensors: Named tensors carried as raw frames.
        meta: Small JSON-serialisable values.
    """

    kind: Kind
    task_id: str = ""
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def split_envelope(frames: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Split a multipart message at its first empty delimiter frame.

    Args:
        frames: ``bytes`` or ``zmq.Frame`` objects as received.

    Returns:
        ``(envelope, body)``: the identity frames before the delimiter, and the
        header plus tensor frames after it.

    Raises:
        ProtocolError: No empty delimiter frame is present.
    """
    for i, frame in enumerate(frames):
        if len(frame) == 0:
            return list(frames[:i]), list(frames[i + 1 :])
    raise ProtocolError(
        f"message of {len(frames)} frames has no empty delimiter frame before its header"
    )


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=True)
_DECODER = json.JSONDecoder()
"""Made once: ``json.dumps`` with options builds a new encoder per call."""

NOBLOCK = int(zmq.NOBLOCK)
"""``zmq.NOBLOCK`` as a plain integer (pyzmq's flags are enums, slow to combine)."""
_SNDMORE = int(zmq.SNDMORE)


def send_frames(socket: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0) -> None:
    """Send ``frames`` as one multipart message, tensor buffers without copying.

    What ``socket.send_multipart(frames, flags, copy=False)`` does, without
    its per-frame type checks and enum arithmetic, which cost more than the
    send itself for small messages. Frames below the socket's
    ``copy_threshold`` are copied by pyzmq as usual; larger ones (tensor
    buffers, received frames being forwarded) go to ZeroMQ by reference.

    Raises:
        zmq.Again: ``flags`` has :data:`NOBLOCK` and the message cannot be
            queued now.
    """
    more = flags | _SNDMORE
    send = socket.send
    for frame in frames[:-1]:
        send(frame, more, copy=False)
    send(frames[-1], flags, copy=False)


def recv_frames(socket: zmq.Socket[Any], flags: int = 0) -> list[zmq.Frame]:
    """Receive one multipart message as :class:`zmq.Frame` objects, without copying.

    What ``socket.recv_multipart(flags, copy=False)`` does, reading each
    frame's ``more`` flag instead of asking the socket for ``RCVMORE``.

    Raises:
        zmq.Again: ``flags`` has :data:`NOBLOCK` and no message is waiting.
    """
    recv = socket.recv
    frame = recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = recv(flags, copy=False)
        frames.append(frame)
    return frames


def _frame_bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def parse_header(frame: Any, limits: Limits = DEFAULT_LIMITS) -> Header:
    """Parse and check a header frame without touching tensor frames.

    Raises:
        ProtocolError: The header is too large, not JSON, of another version,
            of an unknown kind, or a field has the wrong type.
    """
    raw = _frame_bytes(frame)
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError(
            f"header of {len(raw)} bytes exceeds the limit of {limits.max_header_bytes}"
        )
    try:
        obj = _DECODER.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(
            f"header is not UTF-8 JSON ({exc.__class__.__name__}), starts {raw[:16]!r}"
        ) from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"header must be a JSON object, got {type(obj).__name__}")

    version = obj.get("v")
    if type(version) is not int or version != VERSION:
        raise ProtocolError(f"protocol version {version!r:.20} not supported; expected {VERSION}")
    kind = _KINDS.get(obj.get("kind")) if isinstance(obj.get("kind"), str) else None
    if kind is None:
        raise ProtocolError(
            f"unknown message kind {obj.get('kind')!r:.40}; expected one of {sorted(_KINDS)}"
        )
    task_id = obj.get("id", "")
    if not isinstance(task_id, str) or len(task_id) > limits.max_id_chars:
        raise ProtocolError(
            f"task id must be a string of at most {limits.max_id_chars} characters, "
            f"got {task_id!r:.60}"
        )
    tensors = obj.get("tensors", [])
    if not isinstance(tensors, list) or len(tensors) > limits.max_tensors:
        raise ProtocolError(
            f"'tensors' must be a list of at most {limits.max_tensors} entries, "
            f"got {tensors!r:.60}"
        )
    for entry in tensors:
        _check_tensor_entry(entry)
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise ProtocolError(f"'meta' must be a JSON object, got {type(meta).__name__}")
    return Header(kind=kind, task_id=task_id, tensors=tensors, meta=meta)


def _check_tensor_entry(entry: Any) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ProtocolError(f"tensor entry must be an object with a 'name', got {entry!r:.60}")
    if entry.get("dtype") not in DTYPES:
        raise ProtocolError(
            f"tensor {entry['name']!r:.40} has unknown dtype {entry.get('dtype')!r:.40}"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ProtocolError(
            f"tensor {entry['name']!r:.40} shape must be a list of non-negative "
            f"integers, got {shape!r:.60}"
        )


def check_frames(header: Header, tensor_frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> None:
    """Check that the tensor frames match the header in count and size.

    Raises:
        ProtocolError: Wrong number of frames, or a frame of the wrong size.
    """
    if len(tensor_frames) != len(header.tensors):
        raise ProtocolError(
            f"header lists {len(header.tensors)} tensors but {len(tensor_frames)} "
            f"tensor frames followed it"
        )
    for entry, size, frame in zip(header.tensors, header.tensor_bytes, tensor_frames):
        if size > limits.max_tensor_bytes:
            raise ProtocolError(
                f"tensor {entry['name']!r} needs {size} bytes, above the limit of "
                f"{limits.max_tensor_bytes}"
            )
        if len(frame) != size:
            raise ProtocolError(
                f"tensor {entry['name']!r} of shape {entry['shape']} and dtype "
                f"{entry['dtype']} arrived as {len(frame)} bytes, expected {size}"
            )


def pack(message: Message) -> list[Any]:
    """Encode a message into ``[header, *tensor buffers]`` (no envelope, no delimiter).

    Tensor buffers share memory with the tensors; send them with ``copy=False``
    for large payloads.

    Raises:
        ProtocolError: A tensor cannot be encoded, or ``meta`` is not JSON.
    """
    entries = []
    buffers = []
    for name, tensor in message.tensors.items():
        description, buffer = encode_tensor(tensor)
        entries.append({"name": name, **description})
        buffers.append(buffer)
    header = {
        "v": VERSION,
        "kind": message.kind.value,
        "id": message.task_id,
        "tensors": entries,
        "meta": message.meta,
    }
    try:
        raw = _ENCODER.encode(header).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"message meta is not JSON-serialisable: {exc}") from exc
    return [raw, *buffers]


def unpack(body: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode ``[header, *tensor frames]`` into a :class:`Message`.

    Raises:
        ProtocolError: Any check of the module docstring fails.
    """
    if not body:
        raise ProtocolError("message has no header frame after its delimiter")
    header = parse_header(body[0], limits)
    check_frames(header, body[1:], limits)
    tensors = {
        entry["name"]: decode_tensor(entry, _buffer(frame), max_bytes=limits.max_tensor_bytes)
        for entry, frame in zip(header.tensors, body[1:])
    }
    return Message(header.kind, header.task_id, tensors, header.meta)


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def error_frames(task_id: str, reason: str, **meta: Any) -> list[bytes]:
    """Frames of an ``error`` message answering ``task_id`` with ``reason``."""
    return pack(Message(Kind.ERROR, task_id, meta={"reason": reason, **meta}))  # type: ignore[return-value]
