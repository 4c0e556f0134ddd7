/* gemm_small.c's int4 tiles: the integer products (AVX2, AVX-VNNI and AVX512-VNNI), and x rounded
 * per group for them (quantize_x). Included by gemm_small.c only. */
#ifndef MLLAMA_SMALL_INT4_H
#define MLLAMA_SMALL_INT4_H

#include "small_tiles.h"

/* int4 in integers. x is first rounded per group of each row: to int8 where the group is a multiple
 * of 64 (xq = x / sx, sx = max |x| / 127, as llama.cpp's Q4_0 x Q8_0 products: 64 weights in 9
 * instructions with vpmaddubsw, see INT4_RUN_X8), else to int16 (sx = max |x| / 32767, an error
 * below 2^-16 of the group's largest |x|; each run of 32 weights unpacks to 2 x 16 int16 in the
 * natural order and multiplies with vpmaddwd: about 10 instructions per 32 weights against 25 for
 * dequantizing to float32). Per group, the int32
 * sums (at most 2 * 15 * 32767 per run and lane, 8 runs for a group of 256: no overflow) are centred
 * (q - 8, so that x's rounding meets at most half the weight range: sum (q - 8) xq = sum q xq -
 * 8 sum xq, exact) and become float:
 * sum_i (q_i s + z) x_i = s sx sum_i (q_i - 8) xq_i + (z + 8 s) sum_i x_i, the last sum in float. */

/* The lane sums of up to 8 vectors v[0..n), as one vector (lane i: the sum of v[i]; 0 past n). */
__attribute__((target("avx2,fma")))
static inline __m256i lane_sums8(const __m256i *v, int n) {
    __m256i t[8];
    for (int i = 0; i < 8; i++) t[i] = i < n ? v[i] : _mm256_setzero_si256();
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(t[0], t[1]), _mm256_hadd_epi32(t[2], t[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(t[4], t[5]), _mm256_hadd_epi32(t[6], t[7]));
    /* a: the low-half sums of v0..v3, then their high-half sums; b: the same for v4..v7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

/* Up to 8 consecutive scales or offsets (0 past n) as float32. */
__attribute__((target("avx2,fma")))
static inline __m256 params8(const void *base, int64_t i, int n, int is_bf16) {
    if (n == 8) {
        if (is_bf16)
            return _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i))), 16));
        return _mm256_loadu_ps((const float *)base + i);
    }
    float v[8] = {0};
    for (int t = 0; t < n; t++) v[t] = param(base, i + t, is_bf16);
    return _mm256_loadu_ps(v);
}

/* Up to 8 consecutive int32 (0 past n). */
__attribute__((target("avx2,fma")))
static inline __m256i ints8(const int32_t *base, int64_t i, int n) {
    if (n == 8) return _mm256_loadu_si256((const __m256i *)(base + i));
    int32_t v[8] = {0};
    for (int t = 0; t < n; t++) v[t] = base[i + t];
    return _mm256_loadu_si256((const __m256i *)v);
}

/* 32 weights against int16 x: the nibbles widened to 2 x 16 int16 in the natural order. */
#define INT4_RUN_X16(R, M)                                                                                \
            for (int64_t i = g0; i < g0 + d->group; i += 32) {                                      \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                               \
                    const __m128i packed = _mm_loadu_si128((const __m128i *)(w + r * (d->k / 2) + i / 2)); \
                    if (PREFETCH) __builtin_prefetch(w + r * (d->k / 2) + i / 2 + PREFETCH);        \
                    __builtin_prefetch(w + r * (d->k / 2) + i / 2 + d->ahead);                      \
                    const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(packed, _mm_set1_epi8(0x0F))); \
                    const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F))); \
                    _Pragma("GCC unroll 4") for (int j = 0; j < M; j++) {                           \
                        const int16_t *xj = x->xq + j * d->k + i;                                   \
                        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xj))); \
                        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xj + 16)))); \
                    }                                                                               \
                }                                                                                   \
            }

/* 64 weights (two runs, 32 bytes) against int8 x in the X8 order: the low nibbles of both runs are
 * one vector of 32 unsigned bytes, the high nibbles another, each multiplied with its 32 int8 x and
 * summed four products to an int32 lane by ACCUMULATE (below). */
