/* silu(gate) * up of float32 sums, rounded as the model's bf16 ops round them. Included by gemm_small.c only. */
#ifndef MLLAMA_SILU_H
#define MLLAMA_SILU_H

#include "bf16.h"

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

#endif
