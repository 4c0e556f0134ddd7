/* Matrix-vector products for decoding: out (M, N) float32 = x (M, K) bf16 @ w (N, K) bf16 ^T, M small.
 *
 * Decoding one token reads every weight once, so its speed is the rate at which the weights stream
 * from memory. Threads take blocks of 8 weight rows (dynamically, so a thread slowed by another
 * process does not hold the rest back) and read the 8 rows side by side, one accumulator each;
 * measured on an AMD EPYC (Zen 5) this streamed faster than one row at a time or 2-4 rows. Up to
 * three rows of x, a block's rows lie ONE_APART apart (8 sequential runs per work item of 256 rows):
 * on another AMD EPYC (Zen 4) 8 consecutive rows streamed at 0.70 of torch's read rate, 32 apart at
 * 0.79-0.86 (benchmarks/RESULTS.md).
 * The block is then reused (from cache) for the M input rows, three at a time with AVX-512 BF16 (so
 * one weight load feeds three products; from four rows a KC-value chunk of the block at a time, kept
 * in L1), one at a time with AVX2. With AVX-512 BF16, mllama_gemv_quant runs the same passes over
 * int8 or int4 weights (csrc/gemm_small.c's formats) dequantized a chunk at a time into L1 (for
 * batched decode on CPUs without AMX). Accumulation is in float32,
 * as in the library GEMM. Built at first use by mllama/cpu_kernels.py; the OpenMP runtime is the
 * one torch already loaded (same soname), so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "dequant.h"

#define BLOCK 8
#ifndef ONE_APART
#define ONE_APART 32
#endif
#ifndef PREFETCH
#define PREFETCH 512  /* bytes ahead in each weight row (2-4 rows of x: +11-14%; benchmarks/RESULTS.md) */
#endif

/* AVX-512 BF16: vdpbf16ps multiplies pairs of bf16 and adds both products to float32 lanes.
 * ROWS rows of w (ws apart) against XR rows of x (xs apart), one accumulator per pair (so each weight
 * vector loaded serves XR rows), over the first len values from x and w; the sums start at zero
 * (first) or from `part`, and go back to part[r * XR + j]. Only the last partial vector of 32 is
 * loaded masked (masked loads on every step streamed 38 GB/s against 45 unmasked:
 * benchmarks/RESULTS.md). Each pair's sum is taken in one order whatever XR and the chunks are: a
 * row's result does not depend on the rows beside it. Prefetch: phase -1, PREFETCH bytes ahead in
 * each weight row (the pass that streams from memory); phase >= 0, the values at the same offset from
 * `pf` (rows ws apart: the next chunk), those before pf_len, into L2 in the k-steps with
 * step % every == phase; else none. */
#define KC 1024
#define NO_PREFETCH (-2)
#define DEFINE_AVX512(NAME, ROWS, XR)                                                               \
    __attribute__((target("avx512f,avx512bw,avx512bf16")))                                          \
    static void NAME(const uint16_t *x, int64_t xs, const uint16_t *w, int64_t ws, int64_t len,      \
                     __m512 *part, int first, int phase, int every, const uint16_t *pf, int64_t pf_len) { \
        __m512 acc[ROWS][XR];                                                                       \
        for (int r = 0; r < ROWS; r++)                                                              \
            for (int j = 0; j < XR; j++) acc[r][j] = first ? _mm512_setzero_ps() : part[r * XR + j]; \
        const int64_t main_len = len / 32 * 32;                                                     \
        int step = 0;                                                                               \
        for (int64_t i = 0; i < main_len; i += 32, step++) {                                        \
            __m512bh xv[XR];                                                                        \
            for (int j = 0; j < XR; j++) xv[j] = (__m512bh)_mm512_loadu_si512((const void *)(x + j * xs + i)); \
            const int ahead = phase >= 0 && step % every == phase && i < pf_len;                    \
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                \
                if (phase == -1) __builtin_prefetch((const char *)(w + r * ws + i) + PREFETCH);      \
                else if (ahead) _mm_prefetch((const char *)(pf + r * ws + i), _MM_HINT_T1);          \
                const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + r * ws + i));   \
                for (int j = 0; j < XR; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);    \
            }                                                                                       \
        }                                                                                           \
        if (main_len < len) {  /* the last partial vector of 32 */                                  \
            const __mmask32 take = (__mmask32)((1u << (len - main_len)) - 1);                       \
            __m512bh xv[XR];                                                                        \
            for (int j = 0; j < XR; j++) xv[j] = (__m512bh)_mm512_maskz_loadu_epi16(take, x + j * xs + main_len); \
            for (int r = 0; r < ROWS; r++) {                                                        \
                const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(take, w + r * ws + main_len); \
                for (int j = 0; j < XR; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);    \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < ROWS; r++)                                                              \
            for (int j = 0; j < XR; j++) part[r * XR + j] = acc[r][j];                              \
    }
