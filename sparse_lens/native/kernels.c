/* The training step's native kernels on CPU, float32: exact top-k selection by magnitude
 * (AbsTopK, the weight projection), causal attention for 16-wide heads, RMSNorm.
 *
 * Built and loaded by sparse_lens/native/__init__.py (ctypes). The selections have
 * PyTorch/NumPy twins that give the same bits; attention and RMSNorm equal TransformerLens's to
 * float tolerance; tests/test_native.py compares them all.
 *
 * Keys. For a float32 x, key(x) = bits(x) & 0x7fffffff orders |x| as unsigned integers do
 * (a NaN is above +inf, as torch.topk puts it). The k-th largest key T of a set is found by
 * bisection on the integer key: count(key >= mid) is a branch-free loop (AVX-512 intrinsics
 * where available); once few candidates remain between the bounds they are gathered and the
 * bisection goes on over them alone.
 * Ties: every entry with key > T is kept, then the entries with key == T in position order
 * (lowest first) until exactly k are kept.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define KEY_MASK 0x7fffffffu
#define STACK_CANDIDATES 2048
#define PARALLEL_MIN 65536 /* fewer entries run on one thread */

static inline uint32_t key_at(const uint32_t *bits, int64_t i) { return bits[i] & KEY_MASK; }

#if defined(__AVX512F__)
#include <immintrin.h>

/* the first `count` lanes (0 <= count, at most 16) */
static inline __mmask16 lanes(int64_t count) {
    return count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1u);
}

/* How many keys of bits[0..n) are >= t. */
static int64_t count_ge(const uint32_t *bits, int64_t n, uint32_t t) {
    const __m512i key_mask = _mm512_set1_epi32((int)KEY_MASK), tv = _mm512_set1_epi32((int)t);
    int64_t c0 = 0, c1 = 0, i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512i x0 = _mm512_and_si512(_mm512_loadu_si512(bits + i), key_mask);
        __m512i x1 = _mm512_and_si512(_mm512_loadu_si512(bits + i + 16), key_mask);
        c0 += __builtin_popcount(_mm512_cmpge_epu32_mask(x0, tv));
        c1 += __builtin_popcount(_mm512_cmpge_epu32_mask(x1, tv));
    }
    for (; i < n; i += 16) {
        __mmask16 live = lanes(n - i);
        __m512i x = _mm512_and_si512(_mm512_maskz_loadu_epi32(live, bits + i), key_mask);
        c0 += __builtin_popcount(_mm512_mask_cmpge_epu32_mask(live, x, tv));
    }
    return c0 + c1;
}

/* Copy the keys of bits[0..n) in [lo, hi) to cand, in order; returns how many. cand needs
 * room for 16 more than that (whole vectors are stored); it may be bits itself. */
static int64_t gather_range(const uint32_t *bits, int64_t n, uint32_t lo, uint32_t hi, uint32_t *cand) {
    const __m512i key_mask = _mm512_set1_epi32((int)KEY_MASK);
    const __m512i lov = _mm512_set1_epi32((int)lo), hiv = _mm512_set1_epi32((int)hi);
    int64_t j = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 live = lanes(n - i);
        __m512i x = _mm512_and_si512(_mm512_maskz_loadu_epi32(live, bits + i), key_mask);
        __mmask16 in = _mm512_mask_cmpge_epu32_mask(live, x, lov) & _mm512_cmplt_epu32_mask(x, hiv);
        /* compress in a register, then store: the memory form is slow on some CPUs */
        _mm512_storeu_si512(cand + j, _mm512_maskz_compress_epi32(in, x));
        j += __builtin_popcount(in);
    }
    return j;
}

#define GATHER_MIN 64 /* arrays up to this long are only bisected */
#define GATHER_RATIO 4 /* gather once at most 1/GATHER_RATIO of the entries are candidates */

#else /* portable C; the compiler vectorises count_ge */

/* How many keys of bits[0..n) are >= t (counted in 32-bit lanes, blocks of 2^30). */
static int64_t count_ge(const uint32_t *bits, int64_t n, uint32_t t) {
    int64_t total = 0;
    for (int64_t start = 0; start < n; start += (int64_t)1 << 30) {
        int64_t end = n - start > ((int64_t)1 << 30) ? start + ((int64_t)1 << 30) : n;
        uint32_t c = 0;
        for (int64_t i = start; i < end; i++) c += (bits[i] & KEY_MASK) >= t;
        total += c;
    }
    return total;
}

