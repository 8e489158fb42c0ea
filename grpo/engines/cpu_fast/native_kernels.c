/* CPU kernels for grpo.fastpath, built and wrapped by grpo.native (C99 + OpenMP, float32,
 * row-major arrays): the decode step's attention, SwiGLU, RMSNorm, the rotary embedding and the
 * LoRA dropout corrections and the positions LoRA dropout drops. Each does what a chain of small torch operators does, in one pass
 * over the data: fewer trips through memory and no per-operator dispatch. Every one is tested
 * against those operators (tests/test_native.py).
 *
 * Legend: N rows, Hq query heads, Hkv key/value heads (Hq a multiple of Hkv), D head dim,
 * S cache slots.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
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

/* out = R x * scale for one head (D) at one position: R the rotary embedding, x cos +
 * rotate_half(x) sin with rotate_half's sign folded into ssin; or out = R^T x * scale when
 * `transpose` (the backward's rotation: the halves of ssin swap). */
static inline __attribute__((always_inline)) void rotate_head(const float *restrict x, const float *restrict cos_,
                                                              const float *restrict ssin, float scale,
                                                              float *restrict out, const int d, int transpose)
{
    const int half = d / 2;
    const float *s_lo = transpose ? ssin + half : ssin, *s_hi = transpose ? ssin : ssin + half;
    for (int e = 0; e < half; e++) out[e] = (x[e] * cos_[e] + x[e + half] * s_lo[e]) * scale;
    for (int e = 0; e < half; e++) out[e + half] = (x[e + half] * cos_[e + half] + x[e] * s_hi[e]) * scale;
}

/* out (count, D) contiguous = the rotary embedding of x's first `count` rows (row stride xs),
 * row l at position l of the tables cos_, ssin (count, D). */
static void rotate_rows(const float *x, long xs, int count, const float *cos_, const float *ssin, int d, float *out)
{
    for (int l = 0; l < count; l++)
        rotate_head(x + l * xs, cos_ + (size_t)l * d, ssin + (size_t)l * d, 1.0f, out + (size_t)l * d, d, 0);
}

/* The transposed rotation R^T of x's first `count` rows (row stride xs) in place, row l at
 * position l of the tables; tmp holds D floats. */
