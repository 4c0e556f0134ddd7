/* Matrix-vector products for decoding: out (M, N) float32 = x (M, K) bf16 @ w (N, K) bf16 ^T, M small.
 *
 * Decoding one token reads every weight once, so its speed is the rate at which the weights stream
 * from memory. Each thread takes a contiguous range of weight rows and reads each row once as one
 * sequential stream, reusing it (from L1) for the M input rows. Four independent accumulators
 * per row hide the latency of the multiply-adds. Accumulation is in float32, as in the library GEMM.
 * Built at first use by mllama/cpu_kernels.py; the OpenMP runtime is the one torch already loaded
 * (same soname), so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* AVX-512 BF16: vdpbf16ps multiplies pairs of bf16 and adds both products to float32 lanes. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static float dot_avx512bf16(const uint16_t *x, const uint16_t *w, int64_t k) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t i = 0;
    for (; i + 128 <= k; i += 128) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++)
            acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_loadu_si512(w + i + 32 * u),
                                      (__m512bh)_mm512_loadu_si512(x + i + 32 * u));
    }
    for (; i < k; i += 32) {  /* the last < 128 values, the final partial vector masked */
        const __mmask32 take = k - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (k - i)) - 1);
        acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_maskz_loadu_epi16(take, w + i),
                                  (__m512bh)_mm512_maskz_loadu_epi16(take, x + i));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* AVX2 + FMA: widen bf16 to float32 (a 16-bit shift) and fused multiply-add. */
__attribute__((target("avx2,fma")))
static __m256 widen(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

__attribute__((target("avx2,fma")))
static float dot_avx2(const uint16_t *x, const uint16_t *w, int64_t k) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; u++) acc[u] = _mm256_fmadd_ps(widen(w + i + 8 * u), widen(x + i + 8 * u), acc[u]);
    }
    for (; i + 8 <= k; i += 8) acc[0] = _mm256_fmadd_ps(widen(w + i), widen(x + i), acc[0]);
    __m256 sum8 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    float total = _mm_cvtss_f32(s);
    for (; i < k; i++) total += bf16_to_float(x[i]) * bf16_to_float(w[i]);
    return total;
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
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < n; row++) {
        for (int64_t j = 0; j < m; j++)
            out[j * n + row] = level == 2 ? dot_avx512bf16(x + j * k, w + row * k, k)
                                          : dot_avx2(x + j * k, w + row * k, k);
    }
}
