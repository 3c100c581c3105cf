"""Tests of the monitor's samplers: GPU through NVML, host and network.

The host and network samplers read this machine through psutil for real. The
GPU sampler is driven by a substitute for ``pynvml``: this is the one place in
the test suite where a substitute is right. The test machines have no GPU and
no NVIDIA driver, and the cases that matter (a working device, NVML missing,
queries a device does not support, MIG mode, a binding that returns bytes)
depend on hardware and driver versions no single machine shows at once. The
substitute keeps pynvml's function names, constants and error classes (same
class names, same numeric codes, the same ``NVMLError(code)`` dispatch to the
subclass), and :func:`test_substitute_matches_the_real_pynvml_names_and_codes`
checks that against the installed nvidia-ml-py.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pynvml
import pytest

from sparse_zmq.monitor import MonitorClient, MonitorServer, default_endpoint
from sparse_zmq.report import build_report
from sparse_zmq.sampling import (
    GPU_COLUMNS,
    HOST_COLUMNS,
    MAX_PLAUSIBLE_BYTES_PER_S,
    NET_COLUMNS,
    EnergyMeter,
    GpuSampler,
    HostSampler,
    MissingMetrics,
    NetCounters,
    NetSampler,
    ProcessRegistry,
)

DEADLINE_S = 60.0
"""Upper bound for any wait; generous because the test box is a noisy 2-core VM."""


# --- the NVML substitute -------------------------------------------------------

_ERROR_CODES = {
    "Uninitialized": 1,
    "InvalidArgument": 2,
    "NotSupported": 3,
    "NoPermission": 4,
    "NotFound": 6,
    "DriverNotLoaded": 9,
    "LibraryNotFound": 12,
    "FunctionNotFound": 13,
    "GpuIsLost": 15,
    "Unknown": 999,
}
"""pynvml's error classes (``NVMLError_<name>``) and their NVML_ERROR_* codes."""

_CONSTANT_NAMES = {
    "Uninitialized": "NVML_ERROR_UNINITIALIZED",
    "InvalidArgument": "NVML_ERROR_INVALID_ARGUMENT",
    "NotSupported": "NVML_ERROR_NOT_SUPPORTED",
    "NoPermission": "NVML_ERROR_NO_PERMISSION",
    "NotFound": "NVML_ERROR_NOT_FOUND",
    "DriverNotLoaded": "NVML_ERROR_DRIVER_NOT_LOADED",
    "LibraryNotFound": "NVML_ERROR_LIBRARY_NOT_FOUND",
    "FunctionNotFound": "NVML_ERROR_FUNCTION_NOT_FOUND",
    "GpuIsLost": "NVML_ERROR_GPU_IS_LOST",
    "Unknown": "NVML_ERROR_UNKNOWN",
}

_FUNCTIONS = (
    "nvmlInit",
    "nvmlShutdown",
    "nvmlSystemGetDriverVersion",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetName",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetMigMode",
    "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex",
)
"""The pynvml functions the substitute offers (and the sampler may call)."""


