"""What the monitor samples on its own: the node's GPUs, host and network.

The monitor (:mod:`sparse_zmq.monitor`) calls three samplers at a fixed
interval from a thread of its own, so nothing in the pipeline ever waits on a
sample. Each sampler returns rows, one string per column, ready for its CSV
file; a value the machine cannot provide is an empty cell, never ``0``.

* :class:`GpuSampler` reads every GPU through NVML (the ``pynvml`` module of
  the nvidia-ml-py package), one row per device per sample, identified by
  index and UUID (:data:`GPU_COLUMNS`). Power draw is what NVML reports,
  which on Ampere (except GA100) and newer GPUs is already an average over
  one second (NVML API reference, ``nvmlDeviceGetPowerUsage``); the
  total-energy counter
  (``nvmlDeviceGetTotalEnergyConsumption``, Volta and later) is the better
  source for energy, and :class:`EnergyMeter` uses it where present and
  integrates the power series otherwise.
* :class:`HostSampler` reads the machine's CPU and memory and those of each
  process registered with the monitor (:data:`HOST_COLUMNS`), through psutil.
* :class:`NetSampler` reads the byte counters of every network interface and
  turns them into rates (:data:`NET_COLUMNS`), coping with counters that wrap
  around, counters that restart (an interface reset) and interfaces that come
  and go: a rate it cannot trust is left empty and the row says why.

What a machine cannot provide (no NVML library, a query a device does not
support, a process psutil may not read) is collected in
:class:`MissingMetrics`: one WARNING per metric, not per sample, and the full
list goes to ``run.json``.

Example::

    missing = MissingMetrics()
    gpus = GpuSampler("fog-1", missing)
    rows = gpus.sample(time.time())
    gpus.close()
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import platform
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, NamedTuple

import psutil

__all__ = [
    "GPU_COLUMNS",
    "HOST_COLUMNS",
    "MAX_PLAUSIBLE_BYTES_PER_S",
    "NET_COLUMNS",
    "NET_EVENTS",
    "EnergyMeter",
    "GpuSampler",
    "HostSampler",
    "MissingMetrics",
    "NetCounters",
    "NetSampler",
    "ProcessInfo",
    "ProcessRegistry",
    "describe_host",
    "package_versions",
    "processes_from_json",
    "read_link_speeds",
    "read_net_counters",
]

logger = logging.getLogger(__name__)

GPU_COLUMNS: tuple[str, ...] = (
    "time",
    "node",
    "index",
    "mig_index",
    "uuid",
    "name",
    "gpu_util_percent",
    "memory_used_bytes",
    "memory_total_bytes",
    "power_w",
    "energy_counter_j",
    "temperature_c",
    "sm_clock_mhz",
)
"""Columns of ``gpu.csv``. ``time`` is wall-clock Unix seconds; ``mig_index``
is empty for a whole GPU and names the partition for a MIG device;
``energy_counter_j`` is the device's running total since the driver loaded."""

HOST_COLUMNS: tuple[str, ...] = (
    "time",
    "node",
    "scope",
    "pid",
    "stage",
    "role",
    "cpu_percent",
    "cpu_time_s",
    "memory_used_bytes",
    "memory_percent",
    "threads",
)
"""Columns of ``host.csv``. ``scope`` is ``machine`` (whole machine, pid
empty) or ``process``. ``cpu_percent`` is a share of the whole machine's CPU
capacity (all cores = 100) since the previous sample, so process rows add up
to at most the machine row; ``cpu_time_s`` is a process's user plus system
CPU time so far; ``memory_used_bytes`` is total minus available for the
machine and the resident set for a process."""

NET_COLUMNS: tuple[str, ...] = (
    "time",
    "node",
    "interface",
    "bytes_sent",
    "bytes_recv",
    "sent_bytes_per_s",
    "recv_bytes_per_s",
    "interval_s",
    "event",
)
"""Columns of ``net.csv``. ``bytes_sent`` and ``bytes_recv`` are the raw
counters as the kernel reports them; the rates are over ``interval_s``, the
time since the previous sample of the interface. ``event`` is empty for a
normal row, else one of :data:`NET_EVENTS`, and the rates are empty whenever
they cannot be trusted."""