/* Copy the keys of bits[0..n) in [lo, hi) to cand, in order (branch-free); returns how many.
 * cand may be bits itself. */
static int64_t gather_range(const uint32_t *bits, int64_t n, uint32_t lo, uint32_t hi, uint32_t *cand) {
    int64_t j = 0;
    uint32_t width = hi - lo;
    for (int64_t i = 0; i < n; i++) {
        uint32_t key = key_at(bits, i);
        cand[j] = key;
        j += (uint32_t)(key - lo) < width;
    }
    return j;
}

#define GATHER_MIN 4096
#define GATHER_RATIO 8

#endif

/* The k-th largest key of bits[0..n) (1 <= k <= n). Bisection on the key; once at most
 * 1/GATHER_RATIO of the entries searched lie between the bounds, those are gathered and the
 * search goes on over them alone. */
static uint32_t kth_key(const uint32_t *bits, int64_t n, int64_t k) {
    /* invariant: count(>= lo) = c_lo >= k > c_hi = count(>= hi); 2^31 is above every key */
    uint64_t lo = 0, hi = (uint64_t)1 << 31;
    int64_t c_lo = n, c_hi = 0;
    uint32_t stack[STACK_CANDIDATES];
    uint32_t *heap = NULL, *buffer = NULL;
    const uint32_t *keys = bits;
    int may_gather = 1;
    while (hi - lo > 1) {
        int64_t m = c_lo - c_hi;
        if (m == 1) break; /* the one candidate is the answer: found below */
        if (may_gather && n > GATHER_MIN && m <= n / GATHER_RATIO) {
            if (buffer == NULL) {
                buffer = m + 16 <= STACK_CANDIDATES ? stack
                         : (heap = malloc((size_t)(m + 16) * sizeof(uint32_t)));
            }
            if (buffer != NULL) {
                gather_range(keys, n, (uint32_t)lo, (uint32_t)hi, buffer); /* == m */
                keys = buffer;
                n = m;
                k -= c_hi;
                c_lo = m;
                c_hi = 0;
                continue;
            }
            may_gather = 0; /* no memory: bisect over everything */
        }
        uint64_t mid = lo + (hi - lo) / 2;
        int64_t c = count_ge(keys, n, (uint32_t)mid);
        if (c >= k) { lo = mid; c_lo = c; } else { hi = mid; c_hi = c; }
    }
    uint32_t t = (uint32_t)lo;
    if (hi - lo > 1) { /* exactly one key in [lo, hi): the k-th largest */
        for (int64_t i = 0; i < n; i++) {
            uint32_t key = key_at(keys, i);
            if (key >= lo && key < hi) { t = key; break; }
        }
    }
    free(heap);
    return t;
}

/* AbsTopK of each row of x [rows, dim] (contiguous float32, as bits), given each row's k-th
 * largest key kth[r]: out = x * keep, with keep (0/1 bytes) marking exactly k entries per
 * row: those with key > kth[r], then those equal to it in position order. */
void abstopk_apply(const uint32_t *x, const uint32_t *kth, float *out, uint8_t *keep,
                   int64_t rows, int64_t dim, int64_t k, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const uint32_t *restrict xb = x + r * dim;
        const float *restrict xf = (const float *)(x + r * dim);
        float *restrict o = out + r * dim;
        uint8_t *restrict kp = keep + r * dim;
        uint32_t t = kth[r] & KEY_MASK;
        int64_t above = t == KEY_MASK ? 0 : count_ge(xb, dim, t + 1);
        int64_t room = k - above; /* entries equal to t still to keep, in position order */
        if (room == count_ge(xb, dim, t) - above) {
            for (int64_t i = 0; i < dim; i++) kp[i] = (xb[i] & KEY_MASK) >= t;
        } else {
            for (int64_t i = 0; i < dim; i++) {
                uint32_t key = xb[i] & KEY_MASK;
                kp[i] = key > t || (key == t && room-- > 0);
            }
        }
        /* a loop of its own: GCC 12 vectorises neither loop with both */
        for (int64_t i = 0; i < dim; i++) o[i] = xf[i] * (float)kp[i];
    }
}

/* Whether kth_key runs the AVX-512 version (else NumPy's selection is faster on short rows,
 * and sparse_lens/abstopk.py uses it with abstopk_apply). */