#define INT4_RUN_X8(R, M, ACCUMULATE)                                                                     \
            for (int64_t i = g0; i < g0 + d->group; i += 64) {                                      \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                               \
                    const __m256i packed = _mm256_loadu_si256((const __m256i *)(w + r * (d->k / 2) + i / 2)); \
                    if (PREFETCH) __builtin_prefetch(w + r * (d->k / 2) + i / 2 + PREFETCH);        \
                    __builtin_prefetch(w + r * (d->k / 2) + i / 2 + d->ahead);                      \
                    const __m256i lo = _mm256_and_si256(packed, _mm256_set1_epi8(0x0F));            \
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), _mm256_set1_epi8(0x0F)); \
                    _Pragma("GCC unroll 4") for (int j = 0; j < M; j++) {                           \
                        const int8_t *xj = x->xq8 + j * d->k + i;                                   \
                        acc[r][j] = ACCUMULATE(acc[r][j], lo, hi, _mm256_loadu_si256((const __m256i *)xj), \
                                               _mm256_loadu_si256((const __m256i *)(xj + 32)));      \
                    }                                                                               \
                }                                                                                   \
            }
/* AVX2: vpmaddubsw multiplies 32 pairs at once (|15 * 127 * 2| per int16 lane, two of them added: no
 * saturation), vpmaddwd by ones sums to int32. VNNI: vpdpbusd does both and the add in one
 * instruction, with the same integers; EVEX (AVX512-VNNI + VL) or VEX (AVX-VNNI) form. */
#define X8_AVX2(acc, lo, hi, x0, x1)                                                                \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, x0),          \
                                                             _mm256_maddubs_epi16(hi, x1)), _mm256_set1_epi16(1)))
#define X8_AVX512VNNI(acc, lo, hi, x0, x1) _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(acc, lo, x0), hi, x1)
#define X8_AVXVNNI(acc, lo, hi, x0, x1) _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, lo, x0), hi, x1)
#define INT4_RUN_X8_AVX2(R, M) INT4_RUN_X8(R, M, X8_AVX2)
#define INT4_RUN_X8_AVX512VNNI(R, M) INT4_RUN_X8(R, M, X8_AVX512VNNI)
#define INT4_RUN_X8_AVXVNNI(R, M) INT4_RUN_X8(R, M, X8_AVXVNNI)

/* R weight rows x M rows of x over the groups of columns [k0, k1), the products by RUN: each group's
 * int32 sums are kept (part), then turned to float 8 groups at a time, where the group scales and
 * offsets are contiguous: tot += (s * sx) * sums + z * xsum, lane by lane. */
