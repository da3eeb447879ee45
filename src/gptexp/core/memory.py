"""Peak memory of a stretch of work: the CUDA allocator's statistics on a GPU, the process's peak
resident set (Linux /proc) on a CPU."""

from __future__ import annotations

import re
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def _resident_kib(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.M) if STATUS.exists() else None
    return float(match.group(1)) if match else float("nan")


def resident_bytes() -> float:
    """The process's resident set now (NaN off Linux)."""
    return 1024 * _resident_kib("VmRSS")


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.peak (bytes at the high point) and m.before (bytes at entry).

    CUDA: bytes allocated by torch's caching allocator. CPU: the whole process's resident set; the
    kernel's high-water mark is reset on entry (/proc/self/clear_refs), so it covers only the block.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.before = self.peak = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = float(torch.cuda.memory_allocated(self.device))
        elif STATUS.exists():
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
            self.before = resident_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = float(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = 1024 * _resident_kib("VmHWM")
