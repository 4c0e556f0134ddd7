/* Products of bf16 x against bf16, int8 or int4 weights on AMX tiles (Intel Sapphire Rapids and
 * later): the engine's batched decode steps and short prompts (2 to 64 rows of x), and int8 weights
 * through the AMX-INT8 tiles for any number of rows:
 *   out (M, N) float32 = x (M, K) bf16 @ dequant(W) ^T,   W stored (N, K) row-major,
 * in the formats of gemm_small.c (whose one-row and AVX2 paths these sit beside). Built at first use
 * by mllama/cpu_kernels.py; the OpenMP runtime is the one torch loaded.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "dequant.h"

/* The dot product of two bf16 vectors of k values (k a multiple of 32), pairs of products in float32. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static float dot_bf16_avx512(const uint16_t *a, const uint16_t *b, int64_t k) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)(a + i)),
                               (__m512bh)_mm512_loadu_si512((const void *)(b + i)));
    return _mm512_reduce_add_ps(acc);
}


/* ---- AMX-BF16 ------------------------------------------------------------------------------------
 * One tile product multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 float32, pairs of
 * products accumulated in float32 as vdpbf16ps does. The weights are the first operand: bf16 weights
 * are read in place (16 rows of 32 values, a row stride apart: no repacking); int8 and int4 weights
 * are first dequantized, a block of 32 rows at a time, into a buffer of the thread's that stays in
 * its cache (the same bf16 values as mllama_dequant_int4 / _int8 give). x, packed once per call into
 * pairs of k (the second operand's layout), fills 16 columns per tile; a tile product costs the same
 * for 1 or 16 of them, so up to 16 rows of x stream the weights once at memory speed. A block of 32
 * weight rows (two tiles) meets 32 rows of x (two tiles, four results) per pass over k; more rows
 * of x pass over the same block again, from cache. Each output is its own row of x against the
 * weights, summed in one order: a row gets the same bits in any batch. */
#define AMX_ROWS 32        /* weight rows per block: two tiles (streamed faster than one or four) */
#define AMX_MAX_M 64       /* rows of x per call (torch's GEMM wins from about 128) */

/* Whether the tiles run here: the CPU has them and Linux grants this process their register state
 * (asked once; every thread then has it). */
int mllama_amx_usable(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile") || !dequant_avx512(0)) return 0;
    return amx_permission();
}

/* 16 weight rows from `row` x `cols` rows of x from j0, from a stored tile c[weight row][column of x]. */
static void amx_put(const float c[16][16], float *out, int64_t n, int64_t row, int64_t j0, int64_t cols) {
    for (int64_t j = 0; j < cols; j++)
        for (int r = 0; r < 16; r++) out[(j0 + j) * n + row + r] = c[r][j];
}

/* 32 bf16 weight rows (w0: the first 16, w1: the next, `stride` bytes between rows) against every
 * row of x (xpack: (m tiles, k / 32, 16, 16) pairs of k), to out's columns row0 ... row0 + 31. */
__attribute__((target("amx-tile,amx-bf16,avx512f")))
static void amx_block(const uint16_t *w0, const uint16_t *w1, int64_t stride, const uint32_t *xpack, float *out,
                      int64_t row0, int64_t m, int64_t n, int64_t k) {
    const int64_t kblocks = k / 32;
    float c[4][16][16] __attribute__((aligned(64)));  /* [result tile][weight row][column of x] */
    int64_t j0 = 0;
    for (; m - j0 > 16; j0 += 32) {  /* two tiles of x: results (w0, x0) (w1, x0) (w0, x1) (w1, x1) */
        const uint32_t *x0 = xpack + (j0 / 16) * kblocks * 256, *x1 = x0 + kblocks * 256;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < kblocks; kb++) {
            _tile_loadd(6, x0 + kb * 256, 64);
            _tile_loadd(7, x1 + kb * 256, 64);
            _tile_loadd(4, w0 + kb * 32, stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, w1 + kb * 32, stride);
            _tile_dpbf16ps(1, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        const int64_t cols1 = m - j0 - 16 < 16 ? m - j0 - 16 : 16;
        amx_put(c[0], out, n, row0, j0, 16);
        amx_put(c[1], out, n, row0 + 16, j0, 16);
        amx_put(c[2], out, n, row0, j0 + 16, cols1);
        amx_put(c[3], out, n, row0 + 16, j0 + 16, cols1);
    }
    if (j0 < m) {  /* one tile of x left: results (w0, x) (w1, x) */
        const uint32_t *x0 = xpack + (j0 / 16) * kblocks * 256;
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t kb = 0; kb < kblocks; kb++) {
            _tile_loadd(6, x0 + kb * 256, 64);
            _tile_loadd(4, w0 + kb * 32, stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, w1 + kb * 32, stride);
            _tile_dpbf16ps(1, 5, 6);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        amx_put(c[0], out, n, row0, j0, m - j0);
        amx_put(c[1], out, n, row0 + 16, j0, m - j0);
    }
}

/* Weight rows [r0, r1) as bf16 into buf (r1 - r0 rows of k_out), as mllama_dequant_* would give them. */
static void amx_dequant(int fmt, const void *w, const void *scale, const void *offset, int scale_bf16,
                        int64_t k, int64_t group, int64_t k_out, int64_t r0, int64_t r1, uint16_t *buf) {
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *dst = buf + (r - r0) * k_out;
        if (fmt == FMT_INT4)
            dequant_int4_row_avx512((const uint8_t *)w + r * (k / 2), scale, offset, scale_bf16, r * (k / group),
                                    group, k_out, dst, 1);
        else
            dequant_int8_row_avx512((const int8_t *)w + r * k, param(scale, r, scale_bf16), k, dst, 1);
    }
}

