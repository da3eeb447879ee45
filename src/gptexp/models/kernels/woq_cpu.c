/* Weight-only products on a CPU, reading the packed weights once; no float copy of W is ever made. Built by
 * gptexp.models.kernels (cc -O3 -march=native -fopenmp) on first use.
 *
 * int8: y (M, N) = x (M, K) @ W^T with W[n, k] = w[n, k] * scales[n], w (N, K) int8; x and y float32 or bf16.
 *
 * Each thread takes a contiguous block of output channels, so it streams one run of weights from memory. A weight
 * vector, once widened to float32, serves up to ROWS rows of x; each row keeps four independent sums, so the loop
 * runs at the memory's pace rather than at the latency of one chain of FMAs (GPT-2 124M's weights at 96% of this
 * machine's streaming rate for one row; docs/benchmarks.md, "Quantized decoding"). Without AVX-512 the same sums
 * run as plain loops.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4
#define MANY_ROWS 8
#define BLOCK_ROWS 256

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* the dot product of columns [start, K) of one weight row and one row of x */
static inline float tail_dot(const int8_t *wn, const float *x, int64_t start, int64_t K) {
    float sum = 0;
    for (int64_t k = start; k < K; k++) sum += wn[k] * x[k];
    return sum;
}

#ifdef __AVX512F__
#include <immintrin.h>

static inline __m512 widen(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }

/* rows (<= ROWS) dot products of one weight row with rows of x */
static void row_dots(const int8_t *wn, const float *x, int64_t K, int rows, float *out) {
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
        out[m] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])))
                 + tail_dot(wn, x + m * K, whole, K);
}

/* rows (<= MANY_ROWS) dot products with each of two weight rows: one load of x serves both, so the loop runs at
 * the pace of its FMAs rather than of its loads (2.0x one weight row at a time, at 8 rows) */
static void many_row_dots(const int8_t *wn, int channels, const float *x, int64_t K, int rows, float *out) {
    __m512 acc[2][MANY_ROWS];
    for (int m = 0; m < MANY_ROWS; m++) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    const int64_t whole = K - K % 16;
    const int8_t *second = channels == 2 ? wn + K : wn; /* one channel: the same row twice, the second sums unused */
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
static void row_dots(const int8_t *wn, const float *x, int64_t K, int rows, float *out) {
    for (int m = 0; m < rows; m++) out[m] = tail_dot(wn, x + m * K, 0, K);
}

static void many_row_dots(const int8_t *wn, int channels, const float *x, int64_t K, int rows, float *out) {
    for (int c = 0; c < channels; c++) row_dots(wn + c * K, x, K, rows, out + c * MANY_ROWS);
}
#endif

/* The product; threads: how many the work is shared among (torch's own number). Returns 0, or 1 when out of memory. */
int woq_int8_matmul(const void *x, int x_bf16, int64_t M, int64_t K, const int8_t *w, const float *scales,
                    int64_t N, void *y, int y_bf16, int threads) {
    const float *xf = x;
    float *buffer = NULL;
    if (x_bf16) {
        buffer = malloc(M * K * sizeof(float));
        if (!buffer) return 1;
        for (int64_t i = 0; i < M * K; i++) buffer[i] = from_bf16(((const uint16_t *)x)[i]);
        xf = buffer;
    }
    const int tile = M < ROWS ? ROWS : MANY_ROWS, step = tile == ROWS ? 1 : 2; /* output channels a pass */
    for (int64_t block = 0; block < M; block += BLOCK_ROWS) { /* rows of x that stay in the cache while W passes */
        const int64_t end = M - block < BLOCK_ROWS ? M : block + BLOCK_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n += step) {
            float out[2 * MANY_ROWS];
            const int channels = N - n < step ? 1 : step;
            for (int64_t m = block; m < end; m += tile) {
                int rows = end - m < tile ? (int)(end - m) : tile;
                if (tile == ROWS)
                    row_dots(w + n * K, xf + m * K, K, rows, out);
                else
                    many_row_dots(w + n * K, channels, xf + m * K, K, rows, out);
                for (int c = 0; c < channels; c++)
                    for (int r = 0; r < rows; r++) {
                        float value = scales[n + c] * out[c * MANY_ROWS + r];
                        if (y_bf16)
                            ((uint16_t *)y)[(m + r) * N + n + c] = to_bf16(value);
                        else
                            ((float *)y)[(m + r) * N + n + c] = value;
                    }
            }
        }
    }
    free(buffer);
    return 0;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* int4, one row of x at a time (decoding): W[n, k] = (q[n, k] - 8) * s[n, k / g] + z[n, k / g], w (N, K / 2) uint8 with
 * the even column in the high nibble, s and z bf16 pairs (N, K / g, 2); g in 32, 64, 128, 256 and K a multiple of
 * 128; x, y float32, x rounded to bf16 as ATen's int4 kernels round it.
 *
 * 64 bytes of weights are 32 16-bit words, each holding four values; ANDs and shifts alone take them apart into four
 * vectors of 32 bf16 numbers, the value q ORed into the bits of 128 (bf16 0x4300 | q is exactly 128 + q: no
 * conversion, no shuffle), and one bf16 dot-product instruction meets each vector with x's columns in the same order
 * (prepared once a call). A float32 lane of the sums covers 8 consecutive columns, so a group's scale multiplies its
 * lanes, and sum((q - 8) x) = sum((128 + q) x) - 136 sum(x): the float32 sums of products of 8-bit numbers are exact
 * but for their additions, and the subtraction costs ~1e-6 of the result, against bf16's 4e-3 on x. */
static void int4_block_dots(const uint8_t *wb, const uint16_t *xb, __m512 *acc) {
    const __m512i words = _mm512_loadu_si512(wb), nibble = _mm512_set1_epi16(15), bits = _mm512_set1_epi16(0x4300);
    for (int part = 0; part < 4; part++) { /* (word >> 4 part) & 15 | 0x4300 */
        const __m512i value = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4 * part), nibble, bits, 0xEA);
        *acc = _mm512_dpbf16_ps(*acc, (__m512bh)value, (__m512bh)_mm512_loadu_si512(xb + 32 * part));
    }
}

