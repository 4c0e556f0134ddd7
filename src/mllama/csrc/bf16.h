/* bf16 <-> float32 as torch converts (nearest even; a NaN as 0x7FC0), scalar and 8 lanes at a time:
 * included by the kernels that round their float32 sums to bf16 (gemm_small.c, gemm_prefill.c, scans.c)
 * and by dequant.h. */
#ifndef MLLAMA_BF16_H
#define MLLAMA_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* k_in bf16 values -> k float32 (k >= k_in), zeros past k_in: a row of x widened for the kernels. */
__attribute__((target("avx2,fma")))
static inline void widen_bf16_row(const uint16_t *x, int64_t k_in, int64_t k, float *out) {
    int64_t i = 0;
    for (; i + 8 <= k_in; i += 8)
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(x + i))), 16)));
    for (; i < k_in; i++) out[i] = bf16_to_float(x[i]);
    for (; i < k; i++) out[i] = 0.0f;
}

/* float32 -> bf16 to nearest even, NaN to 0x7FC0: torch's .to(torch.bfloat16) (its loops give 0x7FC0
 * or 0xFFFF for a NaN). */
static inline uint16_t round_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
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
static inline void round_row_bf16(const float *of, int64_t n, uint16_t *out) {
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

/* 8 floats rounded to bf16 (nearest even) and widened back; NaN kept. */
__attribute__((target("avx2,fma")))
static inline __m256 bf16_round8(__m256 v) {
    const __m256i r = _mm256_and_si256(bf16_rounded_bits8(v), _mm256_set1_epi32((int)0xFFFF0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

#endif