#define DEFINE_INT4_TILE_FOR(TARGET, NAME, R, M, RUN)                                               \
    __attribute__((target(TARGET)))                                                                 \
    static void NAME(const wdesc *d, const xdesc *x, int64_t row, int64_t k0, int64_t k1, __m256 *tot) { \
        const uint8_t *w = (const uint8_t *)d->w + row * (d->k / 2);                                \
        const int groups = (int)((k1 - k0) / d->group);                                             \
        const int64_t gfirst = k0 / d->group;                                                       \
        for (int c = 0; c < groups; c += 8) {                                                       \
            const int n = groups - c < 8 ? groups - c : 8;                                          \
            __m256i part[R][M][8];                                                                  \
            for (int gi = 0; gi < n; gi++) {                                                        \
                __m256i acc[R][M];                                                                  \
                for (int r = 0; r < R; r++)                                                         \
                    for (int j = 0; j < M; j++) acc[r][j] = _mm256_setzero_si256();                 \
                const int64_t g0 = k0 + (c + gi) * d->group;                                        \
                RUN(R, M)                                                                           \
                for (int r = 0; r < R; r++)                                                         \
                    for (int j = 0; j < M; j++) part[r][j][gi] = acc[r][j];                         \
            }                                                                                       \
            for (int r = 0; r < R; r++) {                                                           \
                const int64_t p = (row + r) * x->groups + gfirst + c;                               \
                const __m256 s = params8(d->scale, p, n, d->scale_bf16);                            \
                const __m256 z = _mm256_fmadd_ps(_mm256_set1_ps(8.0f), s, params8(d->offset, p, n, d->scale_bf16)); \
                for (int j = 0; j < M; j++) {                                                       \
                    const int64_t q = j * x->groups + gfirst + c;                                   \
                    /* sum (q - 8) xq = sum q xq - 8 sum xq, exact in int32 */                   \
                    const __m256 sums = _mm256_cvtepi32_ps(_mm256_sub_epi32(                        \
                        lane_sums8(part[r][j], n), _mm256_slli_epi32(ints8(x->xqsum, q, n), 3)));   \
                    __m256 t = _mm256_fmadd_ps(sums, _mm256_mul_ps(s, params8(x->sx, q, n, 0)), tot[r * MMAX + j]); \
                    tot[r * MMAX + j] = _mm256_fmadd_ps(z, params8(x->xsum, q, n, 0), t);        \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }
#define DEFINE_INT4_TILES(TARGET, PREFIX, RUN)                                                      \
    DEFINE_INT4_TILE_FOR(TARGET, PREFIX##_8x1, 8, 1, RUN) DEFINE_INT4_TILE_FOR(TARGET, PREFIX##_1x1, 1, 1, RUN) \
    DEFINE_INT4_TILE_FOR(TARGET, PREFIX##_4x2, 4, 2, RUN) DEFINE_INT4_TILE_FOR(TARGET, PREFIX##_1x2, 1, 2, RUN) \
    DEFINE_INT4_TILE_FOR(TARGET, PREFIX##_3x4, 3, 4, RUN) DEFINE_INT4_TILE_FOR(TARGET, PREFIX##_1x4, 1, 4, RUN)
DEFINE_INT4_TILES("avx2,fma", int4, INT4_RUN_X16)
DEFINE_INT4_TILES("avx2,fma", int4x8, INT4_RUN_X8_AVX2)
DEFINE_INT4_TILES("avx2,fma,avx512f,avx512vl,avx512vnni", int4x8evex, INT4_RUN_X8_AVX512VNNI)
DEFINE_INT4_TILES("avx2,fma,avxvnni", int4x8vex, INT4_RUN_X8_AVXVNNI)

/* Up to 16 consecutive scales or offsets (0 past n) as float32. */
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
static inline __m512 params16(const void *base, int64_t i, int n, int is_bf16) {
    const __mmask16 take = (__mmask16)((1u << n) - 1);
    if (is_bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(take, (const uint16_t *)base + i)), 16));
    return _mm512_maskz_loadu_ps(take, (const float *)base + i);
}

/* int4 against rows of x with 512-bit VNNI (level 2, groups of a multiple of 128, or of 64 in rows
 * of a multiple of 128): 128 weights per two vpdpbusd, x in the X16 order (see quantize_x), where
 * lanes 0-7 hold values 0-63 of the 128 and lanes 8-15 values 64-127, so a pair of 64-value groups
 * takes one run of 128 with s sx of the first group in lanes 0-7 and of the second in lanes 8-15.
 * Each group's int32 lanes become float and are
 * scaled lane by lane (sum += s sx acc): no horizontal sum per group, which with 256-bit vectors
 * was a quarter of the one-row time and left it at half the bf16 loop's bytes per second on a Xeon
 * with AMX (benchmarks/RESULTS.md). The centring of the other paths is folded into one float term
 * per group, s (8 sum x - 8 sx sum xq) + z sum x: the same value as theirs up to float rounding.
 * The scales and these terms are taken 16 groups at a time in vectors, and each group's s sx is
 * permuted out of its vector: one scalar scale at a time held one-row int4 at 0.74x of the bf16 loop's
 * bytes per second, vectors at 0.86x. Every loop over R and M is unrolled so that the sums, the
 * accumulators and the 16 groups' s sx stay in registers: written with arrays the compiler had kept in
 * memory, a tile ran about 1.4x slower from cache (benchmarks/RESULTS.md).
 * The tiles take R weight rows (`apart` apart) against M rows of x (xq8 + j k, their params j groups
 * apart), the whole of k, each (weight row, x row) pair in the same operations and order, folded and
 * summed into out[j n + row + r apart]: a row of x gets the same bits in any batch, and each weight
 * vector loaded serves M rows of x (int4m_4x2: 2-32 rows, where the 256-bit loops had summed each
 * group's lanes across vectors). */
#define DEFINE_INT4_MULTI512(NAME, R, M)                                                            \
    __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))                        \
    static void NAME(const wdesc *d, const xdesc *x, int64_t row, int64_t apart, float *out, int64_t n) { \
        const int64_t half = d->k / 2, stride = apart * half;  /* bytes a row, between the tile's rows */ \
        const uint8_t *w = (const uint8_t *)d->w + row * half;                                      \
        const __m512i low = _mm512_set1_epi8(0x0F);                                                 \
        const int pair = d->group == 64;                                                            \
        const int64_t span = (pair + 1) * d->group;  /* values a step: one group, or a pair */      \
        /* a step's lane of the 16 groups' s sx: lanes 8-15 the pair's second group */             \
        const __m512i lift = pair ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0) \
                                  : _mm512_setzero_si512();                                         \
        __m512 sum[R][M];                                                                           \
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                         \
            _Pragma("GCC unroll 2") for (int j = 0; j < M; j++) sum[r][j] = _mm512_setzero_ps();    \
        const int64_t gi1 = d->k / d->group;                                                        \
        for (int64_t gv = 0; gv < gi1; gv += 16) {                                                  \
            const int ng = gi1 - gv < 16 ? (int)(gi1 - gv) : 16;                                    \
            const __mmask16 take = (__mmask16)((1u << ng) - 1);                                     \
            __m512 sx[M], xs[M], centre[M], ssx[R][M];                                              \
            _Pragma("GCC unroll 2") for (int j = 0; j < M; j++) {                                   \
                const int64_t q = j * x->groups + gv;                                               \
                sx[j] = _mm512_maskz_loadu_ps(take, x->sx + q);                                     \
                xs[j] = _mm512_maskz_loadu_ps(take, x->xsum + q);                                   \
                const __m512 xq = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(take, x->xqsum + q)); \
                centre[j] = _mm512_mul_ps(_mm512_set1_ps(8.0f), _mm512_fnmadd_ps(sx[j], xq, xs[j])); \
            }                                                                                       \
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                                   \
                const int64_t p = (row + r * apart) * x->groups + gv;                               \
                const __m512 sc = params16(d->scale, p, ng, d->scale_bf16);                         \
                const __m512 off = params16(d->offset, p, ng, d->scale_bf16);                       \
                _Pragma("GCC unroll 2") for (int j = 0; j < M; j++) {                               \
                    ssx[r][j] = _mm512_mul_ps(sc, sx[j]);                                           \
                    sum[r][j] = _mm512_fmadd_ps(sc, centre[j], sum[r][j]);                          \
                    sum[r][j] = _mm512_fmadd_ps(off, xs[j], sum[r][j]);                             \
                }                                                                                   \
            }                                                                                       \
            const uint8_t *p = w + gv * d->group / 2;                                               \
            const int8_t *xp = x->xq8 + gv * d->group;                                              \
            for (int g = 0; g < ng; g += pair + 1, p += span / 2, xp += span) {                     \
                __m512i acc[R][M];                                                                  \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                 \
                    _Pragma("GCC unroll 2") for (int j = 0; j < M; j++) acc[r][j] = _mm512_setzero_si512(); \
                for (int64_t i = 0; i < span; i += 128) {                                           \
                    __m512i x0[M], x1[M];                                                           \
                    _Pragma("GCC unroll 2") for (int j = 0; j < M; j++) {                           \
                        x0[j] = _mm512_loadu_si512(xp + j * d->k + i);                              \
                        x1[j] = _mm512_loadu_si512(xp + j * d->k + i + 64);                         \
                    }                                                                               \
                    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {                           \
                        const uint8_t *q = p + r * stride + i / 2;                                  \
                        if (PREFETCH) __builtin_prefetch(q + PREFETCH);                             \
                        const __m512i packed = _mm512_loadu_si512(q);                               \
                        const __m512i lo = _mm512_and_si512(packed, low);                           \
                        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);     \
                        _Pragma("GCC unroll 2") for (int j = 0; j < M; j++)                         \
                            acc[r][j] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][j], lo, x0[j]), hi, x1[j]); \
                    }                                                                               \
                }                                                                                   \
                const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(g), lift);                    \
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)                                 \
                    _Pragma("GCC unroll 2") for (int j = 0; j < M; j++)                             \
                        sum[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]),                  \
                                                    _mm512_permutexvar_ps(at, ssx[r][j]), sum[r][j]); \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < R; r++)                                                                 \
            for (int j = 0; j < M; j++)                                                             \
                out[j * n + row + r * apart] = hsum(add_folded(_mm256_setzero_ps(), sum[r][j], 0.0f)); \
    }
