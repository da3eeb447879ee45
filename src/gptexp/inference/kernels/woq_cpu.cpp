// Weight-only products on a CPU, as torch operators: gptexp::int8_mm and gptexp::int4_mv. They read the packed
// weights once and never make a float copy of W. Built by gptexp.inference.kernels with
// torch.utils.cpp_extension on first use; their threads are torch's (at::parallel_for).
//
// int8_mm(x (M, K), w (N, K) int8, scales (N) float32) -> y (M, N): y = x @ (w * scales[:, None])^T, x and y float32
// or bf16. Each thread takes a contiguous block of output channels, so it streams one run of weights from memory. A
// weight vector, once widened to float32, serves up to ROWS rows of x; each row keeps four independent sums, so the
// loop runs at the memory's pace rather than at the latency of one chain of FMAs (docs/benchmarks.md, "Quantized
// decoding"). Without AVX-512 the same sums run as plain loops.
//
// int4_mv(x (K) float32, w (N, K / 2) uint8, scale_zero (N, K / g, 2) bf16, g) -> y (N) float32, one row (decoding),
// only where the compiler targets AVX512-BF16: see int4_block_dots.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "woq_cpu.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

constexpr int ROWS = 4;
constexpr int MANY_ROWS = 8;
constexpr int64_t BLOCK_ROWS = 256;
constexpr int64_t GRAIN = 1 << 15;  // weights a thread's share should hold at least (smaller matrices stay on one)

// the dot product of columns [start, K) of one weight row and one row of x
inline float tail_dot(const int8_t *wn, const float *x, int64_t start, int64_t K) {
    float sum = 0;
    for (int64_t k = start; k < K; k++) sum += wn[k] * x[k];
    return sum;
}

#ifdef __AVX512F__
inline __m512 widen(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))));
}

// rows (<= ROWS) dot products of one weight row with rows of x
void row_dots(const int8_t *wn, const float *x, int64_t K, int rows, float *out) {
    __m512 acc[ROWS][4];
    for (int m = 0; m < ROWS; m++)
        for (int i = 0; i < 4; i++) acc[m][i] = _mm512_setzero_ps();
    const int64_t whole = K - K % 64;
    for (int64_t k = 0; k < whole; k += 64) {
        __m512 w0 = widen(wn + k), w1 = widen(wn + k + 16), w2 = widen(wn + k + 32), w3 = widen(wn + k + 48);
        for (int m = 0; m < rows; m++) {
            const float *xm = x + m * K + k;
            acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), acc[m][2]);
            acc[m][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xm + 48), acc[m][3]);
        }
    }
    for (int m = 0; m < rows; m++)
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                    _mm512_add_ps(acc[m][2], acc[m][3])))
                 + tail_dot(wn, x + m * K, whole, K);
}

// rows (<= MANY_ROWS) dot products with each of two weight rows: one load of x serves both, so the loop runs at the
// pace of its FMAs rather than of its loads (2.0x one weight row at a time, at 8 rows)
void many_row_dots(const int8_t *wn, int channels, const float *x, int64_t K, int rows, float *out) {
    __m512 acc[2][MANY_ROWS];
    for (int m = 0; m < MANY_ROWS; m++) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    const int64_t whole = K - K % 16;
    const int8_t *second = channels == 2 ? wn + K : wn;  // one channel: the same row twice, the second sums unused
    for (int64_t k = 0; k < whole; k += 16) {
        const __m512 w0 = widen(wn + k), w1 = widen(second + k);
        for (int m = 0; m < rows; m++) {
            const __m512 xm = _mm512_loadu_ps(x + m * K + k);
            acc[0][m] = _mm512_fmadd_ps(w0, xm, acc[0][m]);
            acc[1][m] = _mm512_fmadd_ps(w1, xm, acc[1][m]);
        }
    }
    for (int c = 0; c < channels; c++)
        for (int m = 0; m < rows; m++)
            out[c * MANY_ROWS + m] = _mm512_reduce_add_ps(acc[c][m]) + tail_dot(wn + c * K, x + m * K, whole, K);
}
#else
void row_dots(const int8_t *wn, const float *x, int64_t K, int rows, float *out) {
    for (int m = 0; m < rows; m++) out[m] = tail_dot(wn, x + m * K, 0, K);
}