static void rotate_rows_back(float *x, long xs, int count, const float *cos_, const float *ssin, int d, float *tmp)
{
    for (int l = 0; l < count; l++) {
        memcpy(tmp, x + l * xs, sizeof(float) * d);
        rotate_head(tmp, cos_ + (size_t)l * d, ssin + (size_t)l * d, 1.0f, x + l * xs, d, 1);
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

/* scores[l] = q . keys[l] (+ m[l] when m is not NULL) for `count` keys of D values, 16 partial
 * sums per dot product (the loop vectorises). */
static inline __attribute__((always_inline)) void score_keys(const float *qr, const float *keys, int count,
                                                             const float *m, float *scores, const int d)
{
    for (int l = 0; l < count; l++) {
        const float *k = keys + (size_t)l * d;
        float part[16] = {0}, dot = 0.0f;
        for (int e0 = 0; e0 + 16 <= d; e0 += 16)
            for (int j = 0; j < 16; j++) part[j] += qr[e0 + j] * k[e0 + j];
        for (int e = d - d % 16; e < d; e++) dot += qr[e] * k[e];
        for (int j = 0; j < 8; j++) part[j] += part[j + 8];
        for (int j = 0; j < 4; j++) part[j] += part[j + 4];
        scores[l] = dot + (part[0] + part[2]) + (part[1] + part[3]) + (m ? m[l] : 0.0f);
    }
}

/* One row's key/value head h: bias, rotate and store its new key and value in slot `slot` of its
 * generated keys/values, then its rep = Hq / Hkv queries attend to the P keys of its prompt
 * (pkeys, pvalues, additive mask pm) and to generated slots 0..slot. q (rep, D), acc (D),
 * scores (rep, P + slot + 1) are the thread's scratch. Inlined with D a constant for the common
 * head sizes, so the D-long loops unroll, vectorise and keep one query's sums in registers.
 * Masked keys (-inf) get weight exactly 0. */
static inline __attribute__((always_inline)) void attend_block(
    const float *x, const float *bias, const float *c, const float *s, const float *pkeys, const float *pvalues,
    const float *pm, const int plen, float *keys, float *values, float *o, float *q, float *acc, float *scores,
    const int hq, const int hkv, const int h, const int d, const int slot, const float scale)
{
    const int rep = hq / hkv, len = plen + slot + 1;
    const size_t at_k = (size_t)(hq + h) * d, at_v = (size_t)(hq + hkv + h) * d;
    for (int e = 0; e < d; e++) acc[e] = x[at_k + e] + bias[at_k + e]; /* the key, biased */
    rotate_head(acc, c, s, 1.0f, keys + (size_t)slot * d, d, 0);
    for (int e = 0; e < d; e++) values[(size_t)slot * d + e] = x[at_v + e] + bias[at_v + e];
    for (int r = 0; r < rep; r++) {
        const size_t at_q = (size_t)(h * rep + r) * d;
        for (int e = 0; e < d; e++) acc[e] = x[at_q + e] + bias[at_q + e];
        rotate_head(acc, c, s, scale, q + (size_t)r * d, d, 0);
    }

    for (int r = 0; r < rep; r++) {
        const float *qr = q + (size_t)r * d;
        float *sr = scores + (size_t)r * len;
        score_keys(qr, pkeys, plen, pm, sr, d);
        score_keys(qr, keys, slot + 1, NULL, sr + plen, d);
        float top = -INFINITY, sum = 0.0f; /* softmax numerators and denominator */
#pragma omp simd reduction(max : top)
        for (int l = 0; l < len; l++) top = sr[l] > top ? sr[l] : top;
#pragma omp simd reduction(+ : sum)
        for (int l = 0; l < len; l++) {
            sr[l] = sr[l] == -INFINITY ? 0.0f : exp_vec(sr[l] - top);
            sum += sr[l];
        }
        for (int e = 0; e < d; e++) acc[e] = 0.0f;
        for (int l = 0; l < plen; l++) { /* acc = p v */
            const float p = sr[l], *v = pvalues + (size_t)l * d;
            for (int e = 0; e < d; e++) acc[e] += p * v[e];
        }
        for (int l = 0; l <= slot; l++) {
            const float p = sr[plen + l], *v = values + (size_t)l * d;
            for (int e = 0; e < d; e++) acc[e] += p * v[e];
        }
        float *out = o + (size_t)r * d;
        const float inv = 1.0f / sum;
        for (int e = 0; e < d; e++) out[e] = acc[e] * inv;
    }
}

/* One decode step of attention for every row, as grpo.fastpath.FastQwen2.generate does it with
 * torch operators:
 *   qkv  (N, (Hq + 2 Hkv) D)  this step's projections: the Hq query heads, Hkv keys, Hkv values
 *   bias ((Hq + 2 Hkv) D)     their bias, added here
 *   cos_, ssin (N, D)         rotary tables at each row's position (rotate_half's sign in ssin)
 *   pk, pv (U, Hkv, P, D)     the keys/values of the U distinct prompts, read by all their rows
 *   pmask (U, P)              additive: 0 for a prompt token, -inf for its padding
 *   prompt (N,)               each row's prompt, below U (else nothing is done and -1 returned)
 *   kc, vc (N, Hkv, S, D)     generated keys/values: slot `slot` receives the rotated key, value
 *   out  (N, Hq D)            softmax(q k^T * scale + mask) v over the prompt and slots 0..slot
 * Query head j reads key/value head j / (Hq / Hkv). Rows x key/value heads run in parallel on
 * `threads` OpenMP threads; the rows of one prompt are neighbours, so its keys/values are read
 * from memory once and from cache after that, and the next block's generated keys and values
 * are prefetched while one is computed. */
int grpo_decode_attention(const float *qkv, const float *bias, const float *cos_, const float *ssin, const float *pk,
                          const float *pv, const float *pmask, const long *prompt, int u, int plen, float *kc,
                          float *vc, int span, int slot, float *out, int n, int hq, int hkv, int d, float scale,
                          int threads)
{
    for (int i = 0; i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= u) return -1;
    const int rep = hq / hkv, len = plen + slot + 1;
    const size_t row = (size_t)(hq + 2 * hkv) * d, block = (size_t)span * d, pblock = (size_t)plen * d;
#pragma omp parallel num_threads(threads)
    {
        FLUSH_DENORMALS_BEGIN
        float *q = malloc(sizeof(float) * (size_t)rep * d);
        float *acc = malloc(sizeof(float) * (size_t)d);
        float *scores = malloc(sizeof(float) * (size_t)rep * len);
#pragma omp for schedule(static)
        for (int b = 0; b < n * hkv; b++) {
            const int i = b / hkv, h = b % hkv;
            float *keys = kc + (size_t)b * block, *values = vc + (size_t)b * block;
            if (b + 1 < n * hkv) {
                const char *next_k = (const char *)(keys + block), *next_v = (const char *)(values + block);
                for (size_t off = 0; off < (size_t)(slot + 1) * d * sizeof(float); off += 64) {
                    __builtin_prefetch(next_k + off, 0, 1);
                    __builtin_prefetch(next_v + off, 0, 1);
                }
            }
            const long u = prompt[i];
            const float *pkeys = pk + ((size_t)u * hkv + h) * pblock, *pvalues = pv + ((size_t)u * hkv + h) * pblock;
            const float *x = qkv + (size_t)i * row, *c = cos_ + (size_t)i * d, *s = ssin + (size_t)i * d;
            const float *pm = pmask + (size_t)u * plen;
            float *o = out + (size_t)i * hq * d + (size_t)h * rep * d;
            if (d == 64)
                attend_block(x, bias, c, s, pkeys, pvalues, pm, plen, keys, values, o, q, acc, scores, hq, hkv, h, 64,
                             slot, scale);
            else if (d == 128)
                attend_block(x, bias, c, s, pkeys, pvalues, pm, plen, keys, values, o, q, acc, scores, hq, hkv, h, 128,
                             slot, scale);
            else
                attend_block(x, bias, c, s, pkeys, pvalues, pm, plen, keys, values, o, q, acc, scores, hq, hkv, h, d,
                             slot, scale);
        }
        free(q);
        free(acc);
        free(scores);
        FLUSH_DENORMALS_END
    }
    return 0;
}

/* One categorical draw per row from softmax((logits + bias) / temperature) by inverse CDF: the
 * first token whose cumulative mass (float64, unnormalised) exceeds u[i] times the total (kept
 * below the total), so tokens of zero mass are never drawn. logits (N, V) contiguous, bias (V)
 * or NULL, u (N) uniforms in [0, 1), out (N); returns the number of rows where every token
 * has zero mass (their out is -1). The masses are summed in blocks of 16 (independent
 * sums, then a running sum over the blocks, then within the chosen block) rather than in one
 * chain of V dependent additions. Same draw as grpo.rollout.pick_tokens' inverse_cdf sampler up
 * to float rounding. */
int grpo_sample_inverse_cdf(const float *logits, const float *bias, float temperature, const double *u, long *out,
                            int n, int v, int threads)
{
    const int blocks = (v + 15) / 16;
    int empty = 0; /* rows without a token of positive mass */
#pragma omp parallel num_threads(threads) if ((long)n * v >= 16384)
    {
        FLUSH_DENORMALS_BEGIN
        float *x = malloc(sizeof(float) * (size_t)v);
        double *sums = malloc(sizeof(double) * (size_t)blocks);
#pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            const float *row = logits + (size_t)i * v;
            float top = -INFINITY;
            for (int j = 0; j < v; j++) {
                float xj = bias ? row[j] + bias[j] : row[j];
                if (temperature != 1.0f) xj /= temperature;
                x[j] = xj;
                top = xj > top ? xj : top;
            }
#pragma omp simd
            for (int j = 0; j < v; j++) x[j] = x[j] == -INFINITY ? 0.0f : exp_vec(x[j] - top);
            double total = 0.0;
            for (int b = 0; b < blocks; b++) {
                double sum = 0.0;
                for (int j = b * 16; j < v && j < b * 16 + 16; j++) sum += x[j];
                sums[b] = sum;
                total += sum;
            }
            const double below = nextafter(total, 0.0), target = u[i] * total < below ? u[i] * total : below;
            double before = 0.0; /* the mass of the blocks before block b: the partial sums of total */
            int b = 0;
            while (b < blocks - 1 && before + sums[b] <= target) before += sums[b++];
            long pick = -1;
            for (int j = b * 16; j < v && j < b * 16 + 16; j++) {
                if (x[j] > 0.0f) pick = j; /* rounding may leave the running sum short: its last token */
                before += x[j];
                if (before > target && x[j] > 0.0f) break;
            }
            out[i] = pick;
            if (pick < 0) {
#pragma omp atomic
                empty++;
            }
        }
        free(x);
        free(sums);
        FLUSH_DENORMALS_END
    }
    return empty;
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

/* -- attention over whole sequences (the log-prob passes), forward and backward ------------------
 *
 * Products run as 4-row tiles: four rows of A times a K x (16 NV) panel of B held in 4 NV vector
 * accumulators (GCC/Clang vector extensions: AVX-512 registers here, split into narrower ones
 * elsewhere). A rows come as pointers with an element stride, so a tile reads rows or columns
 * of a matrix in place; C rows as pointers (overwritten, or added to when `add`). */
typedef float vf __attribute__((vector_size(64)));

static inline vf vload(const float *p)
{
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

#define DEFINE_TILE(NV)                                                                                     \
    static inline __attribute__((always_inline)) void tile_##NV(const float *const a[4], long ae,           \
                                                                const float *b, long ldb, int k,            \
                                                                float *const c[4], int off, int rows, int add) \
    {                                                                                                       \
        vf acc[4][NV];                                                                                      \
        for (int r = 0; r < 4; r++)                                                                         \
            for (int j = 0; j < NV; j++) acc[r][j] = (vf){0};                                               \
        for (int e = 0; e < k; e++) {                                                                       \
            vf bv[NV];                                                                                      \
            for (int j = 0; j < NV; j++) bv[j] = vload(b + (long)e * ldb + 16 * j);                         \
            for (int r = 0; r < 4; r++) {                                                                   \
                const float s = a[r][(long)e * ae];                                                         \
                for (int j = 0; j < NV; j++) acc[r][j] += s * bv[j];                                        \
            }                                                                                               \
        }                                                                                                   \
        for (int r = 0; r < rows; r++)                                                                      \
            for (int j = 0; j < NV; j++) {                                                                  \
                float *at = c[r] + off + 16 * j;                                                            \
                vstore(at, add ? acc[r][j] + vload(at) : acc[r][j]);                                        \
            }                                                                                               \
    }
DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)

/* c[r][0 .. cols) (= or +=) sum over e < k of a[r][e * ae] b[e * ldb + 0 .. cols), r < rows <= 4;
 * cols a multiple of 16. a[r] and c[r] for r >= rows must still be valid pointers (not written). */
static void tile_rows(const float *const a[4], long ae, const float *b, long ldb, int k, float *const c[4], int rows,
                      int cols, int add)
{
    for (int j = 0; j < cols; j += 64) {
        switch ((cols - j) >= 64 ? 4 : (cols - j) / 16) {
        case 4: tile_4(a, ae, b + j, ldb, k, c, j, rows, add); break;
        case 3: tile_3(a, ae, b + j, ldb, k, c, j, rows, add); break;
        case 2: tile_2(a, ae, b + j, ldb, k, c, j, rows, add); break;
        default: tile_1(a, ae, b + j, ldb, k, c, j, rows, add);
        }
    }
}

/* dst[e][col0 + s] = src[s][e] for the first `count` rows of src (row stride ss, d contiguous
 * values each): their transpose into columns col0.. of dst (d rows, row stride ld). */
static void transpose_rows(const float *restrict src, long ss, int count, int d, float *restrict dst, int ld, int col0)
{
    for (int s = 0; s < count; s++) {
        const float *row = src + s * ss;
        for (int e = 0; e < d; e++) dst[(size_t)e * ld + col0 + s] = row[e];
    }
}

/* The keys or values of one row and kv head: the first plen of its span are its prompt's (p, row
 * stride ps; NULL when plen is 0), the rest its own (x, row stride xs). */
typedef struct {
    const float *p, *x;
    long ps, xs;
    int plen;
} span_rows;

/* The rotary embedding for one row and kv head h of the attention kernels: its rep query heads
 * (q_i: the row's q, heads qs_h and positions qs_l apart) rotated into qr (rep L, D), and the
 * span's own keys (at positions 0..own-1) rotated into kr, which the span then reads. */
static void rotate_queries_and_keys(const float *q_i, long qs_h, long qs_l, int h, int rep, int len,
                                    span_rows *keys, int own, const float *c0, const float *s0, int d, float *qr,
                                    float *kr)
{
    for (int r = 0; r < rep; r++)
        rotate_rows(q_i + (h * rep + r) * qs_h, qs_l, len, c0, s0, d, qr + (size_t)r * len * d);
    rotate_rows(keys->x, keys->xs, own, c0, s0, d, kr);
    keys->x = kr;
    keys->xs = d;
}

/* (d, ld) = the transpose of a span's `span` rows, zero-padded from column span to ld. */
static void transpose_span(span_rows r, int span, int d, float *restrict dst, int ld)
{
    for (int e = 0; e < d; e++)
        for (int s = span; s < ld; s++) dst[(size_t)e * ld + s] = 0.0f;
    transpose_rows(r.p, r.ps, r.plen, d, dst, ld, 0);
    transpose_rows(r.x, r.xs, span - r.plen, d, dst, ld, r.plen);
}

/* c rows (4 x d) = sum over the span's first `count` rows s of a[r][s] times row s: the prompt's
 * rows and then the row's own, one tile product each. */
static void tile_span(const float *const a[4], span_rows b, int count, int d, float *const c[4], int rows)
{
    const int first = count < b.plen ? count : b.plen;
    tile_rows(a, 1, b.p, b.ps, first, c, rows, d, 0);
    if (count > b.plen) {
        const float *const own[4] = {a[0] + b.plen, a[1] + b.plen, a[2] + b.plen, a[3] + b.plen};
        tile_rows(own, 1, b.x, b.xs, count - b.plen, c, rows, d, 1);
    }
}

/* One query's scores -> its softmax in place, over x = sc scale + mask for keys below `bound`
 * (the rest, up to ld, get 0). */
static void softmax_row(float *restrict sc, const float *restrict msk, float scale, int bound, int ld)
{
    float top = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : top)
    for (int s = 0; s < bound; s++) {
        sc[s] = sc[s] * scale + msk[s];
        top = sc[s] > top ? sc[s] : top;
    }
#pragma omp simd reduction(+ : sum)
    for (int s = 0; s < bound; s++) {
        sc[s] = sc[s] == -INFINITY ? 0.0f : exp_vec(sc[s] - top);
        sum += sc[s];
    }
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
#pragma omp simd
    for (int s = 0; s < bound; s++) sc[s] *= inv;
    for (int s = bound; s < ld; s++) sc[s] = 0.0f;
}

