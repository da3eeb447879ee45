// One decoding step of a whole quantized model for one row, in one call: the token's embedding, every block and the
// head, with the KV cache read and written in place, around woq_cpu.cpp's products. Built with them by
// gptexp.inference.kernels; gptexp.inference.fused_step describes a model to it and calls gptexp_decode_step.
//
// At one row a GPT-2 124M step reads its int8 weights in ~4.2 ms, and torch's ~180 small operations and the Python
// around them add ~3 ms (docs/benchmarks.md, "A fused decoding step"). Here the small work is a few loops over vectors
// of the model's width, so a step costs little more than its products. Activations are float32 and follow the
// models' own order of operations: GPT-2 (LayerNorm, learned positions, fused q|k|v, tanh GELU) and LLaMA (RMSNorm,
// rotary embeddings in HF's half-split layout, grouped-query attention, SwiGLU).
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "woq_cpu.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define SQRT_2_OVER_PI 0.7978845608028654f

typedef struct {
    int64_t in, out, group;      /* group: int4's group size; 0 for int8 */
    const void *weight; /* int8 (out, in), or int4 two a byte (out, in / 2), the even column high */
    const void *scales; /* int8: float32 (out); int4: bf16 (scale, zero) pairs (out, in / group, 2) */
    const float *bias;  /* (out) or NULL */
} Linear;

typedef struct {
    const float *norm1_weight, *norm1_bias, *norm2_weight, *norm2_bias; /* the biases: GPT-2's LayerNorms */
    Linear attn_in[3];                                                  /* q|k|v fused (GPT-2), or q, k, v */
    Linear attn_out;
    Linear mlp_in[2]; /* GPT-2: c_fc; LLaMA: gate, up */
    Linear mlp_out;
} Layer;

typedef struct {
    int64_t llama; /* 0: GPT-2; 1: LLaMA */
    int64_t n_layer, dim, n_head, n_kv_head, head_dim, hidden, attn_inputs, mlp_inputs, max_len;
    double eps;
    const float *embedding;           /* float32 (vocab, dim), or NULL: the row dequantized from the (tied) head, */
    const float *head_scales, *head_zeros; /* by its float32 scales (vocab[, groups]) and zero points (int4) */
    const float *positions;          /* GPT-2: (context, dim) */
    const float *rope_cos, *rope_sin; /* LLaMA: (context, head_dim) */
    const Layer *layers;
    const float *norm_weight, *norm_bias;
    Linear head;
    float *keys, *values; /* the KV cache, (n_layer, n_kv_head, max_len, head_dim) each */
} Model;

static int linear(const Linear *l, const float *x, float *y) {
    if (l->group == 0)
        woq_int8_rows(x, 1, l->in, (const int8_t *)l->weight, (const float *)l->scales, l->out, y);
    else
#ifdef GPTEXP_INT4_ROW
        woq_int4_row(x, l->in, (const uint8_t *)l->weight, (const uint16_t *)l->scales, l->group, l->out, y);
#else
        return 2;
#endif
    if (l->bias)
        for (int64_t n = 0; n < l->out; n++) y[n] += l->bias[n];
    return 0;
}

/* the head's row `token`, as QuantizedLinear.dequantized computes it from the float32 scales (and zero points) */
static void dequantized_row(const Linear *l, const float *scales, const float *zeros, int64_t token, float *out) {
    if (l->group == 0) {
        const int8_t *q = (const int8_t *)l->weight + token * l->in;
        for (int64_t k = 0; k < l->in; k++) out[k] = (float)q[k] * scales[token];
        return;
    }
    const uint8_t *q = (const uint8_t *)l->weight + token * (l->in / 2);
    const float *s = scales + token * (l->in / l->group), *z = zeros + token * (l->in / l->group);
    for (int64_t k = 0; k < l->in; k++) {
        const int value = k % 2 ? q[k / 2] & 15 : q[k / 2] >> 4;
        out[k] = (float)(value - 8) * s[k / l->group] + z[k / l->group];
    }
}

#ifdef __AVX512F__
static float dot(const float *a, const float *b, int64_t n) {
    __m512 sum = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), sum);
    float total = _mm512_reduce_add_ps(sum);
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* e^x in float32 to ~1 ulp: x = n ln 2 + r, a Cephes polynomial in r, scaled by 2^n */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1)));
    return _mm512_scalef_ps(p, n);
}

