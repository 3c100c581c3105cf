"""CURVE: allowed keys get through, others get nothing; keys on disk; no pickle."""

from __future__ import annotations

import json
import pickle
import pickletools
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from brokers.fog import FogBroker
from sparse_zmq.errors import ConfigError
from sparse_zmq.master import Master
from sparse_zmq.protocol import Kind, Message, pack, unpack
from sparse_zmq.security import (
    AUTHORIZED_FOLDER,
    CurveConfig,
    generate_keys,
    is_loopback,
    secure_client,
)
from sparse_zmq.stage import Result, Stage, StageRuntime, Task

LOOPBACK = "tcp://127.0.0.1:*"
TIMEOUT_S = 60.0  # generous: the test machine is a noisy 2-core box
TIMEOUT_MS = int(TIMEOUT_S * 1000)
# After a refused handshake, how long to keep listening for a reply that must
# not come. Nothing can arrive once the handshake failed; this only gives a
# wrongly accepted message the chance to show up.
SILENCE_MS = 1500
REPO_ROOT = Path(__file__).resolve().parents[1]


class Double(Stage):
    """Last stage: doubles ``x``."""

    name = "double"

    def process(self, task: Task) -> Result:
        return Result({"y": task.tensors["x"] * 2})


@dataclass
class Secured:
    """A CURVE broker and one allowed worker, serving in threads."""

    keys: Path
    frontend: str
    backend: str
    broker: FogBroker
    runtime: StageRuntime
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def finish(self) -> None:
        """Stop serving and join the threads, so that every counter is final."""
        self.stop.set()
        for thread in self.threads:
            thread.join(TIMEOUT_S)
        assert not any(t.is_alive() for t in self.threads)


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    generate_keys(folder, ["worker", "master"])
    return folder


@pytest.fixture
def stranger(tmp_path: Path) -> CurveConfig:
    """A client with a valid key pair of its own, not on the brokers' list."""
    other = tmp_path / "other-keys"
    generate_keys(other, ["stranger"])
    return CurveConfig(
        client_secret_file=other / "stranger.key_secret",
        server_public_file=tmp_path / "keys" / "server.key",
    )


@pytest.fixture
def secured(keys: Path) -> Iterator[Secured]:
    broker = FogBroker(
        LOOPBACK, LOOPBACK, name="curve-broker", curve=CurveConfig.from_folder(keys)
    )
    frontend, backend = broker.bind()
    runtime = StageRuntime(
        Double(), backend, node="fog", curve=CurveConfig.from_folder(keys, "worker")
    )
    running = Secured(keys, frontend, backend, broker, runtime)
    for target in (broker, runtime):
        running.threads.append(
            threading.Thread(target=target.run, args=(running.stop,), daemon=True)
        )
        running.threads[-1].start()
    try:
        yield running
    finally:
        running.finish()
        runtime.close()
        broker.close()


def _allowed_round_trip(secured: Secured, value: float) -> None:
    config = CurveConfig.from_folder(secured.keys, "master")
    with Master(secured.frontend, name="edge", curve=config) as master:
        reply = master.request(
            "double", {"x": torch.full((3,), value)}, timeout_s=TIMEOUT_S
        )
    assert torch.equal(reply.message.tensors["y"], torch.full((3,), 2 * value))


def _connect_and_wait_for_event(
    sock: zmq.Socket[Any], endpoint: str, first: list[Any], wanted: set[int]
) -> int:
    """Connect ``sock``, send ``first``, wait for one of ``wanted`` monitor events.

    The monitor is attached before connecting, so a handshake that fails at
    once is not missed.
    """
    monitor = sock.get_monitor_socket()
    try:
        sock.connect(endpoint)
        sock.send_multipart(first)
        while True:
            assert monitor.poll(TIMEOUT_MS), f"no monitor event in {sorted(wanted)}"
            event = recv_monitor_message(monitor)["event"]
            assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, "the handshake succeeded"
            if event in wanted:
                return event
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


def test_client_with_an_allowed_key_completes_a_task(secured: Secured) -> None:
    _allowed_round_trip(secured, 1.5)
    secured.finish()
    assert secured.broker.stats["tasks_dispatched"] == 1
    assert secured.broker.stats["results_returned"] == 1


REFUSED_PLAIN = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
}