/* Attention of every row and query head over its whole key span:
 *   q    (N, Hq, L, D)   read through strides (elements; D contiguous), as all the keys/values
 *   pk, pv (U, Hkv, P, D) the first P keys/values of each row's span: those of its prompt
 *                        prompt[i] (below U, else nothing is done and -1 returned); P may be 0
 *   k, v (N, Hkv, S - P, D) the rest of each row's keys/values, its own
 *   cos_, ssin (N, L, D) when not NULL: q and the own keys (then S - P = L, the same tokens)
 *                        come unrotated and get the rotary embedding here (rotate_half's sign
 *                        folded into ssin); the prompt's keys come rotated
 *   mask (N, L, S)       additive: 0 for a key to attend, -inf for one to skip
 *   out  (N, L, Hq, D)   softmax(q k^T scale + mask) v, laid out so (N, L, Hq D) is a view
 *   probs (N, Hkv, rep L, S) the softmax, for the backward (NULL: not kept); row r L + l is
 *                        query l of head h rep + r
 * Query head j reads key/value head j / rep, rep = Hq / Hkv. Work items are (row, kv head) pairs
 * over `threads` OpenMP threads; the rows of a prompt are neighbours, so its keys/values come
 * from cache after the first. Each block of 4 queries multiplies only up to its last unmasked
 * key (a causal mask leaves the rest); a query with no unmasked key gets zeros. */
