"""Wire protocol: header checks, frame counts, sizes, no pickle."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from sparse_zmq.errors import ProtocolError
from sparse_zmq.protocol import (
    VERSION,
    Kind,
    Limits,
    Message,
    error_frames,
    pack,
    parse_header,
    split_envelope,
    unpack,
)


def _task() -> Message:
    return Message(
        Kind.TASK,
        "m-1",
        {"x": torch.randn(2, 3), "y": torch.tensor([1, 2]), "s": torch.tensor(1.5, dtype=torch.float16)},
        {"op": "train", "batch": "b0"},
    )


def _header(**fields) -> bytes:
    base = {"v": VERSION, "kind": "task", "id": "t", "tensors": [], "meta": {}}
    base.update(fields)
    return json.dumps(base).encode()


def test_message_roundtrips_with_kind_id_meta_and_tensors() -> None:
    sent = _task()
    got = unpack(pack(sent))
    assert (got.kind, got.task_id, got.meta) == (sent.kind, sent.task_id, sent.meta)
    assert list(got.tensors) == ["x", "y", "s"]
    for name, tensor in sent.tensors.items():
        assert torch.equal(got.tensors[name], tensor)
        assert got.tensors[name].dtype == tensor.dtype


def test_header_is_json_and_documents_every_tensor() -> None:
    header = json.loads(pack(_task())[0])
    assert header["v"] == VERSION and header["kind"] == "task"
    assert header["tensors"][0] == {"name": "x", "dtype": "float32", "shape": [2, 3]}
    assert header["tensors"][2] == {"name": "s", "dtype": "float16", "shape": []}


def test_split_envelope_separates_identities_from_the_body() -> None:
    envelope, body = split_envelope([b"worker", b"master", b"", b"{}", b"data"])
    assert envelope == [b"worker", b"master"]
    assert body == [b"{}", b"data"]
    with pytest.raises(ProtocolError, match="delimiter"):
        split_envelope([b"master", b"{}"])


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([], "no header"),
        ([b"\x80\x04not json"], "not UTF-8 JSON"),
        ([b"[1, 2]"], "JSON object"),
        ([_header(v=99)], "version 99 not supported"),
        ([_header(v="1")], "version"),
        ([_header(v=True)], "version True not supported"),
        ([_header(v=1.0)], "version 1.0 not supported"),
        ([b"[" * 50000], "not UTF-8 JSON"),
        ([_header(kind="exec")], "unknown message kind 'exec'"),
        ([_header(id=5)], "task id must be a string"),
        ([_header(id="x" * 1000)], "task id"),
        ([_header(tensors={"x": 1})], "'tensors' must be a list"),
        ([_header(meta=[])], "'meta' must be a JSON object"),
        ([_header(tensors=[{"name": "x", "dtype": "float32", "shape": [2]}])], "1 tensors but 0"),
        ([_header(), b"extra"], "0 tensors but 1"),
        ([_header(tensors=[{"name": "x", "dtype": "float32", "shape": [2]}]), b"1234567"],
         "arrived as 7 bytes, expected 8"),
        ([_header(tensors=[{"name": "x", "dtype": "pickle", "shape": [2]}]), b"12345678"],
         "unknown dtype"),
        ([_header(tensors=[{"dtype": "float32", "shape": [2]}]), b"12345678"], "'name'"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(frames, match) -> None:
    with pytest.raises(ProtocolError, match=match):
        unpack(frames)


def test_oversized_header_and_tensor_are_rejected() -> None:
    limits = Limits(max_header_bytes=64, max_tensor_bytes=8)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        unpack([_header(meta={"pad": "x" * 100})], limits)
    frames = pack(Message(Kind.TASK, "t", {"x": torch.zeros(4)}))
    with pytest.raises(ProtocolError, match="above the limit of 8"):
        unpack(frames, Limits(max_tensor_bytes=8))


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('pickle ran')",))


def test_pickle_payload_is_refused_without_running_it() -> None:
    payload = pickle.dumps(_Boom())
    with pytest.raises(ProtocolError, match="not UTF-8 JSON"):
        unpack([payload])
    with pytest.raises(ProtocolError):
        unpack([_header(tensors=[{"name": "x", "dtype": "uint8", "shape": [3]}]), payload])


def test_error_frames_carry_the_reason() -> None:
    got = unpack(error_frames("t-9", "queue full", busy=True))
    assert got.kind is Kind.ERROR and got.task_id == "t-9"
    assert got.meta == {"reason": "queue full", "busy": True}


def test_meta_that_is_not_json_is_refused_at_send() -> None:
    with pytest.raises(ProtocolError, match="JSON"):
        pack(Message(Kind.TASK, "t", meta={"bad": object()}))
