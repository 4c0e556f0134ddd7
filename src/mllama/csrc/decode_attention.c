/* Attention of one new token per sequence (a decode step) over its cached keys, bf16 q, k, v on the
 * CPU with AVX-512:
 *   out[b, h] = sum_t softmax_t(scale * q[b, h] . k[b, h / G, t]) v[b, h / G, t]   over the keys t
 * that mask[b] lets row b see (all of them without a mask), float32 sums, out rounded to bf16 once.
 *
 * torch's CPU attention streams a decode step's keys and values at 7-9 GB/s (benchmarks/RESULTS.md),
 * which an image's 1601-6404 cross-attention keys in every cross-attention layer, and long chats in
 * every layer, turn into a large part of a step. Here the work is split as flash decoding does: a work
 * item is one row, one K/V head and a chunk of CHUNK keys; it reads each key and value once for the G
 * query heads that share them and leaves each head's running max, sum of exponentials and weighted
 * sum of values; a second pass merges a head's chunks. Chunks lie at fixed key positions, so a row's
 * result does not depend on the keys other rows of its batch reach (masked keys count exactly zero).
 * Built at first use by mllama/decode_attention.py; the OpenMP runtime is the one torch loaded. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "exp2.h"

#define CHUNK 256     /* keys a work item */
#define MAX_D 256     /* head_dim up to this */
#define LOG2E 1.44269504088896341f

typedef struct {
    const uint16_t *q, *k, *v;
    const uint8_t *mask;     /* (B, T) with keys contiguous, or NULL */
    int64_t q_b, q_h;        /* q (B, H, D) strides, in elements */
    int64_t k_b, k_h, k_t;   /* k (B, H_kv, T, D) strides */
    int64_t v_b, v_h, v_t;
    int64_t mask_b;
    int64_t h, hkv, t, d;
    float scale2;            /* scale log2(e): the scores in base 2 */
    int bf16;                /* AVX-512 BF16 here */
} dattn;

/* The lane sums of 16 vectors: lane i of the result is the sum of v[i]'s 16 lanes (a transposing tree:
 * pairs within 128-bit lanes, then quads, then the four 128-bit lanes). */
__attribute__((target("avx512f")))
static inline __m512 sum16(const __m512 *v) {
    __m512 p[8], q[4], r[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: v[2i]'s lanes 0+2, v[2i+1]'s 0+2, v[2i]'s 1+3, v[2i+1]'s 1+3 */
        p[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: the 4 vectors' sums over it */
        const __m512d a = _mm512_castps_pd(p[2 * i]), b = _mm512_castps_pd(p[2 * i + 1]);
        q[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)  /* 128-bit lanes 0+1 and 2+3 of q[2i], then of q[2i+1] */
        r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(q[2 * i], q[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(q[2 * i], q[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], 0x88), _mm512_shuffle_f32x4(r[0], r[1], 0xDD));
}

/* dots: lane i G + g the dot product of key t + i with query head g; -> s[g][i0 + i] in base 2, -inf
 * where the mask hides the key. */
__attribute__((target("avx512f")))
static inline void keep_scores(const dattn *a, int64_t b, int64_t t, int64_t kn, int groups, __m512 sums,
                               float (*s)[CHUNK], int64_t i0) {
    float dots[16] __attribute__((aligned(64)));
    _mm512_store_ps(dots, _mm512_mul_ps(sums, _mm512_set1_ps(a->scale2)));
    const uint8_t *mask = a->mask ? a->mask + b * a->mask_b + t : NULL;
    for (int64_t i = 0; i < kn; i++)
        for (int g = 0; g < groups; g++) s[g][i0 + i] = mask && !mask[i] ? -INFINITY : dots[i * groups + g];
}

/* Values 32 j .. 32 j + 31 of a head's D (zeros past D): as stored (bf16), or as their even and odd
 * dims in float32 (a shift and a mask of the same load, no widening); and one step of the dot products
 * of k and q in that form. */
typedef struct {
    __m512 even, odd;
} f32pair;
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m512i load_bf16(const uint16_t *row, int64_t j, int64_t d) {
    return _mm512_maskz_loadu_epi16(d - 32 * j >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (d - 32 * j)) - 1),
                                    row + 32 * j);
}
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline f32pair load_f32(const uint16_t *row, int64_t j, int64_t d) {
    const __m512i x = load_bf16(row, j, d);
    const f32pair p = {_mm512_castsi512_ps(_mm512_slli_epi32(x, 16)),
                       _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xFFFF0000u)))};
    return p;
}
__attribute__((target("avx512f")))
static inline __m512 dot_f32(__m512 acc, f32pair k, f32pair q) {
    return _mm512_fmadd_ps(q.odd, k.odd, _mm512_fmadd_ps(q.even, k.even, acc));
}
__attribute__((target("avx512f,avx512bf16")))
static inline __m512 dot_bf16(__m512 acc, __m512i k, __m512i q) {
    return _mm512_dpbf16_ps(acc, (__m512bh)k, (__m512bh)q);
}