int grpo_attention(const float *q, long qs_n, long qs_h, long qs_l, const float *pk, long pks_u, long pks_h,
                   long pks_s, const float *pv, long pvs_u, long pvs_h, long pvs_s, const long *prompt, int u,
                   int plen, const float *k, long ks_n, long ks_h, long ks_s, const float *v, long vs_n, long vs_h,
                   long vs_s, const float *cos_, const float *ssin, const float *mask, float *out, float *probs, int n,
                   int hq, int hkv, int len, int span, int d, float scale, int threads)
{
    for (int i = 0; plen && i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= u) return -1;
    const int rep = hq / hkv, m_rows = rep * len, s16 = (span + 15) & ~15;
    int *ends = malloc(sizeof(int) * (size_t)n * len); /* one past each query's last unmasked key */
#pragma omp parallel num_threads(threads)
    {
        FLUSH_DENORMALS_BEGIN
#pragma omp for schedule(static)
        for (long row = 0; row < (long)n * len; row++) {
            const float *msk = mask + row * span;
            int last = span;
            while (last > 0 && msk[last - 1] == -INFINITY) last--;
            ends[row] = last;
        }
        float *kt = malloc(sizeof(float) * (size_t)d * s16);      /* K^T (D, S16), zero-padded */
        float *pb = malloc(sizeof(float) * (size_t)m_rows * s16); /* scores, then softmax (rep L, S16) */
        float *qr = malloc(sizeof(float) * (size_t)m_rows * d);   /* rotated queries (rep L, D) */
        float *kr = malloc(sizeof(float) * (size_t)len * d);      /* rotated own keys (L, D) */
#pragma omp for schedule(static)
        for (long b = 0; b < (long)n * hkv; b++) {
            const long i = b / hkv, pi = plen ? prompt[i] : 0;
            const int h = (int)(b % hkv);
            span_rows keys = {pk + pi * pks_u + h * pks_h, k + i * ks_n + h * ks_h, pks_s, ks_s, plen};
            const span_rows values = {pv + pi * pvs_u + h * pvs_h, v + i * vs_n + h * vs_h, pvs_s, vs_s, plen};
            if (cos_) /* the rotary embedding of the queries and own keys, at their positions */
                rotate_queries_and_keys(q + i * qs_n, qs_h, qs_l, h, rep, len, &keys, len, cos_ + (size_t)i * len * d,
                                        ssin + (size_t)i * len * d, d, qr, kr);
            transpose_span(keys, span, d, kt, s16);
            for (int m0 = 0; m0 < m_rows; m0 += 4) {
                const int rows = m_rows - m0 < 4 ? m_rows - m0 : 4;
                const float *a[4];
                float *c[4];
                int bound = 0; /* one past the block's last unmasked key */
                for (int r = 0; r < 4; r++) {
                    const int m = m0 + (r < rows ? r : 0), head = h * rep + m / len, l = m % len;
                    a[r] = cos_ ? qr + (size_t)m * d : q + i * qs_n + head * qs_h + l * qs_l;
                    c[r] = pb + (size_t)m * s16;
                    bound = ends[i * len + l] > bound ? ends[i * len + l] : bound;
                }
                const int cols = (bound + 15) & ~15;
                tile_rows(a, 1, kt, s16, d, c, rows, cols, 0);
                for (int r = 0; r < rows; r++) /* softmax over the block's keys */
                    softmax_row(pb + (size_t)(m0 + r) * s16, mask + ((size_t)i * len + (m0 + r) % len) * span, scale,
                                bound, s16);
                if (probs)
                    for (int r = 0; r < rows; r++)
                        memcpy(probs + ((size_t)b * m_rows + m0 + r) * span, pb + (size_t)(m0 + r) * s16,
                               sizeof(float) * span);
                for (int r = 0; r < 4; r++) { /* out rows = softmax v */
                    const int m = m0 + (r < rows ? r : 0), head = h * rep + m / len, l = m % len;
                    a[r] = pb + (size_t)m * s16;
                    c[r] = out + ((size_t)i * len + l) * hq * d + (size_t)head * d;
                }
                tile_span(a, values, bound, d, c, rows);
            }
        }
        free(kt);
        free(pb);
        free(qr);
        free(kr);
        FLUSH_DENORMALS_END
    }
    free(ends);
    return 0;
}

