"""Peak FLOP/s of the device a run uses: datasheet values for common GPUs, measured for a CPU (and the fastest
measurement kept per machine); and a CPU's memory bandwidth, the limit of decoding one token at a time."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from functools import lru_cache
from pathlib import Path

import torch

from gptexp.core.config import CACHE_DIR

log = logging.getLogger(__name__)

# dense (no sparsity) tensor-core peaks in FLOP/s: (bf16/fp16, tf32), from NVIDIA's datasheets
GPU_PEAKS = {
    "H200": (989e12, 494.5e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494.5e12),  # SXM
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A10G": (70e12, 35e12),
    "L4": (121e12, 60e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}

PEAKS = "cpu_peak_flops"  # the kept measurements of a CPU's peak, in gptexp's cache: {cpu_key(dtype): FLOP/s}


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32, repeats: int = 10) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for matrix products in `dtype` on `device`; a CPU's is the
    fastest of `repeats` timed products."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAKS.items():  # the first key that matches: H100 PCIe before H100
            if key in name:
                return (half if dtype in (torch.bfloat16, torch.float16) else tf32), f"datasheet: {name}"
        return float("nan"), f"unknown GPU {name}: add it to gptexp.core.hardware.GPU_PEAKS"
    flops = measured_cpu_matmul_flops(dtype, repeats=repeats)
    keep_cpu_peak(dtype, flops)
    return flops, f"measured: fastest of {repeats} 2048^3 torch.mm"


def kept_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32) -> tuple[float, str]:
    """peak_flops, except that a CPU's is the fastest rate measured on this machine so far (CPU model, threads,
    torch and dtype alike), kept in gptexp's cache: runs share one MFU denominator and skip the measurement
    (0.6 s on a 2-core CPU). Where none is kept yet, it is measured now and kept."""
    if torch.device(device).type == "cpu" and (kept := read_kept(PEAKS).get(cpu_key(dtype))) is not None:
        return kept, f"the fastest 2048^3 torch.mm measured on this CPU, kept in {kept_peaks_path()}"
    return peak_flops(device, dtype, repeats=4)


def kept_path(name: str) -> Path:
    """The file in gptexp's cache that keeps the measurements called `name`, one value per machine."""
    return Path(os.environ.get("GPTEXP_CACHE", CACHE_DIR)).expanduser() / f"{name}.json"


def kept_peaks_path() -> Path:
    return kept_path(PEAKS)


def cpu_key(dtype: torch.dtype) -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {dtype}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def read_kept(name: str) -> dict:
    try:
        kept = json.loads(kept_path(name).read_text())
    except (OSError, ValueError):
        kept = None
    return kept if isinstance(kept, dict) else {}  # none kept yet, or a file that is not ours: measure again


def keep(name: str, key: str, value) -> None:
    """Keep `value` for `key` in the measurements called `name` (written atomically; a cache that cannot be
    written only means the next run measures again)."""
    path = kept_path(name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(read_kept(name) | {key: value}, indent=1))
        os.replace(partial, path)
    except OSError as error:
        log.warning("could not keep the measured %s in %s: %s", name.replace("_", " "), path, error)


def keep_cpu_peak(dtype: torch.dtype, flops: float) -> None:
    """Keep `flops` as this CPU's peak if it is faster than the one kept."""
    if flops > read_kept(PEAKS).get(cpu_key(dtype), 0.0):
        keep(PEAKS, cpu_key(dtype), flops)


def fastest_seconds(work, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `work` after an untimed one (other load on the machine only
    ever slows a call down, so the fastest is the machine's own rate)."""
    work()
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


@lru_cache(maxsize=None)
def measured_cpu_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """The CPU's matrix-product rate with torch's threads: the fastest of `repeats` n^3 products."""
    generator = torch.Generator().manual_seed(0)  # its own: a measurement must not move training's RNG
    a, b = (torch.randn(n, n, dtype=dtype, generator=generator) for _ in range(2))
    return 2 * n**3 / fastest_seconds(lambda: torch.mm(a, b), repeats)


class MemoryStream:
    """The rate in bytes per second at which the CPU streams from memory, measured each time it is called: the
    fastest of `repeats` passes over a `mib` MiB float32 tensor (kept), far larger than any cache, by the faster of
    a sum and a matrix-vector product (which kernel streams fastest differs between CPUs: on one Xeon the product
    read 33 GB/s where the sum read 24). Decoding reads every weight once per token, so weight bytes divided by
    this is the least time a token can take. On a shared machine the rate moves with the neighbours' load (one
    2-core VM read 31 to 59 GB/s within an hour), so a bound is best measured beside what it bounds. The tensor
    holds random numbers, as weights do: the same VM summed a tensor of ones 10% faster than one of random values."""

    def __init__(self, mib: int = 512):
        generator = torch.Generator().manual_seed(0)  # its own: a measurement must not move training's RNG
        self.matrix = torch.rand(mib * 2**20 // 4 // 4096, 4096, generator=generator)
        self.vector = torch.ones(4096)

    def __call__(self, repeats: int = 5) -> float:
        return self.matrix.nbytes / min(fastest_seconds(self.matrix.sum, repeats),
                                        fastest_seconds(lambda: torch.mv(self.matrix, self.vector), repeats))


@lru_cache(maxsize=None)
def measured_cpu_memory_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """MemoryStream's rate, measured once."""
    return MemoryStream(mib)(repeats)