int select_is_vectorised(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* AbsTopK of each row, its k-th largest key found here too; kth: [rows] scratch.
 * 1 <= k < dim. */
void abstopk_rows(const uint32_t *x, uint32_t *kth, float *out, uint8_t *keep, int64_t rows,
                  int64_t dim, int64_t k, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) kth[r] = kth_key(x + r * dim, dim, k);
    abstopk_apply(x, kth, out, keep, rows, dim, k, threads);
}

/* out = g * keep (the backward of AbsTopK), n entries. */
void mul_keep(const float *g, const uint8_t *keep, float *out, int64_t n, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) out[i] = g[i] * (float)keep[i];
}

/* The global top-k of a weight w (n float32 entries, as bits): its threshold key t and how
 * many entries equal to t are kept (`room`, the first ones in position order). Also counts
 * the kept entries of every output unit, with w viewed as [a, b, c] and unit = (i_a, i_c)
 * (index i_a * c + i_c; the fan-in is the b axis): unit_counts must hold a * c zeros. */
void weight_topk(const uint32_t *w, int64_t n, int64_t k, int64_t a, int64_t b, int64_t c,
                 uint32_t *t_out, int64_t *room_out, int64_t *unit_counts) {
    uint32_t t = kth_key(w, n, k);
    int64_t above = t == KEY_MASK ? 0 : count_ge(w, n, t + 1);
    int64_t room = k - above;
    int64_t equal = count_ge(w, n, t) - above;
    *t_out = t;
    *room_out = room;
    for (int64_t ia = 0; ia < a; ia++) {
        int64_t *units = unit_counts + ia * c;
        const uint32_t *block = w + ia * b * c;
        if (room == equal && c == 1) { /* the unit's fan-in is contiguous */
            units[0] = count_ge(block, b, t);
            continue;
        }
        for (int64_t ib = 0; ib < b; ib++) {
            const uint32_t *row = block + ib * c;
            if (room == equal) {
                for (int64_t ic = 0; ic < c; ic++) units[ic] += (row[ic] & KEY_MASK) >= t;
            } else {
                for (int64_t ic = 0; ic < c; ic++) {
                    uint32_t key = row[ic] & KEY_MASK;
                    units[ic] += key > t || (key == t && room-- > 0);
                }
            }
        }
    }
}

/* Zero (+0.0) every entry weight_topk did not keep (same t and room), in place; the kept
 * entries keep their bits. */
void weight_apply(uint32_t *bits, int64_t n, uint32_t t, int64_t room) {
    int64_t equal = count_ge(bits, n, t) - (t == KEY_MASK ? 0 : count_ge(bits, n, t + 1));
    if (room == equal) {
        for (int64_t i = 0; i < n; i++) bits[i] &= -(uint32_t)((bits[i] & KEY_MASK) >= t);
        return;
    }
    for (int64_t i = 0; i < n; i++) {
        uint32_t key = bits[i] & KEY_MASK;
        if (!(key > t || (key == t && room-- > 0))) bits[i] = 0;
    }
}

/* ------------------------------------------------------------------ causal attention
 * Softmax attention over the keys at or before each query, with an optional sink logit per
 * head (an always-visible key of zero value: it only adds exp(sink) to each row's denominator),
 * for heads of ATTN_HEAD_DIM channels. q, k, v, z, dz, dq, dk, dv: [batch, pos, head, d_head]
 * contiguous (TransformerLens's layout); lse: [batch, head, pos], each row's log-sum-exp with
 * the sink. One (batch, head) pair per task, copied into contiguous scratch; every loop runs
 * in a fixed order, so the results do not depend on the thread count. */
#define ATTN_HEAD_DIM 16

int attention_head_dim(void) { return ATTN_HEAD_DIM; }

/* exp(x) for x <= 0, relative error below 2e-7 (Cephes' expf polynomial); 0 below -87.
 * Branch-free, so loops over it vectorise. */
static inline float exp_nonpositive(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float n = __builtin_rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float e = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : e * scale;
}

/* sum of s[0..n) in a fixed order (16 interleaved partial sums, so that it vectorises) */
static float ordered_sum(const float *s, int64_t n) {
    float acc[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int u = 0; u < 16; u++) acc[u] += s[j + u];
    for (; j < n; j++) acc[j & 15] += s[j];
    float total = 0.0f;
    for (int u = 0; u < 16; u++) total += acc[u];
    return total;
}