/* The gradients of `grpo_attention` from its output's gradient grad (N, L, Hq, D; strides gs_*)
 * and the kept softmax probs: with dP = grad v^T and dS = P (dP - rowsum(P dP)) scale,
 *   dq (N, L, Hq, D) = dS k,  dk = dS^T q,  dv = P^T grad,
 * dk, dv split as the keys are: dpk, dpv (N, Hkv, P, D) for each row's prompt keys/values (the
 * caller sums the rows of a prompt), dk, dv (N, Hkv, S - P, D) for its own. All written (not
 * added). Products skip the keys a block of queries gives zero probability, and the queries that
 * give a block of keys none before their first one that does. With cos_, ssin (as in the
 * forward) dq and the own keys' dk are those of the unrotated q and keys. Returns -1 (and does
 * nothing) for a prompt index outside 0..U-1. */
int grpo_attention_backward(const float *grad, long gs_n, long gs_h, long gs_l, const float *probs, const float *q,
                            long qs_n, long qs_h, long qs_l, const float *pk, long pks_u, long pks_h, long pks_s,
                            const float *pv, long pvs_u, long pvs_h, long pvs_s, const long *prompt, int u, int plen,
                            const float *k, long ks_n, long ks_h, long ks_s, const float *v, long vs_n, long vs_h,
                            long vs_s, const float *cos_, const float *ssin, float *dq, float *dpk, float *dpv,
                            float *dk, float *dv, int n, int hq, int hkv, int len, int span, int d, float scale,
                            int threads)
{
    for (int i = 0; plen && i < n; i++)
        if (prompt[i] < 0 || prompt[i] >= u) return -1;
    const int rep = hq / hkv, m_rows = rep * len, s16 = (span + 15) & ~15, own = span - plen;
#pragma omp parallel num_threads(threads)
    {
        FLUSH_DENORMALS_BEGIN
        float *vt = malloc(sizeof(float) * (size_t)d * s16);      /* V^T (D, S16), zero-padded */
        float *pb = malloc(sizeof(float) * (size_t)m_rows * s16); /* P (rep L, S16) */
        float *ds = malloc(sizeof(float) * (size_t)m_rows * s16); /* dP, then dS */
        float *gb = malloc(sizeof(float) * (size_t)m_rows * d);   /* grad rows (rep L, D) */
        float *qb = malloc(sizeof(float) * (size_t)m_rows * d);   /* q rows (rep L, D), rotated */
        float *kr = malloc(sizeof(float) * (size_t)own * d);      /* own keys, rotated */
        float *tmp = malloc(sizeof(float) * (size_t)d);
        int *ends = malloc(sizeof(int) * (size_t)m_rows);          /* one past each row's last p > 0 */
#pragma omp for schedule(static)
        for (long b = 0; b < (long)n * hkv; b++) {
            const long i = b / hkv, pi = plen ? prompt[i] : 0;
            const int h = (int)(b % hkv);
            span_rows keys = {pk + pi * pks_u + h * pks_h, k + i * ks_n + h * ks_h, pks_s, ks_s, plen};
            const span_rows values = {pv + pi * pvs_u + h * pvs_h, v + i * vs_n + h * vs_h, pvs_s, vs_s, plen};
            const float *c0 = cos_ ? cos_ + (size_t)i * len * d : NULL, *s0 = cos_ ? ssin + (size_t)i * len * d : NULL;
            if (cos_) /* the rotated queries and own keys, as the forward used them */
                rotate_queries_and_keys(q + i * qs_n, qs_h, qs_l, h, rep, len, &keys, own, c0, s0, d, qb, kr);
            transpose_span(values, span, d, vt, s16);
            for (int m = 0; m < m_rows; m++) {
                const int head = h * rep + m / len, l = m % len;
                float *pr = pb + (size_t)m * s16;
                memcpy(pr, probs + ((size_t)b * m_rows + m) * span, sizeof(float) * span);
                for (int s = span; s < s16; s++) pr[s] = 0.0f;
                int last = span;
                while (last > 0 && pr[last - 1] == 0.0f) last--;
                ends[m] = last;
                memcpy(gb + (size_t)m * d, grad + i * gs_n + head * gs_h + l * gs_l, sizeof(float) * d);
                if (!cos_) memcpy(qb + (size_t)m * d, q + i * qs_n + head * qs_h + l * qs_l, sizeof(float) * d);
            }
            for (int m0 = 0; m0 < m_rows; m0 += 4) {
                const int rows = m_rows - m0 < 4 ? m_rows - m0 : 4;
                const float *a[4];
                float *c[4];
                int bound = 0; /* one past the block's last key of nonzero probability */
                for (int r = 0; r < 4; r++) {
                    const int m = m0 + (r < rows ? r : 0);
                    a[r] = gb + (size_t)m * d;
                    c[r] = ds + (size_t)m * s16;
                    bound = ends[m] > bound ? ends[m] : bound;
                }
                const int cols = (bound + 15) & ~15;
                tile_rows(a, 1, vt, s16, d, c, rows, cols, 0); /* dP */
                for (int r = 0; r < rows; r++) {
                    const float *pr = pb + (size_t)(m0 + r) * s16;
                    float *dr = ds + (size_t)(m0 + r) * s16, delta = 0.0f;
                    for (int s = 0; s < cols; s++) delta += pr[s] * dr[s];
                    for (int s = 0; s < cols; s++) dr[s] = pr[s] * (dr[s] - delta) * scale;
                    for (int s = cols; s < s16; s++) dr[s] = 0.0f;
                }
                for (int r = 0; r < 4; r++) { /* dq rows = dS k */
                    const int m = m0 + (r < rows ? r : 0), head = h * rep + m / len, l = m % len;
                    a[r] = ds + (size_t)m * s16;
                    c[r] = dq + ((size_t)i * len + l) * hq * d + (size_t)head * d;
                }
                tile_span(a, keys, bound, d, c, rows);
            }
            for (int s0 = 0; s0 < span; s0 += 4) { /* dv rows = P^T grad, dk rows = dS^T q */
                const int rows = span - s0 < 4 ? span - s0 : 4;
                const float *a[4];
                float *cv[4], *ck[4];
                for (int r = 0; r < 4; r++) {
                    const int s = s0 + (r < rows ? r : 0);
                    const size_t at = s < plen ? ((size_t)b * plen + s) * d : ((size_t)b * own + s - plen) * d;
                    cv[r] = (s < plen ? dpv : dv) + at;
                    ck[r] = (s < plen ? dpk : dk) + at;
                }
                int written = 0;
                for (int g = 0; g < rep; g++) { /* per query head: from its first row with p > 0 at or past s0 */
                    int lo = 0;
                    while (lo < len && ends[g * len + lo] <= s0) lo++;
                    if (lo == len) continue;
                    const int m = g * len + lo;
                    for (int r = 0; r < 4; r++) a[r] = pb + (size_t)m * s16 + s0 + (r < rows ? r : 0);
                    tile_rows(a, s16, gb + (size_t)m * d, d, len - lo, cv, rows, d, written);
                    for (int r = 0; r < 4; r++) a[r] = ds + (size_t)m * s16 + s0 + (r < rows ? r : 0);
                    tile_rows(a, s16, qb + (size_t)m * d, d, len - lo, ck, rows, d, written);
                    written = 1;
                }
                if (!written)
                    for (int r = 0; r < rows; r++) {
                        memset(cv[r], 0, sizeof(float) * d);
                        memset(ck[r], 0, sizeof(float) * d);
                    }
            }
            if (cos_) { /* back through the rotary embedding: R^T of the rotated q's and own keys' gradients */
                for (int r = 0; r < rep; r++)
                    rotate_rows_back(dq + (size_t)i * len * hq * d + (size_t)(h * rep + r) * d, (long)hq * d, len, c0,
                                     s0, d, tmp);
                rotate_rows_back(dk + (size_t)b * own * d, d, own, c0, s0, d, tmp);
            }
        }
        free(vt);
        free(pb);
        free(ds);
        free(gb);
        free(qb);
        free(kr);
        free(tmp);
        free(ends);
        FLUSH_DENORMALS_END
    }
    return 0;
}

