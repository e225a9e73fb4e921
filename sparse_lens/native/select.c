/* Exact top-k selection by magnitude for float32, in one pass over memory where possible.
 *
 * Built and loaded by sparse_lens/native/__init__.py (ctypes); every function has a pure
 * PyTorch/NumPy twin in Python that the tests compare it with.
 *
 * Keys. For a float32 x, key(x) = bits(x) & 0x7fffffff orders |x| as unsigned integers do
 * (a NaN is above +inf, as torch.topk puts it). The k-th largest key T of a set is found by
 * bisection on the integer key: count(key >= mid) is a branch-free loop the compiler
 * vectorises; once few candidates remain between the bounds they are sorted directly.
 * Ties: every entry with key > T is kept, then the entries with key == T in position order
 * (lowest first) until exactly k are kept.
 */
#include <stdint.h>
#include <stdlib.h>
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
