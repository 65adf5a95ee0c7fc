"""What the monitor samples besides the engine: NVIDIA GPUs through NVML, else CPU and RAM; for a
server the TUI is attached to, what its engine state says of its device (`RemoteHardware`).

`SystemHardware.sample()` may take a few milliseconds per GPU, so the monitor calls it from a
worker thread. Tests give the monitor a `FixedHardware` instead, so snapshots hold still.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import psutil


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    memory_used: int  # bytes; 0 when the driver does not say


@dataclass(frozen=True)
class GpuSample:
    index: int
    name: str
    utilization: float  # percent
    memory_used: int  # bytes
    memory_total: int
    power_w: float | None
    power_limit_w: float | None
    temperature_c: float | None
    sm_clock_mhz: int | None
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class HostSample:
    cpu_percent: float
    ram_used: int
    ram_total: int
    cpu_count: int


@dataclass(frozen=True)
class RemoteDevice:
    """The device of a server the TUI is attached to, as its engine state reports it."""

    url: str
    device: str  # cuda:0, cpu, ... ("" until the server has answered)
    memory_used: int  # bytes: the GPU's used memory, or the server process's RSS on a CPU
    memory_total: int
    error: str | None = None  # why the server does not answer now


@dataclass(frozen=True)
class HardwareSample:
    gpus: tuple[GpuSample, ...]
    host: HostSample | None  # None: not this machine's (attached to a server)
    no_gpu_reason: str | None = None  # why there are no GPUs, for the user
    remote: RemoteDevice | None = None


class HardwareSource(Protocol):
    def sample(self) -> HardwareSample: ...

    def close(self) -> None: ...


class FixedHardware:
    """Replays the given samples in turn, then repeats the last (tests, screenshots)."""

    def __init__(self, *samples: HardwareSample) -> None:
        self._samples = list(samples)

    def sample(self) -> HardwareSample:
        return self._samples.pop(0) if len(self._samples) > 1 else self._samples[0]

    def close(self) -> None:
        pass


class RemoteHardware:
    """The attached server's device memory, from the engine states its client polls: NVML and
    psutil would measure this machine, not the server's."""

    def __init__(self, handle: Any, url: str) -> None:
        self.handle = handle  # an EngineHandle: its client and state appear once attached
        self.url = url

    def sample(self) -> HardwareSample:
        state = self.handle.state()
        error = getattr(self.handle.client, "error", None) or self.handle.error
        remote = RemoteDevice(
            url=self.url,
            device=state.device if state is not None else "",
            memory_used=state.device_memory_used if state is not None else 0,
            memory_total=state.device_memory_total if state is not None else 0,
            error=error,
        )
        return HardwareSample(gpus=(), host=None, remote=remote)

    def close(self) -> None:
        pass


def _host() -> HostSample:
    vm = psutil.virtual_memory()
    return HostSample(
        cpu_percent=psutil.cpu_percent(interval=None),
        ram_used=vm.total - vm.available,
        ram_total=vm.total,
        cpu_count=psutil.cpu_count() or 1,
    )


class SystemHardware:
    """This machine: NVML when an NVIDIA driver answers, psutil for the host always."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self.no_gpu_reason: str | None = None
        psutil.cpu_percent(interval=None)  # the first call primes the counter
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() == 0:
                self.no_gpu_reason = "NVML reports no GPU"
                pynvml.nvmlShutdown()
            else:
                self._nvml = pynvml
        except Exception as e:  # no library, no driver, no device: all mean "no GPU here"
            self.no_gpu_reason = f"no NVIDIA GPU ({_nvml_reason(e)})"

    def sample(self) -> HardwareSample:
        gpus: tuple[GpuSample, ...] = ()
        if self._nvml is not None:
            try:
                gpus = tuple(self._gpu(i) for i in range(self._nvml.nvmlDeviceGetCount()))
            except Exception as e:
                self.no_gpu_reason = f"NVML failed: {_nvml_reason(e)}"
                self.close()
        return HardwareSample(gpus=gpus, host=_host(), no_gpu_reason=self.no_gpu_reason)

    def _gpu(self, index: int) -> GpuSample:
        nv = self._nvml
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        mem = nv.nvmlDeviceGetMemoryInfo(handle)
        name = nv.nvmlDeviceGetName(handle)
        return GpuSample(
            index=index,
            name=name.decode() if isinstance(name, bytes) else str(name),
            utilization=float(nv.nvmlDeviceGetUtilizationRates(handle).gpu),
            memory_used=int(mem.used),
            memory_total=int(mem.total),
            power_w=_optional(lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            power_limit_w=_optional(lambda: nv.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0),
            temperature_c=_optional(
                lambda: float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU))
            ),
            sm_clock_mhz=_optional(
                lambda: int(nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM))
            ),
            processes=self._processes(handle),
        )

    def _processes(self, handle: Any) -> tuple[GpuProcess, ...]:
        nv = self._nvml
        found: dict[int, GpuProcess] = {}
        for query in (
            nv.nvmlDeviceGetComputeRunningProcesses,
            nv.nvmlDeviceGetGraphicsRunningProcesses,
        ):
            for p in _optional(lambda q=query: q(handle)) or []:
                used = p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else 0
                found.setdefault(p.pid, GpuProcess(p.pid, _process_name(p.pid), used))
        return tuple(sorted(found.values(), key=lambda p: -p.memory_used))

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


def _optional(read: Any) -> Any:
    """A reading some GPUs do not support (power on some boards, clocks in VMs) is None."""
    try:
        return read()
    except Exception:
        return None


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return "?"


def _nvml_reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:80]