@pytest.mark.parametrize("who", ["no key", "unlisted key"])
def test_client_without_an_allowed_key_gets_nothing_through(
    who: str, secured: Secured, stranger: CurveConfig, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        wanted = REFUSED_PLAIN
        if who == "unlisted key":
            secure_client(sock, stranger)
            wanted = {zmq.EVENT_HANDSHAKE_FAILED_AUTH}
        task = Message(Kind.TASK, "intruder-1", {"x": torch.ones(3)}, {"op": "double"})
        _connect_and_wait_for_event(sock, secured.frontend, [b"", *pack(task)], wanted)
        assert not sock.poll(SILENCE_MS), "the refused client got a reply"
    finally:
        sock.close()
        ctx.term()

    # An allowed client after it is served, and only its task was ever seen.
    _allowed_round_trip(secured, 2.0)
    secured.finish()
    stats = secured.broker.stats
    assert stats["tasks_received"] == 1 and stats["tasks_dispatched"] == 1
    assert stats["malformed_frontend"] == 0
    assert secured.runtime.stats["tasks"] == 1
    if who == "unlisted key":
        assert "refused: not in" in caplog.text


def test_worker_without_an_allowed_key_is_given_no_task(secured: Secured) -> None:
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    try:
        ready = [b"", *pack(Message(Kind.READY, meta={"slots": 8}))]
        _connect_and_wait_for_event(rogue, secured.backend, ready, REFUSED_PLAIN)
        for i in range(3):  # all go to the one allowed worker
            _allowed_round_trip(secured, float(i))
        assert not rogue.poll(0), "the rogue worker received a task"
    finally:
        rogue.close()
        ctx.term()
    secured.finish()
    assert secured.runtime.stats["tasks"] == 3
    assert secured.broker.stats["malformed_backend"] == 0


def test_key_generation_writes_secret_keys_readable_by_the_owner_only(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "keys"
    written = generate_keys(folder, ["edge", "fog"])
    secrets = sorted(p.name for p in written if p.suffix == ".key_secret")
    assert secrets == ["edge.key_secret", "fog.key_secret", "server.key_secret"]
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.suffix == ".key_secret":
            assert mode == 0o600, f"{path.name} has mode {mode:o}"
        else:
            assert mode == 0o644, f"{path.name} has mode {mode:o}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert sorted(p.name for p in (folder / AUTHORIZED_FOLDER).iterdir()) == [
        "edge.key",
        "fog.key",
    ]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]

    # Run again: existing pairs are kept as they are, new names are added.
    before = (folder / "server.key_secret").read_bytes()
    again = generate_keys(folder, ["edge", "cloud"])
    assert [p.name for p in again] == ["cloud.key", "cloud.key_secret", "cloud.key"]
    assert (folder / "server.key_secret").read_bytes() == before


def test_keys_command_creates_the_pairs_it_prints(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_zmq.cli", "keys", str(folder), "--name", "edge"],
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    printed = [Path(line) for line in proc.stdout.split()]
    assert folder / "edge.key_secret" in printed and all(p.exists() for p in printed)
    assert stat.S_IMODE((folder / "edge.key_secret").stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["server", "../escape", "", "a b"])
def test_key_names_that_could_clash_or_escape_the_folder_are_refused(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        generate_keys(tmp_path / "keys", [name])


def test_missing_key_files_are_named_in_the_error(keys: Path) -> None:
    ctx = zmq.Context()
    try:
        with pytest.raises(ConfigError, match="nobody.key_secret"):
            Master(
                "tcp://127.0.0.1:1",
                context=ctx,
                curve=CurveConfig.from_folder(keys, "nobody"),
            )
        with pytest.raises(ConfigError, match="server_secret_file"):
            FogBroker(LOOPBACK, LOOPBACK, context=ctx, curve=CurveConfig())
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://localhost:*", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/monitor.sock", True),
        ("tcp://*:5555", False),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://192.168.1.20:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_only_loopback_and_ipc_endpoints_count_as_local(
    endpoint: str, local: bool
) -> None:
    assert is_loopback(endpoint) is local


# No pickle on the wire: a worker must not unpickle what it receives.


class TouchWhenUnpickled:
    """Pickles into a payload whose unpickling creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.path,))


def live_pickle(marker: Path) -> bytes:
    payload = pickle.dumps(TouchWhenUnpickled(marker))
    assert "REDUCE" in {op.name for op, _, _ in pickletools.genops(payload)}
    return payload


def test_the_pickle_payload_is_live(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(live_pickle(control))
    assert control.exists()


def test_worker_answers_a_pickle_payload_with_an_error_and_runs_no_code(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "unpickled"
    ctx = zmq.Context()
    backend = ctx.socket(zmq.ROUTER)
    backend.setsockopt(zmq.LINGER, 0)
    backend.bind(LOOPBACK)
    runtime = StageRuntime(
        Double(), backend.getsockopt_string(zmq.LAST_ENDPOINT), context=ctx
    )
    stop = threading.Event()
    thread = threading.Thread(target=runtime.run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert backend.poll(TIMEOUT_MS), "the worker sent no ready"
        worker_id, _, _ = backend.recv_multipart()
        payload = live_pickle(marker)
        for body in (
            [payload],
            [payload, payload],
            [json.dumps({"v": 1}).encode(), payload],
        ):
            backend.send_multipart([worker_id, b"master", b"", *body])
            assert backend.poll(TIMEOUT_MS), "no answer to a pickle payload"
            frames = backend.recv_multipart()
            assert frames[1] == b"master" and unpack(frames[3:]).kind is Kind.ERROR
        good = pack(Message(Kind.TASK, "ok", {"x": torch.ones(2)}, {"op": "double"}))
        backend.send_multipart([worker_id, b"master", b"", *good])
        assert backend.poll(TIMEOUT_MS)
        assert unpack(backend.recv_multipart()[3:]).kind is Kind.RESULT
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
        runtime.close()
        backend.close()
        ctx.term()
    assert runtime.stats["malformed"] == 3 and runtime.stats["tasks"] == 1
    assert not marker.exists()


@pytest.mark.slow
def test_run_with_curve_trains_over_secured_sockets(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparse_zmq.cli",
            "run",
            "cloudlet",
            "--curve",
            "--batches",
            "2",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["batches"] == 2
    keys = out / "keys"
    assert sorted(p.name for p in (keys / AUTHORIZED_FOLDER).iterdir()) == [
        "cloudlet.key",
        "edge.key",
    ]
    broker_log = (out / "logs" / "broker-cloudlet.log").read_text()
    assert broker_log.count("CURVE server socket") == 2
    assert "refused" not in broker_log