/* LoRA dropout as corrections of the undropped products. x (rows, in) is the input; pos (k,) the
 * ascending flat positions of the entries that one projection's dropout zeroes; a_t (in, R) its
 * A^T. With xd = x with those entries zeroed:
 *   grpo_lora_drop_xa:       xa (rows, R; row stride xa_stride) holds x A^T -> becomes xd A^T
 *   grpo_lora_drop_backward: corr (in, R, zeroed) += the dropped entries' part of x^T gxa, so that
 *                            (x^T gxa - corr)^T = gxa^T xd, the gradient of A; and gx (rows, in;
 *                            NULL: skipped), which holds gxa A among its terms, loses that term at
 *                            the dropped entries, as the gradient through xd has none there.
 * gxa (rows, R; row stride gxa_stride) is the gradient at xa. Each visits only the dropped
 * entries (about p of them), where zeroing copies of x costs full passes. */
/* The three loops, inlined with r a constant for the usual LoRA ranks (the r-long loops become a
 * few vector instructions); positions ascend, so they go row by row. Ranks above 64 are not
 * taken by `grpo.native` (drop_xa's accumulator). */
static inline __attribute__((always_inline)) void drop_xa(const float *restrict x, long in,
                                                          const long *restrict pos, long k,
                                                          const float *restrict a_t, const int r,
                                                          float *restrict xa, long xa_stride)
{
    long j = 0;
    while (j < k) { /* one row at a time: its dropped entries' sum in registers, then one update */
        const long row = pos[j] / in, row_end = (row + 1) * in;
        float acc[64] = {0};
        for (; j < k && pos[j] < row_end; j++) {
            const float v = x[pos[j]], *ac = a_t + (pos[j] - row * in) * r;
            for (int t = 0; t < r; t++) acc[t] += v * ac[t];
        }
        float *out = xa + row * xa_stride;
        for (int t = 0; t < r; t++) out[t] -= acc[t];
    }
}

/* a . b over r values: 8 partial sums and a fixed tree when 8 divides r (a chain of r dependent
 * additions otherwise: the sums of one position would wait on each other). */
