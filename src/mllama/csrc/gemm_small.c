/* Products with few rows (decode steps, 1 to 32 rows) against bf16, int8 or int4 weights, AVX2 + FMA
 * (the int4 products with int8 x also in a VNNI form, AVX512-VNNI or AVX-VNNI, where the CPU has one;
 * on CPUs with AMX, bf16 x of 2 to 64 rows goes through the tiles of gemm_amx.c instead):
 *   out (M, N) float32 = x (M, K) float32 @ dequant(W) ^T,   W stored (N, K) row-major.
 *
 * Weight formats (the same bytes as in memory and in mllama's quantized checkpoints):
 *   bf16: plain. int8: symmetric per output row, w = q * scale[n].
 *   int4: K padded to a multiple of the group (32, 64, 128 or 256); each run of 32 values is 16
 *         bytes, byte j holding value j in its low nibble and value 16 + j in its high nibble;
 *         w = q * scale[n, g] + offset[n, g] for q in 0..15 (asymmetric, one scale and offset per group).
 * Scales and offsets are float32 or bf16 (`scale_bf16`). The dequantizers' row loops are in dequant.h.
 *
 * Decoding is memory bound for one row: each weight must stream from memory once, and be turned
 * into float32 once. With several rows the work per weight grows, so each dequantized vector of 8
 * weights is reused for up to 4 rows of x from registers (tiles of 8x1, 4x2 or 3x4 weight rows x x
 * rows). Two loop orders build the tiles (TILE_LOOP32 / TILE_LOOP8): 32 weights of a row at a time
 * (cheapest for int4, whose 16 bytes hold 32 values, and for one or two rows of x), or 8 weights of
 * each of the R rows and then each x vector loaded once for all R (fewer loads per FMA, which pays
 * with 4 rows of x for bf16 and int8; benchmarks/RESULTS.md). K is walked in cache blocks of KC so the rows of x being read stay in L1/L2 while a block
 * of RB weight rows is swept, and every weight byte is read from memory once per call. Threads take
 * blocks of RB weight rows dynamically (a thread slowed by another process does not hold the rest
 * back). Built at first use by mllama/cpu_kernels.py; the OpenMP runtime is the one torch loaded.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
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
typedef struct {
    const int16_t *xq;   /* (m, k), or NULL when xq8 is used */
    const int8_t *xq8;   /* (m, k) in the X8 order (see quantize_x), for groups that are multiples of 64 */
    const float *sx;     /* (m, k / group): the step of each group's rounded x */
    const float *xsum;   /* (m, k / group): each group's sum of x, in float */
    const int32_t *xqsum; /* (m, k / group): each group's sum of xq */
    int64_t groups;      /* k / group */
    const float *xf;     /* (m, k): x itself, for the int8w tiles' tails */
} xdesc;

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