@dataclass
class FakeGpu:
    """One device of the substitute; a query listed in ``unsupported`` (by its
    pynvml function name) raises ``NVMLError_NotSupported``."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-6f1c0b1e-0000-4000-8000-000000000001"
    util: int = 40
    memory_used: int = 2 * 1024**3
    memory_total: int = 80 * 1024**3
    power_mw: int = 150_000
    energy_mj: int = 1_000_000
    temperature: int = 45
    sm_clock: int = 1_755
    unsupported: set[str] = field(default_factory=set)
    mig: list[FakeGpu] | None = None
    fail_once: dict[str, str] = field(default_factory=dict)
    """Function name -> error class name raised on the next call only."""


def fake_nvml(
    gpus: list[FakeGpu], *, init_error: str | None = None, as_bytes: bool = False
) -> tuple[ModuleType, dict[str, int]]:
    """A module that behaves like pynvml for ``gpus``; returns it and a call count.

    Each power query advances the energy counter by 0.25 s at the current
    power, as a device does between two samples.
    """
    module = ModuleType("fake_pynvml")
    calls: dict[str, int] = {}

    class NVMLError(Exception):
        _by_code: ClassVar[dict[int, type[NVMLError]]] = {}

        def __new__(cls, value: int) -> NVMLError:
            target = cls._by_code.get(value, cls) if cls is NVMLError else cls
            error = Exception.__new__(target)
            error.value = value  # type: ignore[attr-defined]
            return error

        def __init__(self, value: int) -> None:
            super().__init__(value)
            self.value = value

    module.NVMLError = NVMLError  # type: ignore[attr-defined]
    for name, code in _ERROR_CODES.items():
        subclass = type(f"NVMLError_{name}", (NVMLError,), {})
        NVMLError._by_code[code] = subclass
        setattr(module, f"NVMLError_{name}", subclass)
        setattr(module, _CONSTANT_NAMES[name], code)
    module.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    module.NVML_CLOCK_SM = 1  # type: ignore[attr-defined]
    module.NVML_DEVICE_MIG_DISABLE = 0  # type: ignore[attr-defined]
    module.NVML_DEVICE_MIG_ENABLE = 1  # type: ignore[attr-defined]

    def text(value: str) -> str | bytes:
        return value.encode() if as_bytes else value

    def query(function: str, gpu: FakeGpu) -> None:
        calls[function] = calls.get(function, 0) + 1
        if function in gpu.unsupported:
            raise NVMLError(_ERROR_CODES["NotSupported"])
        if function in gpu.fail_once:
            raise NVMLError(_ERROR_CODES[gpu.fail_once.pop(function)])

    def init() -> None:
        calls["nvmlInit"] = calls.get("nvmlInit", 0) + 1
        if init_error is not None:
            raise NVMLError(_ERROR_CODES[init_error])

    def power(gpu: FakeGpu) -> int:
        query("nvmlDeviceGetPowerUsage", gpu)
        gpu.energy_mj += gpu.power_mw // 4  # 0.25 s at this power
        return gpu.power_mw

    def energy(gpu: FakeGpu) -> int:
        query("nvmlDeviceGetTotalEnergyConsumption", gpu)
        return gpu.energy_mj

    def mig_mode(gpu: FakeGpu) -> list[int]:
        query("nvmlDeviceGetMigMode", gpu)
        if gpu.mig is None:
            raise NVMLError(_ERROR_CODES["NotSupported"])
        return [1, 1]

    def mig_handle(gpu: FakeGpu, slot: int) -> FakeGpu:
        assert gpu.mig is not None
        if slot >= len(gpu.mig):
            raise NVMLError(_ERROR_CODES["NotFound"])
        return gpu.mig[slot]

    def simple(function: str, read: Callable[[FakeGpu], Any]) -> Callable[..., Any]:
        def call(gpu: FakeGpu, *_args: object) -> Any:
            query(function, gpu)
            return read(gpu)

        return call

    functions: dict[str, Callable[..., Any]] = {
        "nvmlInit": init,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: text("550.54.15"),
        "nvmlDeviceGetCount": lambda: len(gpus),
        "nvmlDeviceGetHandleByIndex": lambda index: gpus[index],
        "nvmlDeviceGetName": simple("nvmlDeviceGetName", lambda g: text(g.name)),
        "nvmlDeviceGetUUID": simple("nvmlDeviceGetUUID", lambda g: text(g.uuid)),
        "nvmlDeviceGetUtilizationRates": simple(
            "nvmlDeviceGetUtilizationRates",
            lambda g: SimpleNamespace(gpu=g.util, memory=g.util // 2),
        ),
        "nvmlDeviceGetMemoryInfo": simple(
            "nvmlDeviceGetMemoryInfo",
            lambda g: SimpleNamespace(
                total=g.memory_total,
                used=g.memory_used,
                free=g.memory_total - g.memory_used,
            ),
        ),
        "nvmlDeviceGetPowerUsage": power,
        "nvmlDeviceGetTotalEnergyConsumption": energy,
        "nvmlDeviceGetTemperature": simple(
            "nvmlDeviceGetTemperature", lambda g: g.temperature
        ),
        "nvmlDeviceGetClockInfo": simple(
            "nvmlDeviceGetClockInfo", lambda g: g.sm_clock
        ),
        "nvmlDeviceGetMigMode": mig_mode,
        "nvmlDeviceGetMaxMigDeviceCount": lambda gpu: 7,
        "nvmlDeviceGetMigDeviceHandleByIndex": mig_handle,
    }
    assert set(functions) == set(_FUNCTIONS)
    for name, function in functions.items():
        setattr(module, name, function)
    return module, calls


def _rows(sampler: GpuSampler, times: int = 1) -> list[dict[str, str]]:
    rows: list[list[str]] = []
    for i in range(times):
        rows.extend(sampler.sample(1000.0 + 0.25 * i))
    return [dict(zip(GPU_COLUMNS, row, strict=True)) for row in rows]


# --- GPU ---------------------------------------------------------------------------


def test_substitute_matches_the_real_pynvml_names_and_codes() -> None:
    fake, _ = fake_nvml([])
    for name, code in _ERROR_CODES.items():
        real_class = getattr(pynvml, f"NVMLError_{name}")
        assert getattr(pynvml, _CONSTANT_NAMES[name]) == code
        assert issubclass(real_class, pynvml.NVMLError)
        # pynvml's NVMLError(code) builds the subclass; so does the substitute.
        assert type(pynvml.NVMLError(code)) is real_class
        assert type(fake.NVMLError(code)).__name__ == real_class.__name__
    for name in _FUNCTIONS:
        assert callable(getattr(pynvml, name)), name
    for name in ("NVML_TEMPERATURE_GPU", "NVML_CLOCK_SM", "NVML_DEVICE_MIG_ENABLE"):
        assert getattr(fake, name) == getattr(pynvml, name)


def test_working_device_fills_every_column_in_units() -> None:
    nvml, _ = fake_nvml([FakeGpu()])
    missing = MissingMetrics()
    sampler = GpuSampler("fog", missing, nvml)
    first, second = _rows(sampler, times=2)
    sampler.close()

    assert missing.as_list() == []
    assert first["node"] == "fog" and first["index"] == "0" and first["mig_index"] == ""
    assert first["uuid"] == "GPU-6f1c0b1e-0000-4000-8000-000000000001"
    assert first["name"] == "NVIDIA H100 80GB HBM3"
    assert first["gpu_util_percent"] == "40"
    assert int(first["memory_used_bytes"]) == 2 * 1024**3
    assert int(first["memory_total_bytes"]) == 80 * 1024**3
    assert float(first["power_w"]) == 150.0
    assert float(first["temperature_c"]) == 45 and float(first["sm_clock_mhz"]) == 1755
    # The counter (mJ in NVML) is written in joules and grows by 150 W x 0.25 s.
    growth = float(second["energy_counter_j"]) - float(first["energy_counter_j"])
    assert growth == pytest.approx(37.5)
    assert sampler.driver_version == "550.54.15"
    assert sampler.energy() == {
        "GPU 0 (GPU-6f1c0b1e-0000-4000-8000-000000000001)": {
            "energy_j": 37.5,
            "method": "energy counter",
        }
    }


@pytest.mark.parametrize("error", ["LibraryNotFound", "DriverNotLoaded", "Unknown"])
def test_nvml_failing_at_init_gives_no_rows_and_lists_gpu_as_missing(
    error: str, caplog: pytest.LogCaptureFixture
) -> None:
    nvml, calls = fake_nvml([FakeGpu()], init_error=error)
    missing = MissingMetrics()
    caplog.set_level(logging.WARNING, logger="sparse_zmq.sampling")
    sampler = GpuSampler("edge", missing, nvml)
    assert not sampler.available
    assert all(sampler.sample(float(i)) == [] for i in range(10))
    sampler.close()
    assert [m["metric"] for m in missing.as_list()] == ["gpu"]
    assert f"NVMLError_{error}" in missing.as_list()[0]["reason"]
    assert len(caplog.records) == 1
    assert calls == {"nvmlInit": 1}


def test_the_installed_pynvml_on_this_machine_never_raises() -> None:
    missing = MissingMetrics()
    sampler = GpuSampler("here", missing)
    rows = sampler.sample(time.time())
    sampler.close()
    if not sampler.available:
        assert rows == [] and "gpu" in missing
    else:
        assert len(rows) == len(sampler.devices)


def test_power_not_supported_leaves_power_empty_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gpus = [
        FakeGpu(uuid=f"GPU-{i}", unsupported={"nvmlDeviceGetPowerUsage"})
        for i in range(2)
    ]
    nvml, calls = fake_nvml(gpus)
    missing = MissingMetrics()
    caplog.set_level(logging.WARNING, logger="sparse_zmq.sampling")
    sampler = GpuSampler("fog", missing, nvml)
    rows = _rows(sampler, times=20)

    assert len(rows) == 40
    assert all(row["power_w"] == "" for row in rows)
    assert all(row["energy_counter_j"] != "" for row in rows)
    assert all(row["gpu_util_percent"] == "40" for row in rows)
    assert len(caplog.records) == 1, "one warning per metric, not per sample or device"
    assert {(m["metric"], m["where"]) for m in missing.as_list()} == {
        ("power_w", "GPU 0 (GPU-0)"),
        ("power_w", "GPU 1 (GPU-1)"),
    }
    assert calls["nvmlDeviceGetPowerUsage"] == 2, "an unsupported query is not repeated"
    # The counter still gives the energy.
    assert all(e["method"] == "energy counter" for e in sampler.energy().values())


def test_energy_counter_not_supported_falls_back_to_the_power_integral() -> None:
    nvml, _ = fake_nvml([FakeGpu(unsupported={"nvmlDeviceGetTotalEnergyConsumption"})])
    missing = MissingMetrics()
    sampler = GpuSampler("fog", missing, nvml)
    rows = _rows(sampler, times=5)  # 1 s of samples at 150 W
    assert all(
        row["energy_counter_j"] == "" and row["power_w"] == "150.000" for row in rows
    )
    assert [m["metric"] for m in missing.as_list()] == ["energy_counter_j"]
    (energy,) = sampler.energy().values()
    assert energy == {"energy_j": 150.0, "method": "power integral", "span_s": 1.0}


def test_everything_but_the_name_unsupported_still_writes_rows_with_empty_cells() -> (
    None
):
    unsupported = set(_FUNCTIONS) - {"nvmlDeviceGetName"}
    nvml, _ = fake_nvml([FakeGpu(name="Orin (nvgpu)", unsupported=unsupported)])
    missing = MissingMetrics()
    sampler = GpuSampler("jetson", missing, nvml)
    (row,) = _rows(sampler)
    assert row["name"] == "Orin (nvgpu)" and row["index"] == "0"
    metrics = GPU_COLUMNS[GPU_COLUMNS.index("uuid") :]
    assert all(row[c] == "" for c in metrics if c != "name"), (
        "never 0 for a missing value"
    )
    assert {m["metric"] for m in missing.as_list()} == {
        "gpu uuid",
        "gpu_util_percent",
        "memory_used_bytes",
        "memory_total_bytes",
        "power_w",
        "energy_counter_j",
        "temperature_c",
        "sm_clock_mhz",
    }
    assert sampler.energy() == {}


def test_mig_mode_gives_a_row_per_mig_device_and_no_parent_utilization() -> None:
    parts = [
        FakeGpu(
            name="NVIDIA A100 MIG 3g.40gb",
            uuid=f"MIG-{i}",
            memory_total=40 * 1024**3,
            util=10 * (i + 1),
            unsupported={"nvmlDeviceGetPowerUsage", "nvmlDeviceGetTemperature"},
        )
        for i in range(2)
    ]
    nvml, calls = fake_nvml([FakeGpu(name="NVIDIA A100-SXM4-80GB", mig=parts)])
    missing = MissingMetrics()
    sampler = GpuSampler("cloud", missing, nvml)
    parent, first, second = _rows(sampler)

    assert (parent["index"], parent["mig_index"]) == ("0", "")
    assert parent["gpu_util_percent"] == "" and parent["power_w"] == "150.000"
    assert [(r["index"], r["mig_index"], r["uuid"]) for r in (first, second)] == [
        ("0", "0", "MIG-0"),
        ("0", "1", "MIG-1"),
    ]
    assert first["gpu_util_percent"] == "10" and second["gpu_util_percent"] == "20"
    assert int(first["memory_total_bytes"]) == 40 * 1024**3
    # Power, energy, temperature, clock belong to the whole GPU: not asked of parts.
    assert all(first[c] == "" for c in ("power_w", "energy_counter_j", "temperature_c"))
    assert calls["nvmlDeviceGetPowerUsage"] == 1
    assert [m["metric"] for m in missing.as_list()] == ["gpu_util_percent"]


def test_names_and_uuids_returned_as_bytes_are_written_as_text() -> None:
    nvml, _ = fake_nvml([FakeGpu(name="Tesla T4", uuid="GPU-abc")], as_bytes=True)
    sampler = GpuSampler("fog", MissingMetrics(), nvml)
    (row,) = _rows(sampler)
    assert (row["name"], row["uuid"]) == ("Tesla T4", "GPU-abc")
    assert sampler.driver_version == "550.54.15"
    assert sampler.describe() == [
        {"index": 0, "mig_index": None, "uuid": "GPU-abc", "name": "Tesla T4"}
    ]


def test_a_transient_nvml_error_empties_one_cell_and_is_asked_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gpu = FakeGpu(fail_once={"nvmlDeviceGetTemperature": "GpuIsLost"})
    nvml, _ = fake_nvml([gpu])
    missing = MissingMetrics()
    caplog.set_level(logging.WARNING, logger="sparse_zmq.sampling")
    sampler = GpuSampler("fog", missing, nvml)
    first, second = _rows(sampler, times=2)
    assert first["temperature_c"] == "" and second["temperature_c"] == "45"
    assert missing.as_list() == [], "a transient error is not a missing metric"
    assert len(caplog.records) == 1 and "GpuIsLost" in caplog.text


def test_energy_meter_never_uses_a_single_reading() -> None:
    meter = EnergyMeter()
    meter.add(10.0, 300.0, None)
    assert meter.result() is None
    meter.add(11.0, 100.0, None)
    assert meter.result() == {
        "energy_j": 200.0,
        "method": "power integral",
        "span_s": 1.0,
    }
    meter = EnergyMeter()
    for t, counter in ((0.0, 500.0), (1.0, 560.0), (2.0, 3.0), (3.0, 63.0)):
        meter.add(t, None, counter)  # the driver reloaded between 1 s and 2 s
    assert meter.result() == {"energy_j": 60.0, "method": "energy counter"}


# --- host -------------------------------------------------------------------------


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    """A real process that waits on its stdin until the test ends it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(DEADLINE_S)


