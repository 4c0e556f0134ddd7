/* Matrix-vector products for decoding: out (M, N) float32 = x (M, K) bf16 @ w (N, K) bf16 ^T, M small.
 *
 * Decoding one token reads every weight once, so its speed is the rate at which the weights stream
 * from memory. Each thread takes a block of four weight rows, streams them once from memory, and
 * reuses them (from cache) for the M input rows. Accumulation is in float32 (products of bf16 are
 * exact in float32), as in the library GEMM. Built at first use by mllama/cpu_kernels.py; the
 * OpenMP runtime is the one torch already loaded (same soname), so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define ROWS 4

static float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* AVX-512 BF16: vdpbf16ps multiplies pairs of bf16 and adds both products to float32 lanes. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void block_avx512bf16(const uint16_t *x, const uint16_t *w, float *out, int64_t m_rows, int64_t n0,
                             int64_t rows, int64_t n, int64_t k) {
    const int64_t main_k = k - k % 32;
    const __mmask32 tail = (__mmask32)((1ull << (k % 32)) - 1);
    for (int64_t m = 0; m < m_rows; m++) {
        const uint16_t *xm = x + m * k;
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        if (rows == ROWS) {  /* constant trip count: the accumulators stay in registers */
            for (int64_t i = 0; i < main_k; i += 32) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + i);
#pragma GCC unroll 4
                for (int r = 0; r < ROWS; r++)
                    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + (n0 + r) * k + i), xv);
            }
        } else {
            for (int64_t i = 0; i < main_k; i += 32) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + i);
                for (int r = 0; r < rows; r++)
                    acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + (n0 + r) * k + i), xv);
            }
        }
        if (tail) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, xm + main_k);
            for (int r = 0; r < rows; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(tail, w + (n0 + r) * k + main_k), xv);
        }
        for (int r = 0; r < rows; r++) out[m * n + n0 + r] = _mm512_reduce_add_ps(acc[r]);
    }
}

/* AVX2 + FMA: widen bf16 to float32 (a 16-bit shift) and fused multiply-add. */
__attribute__((target("avx2,fma")))
static void block_avx2(const uint16_t *x, const uint16_t *w, float *out, int64_t m_rows, int64_t n0,
                       int64_t rows, int64_t n, int64_t k) {
    const int64_t main_k = k - k % 8;
    for (int64_t m = 0; m < m_rows; m++) {
        const uint16_t *xm = x + m * k;
        __m256 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < main_k; i += 8) {
            __m256 xv = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(xm + i))), 16));
            for (int r = 0; r < rows; r++) {
                __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + (n0 + r) * k + i))), 16));
                acc[r] = _mm256_fmadd_ps(wv, xv, acc[r]);
            }
        }
        for (int r = 0; r < rows; r++) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
            s = _mm_hadd_ps(s, s);
            s = _mm_hadd_ps(s, s);
            float total = _mm_cvtss_f32(s);
            for (int64_t i = main_k; i < k; i++) total += bf16_to_float(xm[i]) * bf16_to_float(w[(n0 + r) * k + i]);
            out[m * n + n0 + r] = total;
        }
    }
}

/* Which instruction set this CPU can run: 2 = AVX-512 BF16, 1 = AVX2 + FMA, 0 = neither. */
int mllama_gemv_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

void mllama_gemv_bf16(const uint16_t *x, const uint16_t *w, float *out, int64_t m, int64_t n, int64_t k,
                      int threads, int level) {
    const int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * ROWS;
        const int64_t rows = n - n0 < ROWS ? n - n0 : ROWS;
        if (level == 2)
            block_avx512bf16(x, w, out, m, n0, rows, n, k);
        else
            block_avx2(x, w, out, m, n0, rows, n, k);
    }
}