NET_EVENTS: Mapping[str, str] = {
    "new": "first sample of the interface: no rate yet",
    "wrap": "a counter wrapped around its width; the rate accounts for it",
    "reset": "a counter went back (interface reset); no rate for this sample",
    "implausible": "the change exceeds what the interface can carry; no rate",
    "gone": "the interface disappeared; counters and rates empty",
}
"""Values of the ``event`` column of ``net.csv`` and what each means."""

MAX_PLAUSIBLE_BYTES_PER_S = 100e9
"""Fastest rate believed when an interface does not report its speed
(loopback, virtual interfaces): 800 Gbit/s, above any NIC on sale in 2025."""

_SPEED_MARGIN = 2.0
"""A rate may exceed the link speed psutil reports by this factor (full
duplex counts, bursts buffered between samples) before it is refused."""

_COUNTER_WIDTHS = (32, 64)
"""Widths of kernel network counters: 32-bit on some older or 32-bit systems,
64-bit on current Linux (``/proc/net/dev``)."""


# --- what is missing --------------------------------------------------------


class MissingMetrics:
    """The metrics this machine could not provide, with one warning each.

    Thread-safe: the monitor's sampler thread adds, the thread writing
    ``run.json`` reads.

    Args:
        node: Name of the node, for log lines.
    """

    def __init__(self, node: str = "node") -> None:
        self.node = node
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], str] = {}
        self._warned: set[str] = set()
        self.changes = 0
        """Incremented on every new entry, so a writer knows when to rewrite."""

    def add(self, metric: str, where: str, reason: str) -> bool:
        """Record that ``metric`` is unavailable at ``where``.

        Logs a WARNING the first time ``metric`` is missing anywhere; later
        devices or processes missing the same metric are only listed.

        Args:
            metric: Column or metric name, e.g. ``"power_w"`` or ``"gpu"``.
            where: What lacks it: ``"GPU 0 (GPU-1234...)"``, ``"pid 812"``.
            reason: Why, e.g. ``"NVMLError_NotSupported"``.

        Returns:
            True if this (metric, where) pair was new.
        """
        with self._lock:
            key = (metric, where)
            if key in self._items:
                return False
            self._items[key] = reason
            self.changes += 1
            first = metric not in self._warned
            self._warned.add(metric)
        if first:
            logger.warning(
                "node %s: %s not available on %s (%s); cells left empty, "
                "logged once per metric",
                self.node,
                metric,
                where,
                reason,
            )
        return True

    def __contains__(self, metric: object) -> bool:
        with self._lock:
            return any(key[0] == metric for key in self._items)

    def as_list(self) -> list[dict[str, str]]:
        """The entries as JSON-ready dicts, in the order they were found."""
        with self._lock:
            return [
                {"metric": metric, "where": where, "reason": reason}
                for (metric, where), reason in self._items.items()
            ]


def _cell(value: float | int | None, digits: int | None = None) -> str:
    """One CSV cell: empty for a missing value, else the number as text."""
    if value is None:
        return ""
    if digits is None:
        return str(value)
    return f"{value:.{digits}f}"


def _time_cell(now: float) -> str:
    return f"{now:.6f}"


# --- GPU through NVML --------------------------------------------------------


def _as_text(value: object) -> str:
    """Device names and UUIDs as text: older bindings return bytes, newer str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


@dataclass
class _Device:
    handle: Any
    index: int
    mig_index: int | None
    uuid: str
    name: str
    where: str
    skip: set[str] = field(default_factory=set)
    """Metrics not queried on this device: unsupported, or the parent's."""


