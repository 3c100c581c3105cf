"""Tensor codec: a torch tensor as a small description plus one raw buffer.

A tensor travels as two parts:

* its **description**, a JSON-ready dict ``{"dtype": "float32", "shape": [2, 3]}``
  that goes into the message header;
* its **buffer**, the tensor's elements in C order, native byte order, handed
  to ZeroMQ as a buffer-protocol object that shares memory with the tensor
  (no copy is made when the tensor is already contiguous and on the CPU).

Tensors that require grad are detached, tensors on an accelerator are moved
to the CPU, non-contiguous, expanded, conjugated or negated views are made
contiguous first. Zero-size and 0-d tensors are allowed. Every dtype that torch
can hold in dense memory is supported, ``bfloat16``, ``float16``, ``float8``
variants and complex types included; quantized and sparse tensors are refused
with :class:`~sparse_zmq.errors.ProtocolError`.

Decoding checks the description (dtype on the allow-list, shape a list of
non-negative integers, element count within limits) and that the buffer holds
exactly ``numel * itemsize`` bytes before anything is built. The decoded
tensor is always writable:

* when the buffer is the memory of a received ZeroMQ frame (a
  :class:`zmq.Frame` or its ``.buffer``), writable and aligned to the dtype's
  item size, the tensor is built **in place** over that memory, without a
  copy; the tensor keeps the frame alive, and writing to the tensor writes to
  the frame (which nothing else reads once it has been received);
* any other buffer (``bytes``, ``bytearray``, a frame whose memory is
  read-only or misaligned) is copied into memory the tensor owns, so the
  caller may reuse or change the buffer afterwards.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import zmq

from sparse_zmq.errors import ProtocolError

__all__ = [
    "DTYPES",
    "ITEMSIZES",
    "describe",
    "encode_tensor",
    "decode_tensor",
    "MAX_DIMS",
]

# Highest rank accepted from the wire; torch itself allows 64 dimensions.
MAX_DIMS = 64


def _dense_dtypes() -> dict[str, torch.dtype]:
    """Every torch dtype that can live in a dense CPU tensor, by name."""
    found: dict[str, torch.dtype] = {}
    for name in dir(torch):
        value = getattr(torch, name)
        if (
            not isinstance(value, torch.dtype)
            or name.startswith("q")
            or name == "quint4x2"
        ):
            continue
        canonical = str(value).removeprefix("torch.")
        if canonical in found:
            continue
        try:
            with warnings.catch_warnings():
                # complex32 and bcomplex32 warn that they are experimental.
                warnings.simplefilter("ignore", UserWarning)
                torch.empty(1, dtype=value).view(torch.uint8)
        except (RuntimeError, TypeError):
            # Dtypes without storage kernels cannot be put on the wire.
            continue
        found[canonical] = value
    return found


DTYPES: dict[str, torch.dtype] = _dense_dtypes()
"""Dtypes allowed on the wire, keyed by their name without ``torch.``."""

ITEMSIZES: dict[str, int] = {name: dtype.itemsize for name, dtype in DTYPES.items()}
"""Bytes per element of each dtype in :data:`DTYPES`, by name."""


_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def _numpy_dtypes() -> dict[str, np.dtype[Any]]:
    """Wire dtypes numpy also holds, at the same item size, by name.

    Tensors of these dtypes are encoded and decoded through numpy views:
    one or two cheap numpy calls instead of several torch dispatches, which
    matters when a message's whole budget is tens of microseconds.
    """
    found = {}
    for name, dtype in DTYPES.items():
        try:
            array = torch.empty(0, dtype=dtype).numpy()
        except (TypeError, RuntimeError):
            continue  # bfloat16, float8, complex32...: torch views only
        if array.dtype.itemsize == dtype.itemsize:
            found[name] = array.dtype
    return found


_NUMPY: dict[str, np.dtype[Any]] = _numpy_dtypes()


def describe(tensor: torch.Tensor) -> dict[str, Any]:
    """Return the wire description of ``tensor`` (dtype name and shape)."""
    return {
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
    }


def encode_tensor(tensor: torch.Tensor) -> tuple[dict[str, Any], memoryview]:
    """Turn a tensor into its wire description and a zero-copy byte buffer.

    Args:
        tensor: Any dense tensor; it may require grad, live on a GPU or be a
            non-contiguous view.

    Returns:
        The description for the header, and a flat ``uint8`` memoryview over
        the tensor's contiguous CPU memory. The memoryview keeps that memory
        alive for as long as ZeroMQ holds it.

    Raises:
        ProtocolError: The tensor is sparse, quantized or of a dtype that has
            no dense storage.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ProtocolError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    name = _NAMES.get(tensor.dtype)
    if tensor.layout != torch.strided:
        raise ProtocolError(
            f"only dense tensors can be sent, got layout {tensor.layout}"
        )
    if name is None:
        if tensor.is_quantized:
            raise ProtocolError(
                f"quantized tensors cannot be sent, got dtype {tensor.dtype}"
            )
        raise ProtocolError(
            f"dtype {str(tensor.dtype).removeprefix('torch.')} has no dense storage; "
            f"allowed: {sorted(DTYPES)}"
        )

    flat = tensor.detach()
    if not flat.is_cpu:
        flat = flat.cpu()
    if flat.is_conj() or flat.is_neg() or not flat.is_contiguous():
        flat = flat.resolve_conj().resolve_neg().contiguous()
    description = {"dtype": name, "shape": list(tensor.shape)}
    if name in _NUMPY:
        return description, memoryview(flat.numpy().reshape(-1).view(np.uint8))
    return description, memoryview(flat.reshape(-1).view(torch.uint8).numpy())