DEFINE_AVX512(avx512_block_x3, BLOCK, 3)
DEFINE_AVX512(avx512_block_x2, BLOCK, 2)
DEFINE_AVX512(avx512_block_x1, BLOCK, 1)
DEFINE_AVX512(avx512_one_x1, 1, 1)

typedef void (*avx512_pass)(const uint16_t *, int64_t, const uint16_t *, int64_t, int64_t, __m512 *, int, int, int,
                            const uint16_t *, int64_t);
static const avx512_pass BLOCK_PASSES[4] = {NULL, avx512_block_x1, avx512_block_x2, avx512_block_x3};

/* One row of x against one weight row (the last n % BLOCK rows). */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void avx512_one_row(const uint16_t *x, const uint16_t *w, float *out, int64_t k) {
    __m512 sum;
    avx512_one_x1(x, k, w, k, k, &sum, 1, -1, 1, NULL, 0);
    *out = _mm512_reduce_add_ps(sum);
}

#define MAX_M 16  /* rows of x a pass over a block takes at once (their sums: MAX_M x BLOCK vectors) */

/* The sums of m rows of x (groups of three, as the passes took them) against BLOCK weight rows from
 * `row`, into out (m, n). */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void store_block(const __m512 *part, float *out, int64_t m, int64_t n, int64_t row, int64_t apart) {
    for (int64_t j = 0; j < m;) {
        const int64_t xr = m - j < 3 ? m - j : 3;
        for (int64_t r = 0; r < BLOCK; r++)
            for (int64_t jj = 0; jj < xr; jj++)
                out[(j + jj) * n + row + r * apart] = _mm512_reduce_add_ps(part[j * BLOCK + r * xr + jj]);
        j += xr;
    }
}

/* All m rows of x against one block of 8 weight rows at `row`, three rows of x a pass (two or one for
 * the rest), MAX_M at a time (each slice past the first reads the block again from cache). Up to three
 * rows: one pass over all of k, streaming with the in-row prefetch. From four: k in chunks of KC, each
 * (8 x KC bf16) staying in L1 while every group passes over it, the sums kept in `part` between chunks
 * (the same bits as one pass); the first group of the first chunk streams the weights, the later
 * groups of every chunk prefetch a share each of the next chunk into L2, so that memory streams while
 * they compute and the next chunk's first group finds it there. Against the block read whole per
 * group (the later passes from L2, the first not overlapping them): 16 rows 1.25x, 12 rows 1.1x on
 * the AMD EPYC (RESULTS.md). */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void avx512_block(const uint16_t *x, const uint16_t *w, float *out, int64_t m, int64_t n, int64_t k,
                         int64_t row, int64_t apart) {
    if (m > MAX_M) {
        for (int64_t j0 = 0; j0 < m; j0 += MAX_M)
            avx512_block(x + j0 * k, w, out + j0 * n, m - j0 < MAX_M ? m - j0 : MAX_M, n, k, row, 1);
        return;
    }
    const uint16_t *wb = w + row * k;  /* the block's rows `apart` apart (1 from four rows of x) */
    __m512 part[MAX_M * BLOCK];  /* group j's sums at part[j * BLOCK]: BLOCK x (its rows of x) */
    const int groups = (int)((m + 2) / 3);
    const int64_t chunk = groups == 1 ? k : KC, kmain = k / 32 * 32;
    for (int64_t i0 = 0; i0 < k; i0 += chunk) {
        const int64_t len = i0 + chunk < k ? chunk : k - i0;
        for (int64_t j = 0, g = 0; j < m; g++) {
            const int64_t xr = m - j < 3 ? m - j : 3;
            const int phase = g > 0 ? (int)(g - 1) : i0 == 0 ? -1 : NO_PREFETCH;
            BLOCK_PASSES[xr](x + j * k + i0, k, wb + i0, apart * k, len, part + j * BLOCK, i0 == 0, phase, groups - 1,
                             wb + i0 + KC, kmain - i0 - KC);
            j += xr;
        }
    }
    store_block(part, out, m, n, row, apart);
}