static inline __attribute__((always_inline)) float dot_rank(const float *restrict a, const float *restrict b,
                                                            const int r)
{
    if (r % 8) {
        float sum = 0.0f;
        for (int t = 0; t < r; t++) sum += a[t] * b[t];
        return sum;
    }
    float p[8] = {0};
    for (int t0 = 0; t0 < r; t0 += 8)
        for (int j = 0; j < 8; j++) p[j] += a[t0 + j] * b[t0 + j];
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
}

static inline __attribute__((always_inline)) void drop_backward(const float *restrict x, float *restrict gx,
                                                                long in, const long *restrict pos, long k,
                                                                const float *restrict gxa, long gxa_stride,
                                                                const float *restrict a_t, const int r,
                                                                float *restrict corr)
{
    long j = 0;
    while (j < k) {
        const long row = pos[j] / in, row_end = (row + 1) * in;
        const float *g = gxa + row * gxa_stride;
        for (; j < k && pos[j] < row_end; j++) {
            const long col = pos[j] - row * in;
            const float v = x[pos[j]], *ac = a_t + col * r;
            float *out = corr + col * r;
            for (int t = 0; t < r; t++) out[t] += v * g[t];
            if (gx) gx[pos[j]] -= dot_rank(g, ac, r);
        }
    }
}

#define BY_RANK(CALL)        \
    switch (r) {             \
    case 8: CALL(8); break;   \
    case 16: CALL(16); break; \
    case 32: CALL(32); break; \
    case 64: CALL(64); break; \
    default: CALL(r);        \
    }

/* The positions [lo, hi) of `threads` equal parts, each part starting at a row boundary (so the
 * parts write disjoint rows). */
static void split_rows(const long *pos, long k, long in, int part, int parts, long *lo, long *hi)
{
    long bounds[2];
    for (int e = 0; e < 2; e++) {
        long j = k * (part + e) / parts;
        if (j > 0 && j < k) {
            const long row = pos[j] / in; /* move back to the first position of that row */
            while (j > 0 && pos[j - 1] / in == row) j--;
        }
        bounds[e] = j;
    }
    *lo = bounds[0];
    *hi = bounds[1];
}

void grpo_lora_drop_xa(const float *x, long in, const long *pos, long k, const float *a_t, int r, float *xa,
                       long xa_stride, int threads)
{
#pragma omp parallel num_threads(threads) if (k >= 4096)
    {
        long lo, hi;
        split_rows(pos, k, in, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
#define CALL(R) drop_xa(x, in, pos + lo, hi - lo, a_t, R, xa, xa_stride)
        BY_RANK(CALL)
#undef CALL
    }
}

void grpo_lora_drop_backward(const float *x, float *gx, long in, const long *pos, long k, const float *gxa,
                             long gxa_stride, const float *a_t, int r, float *corr, int threads)
{
    /* each thread sums its part of corr into its own (in, r) buffer; they are added at the end */
    const int parts = k >= 4096 ? threads : 1;
    float *scratch = calloc((size_t)(parts - 1) * in * r + 1, sizeof(float));
#pragma omp parallel num_threads(parts)
    {
        const int me = omp_get_thread_num(), all = omp_get_num_threads();
        long lo, hi;
        split_rows(pos, k, in, me, all, &lo, &hi);
        float *mine = me == 0 ? corr : scratch + (size_t)(me - 1) * in * r;
#define CALL(R) drop_backward(x, gx, in, pos + lo, hi - lo, gxa, gxa_stride, a_t, R, mine)
        BY_RANK(CALL)
#undef CALL
    }
    for (int e = 1; e < parts; e++)
        for (long t = 0; t < in * r; t++) corr[t] += scratch[(size_t)(e - 1) * in * r + t];
    free(scratch);
}

/* log(v) for v in (0, 1] (normal floats) to about 1 ulp, in operations that vectorise (Cephes'
 * logf): v = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a degree-9 polynomial in m - 1. */
static inline __attribute__((always_inline)) float log_vec(float v)
{
    int bits;
    memcpy(&bits, &v, sizeof bits);
    int e = (bits >> 23) - 126; /* v = m 2^e, m in [0.5, 1) */
    bits = (bits & 0x007fffff) | 0x3f000000;
    float m;
    memcpy(&m, &bits, sizeof m);
    const int small = m < 0.707106781186547524f; /* then m -> 2m, e -> e - 1: m in [sqrt(1/2), sqrt(2)) */
    e -= small;
    const float f = (small ? m + m : m) - 1.0f;
    const float z = f * f;
    float y = 7.0376836292e-2f;
    y = y * f - 1.1514610310e-1f;
    y = y * f + 1.1676998740e-1f;
    y = y * f - 1.2420140846e-1f;
    y = y * f + 1.4249322787e-1f;
    y = y * f - 1.6668057665e-1f;
    y = y * f + 2.0000714765e-1f;
    y = y * f - 2.4999993993e-1f;
    y = y * f + 3.3333331174e-1f;
    y = y * f * z;
    const float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return f + y + 0.693359375f * fe;
}

/* The ascending flat positions of the entries that dropout (drop probability p) zeroes among n:
 * out (cap) receives them; returns their count, or -1 when there are more than cap (the caller
 * asks again with a larger cap: the same seed gives the same positions). The gaps between
 * positions are Geometric(p): gap = max(1, ceil(log(v) / log(1 - p))) for v uniform on the
 * 2^24 grid (0, 1], so each gap's distribution is within 2^-24 of the geometric's and the
 * positions are those of n independent Bernoulli(p) draws to that precision. The uniforms are
 * SplitMix64 outputs at counters seed + i (a counter-based stream: batches vectorise). */
long grpo_dropped_positions(uint64_t seed, long n, float inv_log_q, long *out, long cap)
{
    enum { BATCH = 512 };
    float gaps[BATCH];
    long pos = -1, k = 0;
    for (uint64_t base = 0;; base += BATCH) {
        for (int i = 0; i < BATCH; i++) {
            uint64_t z = seed + (base + (uint64_t)i + 1) * 0x9e3779b97f4a7c15ULL; /* SplitMix64 */
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
            z ^= z >> 31;
            const float v = (float)(int32_t)((z >> 40) + 1) * 0x1p-24f; /* (0, 1], exact */
            const float g = ceilf(log_vec(v) * inv_log_q);
            gaps[i] = g > 1.0f ? g : 1.0f;
        }
        for (int i = 0; i < BATCH; i++) {
            pos += (long)gaps[i];
            if (pos >= n) return k;
            if (k == cap) return -1;
            out[k++] = pos;
        }
    }
}

/* The rotary embedding of a (n, L, H, D) batch of heads: out = x cos + rotate_half(x) sin with
 * rotate_half's sign folded into ssin, cos and ssin (n, L, D) shared by the H heads of a
 * position; `transpose` applies the transposed rotation (the backward: the halves of ssin swap).
 * x is read through its strides (elements; D contiguous), out is written contiguous. */
void grpo_rotary(const float *x, long sx_n, long sx_l, long sx_h, const float *cos_, const float *ssin, float *out,
                 long n, long len, int heads, int d, int transpose, int threads)
{
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static) if (n * len * heads * d >= 32768)
    for (long b = 0; b < n; b++)
        for (long l = 0; l < len; l++) {
            const float *c = cos_ + (b * len + l) * d, *s = ssin + (b * len + l) * d;
            for (int h = 0; h < heads; h++)
                rotate_head(x + b * sx_n + l * sx_l + h * sx_h, c, s, 1.0f, out + ((b * len + l) * heads + h) * d, d,
                            transpose);
        }
}

