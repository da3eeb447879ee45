"""The numeric precision a run trains in. `auto` picks bf16-mixed where the device multiplies bf16 natively
(a CPU with AVX512-BF16 or AMX, a CUDA GPU that supports bf16) and 32-true elsewhere; a precision the device
cannot run is refused with the alternatives."""

from __future__ import annotations

import platform

import torch

from gptexp.core.config import ConfigError

PRECISIONS = ("auto", "32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "64": "64-true"}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 (AMX, AVX512-BF16); aarch64's "bf16" feature


def device_type(accelerator: str) -> str:
    """The device Lightning's `accelerator` setting trains on: cpu, cuda or mps."""
    accelerator = str(accelerator).lower()
    if accelerator in ("auto", "gpu"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu" if accelerator == "auto" else "cuda"  # gpu without one: Lightning says so
    return accelerator


def cpu_bf16_feature() -> str | None:
    """The CPU flag that says it multiplies bf16 natively (amx_bf16, avx512_bf16, bf16), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith(("flags", "Features")) for word in line.split(":", 1)[1].split()}
    except OSError:
        return None
    return next((flag for flag in CPU_BF16_FLAGS if flag in flags), None)


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether `device` multiplies bf16 natively, and how that was found."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        name = torch.cuda.get_device_name()
        return (torch.cuda.is_bf16_supported(), f"{name} {'supports' if torch.cuda.is_bf16_supported() else 'lacks'} bf16")
    if device == "cpu":
        flag = cpu_bf16_feature()
        if flag:
            return True, f"this CPU multiplies bf16 natively ({flag})"
        return False, f"this CPU ({platform.machine()}) has no native bf16 (no {', '.join(CPU_BF16_FLAGS)} flag)"
    return False, f"bf16 on {device} is not relied on"


def resolve(precision, accelerator: str) -> tuple[str, str]:
    """(the precision to train in, why): `auto` made concrete, aliases spelt out, and a precision the
    device cannot run refused."""
    name = ALIASES.get(str(precision), str(precision))
    if name not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    device = device_type(accelerator)
    if name == "auto":
        native, why = native_bf16(device)
        return ("bf16-mixed" if native else "32-true"), f"auto: {why}"
    if name.startswith("16-") and device == "cpu":
        native, _ = native_bf16("cpu")
        raise ConfigError(f"trainer.precision={name} needs a CUDA GPU (fp16 with a gradient scaler); on a CPU use "
                          f"{'bf16-mixed, native here, or ' if native else ''}32-true (or auto)")
    return name, "as asked"