/* The lane sum of v. */
__attribute__((target("avx2,fma")))
static float hsum(__m256 v) {
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
    if (x8) {  /* chunks 0, 1, 2, 3 of a run of 64 -> 0, 2, 1, 3 */
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
 * x[48..63], x[80..95], x[112..127]; else to int16 in the natural order. Eight values at a time, as
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

/* tiles[fmt][0..2]: the wide tile for 1, 2 and 4 rows of x; [3..5]: the one-weight-row tile. */
static const tile_fn TILES[2][6] = {
    {bf16_8x1, bf16_4x2, bf16_3x4, bf16_1x1, bf16_1x2, bf16_1x4},
    {int8_8x1, int8_4x2, int8_3x4, int8_1x1, int8_1x2, int8_1x4},
};
static const int TILE_ROWS[3] = {8, 4, 3};

/* The instruction sets this CPU runs: 0 none (the kernels need AVX2 + FMA), 1 AVX2 + FMA, 2 also
 * AVX512-VNNI with VL, 3 also AVX-VNNI (and not the former). */
int mllama_gemm_small_level(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return 2;
    if (__builtin_cpu_supports("avxvnni")) return 3;
    return 1;
}

/* One row of x against int8 (int8w tiles) or int4 (int4m_4x1) weights: work items of ONE_RB rows,
 * swept as tiles of 4 rows ONE_APART apart (rows r, r + ONE_APART, r + 2 ONE_APART, r + 3 ONE_APART,
 * then r + 1, ...): the tile's rows lie in 4 runs of ONE_APART consecutive rows, and the ONE_APART
 * tiles in turn read each run from start to end, so a work item streams as 4 sequential runs. On an
 * AMD EPYC (Zen 4) 4 runs decoded int8 1.19x and int4 1.21-1.32x faster than 8 runs 32 apart (which a
 * Zen 5 had preferred to 8 runs 4 apart, and a Xeon the latter); 2 runs about as 4, one row at a time
 * 0.89x (one chain of FMAs a row, nothing else in flight; benchmarks/RESULTS.md). */
#ifndef ONE_RB
#define ONE_RB 256   /* a multiple of 4 ONE_APART */
#endif
#ifndef ONE_APART
#define ONE_APART 64
#endif
typedef void (*one_row_tile)(const wdesc *, const xdesc *, int64_t, __m256 *, int64_t);
/* int8: out = the n sums times the row scales. The work item's sums are ONE_RB vectors: the general
 * loop's RB x MMAX, zeroed per block, were a store for every 32 bytes of int4 read (benchmarks/RESULTS.md). */
__attribute__((target("avx2,fma")))
static void one_row_product(const wdesc *d, const xdesc *x, int64_t n, float *out, int threads, one_row_tile tile4,
                            one_row_tile tile1) {
    const int64_t blocks = (n + ONE_RB - 1) / ONE_RB;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        __m256 tot[ONE_RB];
        const int64_t row0 = b * ONE_RB, rows = n - row0 < ONE_RB ? n - row0 : ONE_RB;
        for (int64_t t = 0; t < rows; t++) tot[t] = _mm256_setzero_ps();
        int64_t r = 0;
        for (; r + 4 * ONE_APART <= rows; r += 4 * ONE_APART)
            for (int a = 0; a < ONE_APART; a++) tile4(d, x, row0 + r + a, tot + r + a, ONE_APART);
        for (; r + 4 <= rows; r += 4) tile4(d, x, row0 + r, tot + r, 1);
        for (; r < rows; r++) tile1(d, x, row0 + r, tot + r, 1);
        for (int64_t t = 0; t < rows; t++)
            out[row0 + t] = hsum(tot[t]) * param(d->scale, row0 + t, d->scale_bf16);
    }
}

#ifndef MULTI_APART
#define MULTI_APART 32
#endif
#ifndef MULTI_BYTES
#define MULTI_BYTES (256 << 10)
#endif
/* m rows of x (1, or an even number) against int4 weights with the int4m tiles: four weight rows a
 * tile, one row of x (int4m_4x1) or two a pass over each work item (int4m_4x2); work items of
 * 4 x `apart` weight rows swept as tiles of 4 rows `apart` apart (4 sequential runs, as
 * one_row_product). One row of x: ONE_APART apart. More rows of x: apart is MULTI_APART where one pass over x suffices or a work item fits MULTI_BYTES, which the
 * later passes read from cache, else less. Rows 32 apart against 1 (consecutive) ran 2 rows of x
 * 37.5 -> 47.6-63.8, 8 rows 13.7 -> 21.6-23.6 G weights/s; 64 apart about the same. */
typedef void (*int4m_tile)(const wdesc *, const xdesc *, int64_t, int64_t, float *, int64_t);
__attribute__((target("avx2,fma")))
static void int4m_product(const wdesc *d, const xdesc *x, int64_t m, int64_t n, float *out, int threads) {
    const int64_t tile_m = m == 1 ? 1 : 2, tile_r = 4;  /* rows of x and of w a tile */
    const int4m_tile wide = m == 1 ? int4m_4x1 : int4m_4x2, one = m == 1 ? int4m_1x1 : int4m_1x2;
    const int64_t fit = MULTI_BYTES / (tile_r * (d->k / 2));
    const int64_t apart = m == 1 ? ONE_APART : fit >= MULTI_APART ? MULTI_APART : fit > 1 ? fit : 1;
    const int64_t item = tile_r * apart;
    const int64_t blocks = (n + item - 1) / item;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t row0 = b * item, rows = n - row0 < item ? n - row0 : item;
        for (int64_t j0 = 0; j0 < m; j0 += tile_m) {
            const xdesc xj = {NULL, x->xq8 + j0 * d->k, x->sx + j0 * x->groups, x->xsum + j0 * x->groups,
                              x->xqsum + j0 * x->groups, x->groups, NULL};
            if (rows == item) {
                for (int64_t a = 0; a < apart; a++) wide(d, &xj, row0 + a, apart, out + j0 * n, n);
                continue;
            }
            int64_t r = 0;  /* the last, partial work item: consecutive rows */
            for (; r + tile_r <= rows; r += tile_r) wide(d, &xj, row0 + r, 1, out + j0 * n, n);
            for (; r < rows; r++) one(d, &xj, row0 + r, 1, out + j0 * n, n);
        }
    }
}