/* -- a whole decode step: every layer, the final norm and the head ------------------------------
 *
 * The products go through MKL's packed GEMM, whose cblas_sgemm_compute the caller passes as a
 * function pointer (grpo.native.MklGemm packs the weights); the rest are the kernels above. One
 * call per generated token replaces some forty dispatched operators. */
typedef void (*gemm_compute_fn)(int layout, int transa, int transb, int m, int n, int k, const float *a, int lda,
                                const float *b, int ldb, float beta, float *c, int ldc);

/* One layer's tensors for grpo_decode_step (all float32). */
typedef struct {
    const float *ln1, *ln2;                          /* (H) RMSNorm weights */
    const float *qkv, *o, *gate_up, *down;          /* MKL-packed (H, (Hq + 2 Hkv) D), (Hq D, H), (H, 2 I), (I, H) */
    const float *qkv_bias;                           /* ((Hq + 2 Hkv) D) */
    const float *prompt_k, *prompt_v;                /* (U, Hkv, P, D) */
    float *k_cache, *v_cache;                        /* (N, Hkv, T, D) */
} decode_layer;

/* y (m, n) = x (m, k) @ packed w (beta 0), or y += it (beta 1). */
static void packed_mm(gemm_compute_fn compute, const float *x, const float *w, int m, int k, int n, float beta,
                      float *y)
{
    compute(101 /* row major */, 111 /* no trans */, 151 /* packed */, m, n, k, x, k, w, n, beta, y, n);
}

/* Token `slot` of a generation for all N rows: x = embed[tokens] through the layers (each
 * rms -> qkv -> attention over the row's prompt and generated slots 0..slot -> o (+= x) -> rms ->
 * gate/up -> SwiGLU -> down (+= x)), then logits (N, V) = rms(x) @ head. Scratch: N x (H +
 * (Hq + 2 Hkv) D + Hq D + 3 I) floats. Returns -1 (nothing done) for a prompt index outside
 * 0..U-1, -2 for a token outside 0..V-1 (the embedding and the head share V). */
int grpo_decode_step(const decode_layer *layers, int n_layers, const long *tokens, const float *embed, float *x,
                     const float *cos_, const float *ssin, const float *prompt_mask, const long *prompt, int u,
                     int plen, int span, int slot, const float *norm, const float *head, float *logits, int n, int h,
                     int inter, int vocab, int hq, int hkv, int d, float eps, float scale, float *scratch,
                     void *compute_ptr, int threads)
{
    for (int i = 0; i < n; i++) {
        if (prompt[i] < 0 || prompt[i] >= u) return -1;
        if (tokens[i] < 0 || tokens[i] >= vocab) return -2;
    }
    gemm_compute_fn compute = (gemm_compute_fn)compute_ptr;
    const int qkv_dim = (hq + 2 * hkv) * d;
    float *hb = scratch, *qkv = hb + (size_t)n * h, *att = qkv + (size_t)n * qkv_dim, *gu = att + (size_t)n * hq * d;
    float *act = gu + (size_t)n * 2 * inter;
    for (int i = 0; i < n; i++) memcpy(x + (size_t)i * h, embed + (size_t)tokens[i] * h, sizeof(float) * h);
    for (int l = 0; l < n_layers; l++) {
        const decode_layer *ly = layers + l;
        grpo_rms_norm(x, ly->ln1, hb, NULL, n, h, eps, threads);
        packed_mm(compute, hb, ly->qkv, n, h, qkv_dim, 0.0f, qkv);
        grpo_decode_attention(qkv, ly->qkv_bias, cos_, ssin, ly->prompt_k, ly->prompt_v, prompt_mask, prompt, u, plen,
                              ly->k_cache, ly->v_cache, span, slot, att, n, hq, hkv, d, scale, threads);
        packed_mm(compute, att, ly->o, n, hq * d, h, 1.0f, x);
        grpo_rms_norm(x, ly->ln2, hb, NULL, n, h, eps, threads);
        packed_mm(compute, hb, ly->gate_up, n, h, 2 * inter, 0.0f, gu);
        grpo_swiglu(gu, gu + inter, 2 * inter, act, n, inter, threads);
        packed_mm(compute, act, ly->down, n, inter, h, 1.0f, x);
    }
    grpo_rms_norm(x, norm, hb, NULL, n, h, eps, threads);
    packed_mm(compute, hb, head, n, h, vocab, 0.0f, logits);
    return 0;
}