/* max(start, s[0..n)) (16 running maxima; max is exact in any order) */
static float row_max(const float *s, int64_t n, float start) {
    float acc[16];
    for (int u = 0; u < 16; u++) acc[u] = start;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int u = 0; u < 16; u++) acc[u] = s[j + u] > acc[u] ? s[j + u] : acc[u];
    for (; j < n; j++) acc[j & 15] = s[j] > acc[j & 15] ? s[j] : acc[j & 15];
    float m = start;
    for (int u = 0; u < 16; u++) m = acc[u] > m ? acc[u] : m;
    return m;
}

/* out[j] = scale * a . b_j for j < n rounded up to 16, with bt = b transposed, [HD][tp] */
static void row_dot(const float *a, const float *bt, float *out, int64_t n, int64_t tp, float scale) {
    for (int64_t c = 0; c < n; c += 16) {
#if defined(__AVX512F__)
        __m512 even = _mm512_setzero_ps(), odd = even; /* two chains of half the latency */
        for (int d = 0; d < ATTN_HEAD_DIM; d += 2) {
            even = _mm512_fmadd_ps(_mm512_set1_ps(a[d]), _mm512_loadu_ps(bt + d * tp + c), even);
            odd = _mm512_fmadd_ps(_mm512_set1_ps(a[d + 1]), _mm512_loadu_ps(bt + (d + 1) * tp + c), odd);
        }
        _mm512_storeu_ps(out + c, _mm512_mul_ps(_mm512_add_ps(even, odd), _mm512_set1_ps(scale)));
#else
        float acc[16] = {0};
        for (int d = 0; d < ATTN_HEAD_DIM; d++)
            for (int u = 0; u < 16; u++) acc[u] += a[d] * bt[d * tp + c + u];
        for (int u = 0; u < 16; u++) out[c + u] = acc[u] * scale;
#endif
    }
}

/* acc[0..HD) = sum_j w[j] * rows[j][0..HD) for j < n (rows: [n][HD]) */
static void weighted_rows(const float *w, const float *rows, int64_t n, float *acc) {
#if defined(__AVX512F__)
    /* four independent sums (a chain of dependent FMAs would wait on each one's latency) */
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *r = rows + j * ATTN_HEAD_DIM;
        s0 = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), _mm512_loadu_ps(r), s0);
        s1 = _mm512_fmadd_ps(_mm512_set1_ps(w[j + 1]), _mm512_loadu_ps(r + ATTN_HEAD_DIM), s1);
        s2 = _mm512_fmadd_ps(_mm512_set1_ps(w[j + 2]), _mm512_loadu_ps(r + 2 * ATTN_HEAD_DIM), s2);
        s3 = _mm512_fmadd_ps(_mm512_set1_ps(w[j + 3]), _mm512_loadu_ps(r + 3 * ATTN_HEAD_DIM), s3);
    }
    for (; j < n; j++)
        s0 = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), _mm512_loadu_ps(rows + j * ATTN_HEAD_DIM), s0);
    _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#else
    for (int d = 0; d < ATTN_HEAD_DIM; d++) acc[d] = 0.0f;
    for (int64_t j = 0; j < n; j++)
        for (int d = 0; d < ATTN_HEAD_DIM; d++) acc[d] += w[j] * rows[j * ATTN_HEAD_DIM + d];
#endif
}

/* rows[j][0..HD) += w[j] * x[0..HD) for j < n */
static void add_outer(float *rows, const float *w, const float *x, int64_t n) {
#if defined(__AVX512F__)
    __m512 xv = _mm512_loadu_ps(x);
    for (int64_t j = 0; j < n; j++) {
        float *r = rows + j * ATTN_HEAD_DIM;
        _mm512_storeu_ps(r, _mm512_fmadd_ps(_mm512_set1_ps(w[j]), xv, _mm512_loadu_ps(r)));
    }
#else
    for (int64_t j = 0; j < n; j++)
        for (int d = 0; d < ATTN_HEAD_DIM; d++) rows[j * ATTN_HEAD_DIM + d] += w[j] * x[d];
#endif
}