@dataclass
class EnergyMeter:
    """Energy of one device over a run, from its counter or its power series.

    The counter, where the device has one, gives the energy as the difference
    of two readings; otherwise the power series is integrated with the
    trapezoid rule. A single power reading is never taken for energy.

    Attributes:
        counter_first_j: First energy-counter reading, or None.
        counter_last_j: Latest energy-counter reading, or None.
        power_integral_j: Trapezoid integral of the power series so far.
        power_span_s: Time covered by that integral.
    """

    counter_first_j: float | None = None
    counter_last_j: float | None = None
    power_integral_j: float = 0.0
    power_span_s: float = 0.0
    _last_power: tuple[float, float] | None = None

    def add(self, now: float, power_w: float | None, counter_j: float | None) -> None:
        """Account one sample (either value may be None)."""
        if counter_j is not None:
            if self.counter_first_j is None or (
                self.counter_last_j is not None and counter_j < self.counter_last_j
            ):
                # First reading, or the counter restarted (driver reload).
                self.counter_first_j = counter_j
            self.counter_last_j = counter_j
        if power_w is not None:
            if self._last_power is not None and now > self._last_power[0]:
                dt = now - self._last_power[0]
                self.power_integral_j += 0.5 * (power_w + self._last_power[1]) * dt
                self.power_span_s += dt
            self._last_power = (now, power_w)

    def result(self) -> dict[str, Any] | None:
        """``{"energy_j", "method", "span_s"}``, or None when nothing was seen."""
        if self.counter_first_j is not None and self.counter_last_j is not None:
            energy = self.counter_last_j - self.counter_first_j
            if energy > 0 or self.power_span_s == 0:
                return {"energy_j": round(energy, 3), "method": "energy counter"}
        if self.power_span_s > 0:
            return {
                "energy_j": round(self.power_integral_j, 3),
                "method": "power integral",
                "span_s": round(self.power_span_s, 3),
            }
        return None


