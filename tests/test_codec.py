"""Tensor codec: every dtype, every layout oddity, bit for bit."""

from __future__ import annotations

import pytest
import torch

from sparse_zmq.codec import DTYPES, decode_tensor, encode_tensor
from sparse_zmq.errors import ProtocolError

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
def test_every_dtype_and_shape_roundtrips_bit_for_bit(name: str, shape: tuple[int, ...]) -> None:
    t = _random_of(DTYPES[name], shape)
    back = _roundtrip(t)
    assert back.dtype == t.dtype
    assert back.shape == t.shape
    assert _bits(back) == _bits(t)


def test_the_common_training_dtypes_are_on_the_allow_list() -> None:
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "uint8", "bool",
                 "complex64", "float8_e4m3fn"):
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
def test_bad_descriptions_and_sizes_are_rejected_with_the_values(description, size, match) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_tensor(description, bytes(size), max_bytes=MAX)