int woq_int4_matvec(const float *x, int64_t K, const uint8_t *w, const uint16_t *scales_zeros, int64_t g, int64_t N,
                    float *y, int threads) {
    const int64_t groups = K / g, blocks = K / 128;
    uint16_t *xb = aligned_alloc(64, K * sizeof(uint16_t));
    float *terms = malloc(2 * groups * sizeof(float)); /* what each group's (scale, zero) pair multiplies */
    if (!xb || !terms) {
        free(xb);
        free(terms);
        return 1;
    }
    /* word j of a block holds columns 4j + 1 (bits 0-3), 4j, 4j + 3, 4j + 2 (bits 12-15): x's bf16 in that order */
    static const int column[4] = {1, 0, 3, 2};
    for (int64_t b = 0; b < blocks; b++)
        for (int part = 0; part < 4; part++)
            for (int j = 0; j < 32; j++) xb[128 * b + 32 * part + j] = to_bf16(x[128 * b + 4 * j + column[part]]);
    for (int64_t i = 0; i < groups; i++) { /* the scale: -136 sum(x) of the bf16 x; the zero: sum(x) */
        float sum = 0, sum16 = 0;
        for (int64_t k = i * g; k < (i + 1) * g; k++) sum += x[k], sum16 += from_bf16(to_bf16(x[k]));
        terms[2 * i] = -136 * sum16, terms[2 * i + 1] = sum;
    }
    /* lane i of a block's sums covers columns 8i..8i+7: its group, counted from the block's first */
    __m512i lane_group = _mm512_setzero_si512();
    if (g < 128) {
        int32_t index[16];
        for (int i = 0; i < 16; i++) index[i] = 8 * i / (int)g;
        lane_group = _mm512_loadu_si512(index);
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wn = w + n * (K / 2);
        const uint16_t *sz = scales_zeros + 2 * n * groups;
        __m512 total = _mm512_setzero_ps();
        if (g >= 128) {
            for (int64_t i = 0; i < groups; i++) {
                __m512 acc = _mm512_setzero_ps();
                for (int64_t b = i * (g / 128); b < (i + 1) * (g / 128); b++) int4_block_dots(wn + 64 * b, xb + 128 * b, &acc);
                total = _mm512_fmadd_ps(_mm512_set1_ps(from_bf16(sz[2 * i])), acc, total);
            }
        } else {
            const int per_block = 128 / (int)g;
            for (int64_t b = 0; b < blocks; b++) {
                __m512 acc = _mm512_setzero_ps();
                int4_block_dots(wn + 64 * b, xb + 128 * b, &acc);
                /* the block's (scale, zero) pairs as 32-bit words; a scale's bf16 bits, shifted up, are its float32 */
                const __m512i pairs = _mm512_maskz_loadu_epi32((__mmask16)((1 << per_block) - 1), sz + 2 * per_block * b);
                const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_permutexvar_epi32(lane_group, pairs), 16));
                total = _mm512_fmadd_ps(scale, acc, total);
            }
        }
        for (int64_t i = 0; i < 2 * groups; i += 16) {
            const __mmask16 valid = 2 * groups - i >= 16 ? 0xffff : (__mmask16)((1 << (2 * groups - i)) - 1);
            const __m512 pair = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(valid, sz + i)), 16));
            total = _mm512_fmadd_ps(pair, _mm512_maskz_loadu_ps(valid, terms + i), total);
        }
        y[n] = _mm512_reduce_add_ps(total);
    }
    free(xb);
    free(terms);
    return 0;
}
#endif
