/* Products of bf16 x against bf16, int8 or int4 weights on AMX tiles (Intel Sapphire Rapids and
 * later): the engine's batched decode steps and short prompts (2 to 64 rows of x), and int8 and int4
 * weights through the AMX-INT8 tiles, where the CPU has them, for any number of rows:
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
 * the AMX-INT8 tiles below do not take are first dequantized, a block of 32 rows at a time, into a
 * buffer of the thread's that stays in its cache (the same bf16 values as mllama_dequant_int4 / _int8
 * give). x, packed once per call into
 * pairs of k (the second operand's layout), fills 16 columns per tile; a tile product costs the same
 * for 1 or 16 of them, so up to 16 rows of x stream the weights once at memory speed. Past 16 rows,
 * each weight tile meets every tile of x (up to four) per pass over k (amx_block). Each output is its
 * own row of x against the weights, summed in one order: a row gets the same bits in any batch. */
#ifndef AMX_APART
/* int4: blocks of 32 weight rows AMX_APART apart, taken in turn by one work item, so the item reads
 * runs of AMX_APART consecutive rows from start to end (as gemm_small.c's one-row loops; 2 streamed
 * faster than 1 or 4 at 4-64 rows of x, benchmarks/RESULTS.md) */
#define AMX_APART 2
#endif
#define AMX_ROWS 32        /* weight rows per block: two tiles (streamed faster than one or four) */
#define AMX_MAX_M 64       /* rows of x per call (torch's GEMM wins from about 128); the int8 tiles' chunk */

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

/* Row j of x, as `words` 32-bit words (pairs of bf16 or quads of bytes along k), into the second
 * operand's layout: tiles (m tiles, words / 16, 16, 16) = [tile of x][k block][word in the block][row j % 16]. */
static void pack_row(const uint32_t *row, int64_t words, uint32_t *tiles, int64_t j) {
    uint32_t *at = tiles + (j / 16) * (words / 16) * 256 + j % 16;
    for (int64_t q = 0; q < words; q++) at[(q / 16) * 256 + (q % 16) * 16] = row[q];
}

/* 32 bf16 weight rows (w0: the first 16, w1: the next, `stride` bytes between rows) against every
 * row of x (xpack: (m tiles, k / 32, 16, 16) pairs of k), to out's columns row0 ... row0 + 31. Past 16
 * rows of x, each 16 weight rows meet every tile of x (up to four, one result tile each) in one pass
 * over k, so the weights stream from memory once whatever the rows: two x tiles against both weight
 * tiles per pass (four results) read the block a second time for a third or fourth x tile, and
 * each tile load there waited on the products that read the tile before it. */