/* x: (m, k) float32, m in 1..MMAX and even unless 1 (the caller pads with zero rows); for int4 k is
 * the padded row length. level: the instruction set (mllama_gemm_small_level's numbers; 1 forces the
 * AVX2 path, for tests). Returns 0, or -1 for arguments the kernel does not take (or no memory). */
__attribute__((target("avx2,fma")))
int mllama_gemm_small(int fmt, const float *x, int64_t m, int64_t n, int64_t k, const void *w,
                      const void *scale, const void *offset, int scale_bf16, int64_t group, float *out,
                      int threads, int level) {
    if (fmt < 0 || fmt > 2 || m < 1 || m > MMAX || (m > 1 && m % 2) || n < 1 || k < 1) return -1;
    if (level < 1 || level > 3) return -1;
    if (fmt == FMT_INT4 && (group < 32 || group % 32 || group > 256 || k % group)) return -1;
    /* int4 blocks hold whole groups, at least 8 (its sums turn to float 8 groups at a time); one row
     * of x (a few KiB) stays in L1 anyway, and whole weight rows streamed faster (one-row int4 +9-10%,
     * int8 +4-10%, benchmarks/RESULTS.md) */
    const int64_t kc = m == 1 && fmt != FMT_BF16 ? k : fmt != FMT_INT4 ? KC : KC < 8 * group ? 8 * group : KC / group * group;
    /* Work items go to the threads in turn, so a thread's next block of RB rows is about `threads`
     * blocks on: the int4 runs prefetch there too (the one-row int4 product on an AMD EPYC 64 -> 76-79
     * G weights/s; benchmarks/RESULTS.md; one_row_product's tiles, measured on a Xeon, do not) */
    const int64_t row_bytes = fmt == FMT_INT4 ? k / 2 : fmt == FMT_INT8 ? k : 2 * k;
    const wdesc d = {w, scale, offset, k, group, (int64_t)(threads > 0 ? threads : 1) * RB * row_bytes, scale_bf16};
    xdesc xd = {0};
    /* int4 with 512-bit VNNI: the int4m tiles (one or two rows of x a tile), the X16 order;
     * else X8 where groups allow */
    const int z = fmt == FMT_INT4 && m <= MULTI_MAX_M && level == 2 && (group % 128 == 0 || (group == 64 && k % 128 == 0));
    const int x8 = z ? 2 : fmt == FMT_INT4 && group % 64 == 0;
    const int path = x8 ? level : 0;
    const int w16 = fmt == FMT_INT8 && m == 1 && level == 2;  /* one row of x: the int8w tiles */
    if (fmt == FMT_INT4 || w16) {  /* x rounded per group: int4's groups, or int8w's runs over whole runs of k */
        const int64_t kq = w16 ? k / INT8W_RUN * INT8W_RUN : k, qgroup = w16 ? INT8W_RUN : group;
        xd.groups = kq / qgroup;
        const int64_t params_n = 3 * m * xd.groups > 0 ? 3 * m * xd.groups : 1;  /* sx, xsum, xqsum */
        void *xq = malloc((size_t)(m * kq > 0 ? m * kq : 1) * (x8 ? sizeof(int8_t) : sizeof(int16_t)));
        float *params = malloc((size_t)params_n * sizeof *params);
        if (!xq || !params) {
            free(xq);
            free(params);
            return -1;
        }
        int32_t *xqsum = (int32_t *)(params + 2 * m * xd.groups);
        if (kq > 0) quantize_x(x, m, kq, qgroup, x8, xq, params, params + m * xd.groups, xqsum);
        if (x8)
            xd.xq8 = xq;
        else
            xd.xq = xq;
        xd.sx = params;
        xd.xsum = params + m * xd.groups;
        xd.xqsum = xqsum;
        xd.xf = x;
    }
    if (z || w16) {
        if (z)
            int4m_product(&d, &xd, m, n, out, threads);
        else
            one_row_product(&d, &xd, n, out, threads, int8w_4x1, int8w_1x1);
        free(z ? (void *)xd.xq8 : (void *)xd.xq);
        free((void *)xd.sx);
        return 0;
    }
    const int64_t kmain = k - k % 8;
    const int64_t blocks = (n + RB - 1) / RB;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        __m256 tot[RB * MMAX];
        const int64_t row0 = b * RB;
        const int64_t rows = n - row0 < RB ? n - row0 : RB;
        /* only the m sums of each row: zeroing all MMAX cost a one-row call a store for every 32 it needs */
        for (int64_t t = 0; t < rows; t++)
            for (int64_t j = 0; j < m; j++) tot[t * MMAX + j] = _mm256_setzero_ps();
        for (int64_t k0 = 0; k0 < k; k0 += kc) {
            const int64_t k1 = k - k0 < kc ? k : k0 + kc;
            for (int64_t j0 = 0; j0 < m;) {
                const int kind = m == 1 ? 0 : m - j0 >= 4 ? 2 : 1;
                const int step = kind == 0 ? 1 : kind == 1 ? 2 : 4;
                const int wide = TILE_ROWS[kind];
                int64_t r = 0;
                if (fmt == FMT_INT4) {
                    const xdesc xj = {x8 ? NULL : xd.xq + j0 * k, x8 ? xd.xq8 + j0 * k : NULL, xd.sx + j0 * xd.groups,
                                      xd.xsum + j0 * xd.groups, xd.xqsum + j0 * xd.groups, xd.groups, NULL};
                    for (; r + wide <= rows; r += wide)
                        INT4_TILES[path][kind](&d, &xj, row0 + r, k0, k1, tot + r * MMAX + j0);
                    for (; r < rows; r++)
                        INT4_TILES[path][3 + kind](&d, &xj, row0 + r, k0, k1, tot + r * MMAX + j0);
                } else {
                    for (; r + wide <= rows; r += wide)
                        TILES[fmt][kind](&d, x + j0 * k, row0 + r, k0, k1, kmain, tot + r * MMAX + j0);
                    for (; r < rows; r++)
                        TILES[fmt][3 + kind](&d, x + j0 * k, row0 + r, k0, k1, kmain, tot + r * MMAX + j0);
                }
                j0 += step;
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            const float rescale = fmt == FMT_INT8 ? param(scale, row0 + r, scale_bf16) : 1.0f;
            for (int64_t j = 0; j < m; j++)
                out[j * n + row0 + r] = hsum(tot[r * MMAX + j]) * rescale;
        }
    }
    free(x8 ? (void *)xd.xq8 : (void *)xd.xq);
    free((void *)xd.sx);
    return 0;
}