class GpuSampler:
    """Samples every GPU of the machine through NVML.

    NVML missing altogether (no driver: ``NVMLError_LibraryNotFound``, or any
    other NVML error at initialisation, or no ``pynvml`` module) leaves the
    sampler with no devices: :meth:`sample` returns no rows and ``gpu`` is
    listed in ``missing``. A query a device refuses with
    ``NVMLError_NotSupported`` or ``NVMLError_NoPermission`` (Jetson-class
    boards, MIG partitions, consumer GPUs) leaves that column empty on that
    device for the rest of the run and is not asked again; other NVML errors
    leave the cell empty for that sample only.

    On a GPU in MIG mode the whole GPU keeps its row (power, energy,
    temperature, clock; NVML does not report its utilization) and each MIG
    device gets a row of its own with memory and utilization where NVML
    gives them; power, energy, temperature and clock belong to the whole GPU
    and are not asked of a MIG device.

    Args:
        node: Name of the node, written in every row.
        missing: Where unavailable metrics are recorded.
        nvml: The NVML binding. None imports ``pynvml``; tests pass a
            substitute with the same functions and error classes.
    """

    def __init__(
        self, node: str, missing: MissingMetrics, nvml: ModuleType | None = None
    ) -> None:
        self.node = node
        self.missing = missing
        self.devices: list[_Device] = []
        self.driver_version: str | None = None
        self.meters: dict[str, EnergyMeter] = {}
        self._nvml: ModuleType | None = None
        self._error_seen: set[tuple[str, str]] = set()

        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                missing.add("gpu", "this machine", f"pynvml not importable: {exc}")
                return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            missing.add("gpu", "this machine", f"NVML init failed: {_nvml_reason(exc)}")
            return
        self._nvml = nvml
        try:
            self.driver_version = _as_text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            self.driver_version = None
        try:
            self._find_devices(nvml)
        except nvml.NVMLError as exc:
            missing.add(
                "gpu", "this machine", f"listing devices failed: {_nvml_reason(exc)}"
            )
        if not self.devices and "gpu" not in missing:
            missing.add("gpu", "this machine", "NVML reports no devices")
        logger.info(
            "node %s: NVML driver %s, %d GPU device(s): %s",
            node,
            self.driver_version,
            len(self.devices),
            ", ".join(d.where for d in self.devices) or "none",
        )

    def _find_devices(self, nvml: ModuleType) -> None:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            device = self._describe(nvml, handle, index, None)
            self.devices.append(device)
            if not self._mig_enabled(nvml, handle):
                continue
            # NVML gives no utilization for a GPU split into MIG devices.
            device.skip.add("gpu_util_percent")
            self.missing.add(
                "gpu_util_percent", device.where, "GPU in MIG mode: per MIG device only"
            )
            for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                except nvml.NVMLError:
                    continue  # an empty slot: NVMLError_NotFound
                child = self._describe(nvml, mig, index, slot)
                child.skip.update(("power_w", "energy_counter_j", "temperature_c"))
                child.skip.add("sm_clock_mhz")
                self.devices.append(child)

    def _describe(
        self, nvml: ModuleType, handle: Any, index: int, mig_index: int | None
    ) -> _Device:
        label = f"GPU {index}" if mig_index is None else f"GPU {index} MIG {mig_index}"
        uuid = self._identity(nvml, "uuid", nvml.nvmlDeviceGetUUID, handle, label)
        name = self._identity(nvml, "name", nvml.nvmlDeviceGetName, handle, label)
        where = f"{label} ({uuid})" if uuid else label
        return _Device(handle, index, mig_index, uuid, name, where)

    def _identity(
        self,
        nvml: ModuleType,
        what: str,
        query: Callable[[Any], object],
        handle: Any,
        label: str,
    ) -> str:
        try:
            return _as_text(query(handle))
        except nvml.NVMLError as exc:
            self.missing.add(f"gpu {what}", label, _nvml_reason(exc))
            return ""

    @staticmethod
    def _mig_enabled(nvml: ModuleType, handle: Any) -> bool:
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError:
            return False  # not MIG-capable (NotSupported) or not telling
        return bool(current == nvml.NVML_DEVICE_MIG_ENABLE)

    @property
    def available(self) -> bool:
        """Whether NVML is up and shows at least one device."""
        return bool(self.devices)

    def sample(self, now: float) -> list[list[str]]:
        """One row per device (empty when NVML is unavailable).

        Args:
            now: Wall-clock Unix time written in the rows.
        """
        nvml = self._nvml
        if nvml is None:
            return []
        rows = []
        for device in self.devices:
            values = self._query_all(nvml, device)
            rows.append(
                [
                    _time_cell(now),
                    self.node,
                    str(device.index),
                    _cell(device.mig_index),
                    device.uuid,
                    device.name,
                    _cell(values.get("gpu_util_percent")),
                    _cell(values.get("memory_used_bytes")),
                    _cell(values.get("memory_total_bytes")),
                    _cell(values.get("power_w"), 3),
                    _cell(values.get("energy_counter_j"), 3),
                    _cell(values.get("temperature_c")),
                    _cell(values.get("sm_clock_mhz")),
                ]
            )
            if device.mig_index is None:
                meter = self.meters.setdefault(device.where, EnergyMeter())
                meter.add(now, values.get("power_w"), values.get("energy_counter_j"))
        return rows

    def _query_all(self, nvml: ModuleType, device: _Device) -> dict[str, float | int]:
        values: dict[str, float | int] = {}
        for metric, query in _GPU_QUERIES:
            if metric in device.skip:
                continue
            try:
                values.update(query(nvml, device.handle))
            except nvml.NVMLError as exc:
                self._query_failed(nvml, device, metric, exc)
        return values

    def _query_failed(
        self, nvml: ModuleType, device: _Device, metric: str, exc: Exception
    ) -> None:
        reason = _nvml_reason(exc)
        permanent = (
            getattr(nvml, "NVMLError_NotSupported", ()),
            getattr(nvml, "NVMLError_NoPermission", ()),
            getattr(nvml, "NVMLError_FunctionNotFound", ()),
        )
        if isinstance(exc, permanent):
            device.skip.add(metric)
            for column in _QUERY_COLUMNS[metric]:
                self.missing.add(column, device.where, reason)
            return
        # Transient (GPU busy resetting, lost...): empty cell, one warning per kind.
        key = (metric, reason)
        if key not in self._error_seen:
            self._error_seen.add(key)
            logger.warning(
                "node %s: NVML query for %s on %s failed (%s); cell left empty, "
                "logged once per metric and error",
                self.node,
                metric,
                device.where,
                reason,
            )

    def energy(self) -> dict[str, dict[str, Any]]:
        """Energy per whole GPU since the first sample (see :class:`EnergyMeter`)."""
        return {
            where: result
            for where, meter in self.meters.items()
            if (result := meter.result()) is not None
        }

    def describe(self) -> list[dict[str, Any]]:
        """The devices as JSON-ready dicts (index, MIG index, UUID, name)."""
        return [
            {"index": d.index, "mig_index": d.mig_index, "uuid": d.uuid, "name": d.name}
            for d in self.devices
        ]

    def close(self) -> None:
        """Shut NVML down (once); later samples return no rows."""
        nvml, self._nvml = self._nvml, None
        if nvml is None:
            return
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            logger.debug("node %s: nvmlShutdown failed: %s", self.node, exc)