void many_row_dots(const int8_t *wn, int channels, const float *x, int64_t K, int rows, float *out) {
    for (int c = 0; c < channels; c++) row_dots(wn + c * K, x, K, rows, out + c * MANY_ROWS);
}
#endif

template <typename Out>
void int8_products(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scales, int64_t N, Out *y) {
    const int tile = M < ROWS ? ROWS : MANY_ROWS, step = tile == ROWS ? 1 : 2;  // output channels a pass
    const int64_t passes = (N + step - 1) / step;
    for (int64_t block = 0; block < M; block += BLOCK_ROWS) {  // rows of x that stay in the cache while W passes
        const int64_t end = M - block < BLOCK_ROWS ? M : block + BLOCK_ROWS;
        at::parallel_for(0, passes, std::max<int64_t>(1, GRAIN / (step * K)), [&](int64_t first, int64_t last) {
            float out[2 * MANY_ROWS];
            for (int64_t pass = first; pass < last; pass++) {
                const int64_t n = pass * step;
                const int channels = N - n < step ? 1 : step;
                for (int64_t m = block; m < end; m += tile) {
                    const int rows = end - m < tile ? static_cast<int>(end - m) : tile;
                    if (tile == ROWS)
                        row_dots(w + n * K, x + m * K, K, rows, out);
                    else
                        many_row_dots(w + n * K, channels, x + m * K, K, rows, out);
                    for (int c = 0; c < channels; c++)
                        for (int r = 0; r < rows; r++)
                            y[(m + r) * N + n + c] = static_cast<Out>(scales[n + c] * out[c * MANY_ROWS + r]);
                }
            }
        });
    }
}

#ifdef GPTEXP_INT4_ROW
// int4, one row of x: W[n, k] = (q[n, k] - 8) * s[n, k / g] + z[n, k / g], w two values a byte with the even column in
// the high nibble, s and z bf16 pairs; g in 32, 64, 128, 256 and K a multiple of 128; x rounded to bf16 as ATen's
// int4 kernels round it.
//
// 64 bytes of weights are 32 16-bit words, each holding four values; ANDs and shifts alone take them apart into four
// vectors of 32 bf16 numbers, the value q ORed into the bits of 128 (bf16 0x4300 | q is exactly 128 + q: no
// conversion, no shuffle), and one bf16 dot-product instruction meets each vector with x's columns in the same order
// (prepared once a call). A float32 lane of the sums covers 8 consecutive columns, so a group's scale multiplies its
// lanes, and sum((q - 8) x) = sum((128 + q) x) - 136 sum(x): the float32 sums of products of 8-bit numbers are exact
// but for their additions, and the subtraction costs ~1e-6 of the result, against bf16's 4e-3 on x.
inline void int4_block_dots(const uint8_t *wb, const uint16_t *xb, __m512 *acc) {
    const __m512i words = _mm512_loadu_si512(wb), nibble = _mm512_set1_epi16(15), bits = _mm512_set1_epi16(0x4300);
    for (int part = 0; part < 4; part++) {  // (word >> 4 part) & 15 | 0x4300
        const __m512i value = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4 * part), nibble, bits, 0xEA);
        *acc = _mm512_dpbf16_ps(*acc, (__m512bh)value, (__m512bh)_mm512_loadu_si512(xb + 32 * part));
    }
}

inline uint16_t bf16_bits(float f) { return c10::BFloat16(f).x; }  // rounded to nearest even, as torch rounds
inline float bf16_value(uint16_t bits) { return c10::BFloat16(bits, c10::BFloat16::from_bits()); }
#endif

}  // namespace

void woq_int8_rows(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scales, int64_t N, float *y) {
    int8_products(x, M, K, w, scales, N, y);
}

