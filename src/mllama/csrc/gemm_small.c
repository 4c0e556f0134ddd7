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
 * This file holds the drivers and the entry points; the tiles are in small_tiles.h (bf16 and int8
 * weights) and small_int4.h (int4), the rounding to bf16 in bf16.h.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "small_int4.h"
#include "silu.h"
#include "int4_rows.h"

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

/* One bf16 row (k_in values) widened to float32, zeros to k; NULL without memory. */
__attribute__((target("avx2,fma")))
static float *widen_row(const uint16_t *x, int64_t k_in, int64_t k) {
    float *xf = malloc((size_t)k * sizeof *xf);
    if (xf) widen_bf16_row(x, k_in, k, xf);
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
