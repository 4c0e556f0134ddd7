/* 2^x of 16 floats for x <= 0, for the softmax of the attention kernels (attention_cpu.c,
 * decode_attention.c). */
#ifndef MLLAMA_EXP2_H
#define MLLAMA_EXP2_H

#include <immintrin.h>

/* 2^x for x <= 0 (relative error about 2e-7): 2^round(x) times a degree-5 polynomial in the rest. */
__attribute__((target("avx512f")))
static inline __m512 exp2_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));  /* no denormals: below 2^-126 nothing counts */
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);  /* [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.32764655e-3f);  /* minimax on [-0.5, 0.5] */
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.67554189e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.55071346e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.40221202e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.93146944e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.00000012f));
    return _mm512_scalef_ps(p, n);
}

#endif
