/* gemm_small.c's float tiles: bf16 and int8 weights against float32 rows of x (AVX2 + FMA), the
 * one-row int8 tile with AVX512-VNNI, and what all its tiles share (the weight and x descriptors, the
 * lane sums). Included by small_int4.h and gemm_small.c only. */
#ifndef MLLAMA_SMALL_TILES_H
#define MLLAMA_SMALL_TILES_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "dequant.h"

#ifndef RB
#define RB 24      /* weight rows per work item: a multiple of 8, 4 and 3 */
#endif
#ifndef PREFETCH
/* bytes ahead in the same weight row that the int4 runs prefetch: the hardware prefetcher alone left
 * one-row int4 products at about 40 G weights/s against 50-55 with it (benchmarks/RESULTS.md) */
#define PREFETCH 512
#endif
#ifndef KC
#define KC 1024    /* k values per cache block: a multiple of 32 */
#endif
#define MMAX 32    /* most rows of x per call */
#ifndef MULTI_MAX_M
#define MULTI_MAX_M 32  /* int4 with 512-bit VNNI: up to this many rows of x through the int4m tiles */
#endif


typedef struct {
    const void *w;       /* weights */
    const void *scale;   /* int8: (N,), int4: (N, K / group) */
    const void *offset;  /* int4: (N, K / group) */
    int64_t k;           /* values per weight row (for int4 already padded) */
    int64_t group;       /* int4 group size */
    int64_t ahead;       /* bytes from a weight to the same place in the rows this thread likely takes next */
    int scale_bf16;      /* scales and offsets are bf16 (else float32) */
} wdesc;


/* 32 consecutive weights of row `row` from column i (a multiple of 32), as 4 x 8 float32. */
__attribute__((target("avx2,fma")))
static inline void load32_bf16(const wdesc *d, int64_t row, int64_t i, __m256 *v) {
    const uint16_t *p = (const uint16_t *)d->w + row * d->k + i;
    for (int q = 0; q < 4; q++) {
        __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 8 * q)));
        v[q] = _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
}

__attribute__((target("avx2,fma")))
static inline void load32_int8(const wdesc *d, int64_t row, int64_t i, __m256 *v) {
    const int8_t *p = (const int8_t *)d->w + row * d->k + i;
    for (int q = 0; q < 4; q++)
        v[q] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * q))));
}