def test_host_rows_cover_the_machine_and_each_registered_process(
    child: subprocess.Popen[bytes],
) -> None:
    registry = ProcessRegistry()
    registry.register(child.pid, "fog", "partition-0", "stage")
    sampler = HostSampler("vm", registry, MissingMetrics())
    first = [dict(zip(HOST_COLUMNS, r, strict=True)) for r in sampler.sample(1.0)]
    # Burn a little CPU time so the second sample has something to measure.
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    second = [dict(zip(HOST_COLUMNS, r, strict=True)) for r in sampler.sample(2.0)]

    assert [r["scope"] for r in first] == ["machine", "process"]
    machine, proc = second
    assert first[0]["cpu_percent"] == "" and first[1]["cpu_percent"] == "", (
        "no CPU share before two samples"
    )
    assert 0.0 <= float(machine["cpu_percent"]) <= 100.0
    assert int(machine["memory_used_bytes"]) > 0 and machine["pid"] == ""
    assert (proc["pid"], proc["node"], proc["stage"], proc["role"]) == (
        str(child.pid),
        "fog",
        "partition-0",
        "stage",
    )
    assert 0.0 <= float(proc["cpu_percent"]) <= 100.0
    assert int(proc["memory_used_bytes"]) > 0 and int(proc["threads"]) >= 1