def _nvml_reason(exc: BaseException) -> str:
    """An NVML error as ``ClassName (code N)``; str() of some codes calls NVML."""
    code = getattr(exc, "value", None)
    return f"{type(exc).__name__} (code {code})" if code is not None else repr(exc)


def _utilization(nvml: ModuleType, handle: Any) -> dict[str, float | int]:
    return {"gpu_util_percent": int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)}


def _memory(nvml: ModuleType, handle: Any) -> dict[str, float | int]:
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    return {"memory_used_bytes": int(info.used), "memory_total_bytes": int(info.total)}


def _power(nvml: ModuleType, handle: Any) -> dict[str, float | int]:
    # NVML reports milliwatts.
    return {"power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0}


def _energy(nvml: ModuleType, handle: Any) -> dict[str, float | int]:
    # NVML reports millijoules since the driver was last loaded.
    return {
        "energy_counter_j": nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0
    }


def _temperature(nvml: ModuleType, handle: Any) -> dict[str, float | int]:
    value = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
    return {"temperature_c": int(value)}


def _sm_clock(nvml: ModuleType, handle: Any) -> dict[str, float | int]:
    return {
        "sm_clock_mhz": int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
    }


_GPU_QUERIES: tuple[
    tuple[str, Callable[[ModuleType, Any], dict[str, float | int]]], ...
] = (
    ("gpu_util_percent", _utilization),
    ("memory_used_bytes", _memory),
    ("power_w", _power),
    ("energy_counter_j", _energy),
    ("temperature_c", _temperature),
    ("sm_clock_mhz", _sm_clock),
)
"""One NVML query per metric, named after the (first) column it fills."""

_QUERY_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "gpu_util_percent": ("gpu_util_percent",),
    "memory_used_bytes": ("memory_used_bytes", "memory_total_bytes"),
    "power_w": ("power_w",),
    "energy_counter_j": ("energy_counter_j",),
    "temperature_c": ("temperature_c",),
    "sm_clock_mhz": ("sm_clock_mhz",),
}


# --- host through psutil ------------------------------------------------------


@dataclass(frozen=True)
class ProcessInfo:
    """A process of the node, as it registered with the monitor.

    Attributes:
        pid: Its process id.
        node: Node name it reports under.
        stage: Stage name ("source", "partition-0", "broker-fog"...).
        role: What it does ("source", "stage", "broker", "monitor"...).
        create_time: psutil's creation time, which tells a reused pid apart.
    """

    pid: int
    node: str
    stage: str
    role: str
    create_time: float | None = None