/* GPT-2's tanh GELU, h * sigmoid(2u) with u = sqrt(2/pi) (h + 0.044715 h^3); or LLaMA's silu(h) * up */
static void activation(float *h, const float *up, int64_t n) {
    const int64_t whole = n - n % 16;
    at::parallel_for(0, whole / 16, 64, [&](int64_t first, int64_t last) {
        for (int64_t i = 16 * first; i < 16 * last; i += 16) {
            const __m512 x = _mm512_loadu_ps(h + i);
            __m512 z = x; /* silu: x sigmoid(x) */
            if (!up) z = _mm512_mul_ps(_mm512_set1_ps(2 * SQRT_2_OVER_PI),
                                       _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), x), _mm512_mul_ps(x, x), x));
            __m512 y = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1), exp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
            _mm512_storeu_ps(h + i, up ? _mm512_mul_ps(y, _mm512_loadu_ps(up + i)) : y);
        }
    });
    for (int64_t i = whole; i < n; i++) {
        const float x = h[i];
        h[i] = up ? x / (1 + expf(-x)) * up[i] : 0.5f * x * (1 + tanhf(SQRT_2_OVER_PI * (x + 0.044715f * x * x * x)));
    }
}

/* s[t] = e^(s[t] - top) for t < n; returns their sum */
static float exp_shifted(float *s, float top, int64_t n) {
    __m512 sum = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_set1_ps(top)));
        _mm512_storeu_ps(s + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    float total = _mm512_reduce_add_ps(sum);
    for (; t < n; t++) total += s[t] = expf(s[t] - top);
    return total;
}
#else
static float dot(const float *a, const float *b, int64_t n) {
    float sum = 0;
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static void activation(float *h, const float *up, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float x = h[i];
        h[i] = up ? x / (1 + expf(-x)) * up[i] : 0.5f * x * (1 + tanhf(SQRT_2_OVER_PI * (x + 0.044715f * x * x * x)));
    }
}

static float exp_shifted(float *s, float top, int64_t n) {
    float total = 0;
    for (int64_t t = 0; t < n; t++) total += s[t] = expf(s[t] - top);
    return total;
}
#endif

static void layer_norm(const float *x, const float *weight, const float *bias, double eps, int64_t n, float *out) {
    float mean = 0;
    for (int64_t i = 0; i < n; i++) mean += x[i];
    mean /= n;
    for (int64_t i = 0; i < n; i++) out[i] = x[i] - mean;
    const float rstd = (float)(1 / sqrt(dot(out, out, n) / n + eps));
    for (int64_t i = 0; i < n; i++) out[i] = out[i] * rstd * weight[i] + (bias ? bias[i] : 0);
}

static void rms_norm(const float *x, const float *weight, double eps, int64_t n, float *out) {
    const float r = (float)(1 / sqrt(dot(x, x, n) / n + eps));
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * r);
}

/* HF's rotation of one head: (x[i], x[i + D/2]) turned by the position's angles */
static void rotate(float *x, const float *cos, const float *sin, int64_t D) {
    for (int64_t i = 0; i < D / 2; i++) {
        const float a = x[i], b = x[i + D / 2];
        x[i] = a * cos[i] - b * sin[i];
        x[i + D / 2] = b * cos[i + D / 2] + a * sin[i + D / 2];
    }
}

/* The step of `token` at `pos` (the cache holds positions [0, pos)): its keys and values are stored at pos, and the
 * logits (vocab) written. Returns 0; 1 out of memory; 2 a product this build lacks; 3 pos outside the cache; 4 a
 * token outside the vocabulary. Threads: torch's. */