/* ---- AMX-INT8: int8 weights without dequantizing ------------------------------------------------
 * The per-row scale factors out of the product (w = q * s: x . w = s (x . q)), so the tiles can take
 * q itself. Each row of x is rounded to int16 on its own grid (step max|x| / 32767: an error below
 * 2^-16 of the row's largest |x|, as the one-row int8 path's) and split exactly into a signed high
 * byte and an unsigned low byte, x16 = 256 hi + lo; the signed x signed and signed x unsigned tile
 * products then give the exact integer sums (|sum| < 2^31 for k <= 65536), and
 *   out = (s * step) * (256 sum(q hi) + sum(q lo))
 * in float32 at the end. The int8 tile products take 64 values per tile, twice the bf16 tiles' 32, so
 * the two products cost what one bf16 product costs, with half the weight bytes and no conversion. */
#define AMX_INT8_MAX_K 65536

/* Whether the int8 tile products run here (once mllama_amx_usable has asked for the tiles). */
int mllama_amx_int8_usable(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("amx-int8");
}

typedef struct {
    const uint32_t *hi, *lo;  /* (m tiles, k / 64, 16, 16): [tile of x][k block][quad of k][row of x] */
    const int8_t *hi8;        /* (m, k): the rows, for the weight rows past the last block */
    const uint8_t *lo8;
    const float *step;        /* (m,) */
} x16desc;

/* One row of x (bf16) -> hi, lo (k values each); returns its step. k a multiple of 16. */
__attribute__((target("avx512f,avx512bw")))
static float split_x16(const uint16_t *x, int64_t k, int8_t *hi, uint8_t *lo) {
    __m512 most = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16)
        most = _mm512_max_ps(most, _mm512_abs_ps(_mm512_castsi512_ps(_mm512_slli_epi32(
                   _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i))), 16))));
    const float top = _mm512_reduce_max_ps(most);
    const __m512 inv = _mm512_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    for (int64_t i = 0; i < k; i += 16) {
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i))), 16));
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  /* to nearest, ties to even */
        _mm_storeu_si128((__m128i *)(hi + i), _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 8)));
        _mm_storeu_si128((__m128i *)(lo + i), _mm512_cvtepi32_epi8(_mm512_and_si512(q, _mm512_set1_epi32(255))));
    }
    return top > 0.0f ? top / 32767.0f : 0.0f;
}

/* One output from a weight row's exact sums against one row of x. */
static inline float int8_out(const void *scale, int scale_bf16, int64_t row, float step, int32_t hi, int32_t lo) {
    return (param(scale, row, scale_bf16) * step) * (256.0f * (float)hi + (float)lo);
}

/* out[j][row] for 16 weight rows from `row` x `cols` rows of x from j0, from the stored sums. */
static void amx_put_int8(const int32_t hi[16][16], const int32_t lo[16][16], const void *scale, int scale_bf16,
                         const float *step, float *out, int64_t n, int64_t row, int64_t j0, int64_t cols) {
    for (int64_t j = 0; j < cols; j++)
        for (int r = 0; r < 16; r++)
            out[(j0 + j) * n + row + r] = int8_out(scale, scale_bf16, row + r, step[j0 + j], hi[r][j], lo[r][j]);
}