/* 8 float32's bits plus the nearest-even rounding increment: each high half is the value rounded to bf16
 * (finite values; a carry into the exponent gives inf as torch's conversion does). */
__attribute__((target("avx2,fma")))
static inline __m256i bf16_rounded_bits8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
}

/* 8 float32 -> 8 bf16, rounded to nearest even (as torch's .to(bfloat16) for finite values). */
__attribute__((target("avx2,fma")))
static inline __m128i float8_to_bf16(__m256 v) {
    const __m256i r = _mm256_srli_epi32(bf16_rounded_bits8(v), 16);
    /* (8 x 32-bit, each < 2^16) -> 8 x 16-bit in order */
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* The first `take` (1..8) of 8 values to out[at..] as float32 or bf16 (out_bf16). */
__attribute__((target("avx2,fma")))
static inline void store8(void *out, int out_bf16, int64_t at, __m256 v, int64_t take) {
    if (out_bf16) {
        uint16_t *o = (uint16_t *)out + at, tmp[8];
        _mm_storeu_si128((__m128i *)(take == 8 ? o : tmp), float8_to_bf16(v));
        if (take < 8) memcpy(o, tmp, (size_t)take * sizeof *o);
    } else {
        float *o = (float *)out + at, tmp[8];
        _mm256_storeu_ps(take == 8 ? o : tmp, v);
        if (take < 8) memcpy(o, tmp, (size_t)take * sizeof *o);
    }
}

/* 8 float32 -> 8 bf16 as torch's .to(bfloat16) (nearest even), a NaN as 0x7FC0 (torch's loops give
 * 0x7FC0 or 0xFFFF). */
__attribute__((target("avx2,fma")))
static inline __m128i bf16_bits8(__m256 v) {
    const __m256i unordered = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    /* lanes of v that are NaN, as 8 x 16-bit masks */
    const __m128i nan = _mm_packs_epi32(_mm256_castsi256_si128(unordered), _mm256_extracti128_si256(unordered, 1));
    return _mm_blendv_epi8(float8_to_bf16(v), _mm_set1_epi16(0x7FC0), nan);
}

/* n float32 -> n bf16 (bf16_bits8's rounding). */
__attribute__((target("avx2,fma")))
static void round_row_bf16(const float *of, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm_storeu_si128((__m128i *)(out + i), bf16_bits8(_mm256_loadu_ps(of + i)));
    if (i < n) {
        float tail[8] = {0};
        uint16_t bits[8];
        memcpy(tail, of + i, (size_t)(n - i) * sizeof *tail);
        _mm_storeu_si128((__m128i *)bits, bf16_bits8(_mm256_loadu_ps(tail)));
        memcpy(out + i, bits, (size_t)(n - i) * sizeof *out);
    }
}

/* One bf16 row (k_in values) widened to float32, zeros to k; NULL without memory. */
static float *widen_row(const uint16_t *x, int64_t k_in, int64_t k) {
    float *xf = malloc((size_t)k * sizeof *xf);
    if (!xf) return NULL;
    for (int64_t i = 0; i < k_in; i++) {
        const uint32_t bits = (uint32_t)x[i] << 16;
        memcpy(xf + i, &bits, sizeof bits);
    }
    for (int64_t i = k_in; i < k; i++) xf[i] = 0.0f;
    return xf;
}

/* One bf16 row of x (k_in values; int4 rows padded with zeros to k) against `count` weights of one
 * format, each as mllama_gemm_small takes it, with n[i] outputs -> their float32 sums one after another
 * in `sums`, x widened once (an MLP's gate and up in one call). Returns 0, or -1 for arguments the
 * kernel does not take (or no memory). */
__attribute__((target("avx2,fma")))
static int row_sums(int fmt, const uint16_t *x, int64_t k_in, int64_t k, int count, const int64_t *n,
                    const void *const *w, const void *const *scale, const void *const *offset, int scale_bf16,
                    int64_t group, float *sums, int threads, int level) {
    if (k_in < 1 || k_in > k || (fmt != FMT_INT4 && k_in != k) || count < 1) return -1;
    float *xf = widen_row(x, k_in, k);
    int rc = xf ? 0 : -1;
    for (int64_t i = 0, at = 0; rc == 0 && i < count; at += n[i], i++)
        rc = mllama_gemm_small(fmt, xf, 1, n[i], k, w[i], scale[i], offset[i], scale_bf16, group, sums + at,
                               threads, level);
    free(xf);
    return rc;
}

/* One bf16 row of x (k_in values; int4 rows padded with zeros to k) -> n bf16 outputs: mllama_gemm_small
 * with m = 1 and its float32 output rounded by bf16_bits8, the same bits as torch's .to(bfloat16) of it.
 * A decode step's call: the conversions around it, in torch, had cost each call as much as a small
 * weight's product (benchmarks/RESULTS.md). */
__attribute__((target("avx2,fma")))
int mllama_gemm_small_row_bf16(int fmt, const uint16_t *x, int64_t k_in, int64_t n, int64_t k, const void *w,
                               const void *scale, const void *offset, int scale_bf16, int64_t group,
                               uint16_t *out, int threads, int level) {
    if (n < 1) return -1;
    float *sums = malloc((size_t)n * sizeof *sums);
    const int rc = sums ? row_sums(fmt, x, k_in, k, 1, &n, &w, &scale, &offset, scale_bf16, group, sums, threads,
                                   level) : -1;
    if (rc == 0) round_row_bf16(sums, n, out);
    free(sums);
    return rc;
}

/* 8 floats rounded to bf16 (nearest even) and widened back; NaN kept. */
__attribute__((target("avx2,fma")))
static inline __m256 bf16_round8(__m256 v) {
    const __m256i r = _mm256_and_si256(bf16_rounded_bits8(v), _mm256_set1_epi32((int)0xFFFF0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* e^x of 8 floats: Cephes' expf (x = n ln 2 + r, a degree-5 polynomial in r), within a few ulp of the
 * exact value; +inf past the float range, NaN kept. Below -87 it returns about 2^-126 or 0 instead of
 * the exact tiny value: silu adds it to 1, where every one of them gives 1. */
__attribute__((target("avx2,fma")))
static inline __m256 exp8(__m256 x) {
    const __m256 top = _mm256_set1_ps(88.72283935546875f);  /* the float nearest log(FLT_MAX) */
    const __m256 over = _mm256_cmp_ps(x, top, _CMP_GT_OQ), nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    const __m256 c = _mm256_max_ps(_mm256_min_ps(x, top), _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(c, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), c);  /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    /* n in -126..128: 2^(n - 1) in the exponent field, then times 2, so n = 128 stays finite */
    const __m256i half = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(half)), _mm256_set1_ps(2.0f));
    y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), over);
    return _mm256_blendv_ps(y, x, nan);
}

