/* CPU kernels for the sampling loop of grpo.fastpath, built by grpo.native (C99 + OpenMP,
 * float32, row-major contiguous arrays). They do what a chain of small torch operators does, in
 * one pass over the data: fewer trips through memory and no per-operator dispatch.
 *
 * Legend: N rows, Hq query heads, Hkv key/value heads (Hq a multiple of Hkv), D head dim,
 * S cache slots.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Denormal results (below 1.2e-38) are flushed to zero inside the kernels: a float32 softmax or
 * sigmoid meets them often, and each costs a microcode assist on x86. Per thread, restored on
 * exit. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FLUSH_DENORMALS_BEGIN const unsigned int saved_csr_ = _mm_getcsr(); _mm_setcsr(saved_csr_ | 0x8040);
#define FLUSH_DENORMALS_END _mm_setcsr(saved_csr_);
#else
#define FLUSH_DENORMALS_BEGIN
#define FLUSH_DENORMALS_END
#endif

/* x * cos + rotate_half(x) * sin for one head (D), rotate_half's sign folded into ssin,
 * times `scale`. */
static inline __attribute__((always_inline)) void rotate(const float *x, const float *cos_, const float *ssin,
                                                         float scale, float *out, const int d)
{
    const int half = d / 2;
    for (int e = 0; e < half; e++) out[e] = (x[e] * cos_[e] + x[e + half] * ssin[e]) * scale;
    for (int e = half; e < d; e++) out[e] = (x[e] * cos_[e] + x[e - half] * ssin[e]) * scale;
}

/* One row's key/value head h: rotate and store its new key and value in slot `slot`, then its
 * rep = Hq / Hkv queries attend to slots 0..slot. q (rep, D), acc (rep, D), scores (rep, slot + 1)
 * and inv (rep,) are the thread's scratch. Inlined with D a constant for the common head sizes,
 * so the D-long loops unroll and vectorise. */
static inline __attribute__((always_inline)) void attend_block(
    const float *x, const float *c, const float *s, float *keys, float *values, const float *m, float *o,
    float *q, float *acc, float *scores, float *inv, const int hq, const int hkv, const int h, const int d,
    const int slot, const float scale)
{
    const int rep = hq / hkv, len = slot + 1;
    rotate(x + (size_t)(hq + h) * d, c, s, 1.0f, keys + (size_t)slot * d, d);
    memcpy(values + (size_t)slot * d, x + (size_t)(hq + hkv + h) * d, sizeof(float) * d);
    for (int r = 0; r < rep; r++) rotate(x + (size_t)(h * rep + r) * d, c, s, scale, q + (size_t)r * d, d);

    for (int l = 0; l < len; l++) { /* scores = q k^T + mask */
        const float *k = keys + (size_t)l * d;
        for (int r = 0; r < rep; r++) {
            const float *qr = q + (size_t)r * d;
            float part[16] = {0}, dot = 0.0f; /* 16 partial sums: the loop vectorises */
            for (int e0 = 0; e0 + 16 <= d; e0 += 16)
                for (int j = 0; j < 16; j++) part[j] += qr[e0 + j] * k[e0 + j];
            for (int e = d - d % 16; e < d; e++) dot += qr[e] * k[e];
            for (int j = 0; j < 16; j++) dot += part[j];
            scores[(size_t)r * len + l] = dot + m[l];
        }
    }
    for (int r = 0; r < rep; r++) { /* softmax numerators and 1 / denominators */
        float *sr = scores + (size_t)r * len, top = -INFINITY, sum = 0.0f;
        for (int l = 0; l < len; l++) top = sr[l] > top ? sr[l] : top;
        for (int l = 0; l < len; l++) sr[l] = expf(sr[l] - top);
        for (int l = 0; l < len; l++) sum += sr[l];
        inv[r] = 1.0f / sum;
    }
    memset(acc, 0, sizeof(float) * (size_t)rep * d);
    for (int l = 0; l < len; l++) { /* acc = p v */
        const float *v = values + (size_t)l * d;
        for (int r = 0; r < rep; r++) {
            const float p = scores[(size_t)r * len + l];
            float *ar = acc + (size_t)r * d;
            for (int e = 0; e < d; e++) ar[e] += p * v[e];
        }
    }
    for (int r = 0; r < rep; r++)
        for (int e = 0; e < d; e++) o[(size_t)r * d + e] = acc[(size_t)r * d + e] * inv[r];
}

/* One decode step of attention for every row, as grpo.fastpath.FastQwen2.generate does it with
 * torch operators:
 *   qkv  (N, (Hq + 2 Hkv) D)  this step's projections: the Hq query heads, Hkv keys, Hkv values
 *   cos_, ssin (N, D)         rotary tables at each row's position (rotate_half's sign in ssin)
 *   kc, vc (N, Hkv, S, D)     caches: slot `slot` receives the rotated key and the value
 *   mask (N, S)               additive: 0 for a slot to attend, -inf for prompt padding
 *   out  (N, Hq D)            softmax(q k^T * scale + mask) v over slots 0..slot
 * Query head j reads key/value head j / (Hq / Hkv). Rows x key/value heads run in parallel on
 * `threads` OpenMP threads; the next block's keys and values are prefetched while one is
 * computed. */