/* one head's rows of x into xh [T][HD] and, if xt, its transpose [HD][tp] (zero-padded) */
static void load_head(const float *x, float *xh, float *xt, int64_t b, int64_t h, int64_t T,
                      int64_t H, int64_t tp) {
    for (int64_t j = 0; j < T; j++)
        memcpy(xh + j * ATTN_HEAD_DIM, x + ((b * T + j) * H + h) * ATTN_HEAD_DIM,
               ATTN_HEAD_DIM * sizeof(float));
    if (xt == NULL) return;
    memset(xt, 0, (size_t)(ATTN_HEAD_DIM * tp) * sizeof(float));
    for (int64_t j = 0; j < T; j++)
        for (int d = 0; d < ATTN_HEAD_DIM; d++) xt[d * tp + j] = xh[j * ATTN_HEAD_DIM + d];
}

/* returns 0, or -1 if scratch memory could not be allocated */
int attention_forward(const float *q, const float *k, const float *v, const float *sinks,
                      float *z, float *lse, int64_t B, int64_t T, int64_t H, float scale,
                      int threads) {
    const int64_t tp = (T + 15) / 16 * 16, hd = ATTN_HEAD_DIM;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed) if (threads > 1)
    {
        float *scratch = malloc((size_t)(3 * T * hd + hd * tp + tp) * sizeof(float));
        float *qh = scratch, *vh = qh + T * hd, *kh = vh + T * hd, *kt = kh + T * hd, *s = kt + hd * tp;
        failed = scratch == NULL;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (scratch == NULL) continue;
            int64_t b = bh / H, h = bh % H;
            float sink = sinks ? sinks[h] : -__builtin_inff();
            load_head(q, qh, NULL, b, h, T, H, tp);
            load_head(k, kh, kt, b, h, T, H, tp);
            load_head(v, vh, NULL, b, h, T, H, tp);
            for (int64_t i = 0; i < T; i++) {
                int64_t n = i + 1, n16 = (n + 15) / 16 * 16;
                row_dot(qh + i * hd, kt, s, n, tp, scale);
                float m = row_max(s, n, sink);
                /* whole 16-wide chunks (no scalar tail): entries past n are computed, unused */
                for (int64_t j = 0; j < n16; j++) s[j] = exp_nonpositive(s[j] - m);
                float l = ordered_sum(s, n) + (sinks ? exp_nonpositive(sink - m) : 0.0f);
                float acc[ATTN_HEAD_DIM];
                weighted_rows(s, vh, n, acc);
                float *zi = z + ((b * T + i) * H + h) * hd;
                for (int d = 0; d < ATTN_HEAD_DIM; d++) zi[d] = acc[d] / l;
                lse[bh * T + i] = m + logf(l);
            }
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}

/* The backward of attention_forward: dq, dk, dv, and each (batch, head)'s share of the sink
 * gradient in dsink [batch * head] (summed over the batch by the caller). */
