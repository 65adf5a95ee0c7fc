"""GPUs (utilization, memory, power, temperature, SM clock, processes, with history) or, without
an NVIDIA GPU, a plain statement of that and the CPU and RAM instead."""

from __future__ import annotations

from collections import defaultdict

from rich.text import Text
from textual.widget import Widget

from panels.format import human_bytes
from panels.hardware import GpuSample, HardwareSample, RemoteDevice
from panels.widgets.history import History, spark

LABEL = 6  # width of the row labels ("util  ", "procs ")
VALUE = 24  # width of the values, so that the sparklines line up


class HardwareView(Widget):
    DEFAULT_CSS = "HardwareView { width: 1fr; height: auto; }"

    def __init__(self, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.border_title = "Hardware"
        self.sample: HardwareSample | None = None
        self.history: defaultdict[str, History] = defaultdict(History)
        self._lines = 0

    def add(self, sample: HardwareSample) -> None:
        """Record a sample in the histories (always, shown or not)."""
        self.sample = sample
        for gpu in sample.gpus:
            self.history[f"gpu{gpu.index}.util"].add(gpu.utilization)
            self.history[f"gpu{gpu.index}.mem"].add(_pct(gpu.memory_used, gpu.memory_total))
        if sample.host is not None:
            self.history["cpu"].add(sample.host.cpu_percent)
            self.history["ram"].add(_pct(sample.host.ram_used, sample.host.ram_total))
        if sample.remote is not None and sample.remote.memory_total:
            remote = sample.remote
            self.history["remote.mem"].add(_pct(remote.memory_used, remote.memory_total))

    def show(self) -> None:
        sample = self.sample
        if sample is not None and sample.remote is not None:
            self.border_title = "Server"
        elif sample is not None:
            self.border_title = f"GPU ×{len(sample.gpus)}" if sample.gpus else "CPU and RAM"
        lines = len(self.render().plain.splitlines())
        self.refresh(layout=lines != self._lines)  # a layout only when the height changes
        self._lines = lines

    def render(self) -> Text:
        sample = self.sample
        if sample is None:
            return Text("sampling…", style="dim")
        width = max(self.size.width, 20)
        text = Text()
        if sample.remote is not None:
            self._remote(text, sample.remote, width)
            return text
        if sample.gpus:
            for gpu in sample.gpus:
                self._gpu(text, gpu, width)
        else:
            reason = sample.no_gpu_reason or "no NVIDIA GPU"
            text.append(f"{reason[:1].upper()}{reason[1:]}: showing CPU and RAM.\n", style="bold")
        host = sample.host
        if host is None:
            return text
        cpu = f"{host.cpu_percent:5.1f}% of {host.cpu_count} cores "
        self._row(text, "CPU", cpu, self.history["cpu"], width, 100.0)
        ram = f"{human_bytes(host.ram_used)} / {human_bytes(host.ram_total)} "
        self._row(text, "RAM", ram, self.history["ram"], width, 100.0, last=True)
        return text

    def _remote(self, text: Text, remote: RemoteDevice, width: int) -> None:
        text.append("Server ", style="bold")
        text.append(remote.url + (f" · {remote.device}" if remote.device else "") + "\n")
        if remote.error:
            text.append(f"{remote.error}\n", style="bold red")
        if not remote.device:
            text.append("waiting for the server…", style="dim")
            return
        gpu = remote.device.startswith("cuda")
        label = "mem" if gpu else "RSS"
        value = f"{human_bytes(remote.memory_used)} / {human_bytes(remote.memory_total)} "
        self._row(text, label, value, self.history["remote.mem"], width, 100)
        what = "GPU memory" if gpu else "the server's RSS of its host's RAM"
        note = f"{what} (engine state); no utilization over HTTP"
        text.append(note if len(note) <= width else note[: width - 1] + "…", style="dim")

    def _gpu(self, text: Text, gpu: GpuSample, width: int) -> None:
        text.append(f"GPU {gpu.index} ", style="bold")
        text.append(f"{gpu.name}\n")
        key = f"gpu{gpu.index}"
        self._row(
            text, "util", f"{gpu.utilization:5.1f}% ", self.history[f"{key}.util"], width, 100
        )
        mem = f"{human_bytes(gpu.memory_used)} / {human_bytes(gpu.memory_total)} "
        self._row(text, "mem", mem, self.history[f"{key}.mem"], width, 100)
        facts = []
        if gpu.power_w is not None:
            limit = f" / {gpu.power_limit_w:.0f}" if gpu.power_limit_w else ""
            facts.append(f"{gpu.power_w:.0f}{limit} W")
        if gpu.temperature_c is not None:
            facts.append(f"{gpu.temperature_c:.0f} °C")
        if gpu.sm_clock_mhz is not None:
            facts.append(f"SM {gpu.sm_clock_mhz} MHz")
        text.append(" " * LABEL + (" · ".join(facts) or "power, temperature, clock: n/a") + "\n")
        procs = ", ".join(
            f"{p.pid} {p.name}" + (f" {human_bytes(p.memory_used)}" if p.memory_used else "")
            for p in gpu.processes
        )
        line = f"{'procs':<{LABEL}}{procs or 'none'}"
        text.append((line if len(line) <= width else line[: width - 1] + "…") + "\n", style="dim")

    @staticmethod
    def _row(
        text: Text, label: str, value: str, history: History, width: int, top: float, last=False
    ) -> None:
        text.append(f"{label:<{LABEL}}", style="bold")
        value = value.ljust(VALUE)
        text.append(value)
        room = width - LABEL - len(value)
        if room >= 8:
            text.append(spark(history.values, room, top), style="#61afef")
        if not last:
            text.append("\n")


def _pct(used: int, total: int) -> float:
    return 100.0 * used / total if total else 0.0