#ifdef GPTEXP_INT4_ROW
void woq_int4_row(const float *x, int64_t K, const uint8_t *w, const uint16_t *sz, int64_t g, int64_t N, float *y) {
    const int64_t groups = K / g, blocks = K / 128;
    // word j of a block holds columns 4j + 1 (bits 0-3), 4j, 4j + 3, 4j + 2 (bits 12-15): x's bf16 in that order, in
    // a buffer aligned to 64 bytes (torch's allocator), as the 64-byte loads below read it
    const at::Tensor prepared = at::empty({K}, at::kShort);
    uint16_t *xb = reinterpret_cast<uint16_t *>(prepared.mutable_data_ptr<int16_t>());
    static const int column[4] = {1, 0, 3, 2};
    for (int64_t b = 0; b < blocks; b++)
        for (int part = 0; part < 4; part++)
            for (int j = 0; j < 32; j++) xb[128 * b + 32 * part + j] = bf16_bits(x[128 * b + 4 * j + column[part]]);
    std::vector<float> terms(2 * groups);  // what each group's (scale, zero) pair multiplies
    for (int64_t i = 0; i < groups; i++) {  // the scale: -136 sum(x) of the bf16 x; the zero: sum(x)
        float sum = 0, sum16 = 0;
        for (int64_t k = i * g; k < (i + 1) * g; k++) sum += x[k], sum16 += bf16_value(bf16_bits(x[k]));
        terms[2 * i] = -136 * sum16, terms[2 * i + 1] = sum;
    }
    // lane i of a block's sums covers columns 8i..8i+7: its group, counted from the block's first
    __m512i lane_group = _mm512_setzero_si512();
    if (g < 128) {
        int32_t index[16];
        for (int i = 0; i < 16; i++) index[i] = 8 * i / static_cast<int>(g);
        lane_group = _mm512_loadu_si512(index);
    }
    at::parallel_for(0, N, std::max<int64_t>(1, GRAIN / K), [&](int64_t first, int64_t last) {
        for (int64_t n = first; n < last; n++) {
            const uint8_t *wn = w + n * (K / 2);
            const uint16_t *szn = sz + 2 * n * groups;
            __m512 total = _mm512_setzero_ps();
            if (g >= 128) {
                for (int64_t i = 0; i < groups; i++) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t b = i * (g / 128); b < (i + 1) * (g / 128); b++)
                        int4_block_dots(wn + 64 * b, xb + 128 * b, &acc);
                    total = _mm512_fmadd_ps(_mm512_set1_ps(bf16_value(szn[2 * i])), acc, total);
                }
            } else {
                const int per_block = 128 / static_cast<int>(g);
                for (int64_t b = 0; b < blocks; b++) {
                    __m512 acc = _mm512_setzero_ps();
                    int4_block_dots(wn + 64 * b, xb + 128 * b, &acc);
                    // the block's (scale, zero) pairs as 32-bit words; a scale's bf16 bits, shifted up, are its float32
                    const __m512i pairs = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1 << per_block) - 1),
                                                                   szn + 2 * per_block * b);
                    const __m512 scale = _mm512_castsi512_ps(
                        _mm512_slli_epi32(_mm512_permutexvar_epi32(lane_group, pairs), 16));
                    total = _mm512_fmadd_ps(scale, acc, total);
                }
            }
            for (int64_t i = 0; i < 2 * groups; i += 16) {
                const __mmask16 valid = 2 * groups - i >= 16 ? 0xffff : static_cast<__mmask16>((1 << (2 * groups - i)) - 1);
                const __m512 pair = _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, szn + i)), 16));
                total = _mm512_fmadd_ps(pair, _mm512_maskz_loadu_ps(valid, terms.data() + i), total);
            }
            y[n] = _mm512_reduce_add_ps(total);
        }
    });
}
#endif