__attribute__((target("amx-tile,amx-bf16,avx512f")))
static void amx_block(const uint16_t *w0, const uint16_t *w1, int64_t stride, const uint32_t *xpack, float *out,
                      int64_t row0, int64_t m, int64_t n, int64_t k) {
    const int64_t kblocks = k / 32, mt = (m + 15) / 16;
    float c[4][16][16] __attribute__((aligned(64)));  /* [result tile][weight row][column of x] */
    const uint32_t *x0 = xpack, *x1 = x0 + kblocks * 256, *x2 = x1 + kblocks * 256, *x3 = x2 + kblocks * 256;
    if (mt == 1) {
        /* One tile of x: the weight tiles one after the other (16 rows streaming side by side, not
         * 32), their loads alternating between two registers so that a load need not wait for the
         * product reading the tile before it. */
        for (int h = 0; h < 2; h++) {
            const uint16_t *w = h ? w1 : w0;
            _tile_zero(0);
            int64_t kb = 0;
            for (; kb + 1 < kblocks; kb += 2) {
                _tile_loadd(6, x0 + kb * 256, 64);
                _tile_loadd(4, w + kb * 32, stride);
                _tile_dpbf16ps(0, 4, 6);
                _tile_loadd(7, x0 + kb * 256 + 256, 64);
                _tile_loadd(5, w + kb * 32 + 32, stride);
                _tile_dpbf16ps(0, 5, 7);
            }
            if (kb < kblocks) {
                _tile_loadd(6, x0 + kb * 256, 64);
                _tile_loadd(4, w + kb * 32, stride);
                _tile_dpbf16ps(0, 4, 6);
            }
            _tile_stored(0, c[0], 64);
            amx_put(c[0], out, n, row0 + 16 * h, 0, m);
        }
        return;
    }
    for (int h = 0; h < 2; h++) {  /* weight tile h against x tiles 0 .. mt - 1: results in tiles 0 .. 3 */
        const uint16_t *w = h ? w1 : w0;
        _tile_zero(0);
        _tile_zero(1);
        if (mt > 2) _tile_zero(2);
        if (mt > 3) _tile_zero(3);
        for (int64_t kb = 0; kb < kblocks; kb++) {
            _tile_loadd(4, w + kb * 32, stride);
            _tile_loadd(5, x0 + kb * 256, 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, x1 + kb * 256, 64);
            _tile_dpbf16ps(1, 4, 6);
            if (mt > 2) {
                _tile_loadd(7, x2 + kb * 256, 64);
                _tile_dpbf16ps(2, 4, 7);
            }
            if (mt > 3) {
                _tile_loadd(5, x3 + kb * 256, 64);
                _tile_dpbf16ps(3, 4, 5);
            }
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        if (mt > 2) _tile_stored(2, c[2], 64);
        if (mt > 3) _tile_stored(3, c[3], 64);
        for (int64_t t = 0; t < mt; t++)
            amx_put(c[t], out, n, row0 + 16 * h, 16 * t, m - 16 * t < 16 ? m - 16 * t : 16);
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
        pack_row((const uint32_t *)(hi8 + j * k), k / 4, hi, j);
        pack_row((const uint32_t *)(lo8 + j * k), k / 4, lo, j);
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

/* ---- int4 weights on the AMX-INT8 tiles -----------------------------------------------------------
 * A group's scale cannot leave the tile product the way int8's one scale per row does, so each group
 * gets its own integer sums: x is rounded to int8 per group of each row (step max|x| / 127, as the
 * small-row int4 kernels round it); per block of 32 weight rows and group, the group's nibbles are
 * unpacked into the thread's buffer as q - 8 (signed bytes: the 32 rows stream side by side) and the
 * tile products D = sum (q - 8) xq are stored and folded into float sums, lane by lane over the rows
 * of x (1.6-2x the dequantize-to-bf16 route at 2-16 rows; benchmarks/RESULTS.md):
 *   out = sum_g [ s sx D + (8 s + z) sum x ]
 * (the centring of gemm_small.c's int4 paths: x's rounding meets |q - 8| <= 8 only). */
typedef struct {
    const uint32_t *xq;   /* (m tiles, k / 64, 16, 16): xq in the tiles' layout */
    const float *sx;      /* (m tiles, groups, 16): each group's step, per row of x (0 past m) */
    const float *xsum;    /* (m tiles, groups, 16): each group's sum of x */
    int64_t groups, group;
} x8desc;

/* One row of x (bf16, k_out values) -> xq (k values, zero past k_out), per group its step and sum. */
__attribute__((target("avx512f,avx512bw")))
static void split_x8(const uint16_t *x, int64_t k_out, int64_t k, int64_t group, int8_t *xq, float *sx,
                     float *xsum, int64_t stride) {
    for (int64_t g0 = 0, g = 0; g0 < k; g0 += group, g++) {
        __m512 most = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
        for (int64_t i = g0; i < g0 + group && i < k_out; i += 16) {
            const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i))), 16));
            most = _mm512_max_ps(most, _mm512_abs_ps(v));
            sum = _mm512_add_ps(sum, v);
        }
        const float top = _mm512_reduce_max_ps(most);
        const __m512 inv = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
        for (int64_t i = g0; i < g0 + group; i += 16) {
            if (i >= k_out) {
                _mm_storeu_si128((__m128i *)(xq + i), _mm_setzero_si128());
                continue;
            }
            const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i))), 16));
            _mm_storeu_si128((__m128i *)(xq + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv))));
        }
        sx[g * stride] = top > 0.0f ? top / 127.0f : 0.0f;
        xsum[g * stride] = _mm512_reduce_add_ps(sum);
    }
}

/* One group of 32 rows of int4 nibbles (w: the group's first byte in the first row, `row_bytes` apart)
 * -> buf (32 rows of `group` signed bytes q - 8). */
__attribute__((target("avx512f,avx512bw")))
static void unpack_int4_group(const uint8_t *w, int64_t row_bytes, int64_t group, int8_t *buf) {
    const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    /* 4 runs of 32 values in 64 bytes: low nibbles (values j) and high ones (16 + j) back in order */
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), second = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
    for (int r = 0; r < 32; r++) {
        const uint8_t *src = w + r * row_bytes;
        int8_t *dst = buf + r * group;
        int64_t i = 0;
        for (; i + 128 <= group; i += 128) {
            const __m512i v = _mm512_loadu_si512(src + i / 2);
            const __m512i lo = _mm512_sub_epi8(_mm512_and_si512(v, low), eight);
            const __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), eight);
            _mm512_storeu_si512(dst + i, _mm512_permutex2var_epi64(lo, first, hi));
            _mm512_storeu_si512(dst + i + 64, _mm512_permutex2var_epi64(lo, second, hi));
        }
        if (i < group) {  /* 64 values left (groups of 64 or 192): two runs in 32 bytes */
            const __m256i v = _mm256_loadu_si256((const __m256i *)(src + i / 2));
            const __m256i lo = _mm256_sub_epi8(_mm256_and_si256(v, _mm512_castsi512_si256(low)), _mm512_castsi512_si256(eight));
            const __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 4), _mm512_castsi512_si256(low)),
                                               _mm512_castsi512_si256(eight));
            _mm256_storeu_si256((__m256i *)(dst + i), _mm256_permute2x128_si256(lo, hi, 0x20));
            _mm256_storeu_si256((__m256i *)(dst + i + 32), _mm256_permute2x128_si256(lo, hi, 0x31));
        }
    }
}

