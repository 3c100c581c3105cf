"""Benchmarks: they run end to end in --quick mode and write their CSVs.

Timings are never asserted (the machine is a noisy 2-core box); only that
every row and column is there and that the baseline does what it claims.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import pipeline, transport
from bench._common import Servers
from bench.seed_baseline import SeedClient, decode_request, encode_request
from bench.seed_baseline import serve as serve_seed_baseline

ROOT = Path(__file__).resolve().parents[1]
BENCH_TIMEOUT_S = 600


def _run_quick(module: str, out: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.slow
def test_transport_quick_measures_every_method_payload_and_in_flight(
    tmp_path: Path,
) -> None:
    stdout = _run_quick("bench.transport", tmp_path)
    columns, rows = _read_csv(tmp_path / "transport.csv")
    assert columns == list(transport.COLUMNS)
    cells = {(r["method"], int(r["payload_bytes"]), int(r["in_flight"])) for r in rows}
    assert cells == {
        (m, p, k)
        for m in transport.METHODS
        for p in transport.PAYLOADS
        for k in transport.IN_FLIGHT
    }
    assert all(
        float(r["round_trips_per_s"]) > 0 and float(r["mb_per_s"]) > 0 for r in rows
    )
    for versus in ("zmq-direct", "seed-baseline"):
        assert f"ratio sparse-zmq/{versus} 16 MiB x8:" in stdout


@pytest.mark.slow
def test_pipeline_quick_writes_a_row_per_mode_with_wire_and_payload_bytes(
    tmp_path: Path,
) -> None:
    stdout = _run_quick("bench.pipeline", tmp_path)
    columns, rows = _read_csv(tmp_path / "pipeline.csv")
    assert columns == list(pipeline.COLUMNS)
    assert [r["mode"] for r in rows] == list(pipeline.MODES)
    for r in rows:
        assert float(r["samples_per_s"]) > 0
        if r["mode"] != "single-process":
            # Every payload byte crossed a socket, plus the headers around it.
            assert (
                float(r["wire_bytes_per_sample"])
                > float(r["payload_bytes_per_sample"])
                > 0
            )
    assert "framing overhead" in stdout


def test_ratios_pair_sparse_zmq_with_each_reference_and_name_the_goals() -> None:
    cells = [
        transport.Cell(method, 16 * 1024**2, 8, rate)
        for method, rate in (
            ("zmq-direct", 100.0),
            ("sparse-zmq", 50.0),
            ("seed-baseline", 10.0),
        )
    ]
    got = {
        (versus, goal): round(ratio, 3)
        for versus, _, _, ratio, goal in transport.ratios(cells)
    }
    assert got == {("zmq-direct", 0.45): 0.5, ("seed-baseline", 3.5): 5.0}
    assert "goal >= 3.5: met" in transport.render(cells)
    assert cells[0].mb_per_s == pytest.approx(100 * 2 * 16 * 1024**2 / 1e6)


def test_seed_baseline_echoes_a_pickled_tensor_on_a_new_connection_per_task() -> None:
    import asyncio

    tensor = torch.randn(1000)
    with Servers() as servers:
        host, port = servers.start("seed-baseline", serve_seed_baseline)
        client = SeedClient(host, port)

        async def two_tasks() -> list[tuple[torch.Tensor, float]]:
            labels = torch.empty(0, dtype=torch.int64)
            return [await client.train(tensor, labels) for _ in range(2)]

        replies = asyncio.run(two_tasks())
    assert all(
        torch.equal(gradient, tensor) and loss == 0.0 for gradient, loss in replies
    )
    activation, labels = decode_request(encode_request(tensor, torch.tensor([3])))
    assert torch.equal(activation, tensor) and labels.tolist() == [3]


def test_seed_client_opens_one_new_connection_per_task() -> None:
    import asyncio

    from bench.seed_baseline import LOOPBACK, _rx_pipe

    tensor = torch.randn(100)
    peers: list[tuple[str, int]] = []

    async def counting_rx_pipe(reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername"))
        await _rx_pipe(reader, writer)  # the baseline worker's own handler

    async def three_tasks() -> None:
        server = await asyncio.start_server(counting_rx_pipe, LOOPBACK, 0)
        async with server:
            client = SeedClient(LOOPBACK, server.sockets[0].getsockname()[1])
            for _ in range(3):
                gradient, _ = await client.train(tensor, torch.empty(0, dtype=torch.int64))
                assert torch.equal(gradient, tensor)

    asyncio.run(three_tasks())
    assert len(peers) == 3 and len(set(peers)) == 3  # three connections, three ports


def test_seed_baseline_talks_to_loopback_only() -> None:
    with pytest.raises(ValueError, match="only talks to 127.0.0.1"):
        SeedClient("0.0.0.0", 9)


def test_no_library_module_imports_the_baseline_or_unpickles() -> None:
    banned = ("seed_baseline", "pickle.loads", "pickle.load(", "pickle.Unpickler")
    offenders = [
        f"{path.relative_to(ROOT)}: {word}"
        for folder in ("sparse_zmq", "brokers", "stages")
        for path in (ROOT / folder).rglob("*.py")
        for word in banned
        if word in path.read_text(encoding="utf-8")
    ]
    assert offenders == []
