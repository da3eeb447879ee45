"""CPU kernels gptexp compiles itself, in one library built on first use with torch.utils.cpp_extension for this CPU
(-O3 -march=native, torch's own OpenMP threads) and kept in gptexp's cache, one build per source, compiler, torch and
CPU:

- woq_cpu.cpp: the weight-only products as torch operators, `torch.ops.gptexp.int8_mm` and `torch.ops.gptexp.int4_mv`
  (one row, only where the CPU has AVX512-BF16). Each checks the shapes and dtypes it is given (a wrong one raises,
  naming it) and has a fake kernel here, so torch.compile traces a quantized model through them.
- step_cpu.cpp: a quantized model's whole decoding step in one C call (`decode_step()`, gptexp.inference.fused_step).

`available(name)` says whether one is there: not where there is no C++ compiler or ninja, where the build fails, or
where GPTEXP_KERNELS=0 asks for ATen's kernels. Nothing depends on them: without them the products run through
ATen's weight-only kernels and a step through the model's forward.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import torch

from gptexp.core.config import CACHE_DIR
from gptexp.core.hardware import cpu_name

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name(name) for name in ("woq_cpu.cpp", "step_cpu.cpp")]
HEADERS = [Path(__file__).with_name("woq_cpu.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp"]  # -fopenmp: at::parallel_for's OpenMP, resolved to torch's libgomp
OPERATORS = ("int8_mm", "int4_mv")


def available(name: str) -> bool:
    """Whether torch.ops.gptexp.<name> (int8_mm or int4_mv) is built and loaded, and GPTEXP_KERNELS is not 0."""
    return os.environ.get("GPTEXP_KERNELS") != "0" and name in _library()[0]


def decode_step():
    """The C function gptexp_decode_step (step_cpu.cpp), or None where the library is not there."""
    library = _library()[1]
    return None if library is None or os.environ.get("GPTEXP_KERNELS") == "0" else library.gptexp_decode_step


@cache
def _library() -> tuple[frozenset[str], ctypes.CDLL | None]:
    """The operators loaded, and the library for ctypes; nothing where it cannot be built (a warning says why)."""
    if os.environ.get("GPTEXP_KERNELS") == "0":
        return frozenset(), None
    try:
        path = _build_and_load()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        log.warning("products run through ATen's kernels: building %s failed (%s)",
                    " and ".join(s.name for s in SOURCES),
                    str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
        return frozenset(), None
    names = frozenset(name for name in OPERATORS if hasattr(torch.ops.gptexp, name))
    _register_fakes(names)
    library = ctypes.CDLL(str(path))  # the library the operators came from, already loaded: its C entry points
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.gptexp_decode_step.argtypes = [pointer, size, size, pointer]
    library.gptexp_decode_step.restype = flag
    return names, library


def _build_and_load() -> Path:
    """Compile the sources into gptexp's cache (once per source, flags, compiler, torch and CPU), load the library into
    this process (its operators register themselves) and return its path."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler (c++ or g++) on the PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    text = "\n".join([*(s.read_text() for s in SOURCES + HEADERS), *FLAGS, version, torch.__version__, cpu_name()])
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    name = f"gptexp_cpu_{key}"
    directory = Path(os.environ.get("GPTEXP_CACHE", CACHE_DIR)).expanduser() / "kernels" / name
    library, start = directory / f"{name}.so", time.perf_counter()
    if not library.is_file():
        log.info("building gptexp's CPU kernels for this CPU, once (about 10 s)")
    directory.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])  # the venv's ninja, if installed
    try:
        cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=FLAGS,
                           build_directory=str(directory), is_python_module=False, verbose=False)
    finally:
        os.environ["PATH"] = path
    log.debug("gptexp's CPU kernels: %s, ready after %.1f s", library, time.perf_counter() - start)
    return library


def _register_fakes(names: frozenset[str]) -> None:
    """What each operator returns, computed from shapes alone, for torch.compile's tracing."""
    if "int8_mm" in names:
        @torch.library.register_fake("gptexp::int8_mm")
        def _(x, w, scales):
            torch._check(x.dim() == 2 and w.dim() == 2 and x.size(1) == w.size(1) and scales.size(0) == w.size(0),
                         lambda: f"gptexp::int8_mm: shapes disagree: {x.shape}, {w.shape}, {scales.shape}")
            return x.new_empty(x.size(0), w.size(0))

    if "int4_mv" in names:
        @torch.library.register_fake("gptexp::int4_mv")
        def _(x, w, scale_zero, group_size):
            torch._check(x.dim() == 1 and w.dim() == 2 and 2 * w.size(1) == x.size(0),
                         lambda: f"gptexp::int4_mv: shapes disagree: {x.shape}, {w.shape}, {scale_zero.shape}")
            return x.new_empty(w.size(0))