DEFINE_INT4_MULTI512(int4m_4x1, 4, 1) DEFINE_INT4_MULTI512(int4m_1x1, 1, 1)
DEFINE_INT4_MULTI512(int4m_4x2, 4, 2) DEFINE_INT4_MULTI512(int4m_1x2, 1, 2)

typedef void (*int4_tile_fn)(const wdesc *, const xdesc *, int64_t, int64_t, int64_t, __m256 *);
/* [0]: int16 x (any group); int8 x (groups that are multiples of 64): [1] AVX2, [2] AVX512-VNNI,
 * [3] AVX-VNNI (the same sums: results are equal bit for bit) */
static const int4_tile_fn INT4_TILES[4][6] = {
    {int4_8x1, int4_4x2, int4_3x4, int4_1x1, int4_1x2, int4_1x4},
    {int4x8_8x1, int4x8_4x2, int4x8_3x4, int4x8_1x1, int4x8_1x2, int4x8_1x4},
    {int4x8evex_8x1, int4x8evex_4x2, int4x8evex_3x4, int4x8evex_1x1, int4x8evex_1x2, int4x8evex_1x4},
    {int4x8vex_8x1, int4x8vex_4x2, int4x8vex_3x4, int4x8vex_1x1, int4x8vex_1x2, int4x8vex_1x4},
};


