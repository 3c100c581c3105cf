"""Shared fixtures: in-process pipelines over real loopback sockets."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from brokers.fog import FogBroker
from sparse_zmq.stage import Stage, StageRuntime

LOOPBACK = "tcp://127.0.0.1:*"


@dataclass
class Pipeline:
    """Brokers and stage runtimes, each serving in its own thread."""

    frontends: list[str]
    runtimes: list[StageRuntime]
    brokers: list[FogBroker]
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def frontend(self) -> str:
        """Frontend of the first broker, where the source connects."""
        return self.frontends[0]


@contextmanager
def serve_pipeline(stages: list[Stage], *, slots: int = 1) -> Iterator[Pipeline]:
    """Run ``stages`` in a chain: broker 0 -> stage 0 -> broker 1 -> stage 1 ...

    Every hop is a real ZeroMQ socket on a loopback port the kernel picks.
    """
    brokers = [FogBroker(LOOPBACK, LOOPBACK, name=f"broker-{i}") for i in range(len(stages))]
    endpoints = [b.bind() for b in brokers]
    runtimes = [
        StageRuntime(
            stage,
            endpoints[i][1],
            next_frontend=endpoints[i + 1][0] if i + 1 < len(stages) else None,
            node=f"node-{i}",
            slots=slots,
        )
        for i, stage in enumerate(stages)
    ]
    pipe = Pipeline([f for f, _ in endpoints], runtimes, brokers)
    for target in [*brokers, *runtimes]:
        thread = threading.Thread(target=target.run, args=(pipe.stop,), daemon=True)
        thread.start()
        pipe.threads.append(thread)
    try:
        yield pipe
    finally:
        pipe.stop.set()
        for thread in pipe.threads:
            thread.join(timeout=10)
        for runtime in runtimes:
            runtime.close()
        for broker in brokers:
            broker.close()
        assert not any(t.is_alive() for t in pipe.threads), "a serving thread did not stop"


@pytest.fixture
def pipeline_factory():
    """The :func:`serve_pipeline` context manager, as a fixture."""
    return serve_pipeline