/* Quantized weights (csrc/gemm_small.c's int8 and int4 formats) against bf16 x with AVX-512 BF16:
 * each chunk of KC values of a block's weight rows is dequantized to bf16 into an L1 buffer (the
 * values mllama_dequant_int8 / _int4 give, dequant.h's row loops) and every row of x passes over it
 * as above. So the result is that of this kernel on the dequantized weight, bit for bit, in any
 * batch, at a quarter (int4) or half (int8) of the bytes from memory. */

/* Weight rows [row, row + rows) over values [i0, i0 + len) -> buf (rows, KC) bf16. Each row's bytes
 * of the next chunk (or, after the last, of the next block's first) are prefetched first: a chunk is
 * a short run of each of 8 rows, too short for the hardware prefetcher to run ahead. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void dequant_chunk(const qweight *q, int64_t k, int64_t row, int64_t rows, int64_t i0, int64_t len,
                          uint16_t *buf, int64_t n) {
    const int64_t row_bytes = q->fmt == FMT_INT4 ? k / 2 : k, chunk_bytes = q->fmt == FMT_INT4 ? KC / 2 : KC;
    const int64_t at = q->fmt == FMT_INT4 ? i0 / 2 : i0;
    const int last = i0 + KC >= k;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t next_row = last ? row + r + BLOCK : row + r, next_at = last ? 0 : at + chunk_bytes;
        if (next_row < n) {
            const char *p = (const char *)q->w + next_row * row_bytes + next_at;
            const int64_t bytes = row_bytes - next_at < chunk_bytes ? row_bytes - next_at : chunk_bytes;
            for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
        }
        if (q->fmt == FMT_INT4)
            dequant_int4_row_avx512((const uint8_t *)q->w + (row + r) * (k / 2) + i0 / 2, q->scale, q->offset,
                                    q->scale_bf16, (row + r) * (k / q->group) + i0 / q->group, q->group, len,
                                    buf + r * KC, 1);
        else
            dequant_int8_row_avx512((const int8_t *)q->w + (row + r) * k + i0, param(q->scale, row + r, q->scale_bf16),
                                    len, buf + r * KC, 1);
    }
}

/* All m rows of x (up to MMAX_QUANT) against `rows` (BLOCK, or 1 for the last n % BLOCK) weight rows
 * at `row`: chunk by chunk, dequantized once, then every group of three rows of x over it. */
#define MMAX_QUANT 32
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void avx512_quant_block(const qweight *q, const uint16_t *x, float *out, int64_t m, int64_t n, int64_t k,
                               int64_t row, int64_t rows) {
    uint16_t buf[BLOCK * KC] __attribute__((aligned(64)));
    __m512 part[MMAX_QUANT * BLOCK];
    for (int64_t i0 = 0; i0 < k; i0 += KC) {
        const int64_t len = i0 + KC < k ? KC : k - i0;
        dequant_chunk(q, k, row, rows, i0, len, buf, n);
        for (int64_t j = 0; j < m;) {
            const int64_t xr = rows == 1 ? 1 : m - j < 3 ? m - j : 3;
            (rows == 1 ? avx512_one_x1 : BLOCK_PASSES[xr])(x + j * k + i0, k, buf, KC, len, part + j * BLOCK,
                                                           i0 == 0, NO_PREFETCH, 1, NULL, 0);
            j += xr;
        }
    }
    if (rows == BLOCK) {
        store_block(part, out, m, n, row, 1);
        return;
    }
    for (int64_t j = 0; j < m; j++) out[j * n + row] = _mm512_reduce_add_ps(part[j * BLOCK]);
}