/* 32 int8 weight rows (w0: the first 16, w1: the next, k bytes apart) against the rows j_start..m-1
 * of x (j_start a multiple of 16), to out's columns row0 ... row0 + 31: per tile of x, four sums
 * (w0 hi, w0 lo, w1 hi, w1 lo). */
__attribute__((target("amx-tile,amx-int8,avx512f")))
static void amx_block_int8(const int8_t *w0, const int8_t *w1, int64_t k, const x16desc *x, const void *scale,
                           int scale_bf16, float *out, int64_t row0, int64_t j_start, int64_t m, int64_t n) {
    const int64_t kblocks = k / 64;
    int32_t c[4][16][16] __attribute__((aligned(64)));
    for (int64_t j0 = j_start; j0 < m; j0 += 16) {
        const uint32_t *xh = x->hi + (j0 / 16) * kblocks * 256, *xl = x->lo + (j0 / 16) * kblocks * 256;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < kblocks; kb++) {
            _tile_loadd(6, xh + kb * 256, 64);
            _tile_loadd(7, xl + kb * 256, 64);
            _tile_loadd(4, w0 + kb * 64, k);
            _tile_dpbssd(0, 4, 6);
            _tile_dpbsud(1, 4, 7);
            _tile_loadd(5, w1 + kb * 64, k);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbsud(3, 5, 7);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        const int64_t cols = m - j0 < 16 ? m - j0 : 16;
        amx_put_int8(c[0], c[1], scale, scale_bf16, x->step, out, n, row0, j0, cols);
        amx_put_int8(c[2], c[3], scale, scale_bf16, x->step, out, n, row0 + 16, j0, cols);
    }
}

/* The same sums for one weight row past the last block, in plain integers. */
static void int8_row_x16(const int8_t *w, int64_t k, const x16desc *x, const void *scale, int scale_bf16,
                         float *out, int64_t row, int64_t m, int64_t n) {
    for (int64_t j = 0; j < m; j++) {
        int32_t hi = 0, lo = 0;
        for (int64_t i = 0; i < k; i++) {
            hi += (int32_t)w[i] * x->hi8[j * k + i];
            lo += (int32_t)w[i] * x->lo8[j * k + i];
        }
        out[j * n + row] = int8_out(scale, scale_bf16, row, x->step[j], hi, lo);
    }
}

/* mllama_gemm_amx for int8 weights through the int8 tiles (k a multiple of 64, at most AMX_INT8_MAX_K). */
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw")))
static int gemm_amx_int8(const uint16_t *x, int64_t m, int64_t n, int64_t k, const int8_t *w, const void *scale,
                         int scale_bf16, float *out, int threads, const tile_config *cfg) {
    const int64_t mtiles = (m + 15) / 16, kblocks = k / 64;
    const size_t packed = (size_t)(mtiles * kblocks) * 1024;  /* bytes of each of hi and lo */
    uint32_t *hi = aligned_alloc(64, 2 * packed);
    int8_t *hi8 = malloc((size_t)(m * k) * 2);
    float *step = malloc((size_t)m * sizeof(float));
    if (!hi || !hi8 || !step) {
        free(hi);
        free(hi8);
        free(step);
        return -1;
    }
    uint32_t *lo = hi + packed / 4;
    uint8_t *lo8 = (uint8_t *)hi8 + m * k;
    memset(hi, 0, 2 * packed);
    for (int64_t j = 0; j < m; j++) {
        step[j] = split_x16(x + j * k, k, hi8 + j * k, lo8 + j * k);
        const uint32_t *qh = (const uint32_t *)(hi8 + j * k), *ql = (const uint32_t *)(lo8 + j * k);
        const int64_t at = (j / 16) * kblocks * 256 + j % 16;
        for (int64_t q = 0; q < k / 4; q++) {  /* quad q of k -> [k block q / 16][quad q % 16][row j % 16] */
            hi[at + (q / 16) * 256 + (q % 16) * 16] = qh[q];
            lo[at + (q / 16) * 256 + (q % 16) * 16] = ql[q];
        }
    }
    const x16desc xd = {hi, lo, hi8, lo8, step};
    /* Work items: a block of weight rows against a chunk of AMX_MAX_M rows of x, chunk by chunk, so a
     * long prompt's rows of x being re-read stay in the core's cache (the weights come back from memory
     * once per chunk). */
    const int64_t blocks = n / AMX_ROWS, chunks = (m + AMX_MAX_M - 1) / AMX_MAX_M;
#pragma omp parallel num_threads(threads)
    {
        _tile_loadconfig(cfg);
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t item = 0; item < chunks * blocks; item++) {
            const int64_t b = item % blocks, j0 = item / blocks * AMX_MAX_M;
            const int8_t *w0 = w + b * AMX_ROWS * k;
            amx_block_int8(w0, w0 + 16 * k, k, &xd, scale, scale_bf16, out, b * AMX_ROWS, j0,
                           m < j0 + AMX_MAX_M ? m : j0 + AMX_MAX_M, n);
        }
        _tile_release();
#pragma omp for schedule(static)
        for (int64_t row = blocks * AMX_ROWS; row < n; row++)
            int8_row_x16(w + row * k, k, &xd, scale, scale_bf16, out, row, m, n);
    }
    free(hi);
    free(hi8);
    free(step);
    return 0;
}