int attention_backward(const float *q, const float *k, const float *v, const float *sinks,
                       const float *z, const float *lse, const float *dz, float *dq, float *dk,
                       float *dv, float *dsink, int64_t B, int64_t T, int64_t H, float scale,
                       int threads) {
    const int64_t tp = (T + 15) / 16 * 16, hd = ATTN_HEAD_DIM;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|| : failed) if (threads > 1)
    {
        float *scratch = malloc((size_t)(5 * T * hd + 2 * hd * tp + 3 * tp) * sizeof(float));
        float *qh = scratch, *kh = qh + T * hd, *dkh = kh + T * hd, *dvh = dkh + T * hd;
        float *vh = dvh + T * hd, *kt = vh + T * hd, *vt = kt + hd * tp;
        float *p = vt + hd * tp, *dp = p + tp, *ds = dp + tp;
        failed = scratch == NULL;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (scratch == NULL) continue;
            int64_t b = bh / H, h = bh % H;
            load_head(q, qh, NULL, b, h, T, H, tp);
            load_head(k, kh, kt, b, h, T, H, tp);
            load_head(v, vh, vt, b, h, T, H, tp);
            memset(dkh, 0, (size_t)(2 * T * hd) * sizeof(float)); /* dkh and dvh */
            float d_sink = 0.0f;
            for (int64_t i = 0; i < T; i++) {
                int64_t n = i + 1, n16 = (n + 15) / 16 * 16, row = ((b * T + i) * H + h) * hd;
                const float *qi = qh + i * hd, *zi = z + row, *dzi = dz + row;
                float lse_i = lse[bh * T + i];
                float dot = 0.0f;
                for (int d = 0; d < ATTN_HEAD_DIM; d++) dot += dzi[d] * zi[d];
                row_dot(qi, kt, p, n, tp, scale);
                /* whole 16-wide chunks (no scalar tail): entries past n are computed, unused */
                for (int64_t j = 0; j < n16; j++) p[j] = exp_nonpositive(p[j] - lse_i);
                row_dot(dzi, vt, dp, n, tp, 1.0f);
                for (int64_t j = 0; j < n16; j++) ds[j] = p[j] * (dp[j] - dot) * scale;
                weighted_rows(ds, kh, n, dq + row);
                add_outer(dkh, ds, qi, n);
                add_outer(dvh, p, dzi, n);
                if (sinks) d_sink -= exp_nonpositive(sinks[h] - lse_i) * dot;
            }
            for (int64_t j = 0; j < T; j++) {
                memcpy(dk + ((b * T + j) * H + h) * hd, dkh + j * hd, hd * sizeof(float));
                memcpy(dv + ((b * T + j) * H + h) * hd, dvh + j * hd, hd * sizeof(float));
            }
            dsink[bh] = d_sink;
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------ RMS norm
 * y = (x / s) * w per row of x [rows, dim], s = sqrt(mean(x^2) + eps) (TransformerLens's
 * RMSNorm); s is kept per row for the backward. Rows are independent; the weight gradient is
 * summed over fixed blocks of rows and then over the blocks in order, so no result depends on
 * the thread count. */
#define NORM_BLOCK_ROWS 64

static float sum_of_squares(const float *x, int64_t n) {
    float acc[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int u = 0; u < 16; u++) acc[u] += x[j + u] * x[j + u];
    for (; j < n; j++) acc[j & 15] += x[j] * x[j];
    float total = 0.0f;
    for (int u = 0; u < 16; u++) total += acc[u];
    return total;
}

void rms_norm_forward(const float *x, const float *w, float *y, float *scale, int64_t rows,
                      int64_t dim, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        float s = sqrtf(sum_of_squares(xr, dim) / (float)dim + eps);
        for (int64_t j = 0; j < dim; j++) yr[j] = xr[j] / s * w[j];
        scale[r] = s;
    }
}

/* dx = (g - xh * mean(g * xh)) / s with g = dy * w, xh = x / s; dw = sum over rows of dy * xh.
 * partial: [ceil(rows / NORM_BLOCK_ROWS), dim] scratch. */
void rms_norm_backward(const float *x, const float *w, const float *scale, const float *dy,
                       float *dx, float *dw, float *partial, int64_t rows, int64_t dim, int threads) {
    int64_t blocks = (rows + NORM_BLOCK_ROWS - 1) / NORM_BLOCK_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows * dim >= PARALLEL_MIN)
    for (int64_t blk = 0; blk < blocks; blk++) {
        float *pw = partial + blk * dim;
        for (int64_t j = 0; j < dim; j++) pw[j] = 0.0f;
        int64_t end = (blk + 1) * NORM_BLOCK_ROWS < rows ? (blk + 1) * NORM_BLOCK_ROWS : rows;
        for (int64_t r = blk * NORM_BLOCK_ROWS; r < end; r++) {
            const float *xr = x + r * dim, *gr = dy + r * dim;
            float *dxr = dx + r * dim;
            float inv = 1.0f / scale[r];
            float acc[16] = {0};
            int64_t j = 0;
            for (; j + 16 <= dim; j += 16)
                for (int u = 0; u < 16; u++) acc[u] += gr[j + u] * w[j + u] * (xr[j + u] * inv);
            for (; j < dim; j++) acc[j & 15] += gr[j] * w[j] * (xr[j] * inv);
            float dot = 0.0f;
            for (int u = 0; u < 16; u++) dot += acc[u];
            float mean = dot / (float)dim;
            for (j = 0; j < dim; j++) {
                float xh = xr[j] * inv;
                dxr[j] = (gr[j] * w[j] - xh * mean) * inv;
                pw[j] += gr[j] * xh;
            }
        }
    }
    for (int64_t j = 0; j < dim; j++) dw[j] = 0.0f;
    for (int64_t blk = 0; blk < blocks; blk++)
        for (int64_t j = 0; j < dim; j++) dw[j] += partial[blk * dim + j];
}
