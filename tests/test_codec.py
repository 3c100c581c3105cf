"""Tensor codec: every dtype, every layout oddity, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zmq

from sparse_zmq.codec import DTYPES, decode_tensor, encode_tensor
from sparse_zmq.errors import ProtocolError
from sparse_zmq.protocol import Kind, Message, pack, unpack

MAX = 1 << 30


def _random_of(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bit patterns of any dtype (NaNs and odd values included)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for n in shape:
        numel *= n
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _roundtrip(t: torch.Tensor) -> torch.Tensor:
    description, buffer = encode_tensor(t)
    return decode_tensor(description, bytes(buffer), max_bytes=MAX)


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(3, 5), (0,), (), (2, 0, 4), (1, 1, 1, 7)])
def test_every_dtype_and_shape_roundtrips_bit_for_bit(
    name: str, shape: tuple[int, ...]
) -> None:
    t = _random_of(DTYPES[name], shape)
    back = _roundtrip(t)
    assert back.dtype == t.dtype
    assert back.shape == t.shape
    assert _bits(back) == _bits(t)


def test_the_common_training_dtypes_are_on_the_allow_list() -> None:
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "uint8",
        "bool",
        "complex64",
        "float8_e4m3fn",
    ):
        assert name in DTYPES


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(24.0).reshape(4, 6).t(),  # transposed
        lambda: torch.arange(24.0).reshape(4, 6)[:, ::2],  # strided slice
        lambda: torch.tensor([1.0, 2.0, 3.0]).expand(4, 3),  # stride 0
        lambda: torch.arange(6.0).reshape(2, 3).unsqueeze(0).permute(2, 0, 1),
        lambda: torch.randn(3, 4, dtype=torch.complex64).conj(),  # lazy conjugate
        lambda: torch.randn(5, dtype=torch.bfloat16)[1:4],  # storage offset
    ],
)
def test_views_are_sent_with_their_logical_values(make) -> None:
    t = make()
    back = _roundtrip(t)
    assert back.is_contiguous()
    assert torch.equal(back.resolve_conj(), t.resolve_conj())


def test_tensor_requiring_grad_is_sent_detached() -> None:
    t = torch.randn(3, requires_grad=True) * 2
    back = _roundtrip(t)
    assert not back.requires_grad
    assert torch.equal(back, t.detach())


def test_received_tensor_is_writable_and_owns_its_memory() -> None:
    payload = bytearray(torch.arange(4, dtype=torch.float32).numpy().tobytes())
    back = decode_tensor({"dtype": "float32", "shape": [4]}, payload, max_bytes=MAX)
    back += 1
    payload[:] = bytes(len(payload))
    assert back.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_contiguous_tensor_is_encoded_without_a_copy() -> None:
    t = torch.randn(256, 256)
    _, buffer = encode_tensor(t)
    assert buffer.obj.__array_interface__["data"][0] == t.data_ptr()


def test_sparse_and_quantized_tensors_are_refused() -> None:
    with pytest.raises(ProtocolError, match="dense"):
        encode_tensor(torch.eye(3).to_sparse())
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(ProtocolError, match="quantized"):
        encode_tensor(q)


@pytest.mark.parametrize(
    ("description", "size", "match"),
    [
        ({"dtype": "float32", "shape": [4]}, 15, "holds 15 bytes, expected 16"),
        ({"dtype": "float32", "shape": [4]}, 17, "expected 16"),
        ({"dtype": "object", "shape": [1]}, 8, "unknown dtype"),
        ({"dtype": "float32", "shape": [-1]}, 4, "non-negative"),
        ({"dtype": "float32", "shape": "4"}, 16, "list"),
        ({"dtype": "float32", "shape": [True]}, 4, "non-negative"),
        ({"dtype": "float32", "shape": [1 << 40]}, 16, "above the limit"),
        (["float32", [4]], 16, "must be an object"),
    ],
)
def test_bad_descriptions_and_sizes_are_rejected_with_the_values(
    description, size, match
) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_tensor(description, bytes(size), max_bytes=MAX)


# Zero copies: the socket is given the tensor's own memory, and a received
# frame becomes the tensor's memory.


def _frame_pair():
    """A PAIR of sockets joined over a loopback port the kernel picks."""
    context = zmq.Context()
    a = context.socket(zmq.PAIR)
    a.setsockopt(zmq.LINGER, 0)
    a.bind("tcp://127.0.0.1:*")
    b = context.socket(zmq.PAIR)
    b.setsockopt(zmq.LINGER, 0)
    b.connect(a.getsockopt_string(zmq.LAST_ENDPOINT))
    return context, a, b


def _address(buffer) -> int:
    return np.frombuffer(buffer, dtype=np.uint8).ctypes.data


def test_buffer_handed_to_the_socket_shares_memory_with_the_tensor() -> None:
    t = torch.randn(1024, 64)
    frames = pack(Message(Kind.TASK, "t-1", {"x": t}, {"op": "train"}))
    assert _address(frames[1]) == t.data_ptr()
    t[0, 0] = 42.0  # a write to the tensor shows in the buffer ZeroMQ reads
    assert np.frombuffer(frames[1], dtype=np.float32)[0] == 42.0


def test_decoded_tensor_is_the_received_frame_and_stays_writable() -> None:
    context, a, b = _frame_pair()
    try:
        sent = torch.randn(256, 1024)  # 1 MiB: ZeroMQ gives it a buffer of its own
        a.send_multipart(pack(Message(Kind.RESULT, "t-1", {"grad": sent})), copy=False)
        assert b.poll(10_000), "the message did not arrive"
        frames = b.recv_multipart(copy=False)
        got = unpack(frames).tensors["grad"]
        assert got.data_ptr() == _address(frames[1].buffer)
        assert torch.equal(got, sent)
        got += 1  # writable, and the write lands in the frame's memory
        assert np.frombuffer(frames[1].buffer, dtype=np.float32)[0] == sent[0, 0] + 1
        del frames
        assert torch.equal(got, sent + 1)  # the tensor keeps the frame alive
    finally:
        a.close()
        b.close()
        context.term()


def test_misaligned_or_foreign_buffers_are_copied() -> None:
    context, a, b = _frame_pair()
    try:
        payload = torch.arange(17, dtype=torch.float32).numpy().tobytes()
        a.send_multipart([b"h", bytes(len(payload) + 3)], copy=False)
        assert b.poll(10_000), "the message did not arrive"
        frame = b.recv_multipart(copy=False)[1]
        start = next(k for k in (1, 2, 3) if (_address(frame.buffer) + k) % 4)
        odd = frame.buffer[start : start + len(payload)]  # off float32 alignment
        odd[:] = payload
        got = decode_tensor({"dtype": "float32", "shape": [17]}, odd, max_bytes=MAX)
        assert got.tolist() == list(range(17))
        assert got.data_ptr() != _address(odd)
        got[0] = -1.0
        assert bytes(odd[:4]) == payload[:4]
    finally:
        a.close()
        b.close()
        context.term()
    readonly = torch.arange(4.0).numpy().tobytes()
    got = decode_tensor(
        {"dtype": "float32", "shape": [4]}, memoryview(readonly), max_bytes=MAX
    )
    got += 1
    assert got.tolist() == [1.0, 2.0, 3.0, 4.0]