class ProcessRegistry:
    """The processes whose CPU and memory the host sampler reads.

    Thread-safe: the monitor's receiving thread registers, the sampler thread
    reads and forgets processes that ended.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[int, ProcessInfo] = {}
        self._history: dict[int, ProcessInfo] = {}
        self.changes = 0
        """Incremented on every addition or removal."""

    def register(self, pid: int, node: str, stage: str, role: str) -> bool:
        """Add or rename a process; returns True when something changed."""
        with self._lock:
            old = self._known.get(pid)
            if old is not None and (old.node, old.stage, old.role) == (
                node,
                stage,
                role,
            ):
                return False
        try:
            create_time: float | None = psutil.Process(pid).create_time()
        except (psutil.Error, OSError):
            create_time = None
        with self._lock:
            self._known[pid] = self._history[pid] = ProcessInfo(
                pid, node, stage, role, create_time
            )
            self.changes += 1
        return True

    def restore(self, info: ProcessInfo) -> bool:
        """Re-add a process from an earlier monitor's list if it still runs.

        Returns:
            True if the same process (same pid and creation time) is alive.
        """
        try:
            create_time = psutil.Process(info.pid).create_time()
        except (psutil.Error, OSError):
            return False
        if info.create_time is not None and abs(create_time - info.create_time) > 0.01:
            return False  # the pid now belongs to another process
        with self._lock:
            if info.pid not in self._known:
                self._known[info.pid] = self._history[info.pid] = info
                self.changes += 1
        return True

    def known(self, pid: int) -> bool:
        """Whether ``pid`` is registered."""
        with self._lock:
            return pid in self._known

    def forget(self, pid: int) -> None:
        """Drop a process (it ended)."""
        with self._lock:
            if self._known.pop(pid, None) is not None:
                self.changes += 1

    def snapshot(self) -> list[ProcessInfo]:
        """The registered processes still sampled, by pid."""
        with self._lock:
            return sorted(self._known.values(), key=lambda info: info.pid)

    def history(self) -> list[ProcessInfo]:
        """Every process registered so far, ended ones included, by pid."""
        with self._lock:
            return sorted(self._history.values(), key=lambda info: info.pid)


class HostSampler:
    """Samples the machine's CPU and memory and those of the registered processes.

    CPU shares are computed from CPU-time differences between two samples, so
    the first sample of the machine and of each process has an empty
    ``cpu_percent``. A process that ended is dropped from the registry; one
    that psutil may not read is listed in ``missing`` and skipped.

    Args:
        node: Name of the node, written in the machine row.
        registry: The processes to read.
        missing: Where unavailable metrics are recorded.
    """

    def __init__(
        self, node: str, registry: ProcessRegistry, missing: MissingMetrics
    ) -> None:
        self.node = node
        self.registry = registry
        self.missing = missing
        self.cores = psutil.cpu_count() or 1
        self._machine_last: tuple[float, float, float] | None = None
        self._process_last: dict[int, tuple[float, float]] = {}
        self._handles: dict[int, psutil.Process] = {}

    def sample(self, now: float) -> list[list[str]]:
        """The machine row, then one row per registered process still running."""
        memory = psutil.virtual_memory()
        rows = [self._machine_row(now, memory.total - memory.available, memory.percent)]
        clock = time.monotonic()
        for info in self.registry.snapshot():
            row = self._process_row(now, clock, info, memory.total)
            if row is not None:
                rows.append(row)
        return rows

    def _machine_row(self, now: float, used: int, percent: float) -> list[str]:
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        total = sum(times)
        cpu_percent = None
        if self._machine_last is not None:
            _, last_idle, last_total = self._machine_last
            spent = total - last_total
            if spent > 0:
                busy = spent - (idle - last_idle)
                cpu_percent = min(100.0, max(0.0, 100.0 * busy / spent))
        self._machine_last = (now, idle, total)
        return [
            _time_cell(now),
            self.node,
            "machine",
            "",
            "",
            "",
            _cell(cpu_percent, 1),
            "",
            str(used),
            _cell(percent, 1),
            "",
        ]

    def _process_row(
        self, now: float, clock: float, info: ProcessInfo, memory_total: int
    ) -> list[str] | None:
        try:
            proc = self._handle(info)
            with proc.oneshot():
                cpu = proc.cpu_times()
                rss = proc.memory_info().rss
                threads = proc.num_threads()
        except psutil.AccessDenied as exc:
            self.missing.add("process cpu and memory", f"pid {info.pid}", repr(exc))
            self.registry.forget(info.pid)
            return None
        except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError):
            logger.info(
                "node %s: process %d (%s/%s) ended; no longer sampled",
                self.node,
                info.pid,
                info.node,
                info.stage,
            )
            self._drop(info.pid)
            return None

        cpu_time = cpu.user + cpu.system
        cpu_percent = None
        last = self._process_last.get(info.pid)
        if last is not None and clock > last[0]:
            used = max(0.0, cpu_time - last[1])
            cpu_percent = min(100.0, 100.0 * used / (clock - last[0]) / self.cores)
        self._process_last[info.pid] = (clock, cpu_time)
        return [
            _time_cell(now),
            info.node,
            "process",
            str(info.pid),
            info.stage,
            info.role,
            _cell(cpu_percent, 1),
            _cell(cpu_time, 3),
            str(rss),
            _cell(100.0 * rss / memory_total if memory_total else None, 2),
            str(threads),
        ]

    def _handle(self, info: ProcessInfo) -> psutil.Process:
        proc = self._handles.get(info.pid)
        if proc is None:
            proc = psutil.Process(info.pid)
            if (
                info.create_time is not None
                and abs(proc.create_time() - info.create_time) > 0.01
            ):
                raise psutil.NoSuchProcess(info.pid)  # the pid was reused
            self._handles[info.pid] = proc
        elif not proc.is_running():
            raise psutil.NoSuchProcess(info.pid)
        return proc

    def _drop(self, pid: int) -> None:
        self.registry.forget(pid)
        self._handles.pop(pid, None)
        self._process_last.pop(pid, None)


# --- network through psutil --------------------------------------------------


class NetCounters(NamedTuple):
    """Byte counters of one interface, as read."""

    bytes_sent: int
    bytes_recv: int


def read_net_counters() -> dict[str, NetCounters]:
    """The kernel's raw byte counters per interface (psutil, without its wrap fix)."""
    return {
        name: NetCounters(int(c.bytes_sent), int(c.bytes_recv))
        for name, c in psutil.net_io_counters(pernic=True, nowrap=False).items()
    }