/* silu(g) * u of 8 float32 sums g, u as the model's bf16 ops round them: g and u to bf16, silu in
 * float32 as torch's (g / (1 + e^-g)) to bf16, their product in float32 to bf16. torch's e^x is within
 * 1 ulp, exp8 a few: where a silu lies that close to a bf16 rounding boundary it can round the other
 * way from torch's (one bf16 step; none of 286,720 outputs in benchmarks/RESULTS.md). */
__attribute__((target("avx2,fma")))
static inline __m128i silu_product8(__m256 g, __m256 u) {
    const __m256 gb = bf16_round8(g), ub = bf16_round8(u);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gb));
    const __m256 silu = bf16_round8(_mm256_div_ps(gb, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
    return bf16_bits8(_mm256_mul_ps(silu, ub));
}

/* silu_product8 over n sums of each. */
__attribute__((target("avx2,fma")))
static void silu_product_row(const float *g, const float *u, int64_t n, uint16_t *out) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), silu_product8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    if (i < n) {
        float gs[8] = {0}, us[8] = {0};
        uint16_t bits[8];
        memcpy(gs, g + i, (size_t)(n - i) * sizeof *gs);
        memcpy(us, u + i, (size_t)(n - i) * sizeof *us);
        _mm_storeu_si128((__m128i *)bits, silu_product8(_mm256_loadu_ps(gs), _mm256_loadu_ps(us)));
        memcpy(out + i, bits, (size_t)(n - i) * sizeof *out);
    }
}

