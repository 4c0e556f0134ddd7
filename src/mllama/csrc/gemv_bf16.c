/* Matrix-vector products for decoding: out (M, N) float32 = x (M, K) bf16 @ w (N, K) bf16 ^T, M small.
 *
 * Decoding one token reads every weight once, so its speed is the rate at which the weights stream
 * from memory. Threads take blocks of 8 weight rows (dynamically, so a thread slowed by another
 * process does not hold the rest back) and read the 8 rows side by side, one accumulator each;
 * measured on the project's AMD EPYC this streamed faster than one row at a time or 2-4 rows.
 * The block is then reused (from cache) for the M input rows, three at a time with AVX-512 BF16 (so
 * one weight load feeds three products: past a few rows this CPU is bound by the products, not by
 * memory), one at a time with AVX2. Accumulation is in float32,
 * as in the library GEMM. Built at first use by mllama/cpu_kernels.py; the OpenMP runtime is the
 * one torch already loaded (same soname), so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 8
#ifndef PREFETCH
#define PREFETCH 512  /* bytes ahead in each weight row (2-4 rows of x: +11-14%; benchmarks/RESULTS.md) */
#endif

static float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* AVX-512 BF16: vdpbf16ps multiplies pairs of bf16 and adds both products to float32 lanes.
 * ROWS rows of w starting at w, against XR rows of x (x_stride apart), one accumulator per pair, so
 * each weight vector loaded serves XR rows; out[j * n + r]. Only the last partial vector of 32 is
 * loaded masked (masked loads on every step streamed 38 GB/s against 45 unmasked: benchmarks/RESULTS.md).
 * Each pair's sum is taken in the same order whatever XR is: a row's result does not depend on
 * the rows beside it. PF: prefetch ahead in the weight rows (the first pass over a block, from
 * memory; the later passes find the block in cache). */
#define DEFINE_AVX512(NAME, ROWS, XR, PF)                                                           \
    __attribute__((target("avx512f,avx512bw,avx512bf16")))                                          \
    static void NAME(const uint16_t *x, const uint16_t *w, float *out, int64_t n, int64_t k) {       \
        __m512 acc[ROWS][XR];                                                                       \
        for (int r = 0; r < ROWS; r++)                                                              \
            for (int j = 0; j < XR; j++) acc[r][j] = _mm512_setzero_ps();                           \
        const int64_t kmain = k / 32 * 32;  /* plain loads there: masked ones every step were slower */ \
        for (int64_t i = 0; i < kmain; i += 32) {                                                   \
            __m512bh xv[XR];                                                                        \
            for (int j = 0; j < XR; j++) xv[j] = (__m512bh)_mm512_loadu_si512((const void *)(x + j * k + i)); \
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                \
                if (PF) __builtin_prefetch((const char *)(w + r * k + i) + PREFETCH);                \
                const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + r * k + i));    \
                for (int j = 0; j < XR; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);    \
            }                                                                                       \
        }                                                                                           \
        for (int64_t i = kmain; i < k; i += 32) {                                                   \
            const __mmask32 take = k - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (k - i)) - 1); \
            __m512bh xv[XR];                                                                        \
            for (int j = 0; j < XR; j++) xv[j] = (__m512bh)_mm512_maskz_loadu_epi16(take, x + j * k + i); \
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                \
                const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(take, w + r * k + i);        \
                for (int j = 0; j < XR; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);    \
            }                                                                                       \
        }                                                                                           \
        for (int j = 0; j < XR; j++)                                                                \
            for (int r = 0; r < ROWS; r++) out[j * n + r] = _mm512_reduce_add_ps(acc[r][j]);        \
    }
/* Three rows of x a pass: 24 accumulators, a weight vector and three of x fill the 32 registers; on
 * the AMD EPYC (Zen 5) 16 rows of x stream 1.8x the one-row-at-a-time passes and 1.1x torch's GEMM
 * (benchmarks/RESULTS.md). */
DEFINE_AVX512(avx512_block_x3, BLOCK, 3, 1)
DEFINE_AVX512(avx512_block_x3_cached, BLOCK, 3, 0)
DEFINE_AVX512(avx512_block_x2, BLOCK, 2, 1)
DEFINE_AVX512(avx512_block_x2_cached, BLOCK, 2, 0)
DEFINE_AVX512(avx512_block_x1, BLOCK, 1, 1)
DEFINE_AVX512(avx512_block_x1_cached, BLOCK, 1, 0)
DEFINE_AVX512(avx512_one_x1, 1, 1, 1)

/* All m rows of x against one block of 8 weight rows at `row`, XGROUP rows of x a pass. */
static void avx512_block(const uint16_t *x, const uint16_t *w, float *out, int64_t m, int64_t n, int64_t k,
                         int64_t row) {
    for (int64_t j = 0; j < m;) {
        const int64_t left = m - j;
        const int first = j == 0;
        const uint16_t *xj = x + j * k, *wb = w + row * k;
        float *o = out + j * n + row;
        if (left >= 3) {
            (first ? avx512_block_x3 : avx512_block_x3_cached)(xj, wb, o, n, k);
            j += 3;
        } else if (left == 2) {
            (first ? avx512_block_x2 : avx512_block_x2_cached)(xj, wb, o, n, k);
            j += 2;
        } else {
            (first ? avx512_block_x1 : avx512_block_x1_cached)(xj, wb, o, n, k);
            j += 1;
        }
    }
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
#pragma omp parallel num_threads(threads)
    {
        float part[BLOCK];
#pragma omp for schedule(dynamic, 64) nowait
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t row = b * BLOCK;
            if (level == 2) {
                avx512_block(x, w, out, m, n, k, row);
                continue;
            }
            for (int64_t j = 0; j < m; j++) {
                rows_avx2_block(x + j * k, w + row * k, part, k);
                memcpy(out + j * n + row, part, sizeof part);
            }
        }
#pragma omp for schedule(static)
        for (int64_t row = blocks * BLOCK; row < n; row++) {  /* the last n % BLOCK rows */
            for (int64_t j = 0; j < m; j++) {
                if (level == 2)
                    avx512_one_x1(x + j * k, w + row * k, out + j * n + row, n, k);
                else
                    rows_avx2_one(x + j * k, w + row * k, out + j * n + row, k);
            }
        }
    }
}