def test_an_ended_process_is_dropped_from_sampling(
    child: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    registry = ProcessRegistry()
    registry.register(child.pid, "edge", "source", "source")
    sampler = HostSampler("vm", registry, MissingMetrics())
    assert len(sampler.sample(1.0)) == 2
    child.kill()
    child.wait(DEADLINE_S)
    caplog.set_level(logging.INFO, logger="sparse_zmq.sampling")
    assert len(sampler.sample(2.0)) == 1
    assert not registry.known(child.pid)
    assert "ended" in caplog.text


def test_missing_metrics_warn_once_per_metric(caplog: pytest.LogCaptureFixture) -> None:
    missing = MissingMetrics("fog")
    caplog.set_level(logging.WARNING, logger="sparse_zmq.sampling")
    assert missing.add("power_w", "GPU 0", "NotSupported")
    assert not missing.add("power_w", "GPU 0", "NotSupported")
    assert missing.add("power_w", "GPU 1", "NotSupported")
    assert missing.add("sm_clock_mhz", "GPU 0", "NoPermission")
    assert len(caplog.records) == 2
    assert "power_w" in missing and "temperature_c" not in missing
    assert len(missing.as_list()) == 3


# --- network ---------------------------------------------------------------------


class _FakeNet:
    """Counters and a clock the test sets before each sample."""

    def __init__(self) -> None:
        self.now = 0.0
        self.counters: dict[str, NetCounters] = {}
        self.speeds: dict[str, float] = {}

    def sampler(self) -> NetSampler:
        return NetSampler(
            "fog",
            counters=lambda: dict(self.counters),
            speeds=lambda: dict(self.speeds),
            clock=lambda: self.now,
        )


def _net_rows(
    sampler: NetSampler, net: _FakeNet, steps: list[Mapping[str, NetCounters]]
) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for step in steps:
        net.now += 1.0
        net.counters = dict(step)
        rows.extend(
            dict(zip(NET_COLUMNS, r, strict=True)) for r in sampler.sample(net.now)
        )
    return rows


def _rates(rows: list[dict[str, str]]) -> list[float]:
    return [
        float(row[c])
        for row in rows
        for c in ("sent_bytes_per_s", "recv_bytes_per_s")
        if row[c] != ""
    ]


def test_net_rates_are_deltas_over_the_interval() -> None:
    net = _FakeNet()
    rows = _net_rows(
        net.sampler(),
        net,
        [{"eth0": NetCounters(1_000, 5_000)}, {"eth0": NetCounters(3_000, 5_500)}],
    )
    assert rows[0]["event"] == "new" and rows[0]["sent_bytes_per_s"] == ""
    assert (rows[1]["sent_bytes_per_s"], rows[1]["recv_bytes_per_s"]) == (
        "2000.0",
        "500.0",
    )
    assert rows[1]["interval_s"] == "1.000" and rows[1]["event"] == ""
    assert (rows[1]["bytes_sent"], rows[1]["bytes_recv"]) == ("3000", "5500")


def test_net_counter_wrap_reset_and_vanishing_interface_give_no_absurd_rate() -> None:
    net = _FakeNet()
    net.speeds = {"eth0": 1e9 / 8}  # 1 Gbit/s
    top32 = 2**32
    steps: list[Mapping[str, NetCounters]] = [
        {
            "eth0": NetCounters(top32 - 1_000, 10),
            "wlan0": NetCounters(5_000_000, 5_000_000),
        },
        # eth0's 32-bit send counter wraps: 1000 bytes to the top, then 500.
        {"eth0": NetCounters(500, 20), "wlan0": NetCounters(6_000_000, 6_000_000)},
        # wlan0 resets (driver reload): its counters restart near zero.
        {"eth0": NetCounters(1_500, 30), "wlan0": NetCounters(2_000, 1_000)},
        {"eth0": NetCounters(2_500, 40), "wlan0": NetCounters(4_000, 2_000)},
        # wlan0 vanishes...
        {"eth0": NetCounters(3_500, 50)},
        # ...and comes back with fresh counters.
        {"eth0": NetCounters(4_500, 60), "wlan0": NetCounters(100, 100)},
        {"eth0": NetCounters(5_500, 70), "wlan0": NetCounters(300, 300)},
        # A jump no 1 Gbit/s link can carry in a second.
        {"eth0": NetCounters(5_500 + 10**12, 80), "wlan0": NetCounters(400, 400)},
    ]
    rows = _net_rows(net.sampler(), net, steps)
    by_interface: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_interface.setdefault(row["interface"], []).append(row)
    eth0, wlan0 = by_interface["eth0"], by_interface["wlan0"]

    assert eth0[1]["event"] == "wrap" and eth0[1]["sent_bytes_per_s"] == "1500.0"
    assert wlan0[2]["event"] == "reset" and wlan0[2]["sent_bytes_per_s"] == ""
    assert wlan0[3]["event"] == "" and wlan0[3]["sent_bytes_per_s"] == "2000.0"
    assert wlan0[4]["event"] == "gone" and wlan0[4]["bytes_sent"] == ""
    assert wlan0[5]["event"] == "new" and wlan0[5]["sent_bytes_per_s"] == ""
    assert wlan0[6]["sent_bytes_per_s"] == "200.0"
    assert eth0[7]["event"] == "implausible" and eth0[7]["sent_bytes_per_s"] == ""

    rates = _rates(rows)
    assert rates, "some rates were computed"
    assert all(0.0 <= rate <= 2 * 1e9 / 8 for rate in rates)


def test_net_reset_of_a_64bit_counter_is_not_mistaken_for_a_wrap() -> None:
    net = _FakeNet()  # no link speed known: the generic ceiling applies
    rows = _net_rows(
        net.sampler(),
        net,
        [
            {"lo": NetCounters(3 * 10**12, 3 * 10**12)},
            {"lo": NetCounters(10, 10)},
            {"lo": NetCounters(2**64 - 100, 20)},
            {"lo": NetCounters(50, 50)},
        ],
    )
    assert rows[1]["event"] == "reset"
    assert rows[2]["event"] == "implausible"
    assert rows[3]["event"] == "wrap" and rows[3]["sent_bytes_per_s"] == "150.0"
    assert all(0.0 <= rate <= MAX_PLAUSIBLE_BYTES_PER_S for rate in _rates(rows))


def test_net_sampler_reads_this_machine() -> None:
    sampler = NetSampler("vm")
    first = sampler.sample(1.0)
    second = sampler.sample(2.0)
    assert first and all(row[-1] == "new" for row in first)
    assert all(float(r[5]) >= 0 for r in second if r[5] != "")


# --- the whole monitor with the substitute -------------------------------------------


def test_monitor_with_a_gpu_writes_gpu_rows_energy_and_a_report(tmp_path: Path) -> None:
    nvml, _ = fake_nvml([FakeGpu()])
    endpoint = default_endpoint(tmp_path)
    stop = threading.Event()
    server = MonitorServer(tmp_path, endpoint, sample_interval_s=0.05, nvml=nvml)
    thread = threading.Thread(target=server.run, args=(stop,), daemon=True)
    thread.start()
    try:
        with MonitorClient(
            endpoint, node="cloud", stage="partition-1", role="stage"
        ) as client:
            # Tasks of 0.1 s (two sampling intervals) inside the sampled span.
            _wait_rows(tmp_path / "gpu.csv", 3)
            now = time.time()
            for i in range(4):
                start = now - 0.04 + 0.02 * i
                client.task(f"t{i}", "train", 8, start, start + 0.1, 800, 80)
            _wait_rows(tmp_path / "tasks.csv", 4)
            _wait_for_sample_after(tmp_path / "gpu.csv", now + 0.2)
    finally:
        stop.set()
        thread.join(DEADLINE_S)
        server.close()
    assert not thread.is_alive()

    with (tmp_path / "gpu.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["power_w"] == "150.000" for r in rows)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["missing"] == []
    assert run["host"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert run["versions"]["nvml-driver"] == "550.54.15"
    assert (
        run["gpu_energy"]["GPU 0 (GPU-6f1c0b1e-0000-4000-8000-000000000001)"]["method"]
        == "energy counter"
    )

    report = build_report(tmp_path)
    (figures,) = report.stages
    assert figures.power_w == pytest.approx(150.0)
    assert figures.gpu_util_percent == pytest.approx(40.0)
    assert figures.energy_per_sample_j is not None and figures.energy_per_sample_j > 0
    assert figures.short_windows == 0
    assert "not available: nothing" in report.render()


def _data_rows(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return 0


def _wait_for_sample_after(path: Path, moment: float) -> None:
    def last_time() -> float:
        lines = path.read_bytes().splitlines()
        return float(lines[-1].split(b",")[0]) if len(lines) > 1 else 0.0

    deadline = time.monotonic() + DEADLINE_S
    tick = threading.Event()
    while last_time() <= moment:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for a sample in {path.name}")
        tick.wait(0.02)


def _wait_rows(path: Path, count: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    tick = threading.Event()
    while _data_rows(path) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {count} rows in {path.name}")
        tick.wait(0.02)