/* AVX2 + FMA: widen bf16 to float32 (a 16-bit shift) and fused multiply-add; scalar tail. */
__attribute__((target("avx2,fma")))
static inline __m256 widen(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

#define DEFINE_AVX2(NAME, ROWS)                                                                     \
    __attribute__((target("avx2,fma")))                                                             \
    static void NAME(const uint16_t *x, const uint16_t *w, float *out, int64_t k) {                  \
        __m256 acc[ROWS];                                                                           \
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();                                \
        const int64_t main_k = k - k % 8;                                                           \
        for (int64_t i = 0; i < main_k; i += 8) {                                                   \
            __m256 xv = widen(x + i);                                                               \
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++)                                  \
                acc[r] = _mm256_fmadd_ps(widen(w + r * k + i), xv, acc[r]);                         \
        }                                                                                           \
        for (int r = 0; r < ROWS; r++) {                                                            \
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1)); \
            s = _mm_hadd_ps(s, s);                                                                  \
            s = _mm_hadd_ps(s, s);                                                                  \
            float total = _mm_cvtss_f32(s);                                                         \
            for (int64_t i = main_k; i < k; i++) total += bf16_to_float(x[i]) * bf16_to_float(w[r * k + i]); \
            out[r] = total;                                                                         \
        }                                                                                           \
    }
DEFINE_AVX2(rows_avx2_block, BLOCK)
DEFINE_AVX2(rows_avx2_one, 1)

/* Which instruction set this CPU can run: 2 = AVX-512 BF16, 1 = AVX2 + FMA, 0 = neither. */
int mllama_gemv_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

void mllama_gemv_bf16(const uint16_t *x, const uint16_t *w, float *out, int64_t m, int64_t n, int64_t k,
                      int threads, int level) {
    const int64_t blocks = n / BLOCK;
    /* up to three rows of x (one pass over k), AVX-512: work items of BLOCK x ONE_APART rows, whose
     * blocks take rows ONE_APART apart, so the item streams as BLOCK runs of consecutive rows */
    const int64_t spread = level == 2 && m <= 3 ? ONE_APART : 1;
    const int64_t spread_blocks = blocks / spread * spread;
#pragma omp parallel num_threads(threads)
    {
        float part[BLOCK];
#pragma omp for schedule(dynamic, 64) nowait
        for (int64_t b = 0; b < blocks; b++) {
            if (level == 2) {
                if (b < spread_blocks)
                    avx512_block(x, w, out, m, n, k, b / spread * spread * BLOCK + b % spread, spread);
                else
                    avx512_block(x, w, out, m, n, k, b * BLOCK, 1);
                continue;
            }
            const int64_t row = b * BLOCK;
            for (int64_t j = 0; j < m; j++) {
                rows_avx2_block(x + j * k, w + row * k, part, k);
                memcpy(out + j * n + row, part, sizeof part);
            }
        }
#pragma omp for schedule(static)
        for (int64_t row = blocks * BLOCK; row < n; row++) {  /* the last n % BLOCK rows */
            for (int64_t j = 0; j < m; j++) {
                if (level == 2)
                    avx512_one_row(x + j * k, w + row * k, out + j * n + row, k);
                else
                    rows_avx2_one(x + j * k, w + row * k, out + j * n + row, k);
            }
        }
    }
}

/* out (m, n) float32 = x (m, k) bf16 @ dequant(w) ^T for int8 (fmt 1) or int4 (fmt 2; k the padded
 * row length, group dividing KC) weights; needs AVX-512 BF16. Returns 0, or -1 for arguments it
 * does not take. */
int mllama_gemv_quant(int fmt, const uint16_t *x, int64_t m, int64_t n, int64_t k, const void *w, const void *scale,
                      const void *offset, int scale_bf16, int64_t group, float *out, int threads) {
    if ((fmt != FMT_INT8 && fmt != FMT_INT4) || m < 1 || m > MMAX_QUANT || n < 1 || k < 1) return -1;
    if (fmt == FMT_INT4 && (group < 32 || group % 32 || KC % group || k % group)) return -1;
    if (mllama_gemv_level() != 2) return -1;
    const qweight q = {fmt, w, scale, offset, scale_bf16, group};
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t row = b * BLOCK;
        if (n - row >= BLOCK)
            avx512_quant_block(&q, x, out, m, n, k, row, BLOCK);
        else
            for (int64_t r = row; r < n; r++) avx512_quant_block(&q, x, out, m, n, k, r, 1);
    }
    return 0;
}