extern "C" int gptexp_decode_step(const Model *m, int64_t token, int64_t pos, float *logits) {
    if (pos < 0 || pos >= m->max_len) return 3;
    if (token < 0 || token >= m->head.out) return 4;
    const int64_t D = m->head_dim, q_width = m->n_head * D, kv_width = m->n_kv_head * D;
    const int64_t widest = m->hidden > q_width + 2 * kv_width ? m->hidden : q_width + 2 * kv_width;
    float *x = (float *)malloc((2 * m->dim + q_width + 3 * widest + m->n_head * (pos + 1)) * sizeof(float));
    if (!x) return 1;
    float *normed = x + m->dim, *attended = normed + m->dim, *qkv = attended + q_width, *hidden = qkv + widest,
          *other = hidden + widest, *scores = other + widest;
    int failed = 0;

    if (m->embedding)
        memcpy(x, m->embedding + token * m->dim, m->dim * sizeof(float));
    else
        dequantized_row(&m->head, m->head_scales, m->head_zeros, token, x);
    if (!m->llama)
        for (int64_t i = 0; i < m->dim; i++) x[i] += m->positions[pos * m->dim + i];

    for (int64_t l = 0; l < m->n_layer && !failed; l++) {
        const Layer *layer = &m->layers[l];
        if (m->llama)
            rms_norm(x, layer->norm1_weight, m->eps, m->dim, normed);
        else
            layer_norm(x, layer->norm1_weight, layer->norm1_bias, m->eps, m->dim, normed);
        for (int64_t i = 0, at = 0; i < m->attn_inputs; at += layer->attn_in[i].out, i++)
            failed |= linear(&layer->attn_in[i], normed, qkv + at);
        float *q = qkv, *k = qkv + q_width, *v = k + kv_width;
        if (m->llama) {
            const float *cos = m->rope_cos + pos * D, *sin = m->rope_sin + pos * D;
            for (int64_t h = 0; h < m->n_head; h++) rotate(q + h * D, cos, sin, D);
            for (int64_t h = 0; h < m->n_kv_head; h++) rotate(k + h * D, cos, sin, D);
        }
        float *keys = m->keys + l * m->n_kv_head * m->max_len * D, *values = m->values + l * m->n_kv_head * m->max_len * D;
        for (int64_t h = 0; h < m->n_kv_head; h++) {
            memcpy(keys + (h * m->max_len + pos) * D, k + h * D, D * sizeof(float));
            memcpy(values + (h * m->max_len + pos) * D, v + h * D, D * sizeof(float));
        }
        const float scale = (float)(1 / sqrt((double)D));
        const int64_t group = m->n_head / m->n_kv_head;
        at::parallel_for(0, m->n_head, 1, [&](int64_t first, int64_t last) {
            for (int64_t h = first; h < last; h++) { /* softmax(q K^T / sqrt(D)) V over positions [0, pos] */
                const float *qh = q + h * D, *kh = keys + (h / group) * m->max_len * D,
                            *vh = values + (h / group) * m->max_len * D;
                float *s = scores + h * (pos + 1), top = -INFINITY, total = 0, *out = attended + h * D;
                for (int64_t t = 0; t <= pos; t++) {
                    s[t] = dot(qh, kh + t * D, D) * scale;
                    top = s[t] > top ? s[t] : top;
                }
                total = exp_shifted(s, top, pos + 1);
                memset(out, 0, D * sizeof(float));
                for (int64_t t = 0; t <= pos; t++) {
                    const float p = s[t] / total;
                    for (int64_t i = 0; i < D; i++) out[i] += p * vh[t * D + i];
                }
            }
        });
        failed |= linear(&layer->attn_out, attended, hidden);
        for (int64_t i = 0; i < m->dim; i++) x[i] += hidden[i];

        if (m->llama)
            rms_norm(x, layer->norm2_weight, m->eps, m->dim, normed);
        else
            layer_norm(x, layer->norm2_weight, layer->norm2_bias, m->eps, m->dim, normed);
        failed |= linear(&layer->mlp_in[0], normed, hidden);
        if (m->llama)
            failed |= linear(&layer->mlp_in[1], normed, other); /* silu(gate) * up */
        activation(hidden, m->llama ? other : NULL, m->hidden);
        failed |= linear(&layer->mlp_out, hidden, other);
        for (int64_t i = 0; i < m->dim; i++) x[i] += other[i];
    }
    if (!failed) {
        if (m->llama)
            rms_norm(x, m->norm_weight, m->eps, m->dim, normed);
        else
            layer_norm(x, m->norm_weight, m->norm_bias, m->eps, m->dim, normed);
        failed = linear(&m->head, normed, logits);
    }
    free(x);
    return failed;
}