/* out (m, n) float32 = x (m, k_out) bf16 @ W ^T for W (n, k) in `fmt` (k the stored row length, k_out
 * the real in_features: k for bf16 and int8, k_out <= k for int4), k_out a multiple of 32. int8
 * weights with k a multiple of 64 take the int8 tiles (any m); the others m <= AMX_MAX_M (the caller
 * sends 2 or more: one row streams faster through the AVX-512 loop). Weight rows past the last whole
 * block of 32 take the AVX-512 loop on a dequantized copy (bf16: in place). Returns 0, or -1 for
 * arguments it does not take (or no memory). */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
int mllama_gemm_amx(int fmt, const uint16_t *x, int64_t m, int64_t n, int64_t k, int64_t k_out, const void *w,
                    const void *scale, const void *offset, int scale_bf16, int64_t group, float *out, int threads) {
    if (fmt < 0 || fmt > 2 || m < 1 || n < 1 || k_out < 32 || k_out % 32 || k_out > k) return -1;
    if (fmt != FMT_INT4 && k_out != k) return -1;
    if (fmt == FMT_INT4 && (group < 32 || group % 32 || k % group)) return -1;
    const tile_config cfg = amx_config_16x64();
    if (fmt == FMT_INT8 && k % 64 == 0 && k <= AMX_INT8_MAX_K && mllama_amx_int8_usable())
        return gemm_amx_int8(x, m, n, k, (const int8_t *)w, scale, scale_bf16, out, threads, &cfg);
    if (m > AMX_MAX_M) return -1;
    const int64_t mtiles = (m + 15) / 16, kblocks = k_out / 32;
    /* (m tiles, k / 32, 16, 16) pairs: [tile of x][k block][pair of k][row of x in the tile], 0 past m */
    const size_t bytes = (size_t)(mtiles * kblocks) * 1024;
    uint32_t *xpack = aligned_alloc(64, bytes);
    if (!xpack) return -1;
    memset(xpack, 0, bytes);
    for (int64_t j = 0; j < m; j++) {
        const uint32_t *pairs = (const uint32_t *)(x + j * k_out);
        uint32_t *tile = xpack + (j / 16) * kblocks * 256 + j % 16;
        for (int64_t p = 0; p < k_out / 2; p++) tile[(p / 16) * 256 + (p % 16) * 16] = pairs[p];
    }
    const int64_t blocks = n / AMX_ROWS;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        uint16_t *buf = fmt == FMT_BF16 ? NULL : aligned_alloc(64, (size_t)(AMX_ROWS * k_out) * 2);
        if (fmt != FMT_BF16 && !buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            _tile_loadconfig(&cfg);
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t row0 = b * AMX_ROWS;
                if (fmt == FMT_BF16) {
                    const uint16_t *w0 = (const uint16_t *)w + row0 * k;
                    amx_block(w0, w0 + 16 * k, k * 2, xpack, out, row0, m, n, k_out);
                } else {
                    amx_dequant(fmt, w, scale, offset, scale_bf16, k, group, k_out, row0, row0 + AMX_ROWS, buf);
                    amx_block(buf, buf + 16 * k_out, k_out * 2, xpack, out, row0, m, n, k_out);
                }
            }
            _tile_release();
#pragma omp for schedule(static)
            for (int64_t row = blocks * AMX_ROWS; row < n; row++) {
                const uint16_t *wrow = (const uint16_t *)w + row * k;
                if (fmt != FMT_BF16) {
                    amx_dequant(fmt, w, scale, offset, scale_bf16, k, group, k_out, row, row + 1, buf);
                    wrow = buf;
                }
                for (int64_t j = 0; j < m; j++) out[j * n + row] = dot_bf16_avx512(x + j * k_out, wrow, k_out);
            }
        }
        free(buf);
    }
    free(xpack);
    return failed ? -1 : 0;
}