def read_link_speeds() -> dict[str, float]:
    """Link speed per interface in bytes per second (0 when unknown)."""
    try:
        stats = psutil.net_if_stats()
    except (OSError, psutil.Error):
        return {}
    return {name: s.speed * 1e6 / 8 for name, s in stats.items()}


class NetSampler:
    """Turns per-interface byte counters into rates that can be trusted.

    For each interface and direction the change since the previous sample is:

    * the plain difference when the counter grew;
    * when it went back, a wrap-around if the previous value was in the top
      half of a 32- or 64-bit counter and the wrapped difference is a rate
      the interface can carry (event ``wrap``); otherwise an interface reset
      (event ``reset``), and no rate for this sample;
    * refused (event ``implausible``) if it exceeds the interface's link
      speed times a margin, or :data:`MAX_PLAUSIBLE_BYTES_PER_S` when the
      speed is unknown.

    An interface seen for the first time (again) gets no rate (event
    ``new``); one that vanished gets a single ``gone`` row. A negative rate
    can never be written.

    Args:
        node: Name of the node, written in every row.
        counters: Reads the counters; :func:`read_net_counters` by default,
            tests feed their own.
        speeds: Reads link speeds in bytes per second; :func:`read_link_speeds`
            by default. Read again when an interface appears.
        clock: Monotonic clock for the intervals; ``time.monotonic`` by default.
    """

    def __init__(
        self,
        node: str,
        counters: Callable[[], Mapping[str, NetCounters]] = read_net_counters,
        speeds: Callable[[], Mapping[str, float]] = read_link_speeds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self._counters = counters
        self._speeds = speeds
        self._clock = clock
        self._last: dict[str, tuple[float, NetCounters]] = {}
        self._speed: dict[str, float] = dict(speeds())

    def sample(self, now: float) -> list[list[str]]:
        """One row per interface present now, plus one per interface just gone."""
        clock = self._clock()
        current = self._counters()
        rows = []
        for name in sorted(self._last.keys() - current.keys()):
            del self._last[name]
            rows.append([_time_cell(now), self.node, name, "", "", "", "", "", "gone"])
        if current.keys() - self._last.keys():
            self._speed.update(self._speeds())
        for name in sorted(current):
            rows.append(self._row(now, clock, name, current[name]))
        return rows

    def _row(
        self, now: float, clock: float, name: str, counters: NetCounters
    ) -> list[str]:
        previous = self._last.get(name)
        self._last[name] = (clock, counters)
        raw = [
            _time_cell(now),
            self.node,
            name,
            str(counters.bytes_sent),
            str(counters.bytes_recv),
        ]
        if previous is None:
            return [*raw, "", "", "", "new"]
        dt = clock - previous[0]
        if dt <= 0:
            return [*raw, "", "", "", "reset"]

        limit = self._limit(name)
        sent, sent_event = _counter_delta(
            previous[1].bytes_sent, counters.bytes_sent, dt, limit
        )
        recv, recv_event = _counter_delta(
            previous[1].bytes_recv, counters.bytes_recv, dt, limit
        )
        # The more serious of the two directions' events names the row.
        event = max(sent_event, recv_event, key=_EVENT_RANK.__getitem__)
        if sent is None or recv is None:
            sent = recv = None  # a reset or refusal voids both rates of the sample
        return [
            *raw,
            _cell(None if sent is None else sent / dt, 1),
            _cell(None if recv is None else recv / dt, 1),
            f"{dt:.3f}",
            event,
        ]

    def _limit(self, name: str) -> float:
        speed = self._speed.get(name, 0.0)
        return speed * _SPEED_MARGIN if speed > 0 else MAX_PLAUSIBLE_BYTES_PER_S


_EVENT_RANK: Mapping[str, int] = {"": 0, "wrap": 1, "implausible": 2, "reset": 3}


def _counter_delta(
    before: int, after: int, dt: float, limit_bytes_per_s: float
) -> tuple[int | None, str]:
    """Bytes counted between two readings of one counter, and the event seen."""
    limit = limit_bytes_per_s * dt
    if after >= before:
        delta = after - before
        return (delta, "") if delta <= limit else (None, "implausible")
    for width in _COUNTER_WIDTHS:
        top = 1 << width
        if top // 2 <= before < top:
            wrapped = top - before + after
            if wrapped <= limit:
                return wrapped, "wrap"
    return None, "reset"


# --- run description ---------------------------------------------------------


def package_versions() -> dict[str, str | None]:
    """Versions of Python and the packages a run depends on (None if absent).

    Read from package metadata, so the monitor never imports torch for it.
    """
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for label, dist in (
        ("sparse-zmq", "sparse-zmq"),
        ("torch", "torch"),
        ("pyzmq", "pyzmq"),
        ("psutil", "psutil"),
        ("nvidia-ml-py", "nvidia-ml-py"),
        ("numpy", "numpy"),
    ):
        try:
            versions[label] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[label] = None
    if versions["sparse-zmq"] is None:
        from sparse_zmq import __version__

        versions["sparse-zmq"] = __version__
    try:
        import zmq

        versions["libzmq"] = zmq.zmq_version()
    except ImportError:
        versions["libzmq"] = None
    return versions


def describe_host() -> dict[str, Any]:
    """The machine: name, OS, CPU count, memory, boot time."""
    memory = psutil.virtual_memory()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_logical": psutil.cpu_count(),
        "cpu_physical": psutil.cpu_count(logical=False),
        "memory_total_bytes": memory.total,
        "boot_time": psutil.boot_time(),
    }


def processes_from_json(items: Sequence[Mapping[str, Any]]) -> list[ProcessInfo]:
    """Rebuild :class:`ProcessInfo` entries saved in ``run.json`` (bad ones skipped)."""
    result = []
    for item in items:
        try:
            pid = item["pid"]
            if type(pid) is not int or pid <= 0 or pid == os.getpid():
                continue
            create = item.get("create_time")
            result.append(
                ProcessInfo(
                    pid,
                    str(item["node"]),
                    str(item["stage"]),
                    str(item["role"]),
                    float(create) if isinstance(create, (int, float)) else None,
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return result