/* An MLP's silu(gate(x)) * up(x) for one bf16 row of x against gate and up weights of one format
 * (each as mllama_gemm_small_row_bf16 takes it) -> n bf16 values, rounded as silu_product_row says:
 * one call where a decode step made four (two products, silu, the product), each of which, right
 * after the weights had streamed through the caches, cost tens of microseconds. */
__attribute__((target("avx2,fma")))
int mllama_gemm_small_silu_bf16(int fmt, const uint16_t *x, int64_t k_in, int64_t n, int64_t k,
                                const void *w_gate, const void *scale_gate, const void *offset_gate,
                                const void *w_up, const void *scale_up, const void *offset_up, int scale_bf16,
                                int64_t group, uint16_t *out, int threads, int level) {
    if (n < 1) return -1;
    const int64_t ns[2] = {n, n};
    const void *ws[2] = {w_gate, w_up}, *scales[2] = {scale_gate, scale_up}, *offsets[2] = {offset_gate, offset_up};
    float *sums = malloc((size_t)(2 * n) * sizeof *sums);
    const int rc = sums ? row_sums(fmt, x, k_in, k, 2, ns, ws, scales, offsets, scale_bf16, group, sums, threads,
                                   level) : -1;
    if (rc == 0) silu_product_row(sums, sums + n, n, out);
    free(sums);
    return rc;
}

