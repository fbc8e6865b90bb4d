"""How a benchmark measures: peak memory, device sync, machine load.

Shared by :mod:`kvroute.bench` (the HF path) and :mod:`kvroute.serving_bench` (vLLM).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class PeakMemory:
    """Peak process memory since :meth:`reset`: CUDA max allocated, else peak RSS (VmHWM, reset via clear_refs)."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.kind = "cuda max_memory_allocated" if self.cuda else "process peak RSS (VmHWM)"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.kind = "process peak RSS since start (ru_maxrss; could not reset)"

    def peak_bytes(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        peak = proc_bytes("/proc/self/status", "VmHWM")
        if peak is not None:
            return peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_bytes(path: str, key: str) -> int | None:
    """A ``KEY: N kB`` field of a ``/proc`` file in bytes; None where the file or field is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA), so a timer reads the work done."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def loadavg() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (None where unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
