"""How fast one row can read GPT-2 124M's weights on this CPU: the limit of batch-1 decoding.

    python benchmarks/bf16_matvec.py [--repeats 30]

A token of batch-1 decoding multiplies one row by each of GPT-2 124M's 49 weight matrices (12 layers x 4, and
the head), in that order. This times that sequence, interleaved, for:
- oneDNN's bf16 inner product on the weights in its blocked layout (what `generate` runs in bf16);
- a hand-written AVX512-BF16 matrix-vector kernel on nn.Linear's own (out, in) bf16 layout (compiled here with
  gcc: `vdpbf16ps`, float32 sums, rows split over OpenMP's threads, which are torch's own);
- MKL's float32 product on the float32 weights (`F.linear`, what HF's float32 `generate` runs);
- a plain read of the bf16 weights' bytes (AVX-512 loads, nothing computed): no kernel can stream faster.
Prints each one's median and fastest time and GB/s. Needs gcc and a CPU with avx512_bf16.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

KERNELS = r"""
#include <immintrin.h>
#include <stdint.h>

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; __builtin_memcpy(&f, &u, 4); return f;
}
static inline uint16_t to_bf16(float f) {  /* round to nearest even */
    uint32_t u; __builtin_memcpy(&u, &f, 4); u += 0x7FFF + ((u >> 16) & 1); return (uint16_t)(u >> 16);
}

#define LOAD(p) ((__m512bh)_mm512_loadu_si512(p))

/* y = W x + b: W (N, K) row-major bf16, K a multiple of 128; four sums along K, the next KiB prefetched */
void matvec_bf16(const uint16_t *W, const uint16_t *x, const uint16_t *b, uint16_t *y, int64_t N, int64_t K) {
    #pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *w = W + n * K;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int64_t k = 0; k < K; k += 128) {
            for (int line = 0; line < 4; line++) _mm_prefetch((const char *)(w + k) + 1024 + 64 * line, _MM_HINT_T0);
            s0 = _mm512_dpbf16_ps(s0, LOAD(w + k), LOAD(x + k));
            s1 = _mm512_dpbf16_ps(s1, LOAD(w + k + 32), LOAD(x + k + 32));
            s2 = _mm512_dpbf16_ps(s2, LOAD(w + k + 64), LOAD(x + k + 64));
            s3 = _mm512_dpbf16_ps(s3, LOAD(w + k + 96), LOAD(x + k + 96));
        }
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
        y[n] = to_bf16(sum + from_bf16(b[n]));
    }
}

/* every 64-byte line of p (n bytes, a multiple of 256) loaded once, nothing else */
int64_t read_all(const char *p, int64_t n) {
    int64_t out = 0;
    #pragma omp parallel reduction(^:out)
    {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i += 256) {
            a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
            a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 64));
            a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 128));
            a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 192));
        }
        out ^= _mm512_reduce_add_epi64(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)));
    }
    return out;
}
"""

SHAPES = [(3 * 768, 768), (768, 768), (4 * 768, 768), (768, 4 * 768)] * 12 + [(50257, 768)]  # (out, in)


def compiled(directory: Path) -> ctypes.CDLL:
    source, library = directory / "kernels.c", directory / "kernels.so"
    source.write_text(KERNELS)
    # -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded: one thread pool
    subprocess.run(["gcc", "-O3", "-mavx512f", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC", str(source), "-o",
                    str(library)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.matvec_bf16.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2
    lib.read_all.argtypes, lib.read_all.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int64
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if "avx512_bf16" not in Path("/proc/cpuinfo").read_text():
        sys.exit("this CPU has no avx512_bf16: the hand-written kernel cannot run here")
    with tempfile.TemporaryDirectory() as tmp:
        lib = compiled(Path(tmp))
        generator = torch.Generator().manual_seed(0)
        weights = [torch.randn(shape, generator=generator) / 30 for shape in SHAPES]
        biases = [torch.randn(shape[0], generator=generator) / 30 for shape in SHAPES]
        rows = {k: torch.randn(1, k, generator=generator) for k in (768, 3072)}
        bf16 = [(w.bfloat16(), b.bfloat16()) for w, b in zip(weights, biases)]
        bf16_rows = {k: x.bfloat16() for k, x in rows.items()}
        outputs = [torch.empty(1, w.size(0), dtype=torch.bfloat16) for w, _ in bf16]
        onednn = torch.ops.mkldnn._linear_pointwise.default
        packed = [(bf16_rows[w.size(1)], torch.ops.mkldnn._reorder_linear_weight(w, 1), b) for w, b in bf16]
        calls = [(w.data_ptr(), bf16_rows[w.size(1)].data_ptr(), b.data_ptr(), y.data_ptr(), *w.shape)
                 for (w, b), y in zip(bf16, outputs)]
        flat = torch.cat([w.flatten() for w, _ in bf16])
        flat = flat[:flat.numel() // 128 * 128]
        bf16_bytes = sum(w.nbytes for w, _ in bf16)

        for (w, b), y in zip(bf16[:4] + bf16[-1:], outputs[:4] + outputs[-1:]):  # the kernel is right first
            lib.matvec_bf16(w.data_ptr(), bf16_rows[w.size(1)].data_ptr(), b.data_ptr(), y.data_ptr(), *w.shape)
            reference = F.linear(bf16_rows[w.size(1)].float(), w.float(), b.float())
            torch.testing.assert_close(y.float(), reference, rtol=1e-2, atol=1e-2)

        cases = {
            "oneDNN bf16, packed (generate's)": (bf16_bytes, lambda: [onednn(x, w, b, "none", [], "")
                                                                      for x, w, b in packed]),
            "hand-written AVX512-BF16": (bf16_bytes, lambda: [lib.matvec_bf16(*call) for call in calls]),
            "MKL float32 (HF's fp32)": (2 * bf16_bytes, lambda: [F.linear(rows[w.size(1)], w, b)
                                                                for w, b in zip(weights, biases)]),
            "read the bf16 bytes, no product": (flat.nbytes, lambda: lib.read_all(flat.data_ptr(), flat.nbytes)),
        }
        seconds = {name: [] for name in cases}
        with torch.inference_mode():
            for repeat in range(args.repeats + 1):  # the first round warms up
                for name, (_, run) in cases.items():
                    start = time.perf_counter()
                    run()
                    if repeat:
                        seconds[name].append(time.perf_counter() - start)
    print(f"GPT-2 124M's 49 products, one row; {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.repeats} interleaved repeats; bf16 weights {bf16_bytes / 1e6:.1f} MB")
    for name, (nbytes, _) in cases.items():
        median, fastest = statistics.median(seconds[name]), min(seconds[name])
        print(f"{name:34s} median {1e3 * median:6.2f} ms ({nbytes / median / 1e9:5.1f} GB/s), "
              f"fastest {1e3 * fastest:6.2f} ms ({nbytes / fastest / 1e9:5.1f} GB/s)")


if __name__ == "__main__":
    main()