def decode_tensor(description: Any, buffer: Any, *, max_bytes: int) -> torch.Tensor:
    """Build a writable tensor from a wire description and its byte buffer.

    Args:
        description: The tensor's entry from the header, as received.
        buffer: Any buffer-protocol object holding the raw elements. A
            received :class:`zmq.Frame`, or its ``.buffer``, is decoded in
            place when its memory is writable and aligned (see the module
            docstring); anything else is copied.
        max_bytes: Largest buffer accepted for one tensor.

    Returns:
        A writable CPU tensor of the described dtype and shape.

    Raises:
        ProtocolError: The description is malformed, names an unknown dtype,
            or the buffer size is not ``numel * itemsize``.
    """
    if not isinstance(description, dict):
        raise ProtocolError(
            f"tensor description must be an object, got {description!r:.80}"
        )
    name = description.get("dtype")
    shape = description.get("shape")
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"unknown dtype {name!r:.40}; allowed: {sorted(DTYPES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise ProtocolError(
            f"shape must be a list of at most {MAX_DIMS} non-negative integers, "
            f"got {shape!r:.80}"
        )

    itemsize = ITEMSIZES[name]
    expected = math.prod(shape) * itemsize
    if isinstance(buffer, zmq.Frame):
        buffer = buffer.buffer
    view = memoryview(buffer).cast("B")
    if expected > max_bytes:
        raise ProtocolError(
            f"tensor of shape {shape} and dtype {name} needs {expected} bytes, "
            f"above the limit of {max_bytes}"
        )
    if view.nbytes != expected:
        raise ProtocolError(
            f"buffer for tensor of shape {shape} and dtype {name} holds {view.nbytes} "
            f"bytes, expected {expected}"
        )
    if not expected:
        return torch.empty(shape, dtype=dtype)

    if _is_frame(buffer) and not view.readonly:
        # The tensor keeps the memoryview, and so the frame, alive.
        np_dtype = _NUMPY.get(name)
        if np_dtype is not None:
            array = np.frombuffer(view, dtype=np_dtype)
            if not array.flags.aligned:
                # ZeroMQ packs small messages into one receive buffer, so
                # their frames may start anywhere: fresh, aligned memory.
                array = array.copy()
            return torch.from_numpy(array.reshape(shape))
        out = torch.frombuffer(view, dtype=torch.uint8)
        if out.data_ptr() % itemsize:
            out = out.clone()  # misaligned for the dtype: fresh, aligned memory
    else:
        out = torch.empty(expected, dtype=torch.uint8)
        out.numpy()[:] = np.frombuffer(view, dtype=np.uint8)
    return out.view(dtype).view(shape)


def _is_frame(buffer: Any) -> bool:
    """True when ``buffer`` is the memory of a received ZeroMQ frame."""
    return isinstance(buffer, memoryview) and isinstance(buffer.obj, zmq.Frame)