/* 8 consecutive weights of row `row` from column i (a multiple of 8) as float32. */
__attribute__((target("avx2,fma")))
static inline __m256 load8_bf16(const wdesc *d, int64_t row, int64_t i) {
    const uint16_t *p = (const uint16_t *)d->w + row * d->k + i;
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

__attribute__((target("avx2,fma")))
static inline __m256 load8_int8(const wdesc *d, int64_t row, int64_t i) {
    const int8_t *p = (const int8_t *)d->w + row * d->k + i;
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* One weight value as float (for the tails of bf16 and int8 rows; int4 rows have no tail). */
static inline float load1(const wdesc *d, int fmt, int64_t row, int64_t i) {
    if (fmt == FMT_BF16) return bf16_to_float(((const uint16_t *)d->w)[row * d->k + i]);
    return (float)((const int8_t *)d->w)[row * d->k + i];
}

/* The main loop of a tile, two orders: W = 32 dequantizes 32 weights of a row at a time; W = 8
 * takes 8 weights of each of the R rows, then loads each x vector once for all R. */
#ifndef PREFETCH_W
#define PREFETCH_W 512  /* bytes ahead in a weight row, as PREFETCH for int4 (int8, 2 rows of x: +27%) */
#endif
#define WBYTES_bf16 2
#define WBYTES_int8 1
#define TILE_LOOP32(FMT, R, M)                                                                      \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                           \
        __m256 wv[4];                                                                               \
        load32_##FMT(d, row + r, i, wv);                                                            \
        if (PREFETCH_W) __builtin_prefetch((const char *)d->w + ((row + r) * d->k + i) * WBYTES_##FMT + PREFETCH_W); \
        __builtin_prefetch((const char *)d->w + ((row + r) * d->k + i) * WBYTES_##FMT + d->ahead); \
        _Pragma("GCC unroll 4") for (int q = 0; q < 4; q++)                                         \
            _Pragma("GCC unroll 4") for (int j = 0; j < M; j++)                                     \
                acc[r][j] = _mm256_fmadd_ps(wv[q], _mm256_loadu_ps(x + j * d->k + i + 8 * q), acc[r][j]); \
    }
#define TILE_LOOP8(FMT, R, M)                                                                       \
    __m256 wv[R];                                                                                   \
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                                           \
        wv[r] = load8_##FMT(d, row + r, i);                                                         \
        if (PREFETCH_W) __builtin_prefetch((const char *)d->w + ((row + r) * d->k + i) * WBYTES_##FMT + PREFETCH_W); \
        __builtin_prefetch((const char *)d->w + ((row + r) * d->k + i) * WBYTES_##FMT + d->ahead); \
    }                                                                                               \
    _Pragma("GCC unroll 4") for (int j = 0; j < M; j++) {                                           \
        const __m256 xv = _mm256_loadu_ps(x + j * d->k + i);                                        \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r][j] = _mm256_fmadd_ps(wv[r], xv, acc[r][j]); \
    }

/* R weight rows from `row` x M rows of x, over columns [k0, k1), W columns per iteration (k0 is a
 * multiple of 32); adds into tot[r * MMAX + j] (vectors whose lanes are summed at the end). kmain:
 * where the vectorized part may end (columns from there to k1 go one by one). */
#define DEFINE_TILE(FMT, NAME, R, M, W)                                                             \
    __attribute__((target("avx2,fma")))                                                             \
    static void NAME(const wdesc *d, const float *x, int64_t row, int64_t k0, int64_t k1, int64_t kmain, \
                     __m256 *tot) {                                                                 \
        __m256 acc[R][M];                                                                           \
        for (int r = 0; r < R; r++)                                                                 \
            for (int j = 0; j < M; j++) acc[r][j] = _mm256_setzero_ps();                            \
        const int64_t stop = k0 + ((k1 < kmain ? k1 : kmain) - k0) / W * W;                         \
        for (int64_t i = k0; i < stop; i += W) {                                                    \
            TILE_LOOP##W(FMT, R, M)                                                                 \
        }                                                                                           \
        for (int r = 0; r < R; r++)                                                                 \
            for (int j = 0; j < M; j++) {                                                           \
                float tail = 0.0f;                                                                  \
                for (int64_t i = stop > k0 ? stop : k0; i < k1; i++)                                \
                    tail += load1(d, FMT_##FMT, row + r, i) * x[j * d->k + i];                      \
                tot[r * MMAX + j] = _mm256_add_ps(_mm256_add_ps(tot[r * MMAX + j], acc[r][j]),      \
                                                  _mm256_setr_ps(tail, 0, 0, 0, 0, 0, 0, 0));       \
            }                                                                                       \
    }

#define FMT_bf16 FMT_BF16
#define FMT_int8 FMT_INT8
#define DEFINE_TILES(FMT, ONE, TWO, FOUR)                                                          \
    DEFINE_TILE(FMT, FMT##_8x1, 8, 1, ONE) DEFINE_TILE(FMT, FMT##_1x1, 1, 1, ONE)                  \
    DEFINE_TILE(FMT, FMT##_4x2, 4, 2, TWO) DEFINE_TILE(FMT, FMT##_1x2, 1, 2, TWO)                  \
    DEFINE_TILE(FMT, FMT##_3x4, 3, 4, FOUR) DEFINE_TILE(FMT, FMT##_1x4, 1, 4, FOUR)
/* Loop order per format for the tiles of 1, 2 and 4 rows of x (-D overrides, for measuring). */
#ifndef BF16_TILES
#define BF16_TILES 32, 8, 8
#endif
#ifndef INT8_TILES
#define INT8_TILES 32, 32, 8
#endif
#define EXPAND_TILES(FMT, SPEC) DEFINE_TILES(FMT, SPEC)
EXPAND_TILES(bf16, BF16_TILES)
EXPAND_TILES(int8, INT8_TILES)


typedef void (*tile_fn)(const wdesc *, const float *, int64_t, int64_t, int64_t, int64_t, __m256 *);

/* Rows of x rounded per group (int4) or per run (int8w), as quantize_x (small_int4.h) leaves them. */
typedef struct {
    const int16_t *xq;   /* (m, k), or NULL when xq8 is used */
    const int8_t *xq8;   /* (m, k) in the X8 order (see quantize_x), for groups that are multiples of 64 */
    const float *sx;     /* (m, k / group): the step of each group's rounded x */
    const float *xsum;   /* (m, k / group): each group's sum of x, in float */
    const int32_t *xqsum; /* (m, k / group): each group's sum of xq */
    int64_t groups;      /* k / group */
    const float *xf;     /* (m, k): x itself, for the int8w tiles' tails */
} xdesc;

/* The lane sum of v. */
__attribute__((target("avx2,fma")))
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* tot + (v's 16 lanes folded to 8) + lane0 in the first lane: a 512-bit tile's sums into tot. */
__attribute__((target("avx2,fma,avx512f")))
static inline __m256 add_folded(__m256 tot, __m512 v, float lane0) {
    const __m256 folded = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm256_add_ps(_mm256_add_ps(tot, folded), _mm256_setr_ps(lane0, 0, 0, 0, 0, 0, 0, 0));
}

/* int8 against one row of x with AVX512-VNNI (level 2): x rounded to int16 per 128 values (as the
 * int4 path's int16 x: an error below 2^-16 of the run's largest |x|), 32 weights per widening and
 * vpdpwssd (the products exact in int32), each run's lanes scaled by its step lane by lane; the last
 * k % 128 values in float. One row streamed 17-25% faster than widening the weights to float
 * (benchmarks/RESULTS.md). The row's scale is applied by one_row_product at the end. */
#define INT8W_RUN 128
#define DEFINE_INT8_TILE_W16(NAME, R)                                                               \
    __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))                        \
    static void NAME(const wdesc *d, const xdesc *x, int64_t row, __m256 *tot, int64_t apart) {     \
        /* as the int4m tiles */                                                                    \
        const int64_t main_end = d->k / INT8W_RUN * INT8W_RUN;                                      \
        __m512 sum[R];                                                                              \
        for (int r = 0; r < R; r++) sum[r] = _mm512_setzero_ps();                                   \
        for (int64_t g0 = 0; g0 < main_end; g0 += INT8W_RUN) {                                      \
            __m512i acc[R];                                                                         \
            for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();                            \
            for (int64_t i = g0; i < g0 + INT8W_RUN; i += 32) {                                     \
                const __m512i xv = _mm512_loadu_si512(x->xq + i);                                   \
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                               \
                    const int8_t *p = (const int8_t *)d->w + (row + r * apart) * d->k + i;          \
                    /* in the row only: also prefetching the rows this thread takes next (as the   \
                     * other loops do) cost one row about 8% here (benchmarks/RESULTS.md) */      \
                    if ((i & 63) == 0 && PREFETCH_W) __builtin_prefetch(p + PREFETCH_W);            \
                    acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)), xv); \
                }                                                                                   \
            }                                                                                       \
            const __m512 step = _mm512_set1_ps(x->sx[g0 / INT8W_RUN]);                              \
            for (int r = 0; r < R; r++) sum[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), step, sum[r]); \
        }                                                                                           \
        for (int r = 0; r < R; r++) {                                                               \
            float tail = 0.0f;                                                                      \
            for (int64_t i = main_end; i < d->k; i++) tail += load1(d, FMT_INT8, row + r * apart, i) * x->xf[i]; \
            tot[r * apart] = add_folded(tot[r * apart], sum[r], tail);                              \
        }                                                                                           \
    }
DEFINE_INT8_TILE_W16(int8w_4x1, 4) DEFINE_INT8_TILE_W16(int8w_1x1, 1)

/* tiles[fmt][0..2]: the wide tile for 1, 2 and 4 rows of x; [3..5]: the one-weight-row tile. */
static const tile_fn TILES[2][6] = {
    {bf16_8x1, bf16_4x2, bf16_3x4, bf16_1x1, bf16_1x2, bf16_1x4},
    {int8_8x1, int8_4x2, int8_3x4, int8_1x1, int8_1x2, int8_1x4},
};
static const int TILE_ROWS[3] = {8, 4, 3};

#endif