/* 32 int4 weight rows (w: the first, `apart` rows of k / 2 bytes apart) against every row of x, to
 * out's columns row0, row0 + apart, ...: group by group, the group's nibbles unpacked into buf (32
 * rows of it: the 32 rows stream from memory side by side), then per tile of x its sums D folded
 * into acc. */
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw")))
static void amx_block_int4(const uint8_t *w, int64_t k, int64_t apart, const x8desc *x, int64_t j0, int64_t j1,
                           const float *sf, const float *of, int8_t *buf, float *acc, int64_t row0, float *out, int64_t n) {
    const int64_t kblocks = k / 64, group = x->group, per_group = group / 64;
    const int64_t t0 = j0 / 16, mtiles = (j1 - j0 + 15) / 16;
    memset(acc, 0, (size_t)(mtiles * 32 * 16) * sizeof(float));
    int32_t c[2][16][16] __attribute__((aligned(64)));
    for (int64_t g = 0; g < x->groups; g++) {
        unpack_int4_group(w + g * group / 2, apart * (k / 2), group, buf);
        for (int64_t t = 0; t < mtiles; t++) {
            const uint32_t *xt = x->xq + (t0 + t) * kblocks * 256;
            _tile_zero(0);
            _tile_zero(1);
            for (int64_t kb = 0; kb < per_group; kb++) {
                _tile_loadd(6, xt + (g * per_group + kb) * 256, 64);
                _tile_loadd(4, buf + kb * 64, group);
                _tile_dpbssd(0, 4, 6);
                _tile_loadd(5, buf + 16 * group + kb * 64, group);
                _tile_dpbssd(1, 5, 6);
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            const __m512 sxv = _mm512_loadu_ps(x->sx + ((t0 + t) * x->groups + g) * 16);
            const __m512 sumv = _mm512_loadu_ps(x->xsum + ((t0 + t) * x->groups + g) * 16);
            float *a = acc + t * 32 * 16;
            for (int r = 0; r < 32; r++) {
                const __m512 d = _mm512_cvtepi32_ps(_mm512_load_si512(c[r / 16][r % 16]));
                __m512 v = _mm512_fmadd_ps(d, _mm512_mul_ps(_mm512_set1_ps(sf[r * x->groups + g]), sxv),
                                           _mm512_load_ps(a + r * 16));
                _mm512_store_ps(a + r * 16, _mm512_fmadd_ps(_mm512_set1_ps(of[r * x->groups + g]), sumv, v));
            }
        }
    }
    for (int64_t j = j0; j < j1; j++)
        for (int r = 0; r < 32; r++) out[j * n + row0 + r * apart] = acc[(((j - j0) / 16) * 32 + r) * 16 + j % 16];
}

/* mllama_gemm_amx for int4 weights through the int8 tiles: groups a multiple of 64, n a multiple of
 * AMX_ROWS, any m (work items of a block of weight rows and up to AMX_MAX_M rows of x, as int8's). */
__attribute__((target("amx-tile,amx-int8,avx512f,avx512bw")))
static int gemm_amx_int4(const uint16_t *x, int64_t m, int64_t n, int64_t k, int64_t k_out, const uint8_t *w,
                         const void *scale, const void *offset, int scale_bf16, int64_t group, float *out, int threads,
                         const tile_config *cfg) {
    const int64_t mtiles = (m + 15) / 16, kblocks = k / 64, groups = k / group;
    uint32_t *xq = aligned_alloc(64, (size_t)(mtiles * kblocks) * 1024);
    float *sx = calloc((size_t)(mtiles * groups * 16) * 2, sizeof(float));
    int8_t *rowq = malloc((size_t)k);
    if (!xq || !sx || !rowq) {
        free(xq);
        free(sx);
        free(rowq);
        return -1;
    }
    float *xsum = sx + mtiles * groups * 16;
    memset(xq, 0, (size_t)(mtiles * kblocks) * 1024);
    for (int64_t j = 0; j < m; j++) {
        const int64_t t = j / 16, col = j % 16;
        split_x8(x + j * k_out, k_out, k, group, rowq, sx + t * groups * 16 + col, xsum + t * groups * 16 + col, 16);
        pack_row((const uint32_t *)rowq, k / 4, xq, j);
    }
    free(rowq);
    const x8desc xd = {xq, sx, xsum, groups, group};
    /* items: super-blocks of AMX_APART * 32 rows (as AMX_APART blocks of 32 rows AMX_APART apart, in
     * turn), then the blocks of 32 rows left */
    const int64_t supers = n / (AMX_APART * AMX_ROWS), rest = (n - supers * AMX_APART * AMX_ROWS) / AMX_ROWS;
    const int64_t blocks = supers + rest, chunks = (m + AMX_MAX_M - 1) / AMX_MAX_M;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int8_t *buf = aligned_alloc(64, (size_t)(AMX_ROWS * group));
        float *sf = malloc((size_t)(AMX_ROWS * groups) * 2 * sizeof(float)), *of = sf + AMX_ROWS * groups;
        float *acc = aligned_alloc(64, (size_t)(AMX_MAX_M * AMX_ROWS) * sizeof(float));
        if (!buf || !sf || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            _tile_loadconfig(cfg);
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t item = 0; item < chunks * blocks; item++) {
                const int64_t b = item % blocks, j0 = item / blocks * AMX_MAX_M;
                const int64_t apart = b < supers ? AMX_APART : 1;
                const int64_t first = b < supers ? b * AMX_APART * AMX_ROWS : supers * AMX_APART * AMX_ROWS + (b - supers) * AMX_ROWS;
                for (int64_t a = 0; a < apart; a++) {
                    for (int64_t r = 0; r < AMX_ROWS; r++)  /* the block's scales and offsets, (32, groups) */
                        for (int64_t g = 0; g < groups; g++) {
                            const int64_t p = (first + a + r * apart) * groups + g;
                            const float sc = param(scale, p, scale_bf16);
                            sf[r * groups + g] = sc;
                            of[r * groups + g] = 8.0f * sc + param(offset, p, scale_bf16);
                        }
                    amx_block_int4(w + (first + a) * (k / 2), k, apart, &xd, j0, m < j0 + AMX_MAX_M ? m : j0 + AMX_MAX_M,
                                   sf, of, buf, acc, first + a, out, n);
                }
            }
            _tile_release();
        }
        free(buf);
        free(sf);
        free(acc);
    }
    free(xq);
    free(sx);
    return failed ? -1 : 0;
}

