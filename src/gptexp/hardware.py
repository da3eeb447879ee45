"""Peak FLOP/s of the device a run uses: datasheet values for common GPUs, measured once for a CPU; and a
CPU's memory bandwidth, the limit of decoding one token at a time."""

from __future__ import annotations

import time
from functools import lru_cache

import torch

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


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32, repeats: int = 10) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for matrix products in `dtype` on `device`; a CPU's is the
    fastest of `repeats` timed products."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAKS.items():  # the first key that matches: H100 PCIe before H100
            if key in name:
                return (half if dtype in (torch.bfloat16, torch.float16) else tf32), f"datasheet: {name}"
        return float("nan"), f"unknown GPU {name}: add it to gptexp.hardware.GPU_PEAKS"
    return measured_cpu_matmul_flops(dtype, repeats=repeats), f"measured: fastest of {repeats} 2048^3 torch.mm"


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


@lru_cache(maxsize=None)
def measured_cpu_memory_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second the CPU streams from memory: the fastest of `repeats` sums over a `mib` MiB float32
    tensor, far larger than any cache. Decoding reads every weight once per token, so weight bytes divided by
    this is the least time a token can take."""
    x = torch.ones(mib * 2**20 // 4)
    return x.numel() * x.element_size() / fastest_seconds(x.sum, repeats)