/* int4 weights (n, k: k the padded row length) -> out (n, k_out), k_out <= k the real in_features,
 * float32 or bf16 (out_bf16): w = q * scale + offset, multiplied then added (two roundings, as the
 * reference's torch ops), for the prefill and vision GEMMs that take plain weights. level 1 keeps to
 * AVX2 (tests), else AVX512-BF16 where the CPU has it. Returns 0, or -1 for arguments it does not take. */

__attribute__((target("avx2,fma"), optimize("fp-contract=off")))  /* no fused multiply-add here */
int mllama_dequant_int4(const uint8_t *w, const void *scale, const void *offset, int scale_bf16, int64_t n,
                        int64_t k, int64_t group, int64_t k_out, void *out, int out_bf16, int threads, int level) {
    if (n < 1 || k < 1 || group < 32 || group % 32 || k % group || k_out < 1 || k_out > k) return -1;
    const int64_t groups = k / group;
    const int wide = dequant_avx512(level);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < n; r++) {
        if (wide) {
            dequant_int4_row_avx512(w + r * (k / 2), scale, offset, scale_bf16, r * groups, group, k_out,
                                    (char *)out + r * k_out * (out_bf16 ? 2 : 4), out_bf16);
            continue;
        }
        const uint8_t *row = w + r * (k / 2);
        for (int64_t i = 0; i < k_out; i += 32) {
            const int64_t g = r * groups + i / group;
            const __m256 s = _mm256_set1_ps(param(scale, g, scale_bf16));
            const __m256 z = _mm256_set1_ps(param(offset, g, scale_bf16));
            const __m128i packed = _mm_loadu_si128((const __m128i *)(row + i / 2));
            const __m128i lo = _mm_and_si128(packed, _mm_set1_epi8(0x0F));              /* values i .. i+15 */
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F)); /* i+16 .. i+31 */
            __m256 v[4];
            v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            for (int t = 0; t < 4; t++) v[t] = _mm256_add_ps(_mm256_mul_ps(v[t], s), z);
            for (int t = 0; t < 4 && i + 8 * t < k_out; t++) {
                const int64_t left = k_out - i - 8 * t;
                store8(out, out_bf16, r * k_out + i + 8 * t, v[t], left < 8 ? left : 8);
            }
        }
    }
    return 0;
}


/* int8 weights (n, k) -> out (n, k) float32 or bf16 (out_bf16): w = q * scale[row], as the
 * reference's torch ops; level as for int4. Returns 0, or -1 for arguments it does not take. */
__attribute__((target("avx2,fma")))
int mllama_dequant_int8(const int8_t *w, const void *scale, int scale_bf16, int64_t n, int64_t k, void *out,
                        int out_bf16, int threads, int level) {
    if (n < 1 || k < 1) return -1;
    const int wide = dequant_avx512(level);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < n; r++) {
        if (wide) {
            dequant_int8_row_avx512(w + r * k, param(scale, r, scale_bf16), k,
                                    (char *)out + r * k * (out_bf16 ? 2 : 4), out_bf16);
            continue;
        }
        const __m256 s = _mm256_set1_ps(param(scale, r, scale_bf16));
        const int8_t *row = w + r * k;
        int64_t i = 0;
        for (; i + 8 <= k; i += 8)
            store8(out, out_bf16, r * k + i,
                   _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + i)))), s), 8);
        if (i < k) {  /* the last k % 8 values: no 8-byte load past the row */
            float tail[8] = {0};
            for (int64_t t = 0; t < k - i; t++) tail[t] = (float)row[i + t];
            store8(out, out_bf16, r * k + i, _mm256_mul_ps(_mm256_loadu_ps(tail), s), k - i);
        }
    }
    return 0;
}