/* Where the 8 values of x from i (a multiple of 8) within their group go in xq (see quantize_x):
 * a run of 8 never straddles a 16-value chunk, and chunks move whole. */
static inline int64_t x_slot(int x8, int64_t i) {
    if (x8 == 2) {  /* chunk c of a run of 128 (run c / 2 of 32, half c % 2) -> (c % 2) * 64 + (c / 2) * 16 */
        const int64_t c = i % 128 / 16;
        return i / 128 * 128 + c % 2 * 64 + c / 2 * 16 + i % 16;
    }
    if (x8 == 1) {  /* chunks 0, 1, 2, 3 of a run of 64 -> 0, 2, 1, 3 */
        const int64_t c = i % 64 / 16;
        return i / 64 * 64 + (c == 1 ? 2 : c == 2 ? 1 : c) * 16 + i % 16;
    }
    return i;
}

__attribute__((target("avx2,fma")))
static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* x rounded per group of each row, with each group's step, float sum and integer sum: to int8
 * (x8: groups of a multiple of 64) in the X8 order, where each run of 64 holds x[0..15], x[32..47],
 * x[16..31], x[48..63], the order in which the low and then the high nibbles of two 16-byte weight
 * runs lie in one 32-byte load, or (x8 == 2: the one-row 512-bit tile, rows of a multiple of 128) in
 * the X16 order, the same for four runs in one 64-byte load: x[0..15], x[32..47], x[64..79], x[96..111], then x[16..31],
 * x[48..63], x[80..95], x[112..127], or (x8 == 3: int4_rows.h) in the natural order; else to int16 in the
 * natural order. Eight values at a time, as
 * the one-row products spend about as long here as on a small weight (the float sums of a group are
 * taken in eight lanes: one order on every CPU, so every instruction set rounds x alike). */
__attribute__((target("avx2,fma")))
static void quantize_x(const float *x, int64_t m, int64_t k, int64_t group, int x8, void *xq, float *sx,
                       float *xsum, int32_t *xqsum) {
    const float levels = x8 ? 127.0f : 32767.0f;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i hi = _mm256_set1_epi32((int)levels), lo = _mm256_set1_epi32(-(int)levels);
    for (int64_t j = 0; j < m; j++)
        for (int64_t g0 = 0; g0 < k; g0 += group) {
            const float *v = x + j * k + g0;
            __m256 top8 = _mm256_setzero_ps(), sum8 = _mm256_setzero_ps();
            for (int64_t i = 0; i < group; i += 8) {
                const __m256 a = _mm256_loadu_ps(v + i);
                top8 = _mm256_max_ps(_mm256_andnot_ps(sign, a), top8);  /* a NaN keeps top8, as a scalar max */
                sum8 = _mm256_add_ps(sum8, a);
            }
            const float top = hmax8(top8), sum = hsum(sum8);
            const __m256 inv = _mm256_set1_ps(top > 0 ? levels / top : 0.0f);
            __m256i qsum8 = _mm256_setzero_si256();
            for (int64_t i = 0; i < group; i += 8) {
                /* rounded to nearest even, as lrintf; |q| <= levels but for a rounding ulp */
                __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + i), inv));
                q = _mm256_max_epi32(_mm256_min_epi32(q, hi), lo);
                qsum8 = _mm256_add_epi32(qsum8, q);
                const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                if (x8)
                    _mm_storel_epi64((__m128i *)((int8_t *)xq + j * k + x_slot(x8, g0 + i)), _mm_packs_epi16(q16, q16));
                else
                    _mm_storeu_si128((__m128i *)((int16_t *)xq + j * k + g0 + i), q16);
            }
            const __m128i q4 = _mm_add_epi32(_mm256_castsi256_si128(qsum8), _mm256_extracti128_si256(qsum8, 1));
            const __m128i q2 = _mm_add_epi32(q4, _mm_shuffle_epi32(q4, 0x4E));
            sx[j * (k / group) + g0 / group] = top / levels;
            xsum[j * (k / group) + g0 / group] = sum;
            xqsum[j * (k / group) + g0 / group] = _mm_cvtsi128_si32(_mm_add_epi32(q2, _mm_shuffle_epi32(q2, 0xB1)));
        }
}

#endif