namespace {

void check_cpu(const at::Tensor &t, const char *op, const char *name) {
    TORCH_CHECK(t.device().is_cpu(), "gptexp::", op, ": ", name, " must be on the CPU, got ", t.device());
}

at::Tensor int8_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scales) {
    for (auto [t, name] : {std::pair{&x, "x"}, {&w, "w"}, {&scales, "scales"}}) check_cpu(*t, "int8_mm", name);
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && scales.dim() == 1,
                "gptexp::int8_mm: want x (M, K), w (N, K) and scales (N), got ", x.sizes(), ", ", w.sizes(), ", ",
                scales.sizes());
    TORCH_CHECK(x.size(1) == w.size(1) && scales.size(0) == w.size(0),
                "gptexp::int8_mm: shapes disagree: x ", x.sizes(), ", w ", w.sizes(), ", scales ", scales.sizes());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "gptexp::int8_mm: x must be float32 or bfloat16, got ", x.scalar_type());
    TORCH_CHECK(w.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
                "gptexp::int8_mm: want int8 w and float32 scales, got ", w.scalar_type(), " and ", scales.scalar_type());
    const at::Tensor x32 = x.to(at::kFloat).contiguous(), wc = w.contiguous(), sc = scales.contiguous();
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    if (x.scalar_type() == at::kBFloat16)
        int8_products(x32.const_data_ptr<float>(), M, K, wc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(), N,
                      y.mutable_data_ptr<c10::BFloat16>());
    else
        int8_products(x32.const_data_ptr<float>(), M, K, wc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(), N,
                      y.mutable_data_ptr<float>());
    return y;
}

#ifdef GPTEXP_INT4_ROW
at::Tensor int4_mv(const at::Tensor &x, const at::Tensor &w, const at::Tensor &scale_zero, int64_t g) {
    for (auto [t, name] : {std::pair{&x, "x"}, {&w, "w"}, {&scale_zero, "scale_zero"}}) check_cpu(*t, "int4_mv", name);
    TORCH_CHECK(g == 32 || g == 64 || g == 128 || g == 256, "gptexp::int4_mv: group size must be 32, 64, 128 or 256, got ", g);
    TORCH_CHECK(x.dim() == 1 && w.dim() == 2 && scale_zero.dim() == 3,
                "gptexp::int4_mv: want x (K), w (N, K / 2) and scale_zero (N, K / g, 2), got ", x.sizes(), ", ",
                w.sizes(), ", ", scale_zero.sizes());
    const int64_t K = x.size(0), N = w.size(0);
    TORCH_CHECK(K % 128 == 0, "gptexp::int4_mv: K must be a multiple of 128, got ", K);
    TORCH_CHECK(w.size(1) * 2 == K && scale_zero.size(0) == N && scale_zero.size(1) == K / g && scale_zero.size(2) == 2,
                "gptexp::int4_mv: shapes disagree: x ", x.sizes(), ", w ", w.sizes(), ", scale_zero ",
                scale_zero.sizes(), " with groups of ", g);
    TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kByte && scale_zero.scalar_type() == at::kBFloat16,
                "gptexp::int4_mv: want float32 x, uint8 w and bfloat16 scale_zero, got ", x.scalar_type(), ", ",
                w.scalar_type(), ", ", scale_zero.scalar_type());
    const at::Tensor xc = x.contiguous(), wc = w.contiguous(), szc = scale_zero.contiguous();
    at::Tensor y = at::empty({N}, x.options());
    woq_int4_row(xc.const_data_ptr<float>(), K, wc.const_data_ptr<uint8_t>(),
                 reinterpret_cast<const uint16_t *>(szc.const_data_ptr<c10::BFloat16>()), g, N, y.mutable_data_ptr<float>());
    return y;
}
#endif

}  // namespace

TORCH_LIBRARY(gptexp, m) {
    m.def("int8_mm(Tensor x, Tensor w, Tensor scales) -> Tensor");
#ifdef GPTEXP_INT4_ROW
    m.def("int4_mv(Tensor x, Tensor w, Tensor scale_zero, int group_size) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(gptexp, CPU, m) {
    m.impl("int8_mm", &int8_mm);
#ifdef GPTEXP_INT4_ROW
    m.impl("int4_mv", &int4_mv);
#endif
}