/* The scores of keys t0 .. t0 + n - 1 of row b, K/V head kh, for its G query heads, in base 2 (scale
 * log2 e): s[g][i], -inf where the mask hides the key. KB = 16 / G keys at a time, their G x KB dot
 * products' lanes summed in one tree (sum16). Past n the last key is read again and its scores dropped.
 * With AVX-512 BF16, vdpbf16ps takes q and k as they are (its products exact in float32, summed in
 * pairs); without, FMAs over their even and odd dims. */
#define DEFINE_SCORES(KIND, VEC, PER, TARGET, G)                                                      \
    __attribute__((target(TARGET)))                                                                   \
    static void scores_##KIND##_g##G(const dattn *a, int64_t b, int64_t kh, int64_t t0, int64_t n, float (*s)[CHUNK]) { \
        enum { KB = 16 / G };                                                                         \
        const int64_t dv = (a->d + PER - 1) / PER;                                                    \
        VEC qv[G][MAX_D / PER];                                                                       \
        for (int g = 0; g < G; g++)                                                                   \
            for (int64_t j = 0; j < dv; j++)                                                          \
                qv[g][j] = load_##KIND(a->q + b * a->q_b + (kh * G + g) * a->q_h, j, a->d);           \
        const uint16_t *kb = a->k + b * a->k_b + kh * a->k_h;                                         \
        for (int64_t i0 = 0; i0 < n; i0 += KB) {                                                      \
            __m512 acc[KB * G];                                                                       \
            _Pragma("GCC unroll 16") for (int e = 0; e < KB * G; e++) acc[e] = _mm512_setzero_ps();   \
            const int64_t kn = n - i0 < KB ? n - i0 : KB;                                             \
            for (int64_t j = 0; j < dv; j++)                                                          \
                _Pragma("GCC unroll 16") for (int i = 0; i < KB; i++) {                               \
                    const VEC kj = load_##KIND(kb + (t0 + i0 + (i < kn ? i : kn - 1)) * a->k_t, j, a->d); \
                    _Pragma("GCC unroll 16") for (int g = 0; g < G; g++)                              \
                        acc[i * G + g] = dot_##KIND(acc[i * G + g], kj, qv[g][j]);                    \
                }                                                                                     \
            keep_scores(a, b, t0 + i0, kn, G, sum16(acc), s, i0);                                     \
        }                                                                                             \
    }
#define SCORES_FOR(G) DEFINE_SCORES(f32, f32pair, 32, "avx512f,avx512bw,avx512vl", G) \
    DEFINE_SCORES(bf16, __m512i, 32, "avx512f,avx512bw,avx512vl,avx512bf16", G)
SCORES_FOR(1) SCORES_FOR(2) SCORES_FOR(4) SCORES_FOR(8) SCORES_FOR(16)

/* One (row b, K/V head kh, chunk c) item for G query heads -> part: per head its max m (base 2, -inf
 * where the chunk has no visible key), sum l of 2^(s - m) and the d sums of 2^(s - m) v, as 2 + d floats.
 * G is a constant of each instance, so the G x 4 sums of the value pass stay in registers. */
