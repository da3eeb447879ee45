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

/* rows (<= MANY_ROWS) dot products, one sum a row: the rows' chains of FMAs interleave */
static void many_row_dots(const int8_t *wn, const float *x, int64_t K, int rows, float *out) {
    __m512 acc[MANY_ROWS];
    for (int m = 0; m < MANY_ROWS; m++) acc[m] = _mm512_setzero_ps();
    const int64_t whole = K - K % 64;
    for (int64_t k = 0; k < whole; k += 64) {
        __m512 w0 = widen(wn + k), w1 = widen(wn + k + 16), w2 = widen(wn + k + 32), w3 = widen(wn + k + 48);
        for (int m = 0; m < rows; m++) {
            const float *xm = x + m * K + k;
            __m512 a = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), _mm512_mul_ps(w1, _mm512_loadu_ps(xm + 16)));
            __m512 b = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), _mm512_mul_ps(w3, _mm512_loadu_ps(xm + 48)));
            acc[m] = _mm512_add_ps(acc[m], _mm512_add_ps(a, b));
        }
    }
    for (int m = 0; m < rows; m++) out[m] = _mm512_reduce_add_ps(acc[m]) + tail_dot(wn, x + m * K, whole, K);
}
#else
static void row_dots(const int8_t *wn, const float *x, int64_t K, int rows, float *out) {
    for (int m = 0; m < rows; m++) out[m] = tail_dot(wn, x + m * K, 0, K);
}

static void many_row_dots(const int8_t *wn, const float *x, int64_t K, int rows, float *out) {
    row_dots(wn, x, K, rows, out);
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
    const int tile = M < ROWS ? ROWS : MANY_ROWS;
    for (int64_t block = 0; block < M; block += BLOCK_ROWS) { /* rows of x that stay in the cache while W passes */
        const int64_t end = M - block < BLOCK_ROWS ? M : block + BLOCK_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t n = 0; n < N; n++) {
            float out[MANY_ROWS];
            for (int64_t m = block; m < end; m += tile) {
                int rows = end - m < tile ? (int)(end - m) : tile;
                if (tile == ROWS)
                    row_dots(w + n * K, xf + m * K, K, rows, out);
                else
                    many_row_dots(w + n * K, xf + m * K, K, rows, out);
                for (int r = 0; r < rows; r++) {
                    float value = scales[n] * out[r];
                    if (y_bf16)
                        ((uint16_t *)y)[(m + r) * N + n] = to_bf16(value);
                    else
                        ((float *)y)[(m + r) * N + n] = value;
                }
            }
        }
    }
    free(buffer);
    return 0;
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* int4, one row of x at a time (decoding): W[n, k] = (q[n, k] - 8) * scales[n, k / g] + zeros[n, k / g], w (N, K / 2)
 * uint8 with the even column in the high nibble, g a multiple of 64; x, y float32, x rounded to bf16 as ATen's int4
 * kernels round it. 32 bytes of weights become two vectors of 32 bf16 values (q - 8, looked up by a 16-bit permute,
 * no conversion), each met by x's matching pairs in one bf16 dot-product instruction; a group's sum is scaled
 * once, and its zero point meets x summed over the group. 21 GB/s over GPT-2 124M's int4 weights (groups of 128)
 * here, against ATen's 14 with its call around it. */
int woq_int4_matvec(const float *x, int64_t K, const uint8_t *w, const float *scales, const float *zeros, int64_t g,
                    int64_t N, float *y, int threads) {
    const int64_t groups = K / g;
    uint16_t *pairs = aligned_alloc(64, K * sizeof(uint16_t)), *xh = pairs, *xl = pairs + K / 2;
    float *xsums = malloc(groups * sizeof(float));
    if (!pairs || !xsums) {
        free(pairs);
        free(xsums);
        return 1;
    }
    for (int64_t k = 0; k < K; k += 4) { /* the bf16 pairs (4i, 4i + 2) and (4i + 1, 4i + 3) */
        xh[k / 2] = to_bf16(x[k]), xh[k / 2 + 1] = to_bf16(x[k + 2]);
        xl[k / 2] = to_bf16(x[k + 1]), xl[k / 2 + 1] = to_bf16(x[k + 3]);
    }
    for (int64_t i = 0; i < groups; i++) {
        float sum = 0;
        for (int64_t k = 0; k < g; k++) sum += x[i * g + k];
        xsums[i] = sum;
    }
    uint16_t table[32]; /* bf16 of v - 8 for the nibble v, twice over the permute's 32 lanes */
    for (int v = 0; v < 32; v++) table[v] = to_bf16((float)((v & 15) - 8));
    const __m512i lookup = _mm512_loadu_si512(table), nibble = _mm512_set1_epi16(15);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wn = w + n * (K / 2);
        const float *sn = scales + n * groups, *zn = zeros + n * groups;
        __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
        for (int64_t j = 0; j < K / 2; j += g / 2) {
            __m512 group_even = _mm512_setzero_ps(), group_odd = _mm512_setzero_ps();
            for (int64_t b = j; b < j + g / 2; b += 32) {
                __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wn + b)));
                __m512i high = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), lookup);
                __m512i low = _mm512_permutexvar_epi16(_mm512_and_si512(bytes, nibble), lookup);
                group_even = _mm512_dpbf16_ps(group_even, (__m512bh)high, (__m512bh)_mm512_loadu_si512(xh + b));
                group_odd = _mm512_dpbf16_ps(group_odd, (__m512bh)low, (__m512bh)_mm512_loadu_si512(xl + b));
            }
            __m512 scale = _mm512_set1_ps(sn[2 * j / g]);
            even = _mm512_fmadd_ps(scale, group_even, even);
            odd = _mm512_fmadd_ps(scale, group_odd, odd);
        }
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
        for (int64_t i = 0; i < groups; i++) sum += zn[i] * xsums[i];
        y[n] = sum;
    }
    free(pairs);
    free(xsums);
    return 0;
}
#endif
