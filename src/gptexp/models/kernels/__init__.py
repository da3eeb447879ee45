"""CPU kernels gptexp compiles itself: a C file, the machine's C compiler, loaded with ctypes.

`int8_matmul()` and `int4_matvec()` are woq_cpu.c's weight-only products, and `decode_step()` is step_cpu.c's
whole decoding step of a quantized model (gptexp.models.fused_step). They are built on first use with `cc -O3
-march=native -fopenmp` for this CPU and kept in gptexp's cache (one file per source, compiler and CPU); None
where there is no compiler, the build fails, the CPU lacks what a kernel needs (int4: AVX512-BF16), or
GPTEXP_KERNELS=0 asks for ATen's kernels instead. Nothing else depends on them: without them the products run
through ATen and a step through torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from gptexp.config import CACHE_DIR
from gptexp.hardware import cpu_name

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name(name) for name in ("woq_cpu.c", "step_cpu.c")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def int8_matmul():
    """The C function woq_int8_matmul (see woq_cpu.c), or None."""
    library = _library()
    return None if library is None else library.woq_int8_matmul


def int4_matvec():
    """The C function woq_int4_matvec (see woq_cpu.c), or None: it needs AVX512-BF16 (with AVX512-BW)."""
    library = _library()
    return getattr(library, "woq_int4_matvec", None)


def decode_step():
    """The C function gptexp_decode_step (see step_cpu.c), or None."""
    library = _library()
    return None if library is None else library.gptexp_decode_step


@cache
def _library():
    if os.environ.get("GPTEXP_KERNELS") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: products run through ATen's kernels")
        return None
    try:
        library = ctypes.CDLL(str(_built(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        log.warning("products run through ATen's kernels: building %s failed (%s)",
                    " and ".join(s.name for s in SOURCES), getattr(error, "stderr", None) or error)
        return None
    pointer, size, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library.woq_int8_matmul.argtypes = [pointer, flag, size, size, pointer, pointer, size, pointer, flag, flag]
    library.woq_int8_matmul.restype = flag
    if hasattr(library, "woq_int4_matvec"):
        library.woq_int4_matvec.argtypes = [pointer, size, pointer, pointer, size, size, pointer, flag]
        library.woq_int4_matvec.restype = flag
    library.gptexp_decode_step.argtypes = [pointer, size, size, pointer, flag]
    library.gptexp_decode_step.restype = flag
    return library


def _built(compiler: str) -> Path:
    """The shared library for these sources, compiler and CPU: compiled once, then reused."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    text = "\n".join([*(s.read_text() for s in SOURCES), *FLAGS, version, cpu_name()])
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(os.environ.get("GPTEXP_CACHE", CACHE_DIR)).expanduser() / "kernels" / f"gptexp_cpu-{key}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:  # renamed into place whole: no half a library
            built = Path(scratch) / path.name
            subprocess.run([compiler, *FLAGS, "-o", str(built), *map(str, SOURCES), "-lm"], check=True,
                           capture_output=True, text=True)
            os.replace(built, path)
        log.info("built %s for this CPU (%s)", path, compiler)
    return path