/* out (m, n) float32 = x (m, k_out) bf16 @ W ^T for W (n, k) in `fmt` (k the stored row length, k_out
 * the real in_features: k for bf16 and int8, k_out <= k for int4), k_out a multiple of 32. With
 * AMX-INT8, int8 weights with k a multiple of 64 take the int8 tiles (any m), and int4 weights with
 * groups of a multiple of 64 and n a multiple of AMX_ROWS take them too (any m; x rounded to int8 per
 * group);
 * everything else m <= AMX_MAX_M dequantized to bf16 (the caller sends 2 or more rows: one streams
 * faster through the AVX-512 loop). Weight rows past the last whole block of 32 take the AVX-512 loop
 * on a dequantized copy (bf16: in place). Returns 0, or -1 for arguments it does not take (or no
 * memory). */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
int mllama_gemm_amx(int fmt, const uint16_t *x, int64_t m, int64_t n, int64_t k, int64_t k_out, const void *w,
                    const void *scale, const void *offset, int scale_bf16, int64_t group, float *out, int threads) {
    if (fmt < 0 || fmt > 2 || m < 1 || n < 1 || k_out < 32 || k_out % 32 || k_out > k) return -1;
    if (fmt != FMT_INT4 && k_out != k) return -1;
    if (fmt == FMT_INT4 && (group < 32 || group % 32 || k % group)) return -1;
    const tile_config cfg = amx_config_16x64();
    if (fmt == FMT_INT8 && k % 64 == 0 && k <= AMX_INT8_MAX_K && mllama_amx_int8_usable())
        return gemm_amx_int8(x, m, n, k, (const int8_t *)w, scale, scale_bf16, out, threads, &cfg);
    if (fmt == FMT_INT4 && group % 64 == 0 && n % AMX_ROWS == 0 && mllama_amx_int8_usable())
        return gemm_amx_int4(x, m, n, k, k_out, (const uint8_t *)w, scale, offset, scale_bf16, group, out, threads, &cfg);
    if (m > AMX_MAX_M) return -1;
    const int64_t mtiles = (m + 15) / 16, kblocks = k_out / 32;
    /* (m tiles, k / 32, 16, 16) pairs: [tile of x][k block][pair of k][row of x in the tile], 0 past m */
    const size_t bytes = (size_t)(mtiles * kblocks) * 1024;
    uint32_t *xpack = aligned_alloc(64, bytes);
    if (!xpack) return -1;
    memset(xpack, 0, bytes);
    for (int64_t j = 0; j < m; j++) pack_row((const uint32_t *)(x + j * k_out), k_out / 2, xpack, j);
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