void grpo_decode_attention(const float *qkv, const float *cos_, const float *ssin, float *kc, float *vc,
                           const float *mask, float *out, int n, int hq, int hkv, int d, int span, int slot,
                           float scale, int threads)
{
    const int rep = hq / hkv, len = slot + 1;
    const size_t row = (size_t)(hq + 2 * hkv) * d, block = (size_t)span * d;
#pragma omp parallel num_threads(threads)
    {
        FLUSH_DENORMALS_BEGIN
        float *q = malloc(sizeof(float) * (size_t)rep * d);
        float *acc = malloc(sizeof(float) * (size_t)rep * d);
        float *scores = malloc(sizeof(float) * (size_t)rep * len);
        float *inv = malloc(sizeof(float) * (size_t)rep);
#pragma omp for schedule(static)
        for (int b = 0; b < n * hkv; b++) {
            const int i = b / hkv, h = b % hkv;
            float *keys = kc + (size_t)b * block, *values = vc + (size_t)b * block;
            if (b + 1 < n * hkv) {
                const char *next_k = (const char *)(keys + block), *next_v = (const char *)(values + block);
                for (size_t off = 0; off < (size_t)len * d * sizeof(float); off += 64) {
                    __builtin_prefetch(next_k + off, 0, 1);
                    __builtin_prefetch(next_v + off, 0, 1);
                }
            }
            const float *x = qkv + (size_t)i * row, *c = cos_ + (size_t)i * d, *s = ssin + (size_t)i * d;
            const float *m = mask + (size_t)i * span;
            float *o = out + (size_t)i * hq * d + (size_t)h * rep * d;
            if (d == 64)
                attend_block(x, c, s, keys, values, m, o, q, acc, scores, inv, hq, hkv, h, 64, slot, scale);
            else if (d == 128)
                attend_block(x, c, s, keys, values, m, o, q, acc, scores, inv, hq, hkv, h, 128, slot, scale);
            else
                attend_block(x, c, s, keys, values, m, o, q, acc, scores, inv, hq, hkv, h, d, slot, scale);
        }
        free(q);
        free(acc);
        free(scores);
        free(inv);
        FLUSH_DENORMALS_END
    }
}

/* e^x for finite x to about 2 ulp, in operations that vectorise (Cephes' expf): x = n ln2 + f
 * with n = round(x / ln2), e^f by a degree-6 polynomial, 2^n through the exponent bits.
 * Saturates below -87.3 and above 88.3. */
static inline __attribute__((always_inline)) float exp_vec(float x)
{
    x = x > -87.3f ? x : -87.3f; /* max, min: one instruction each */
    x = x < 88.3f ? x : 88.3f;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2): 1.5 * 2^23 trick */
    const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * f + 1.3981999507e-3f;
    y = y * f + 8.3334519073e-3f;
    y = y * f + 4.1665795894e-2f;
    y = y * f + 1.6666665459e-1f;
    y = y * f + 5.0000001201e-1f;
    y = y * f * f + f + 1.0f;
    const int bits = ((int)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return y * two_n;
}

/* SwiGLU, silu(gate) * up, over `rows` rows of `width`: gate and up rows `stride` apart (they may
 * be the two halves of one (rows, 2 width) array), out contiguous (rows, width). */
void grpo_swiglu(const float *gate, const float *up, long stride, float *out, long rows, int width, int threads)
{
#pragma omp parallel num_threads(threads) if (rows * width >= 32768)
    {
        FLUSH_DENORMALS_BEGIN
#pragma omp for schedule(static)
        for (long i = 0; i < rows; i++) {
            const float *g = gate + i * stride, *u = up + i * stride;
            float *o = out + i * width;
#pragma omp simd
            for (int e = 0; e < width; e++) o[e] = g[e] / (1.0f + exp_vec(-g[e])) * u[e];
        }
        FLUSH_DENORMALS_END
    }
}

/* The SwiGLU backward for contiguous (rows, width) arrays: with s = sigmoid(gate),
 * dgate = grad up s (1 + gate (1 - s)) and dup = grad gate s. */
void grpo_swiglu_backward(const float *grad, const float *gate, const float *up, float *dgate, float *dup, long rows,
                          int width, int threads)
{
    const long total = rows * width;
#pragma omp parallel num_threads(threads) if (total >= 32768)
    {
        FLUSH_DENORMALS_BEGIN
#pragma omp for simd schedule(static)
        for (long e = 0; e < total; e++) {
            const float g = gate[e], s = 1.0f / (1.0f + exp_vec(-g));
            dup[e] = grad[e] * g * s;
            dgate[e] = grad[e] * up[e] * s * (1.0f + g * (1.0f - s));
        }
        FLUSH_DENORMALS_END
    }
}

/* RMSNorm over rows of width h: out = x r w with r = 1 / sqrt(mean(x^2) + eps), r stored in
 * rstd (rows,) when it is not NULL. */
void grpo_rms_norm(const float *x, const float *w, float *out, float *rstd, long rows, int h, float eps, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * h >= 32768)
    for (long i = 0; i < rows; i++) {
        const float *xi = x + i * h;
        float *oi = out + i * h, sq = 0.0f;
#pragma omp simd reduction(+ : sq)
        for (int e = 0; e < h; e++) sq += xi[e] * xi[e];
        const float r = 1.0f / sqrtf(sq / h + eps);
        if (rstd) rstd[i] = r;
#pragma omp simd
        for (int e = 0; e < h; e++) oi[e] = xi[e] * r * w[e];
    }
}

/* The RMSNorm input gradient: dx = r (g w - x r^2 mean(g w x)), r from `grpo_rms_norm`. */
void grpo_rms_norm_backward(const float *g, const float *x, const float *w, const float *rstd, float *dx, long rows,
                            int h, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * h >= 32768)
    for (long i = 0; i < rows; i++) {
        const float *gi = g + i * h, *xi = x + i * h, r = rstd[i];
        float *di = dx + i * h, dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int e = 0; e < h; e++) dot += gi[e] * w[e] * xi[e];
        const float coef = -dot * r * r / h;
#pragma omp simd
        for (int e = 0; e < h; e++) di[e] = (gi[e] * w[e] + xi[e] * coef) * r;
    }
}