#define DEFINE_CHUNK(G)                                                                               \
    __attribute__((target("avx512f,avx512bw,avx512vl")))                                             \
    static void chunk_g##G(const dattn *a, int64_t b, int64_t kh, int64_t c, float *part) {           \
        const int64_t width = 2 + 32 * ((a->d + 31) / 32);  /* a head's part */                      \
        const int64_t t0 = c * CHUNK, n = a->t - t0 < CHUNK ? a->t - t0 : CHUNK;                      \
        float s[G][CHUNK] __attribute__((aligned(64)));                                               \
        if (a->mask && !memchr(a->mask + b * a->mask_b + t0, 1, (size_t)n)) {                       \
            /* nothing visible (a compiled step reads the whole cache): no key or value read */      \
            for (int g = 0; g < G; g++) part[g * width] = -INFINITY;                                  \
            return;                                                                                   \
        }                                                                                             \
        (a->bf16 ? scores_bf16_g##G : scores_f32_g##G)(a, b, kh, t0, n, s);                          \
        const uint16_t *vb = a->v + b * a->v_b + kh * a->v_h;                                         \
        const uint8_t *mask = a->mask ? a->mask + b * a->mask_b + t0 : NULL;                          \
        for (int g = 0; g < G; g++) {                                                                 \
            float *pg = part + g * width;                                                        \
            __m512 mv = _mm512_set1_ps(-INFINITY);                                                    \
            int64_t i = 0;                                                                            \
            for (; i + 16 <= n; i += 16) mv = _mm512_max_ps(mv, _mm512_load_ps(s[g] + i));            \
            float m = _mm512_reduce_max_ps(mv);                                                       \
            for (; i < n; i++) m = s[g][i] > m ? s[g][i] : m;                                         \
            pg[0] = m;                                                                                \
            if (m == -INFINITY) continue;  /* nothing visible: the merge skips this chunk */           \
            const __m512 mm = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);                    \
            __m512 lv = _mm512_setzero_ps();                                                          \
            for (i = 0; i < n; i += 16) {                                                             \
                const __mmask16 in = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1); \
                const __m512 sv = _mm512_maskz_load_ps(in, s[g] + i);                                 \
                /* masked keys exactly 0 (exp2_neg stops at 2^-126) */                                \
                const __m512 p = _mm512_maskz_mov_ps(in & _mm512_cmp_ps_mask(sv, ninf, _CMP_NEQ_OQ),  \
                                                     exp2_neg(_mm512_sub_ps(sv, mm)));                \
                _mm512_store_ps(s[g] + i, p);                                                         \
                lv = _mm512_add_ps(lv, p);                                                            \
            }                                                                                         \
            pg[1] = _mm512_reduce_add_ps(lv);                                                         \
        }                                                                                             \
        /* 64 dims of the values at a time, as even and odd dims (load_f32), put back in order when  \
         * stored: the same sums as dim by dim */                                                     \
        const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23); \
        const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31); \
        const int64_t dw = (a->d + 31) / 32;                                                          \
        for (int64_t j0 = 0; j0 < dw; j0 += 2) {                                                      \
            const int64_t w = dw - j0 < 2 ? dw - j0 : 2;                                              \
            __m512 ev[G][2], od[G][2];                                                                \
            _Pragma("GCC unroll 16") for (int g = 0; g < G; g++)                                      \
                _Pragma("GCC unroll 2") for (int j = 0; j < 2; j++) ev[g][j] = od[g][j] = _mm512_setzero_ps(); \
            for (int64_t i = 0; i < n; i++) {                                                         \
                if (mask && !mask[i]) continue;                                                       \
                const uint16_t *vr = vb + (t0 + i) * a->v_t;                                          \
                f32pair x[2];                                                                         \
                _Pragma("GCC unroll 2") for (int j = 0; j < 2; j++)                                   \
                    x[j] = j < w ? load_f32(vr, j0 + j, a->d) : (f32pair){_mm512_setzero_ps(), _mm512_setzero_ps()}; \
                _Pragma("GCC unroll 16") for (int g = 0; g < G; g++) {                                \
                    const __m512 p = _mm512_set1_ps(s[g][i]);                                         \
                    _Pragma("GCC unroll 2") for (int j = 0; j < 2; j++) {                             \
                        ev[g][j] = _mm512_fmadd_ps(p, x[j].even, ev[g][j]);                           \
                        od[g][j] = _mm512_fmadd_ps(p, x[j].odd, od[g][j]);                            \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
            for (int g = 0; g < G; g++)                                                               \
                for (int64_t j = 0; j < w; j++) {                                                     \
                    float *o = part + g * width + 2 + 32 * (j0 + j);                                  \
                    _mm512_storeu_ps(o, _mm512_permutex2var_ps(ev[g][j], first, od[g][j]));           \
                    _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(ev[g][j], second, od[g][j]));     \
                }                                                                                     \
        }                                                                                             \
    }
DEFINE_CHUNK(1) DEFINE_CHUNK(2) DEFINE_CHUNK(4) DEFINE_CHUNK(8) DEFINE_CHUNK(16)

typedef void (*chunk_fn)(const dattn *, int64_t, int64_t, int64_t, float *);

/* q (B, H, D), k and v (B, H_kv, T, D), each with the given batch, head and key strides (elements; the
 * last dimension contiguous), mask (B, T) bytes (nonzero: visible; NULL: all) -> out (B, H, D) bf16,
 * contiguous. H a multiple of H_kv with H / H_kv in 1, 2, 4, 8, 16; D up to MAX_D. A row
 * that sees no key gets zeros. plain: the float32 FMA products even where the CPU has AVX-512 BF16
 * (tests). Returns 0, or -1 for arguments the kernel does not take (or no memory). */
__attribute__((target("avx512f,avx512bw,avx512vl")))
int mllama_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
                            const int64_t *strides, int64_t batch, int64_t h, int64_t hkv, int64_t t, int64_t d,
                            float scale, uint16_t *out, int plain, int threads) {
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl"))
        return -1;
    if (batch < 1 || hkv < 1 || h < hkv || h % hkv || t < 1 || d < 1 || d > MAX_D) return -1;
    const int64_t groups = h / hkv;
    const chunk_fn fn = groups == 1 ? chunk_g1 : groups == 2 ? chunk_g2 : groups == 4 ? chunk_g4
                        : groups == 8 ? chunk_g8 : groups == 16 ? chunk_g16 : NULL;
    if (!fn) return -1;
    const dattn a = {q, k, v, mask, strides[0], strides[1], strides[2], strides[3], strides[4], strides[5],
                     strides[6], strides[7], strides[8], h, hkv, t, d, scale * LOG2E,
                     !plain && __builtin_cpu_supports("avx512bf16")};
    const int64_t chunks = (t + CHUNK - 1) / CHUNK, items = batch * hkv * chunks, width = 2 + 32 * ((d + 31) / 32);
    float *parts = malloc((size_t)(items * groups * width) * sizeof *parts);
    if (!parts) return -1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            const int64_t c = it % chunks, kh = it / chunks % hkv, b = it / chunks / hkv;
            fn(&a, b, kh, c, parts + it * groups * width);
        }
        /* merge: each head's chunks scaled to the largest max among them, in chunk order */
#pragma omp for schedule(static)
        for (int64_t row = 0; row < batch * h; row++) {
            const int64_t b = row / h, head = row % h, kh = head / groups, g = head % groups;
            const float *first = parts + (b * hkv + kh) * chunks * groups * width + g * width;
            float m = -INFINITY;
            for (int64_t c = 0; c < chunks; c++) m = first[c * groups * width] > m ? first[c * groups * width] : m;
            float sums[MAX_D] = {0}, l = 0.0f;
            if (m != -INFINITY)
                for (int64_t c = 0; c < chunks; c++) {
                    const float *pc = first + c * groups * width;
                    if (pc[0] == -INFINITY) continue;
                    const float f = exp2f(pc[0] - m);
                    l += f * pc[1];
                    for (int64_t i = 0; i < d; i++) sums[i] += f * pc[2 + i];
                }
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            uint16_t *o = out + row * d;
            for (int64_t i = 0; i < d; i++) o[i] = round_bf16(sums[i] * inv);
        }
    }
    free(parts);
    return 0;
}
