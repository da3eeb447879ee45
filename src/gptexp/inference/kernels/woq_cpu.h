// The weight-only products of woq_cpu.cpp on plain arrays, for its operators and for the fused decoding step
// (step_cpu.cpp). Threads: torch's (at::parallel_for).
#pragma once

#include <cstdint>

// y (M, N) = x (M, K) @ (w (N, K) int8 * scales (N))^T, in float32
void woq_int8_rows(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scales, int64_t N, float *y);

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define GPTEXP_INT4_ROW 1
// y (N) = x (K) @ W^T, W int4 two values a byte, w (N, K / 2), in groups of g with bf16 (scale, zero) pairs
// scale_zero (N, K / g, 2); K a multiple of 128
void woq_int4_row(const float *x, int64_t K, const uint8_t *w, const uint16_t *scale_zero, int64_t g, int64_t N,
                  float *y);
#endif
