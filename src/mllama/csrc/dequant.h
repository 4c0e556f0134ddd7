/* The dequantizers' row loops (AVX512-BF16) and the helpers around them, shared by gemm_small.c
 * (mllama_dequant_int4 / _int8, for the prefill and vision GEMMs) and gemm_amx.c (a block of rows
 * dequantized into cache for the bf16 tiles). Included into each .c file (mllama.kernel_cache hashes
 * local headers into a build's key). */
#ifndef MLLAMA_DEQUANT_H
#define MLLAMA_DEQUANT_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* The weight formats (see gemm_small.c). */
enum { FMT_BF16 = 0, FMT_INT8 = 1, FMT_INT4 = 2 };

/* An int8 or int4 weight as the dequantizing products take it (gemv_bf16.c, gemm_prefill.c). */
typedef struct {
    int fmt;             /* FMT_INT8 or FMT_INT4 */
    const void *w;       /* int8 (n, k) or int4 (n, k / 2) packed */
    const void *scale;   /* int8: (n,); int4: (n, k / group) */
    const void *offset;  /* int4: (n, k / group) */
    int scale_bf16;      /* scales and offsets are bf16 (else float32) */
    int64_t group;       /* int4 group size (each kernel's block of k values is a multiple of it) */
} qweight;

static inline float param(const void *base, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* 32 values (a: the first 16, b: the next) to out[at..] as float32 or bf16; masked only for a last
 * partial run (`left` < 32), as masked stores are slow on some CPUs. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static inline void store32_avx512(void *out, int out_bf16, int64_t at, __m512 a, __m512 b, int64_t left) {
    if (out_bf16) {
        const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(b, a);
        if (left >= 32)
            _mm512_storeu_si512((uint16_t *)out + at, v);
        else
            _mm512_mask_storeu_epi16((uint16_t *)out + at, (__mmask32)((1u << left) - 1), v);
    } else if (left >= 32) {
        _mm512_storeu_ps((float *)out + at, a);
        _mm512_storeu_ps((float *)out + at + 16, b);
    } else {
        _mm512_mask_storeu_ps((float *)out + at, left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1), a);
        if (left > 16) _mm512_mask_storeu_ps((float *)out + at + 16, (__mmask16)((1u << (left - 16)) - 1), b);
    }
}

/* Group g's 16 possible int4 values, q * scale + offset for q = 0..15 rounded to bf16, in words 0-15
 * and again in 16-31 (vpermw reads an index's low 5 bits): the table the bf16 row loops look nibbles
 * up in. Multiply, then add (no fused multiply-add): the values of the torch reference. */
__attribute__((target("avx512f,avx512bw,avx512bf16"), optimize("fp-contract=off")))
static inline __m512i int4_table_avx512(const void *scale, const void *offset, int scale_bf16, int64_t g) {
    const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(q, _mm512_set1_ps(param(scale, g, scale_bf16))),
                                   _mm512_set1_ps(param(offset, g, scale_bf16)));
    return (__m512i)_mm512_cvtne2ps_pbh(v, v);
}

/* The AVX512-BF16 form of one row: 16 lanes, and the rounding to bf16 in one instruction
 * (vcvtne2ps2bf16: to nearest even, as float8_to_bf16, for values above float32's denormals, which it
 * flushes to zero); the last partial run by masked stores. To bf16, a group's 16 possible values are
 * computed once (the same operations) and each run of 32 weights looks its nibbles up in that table
 * (vpermw): half the instructions of converting every weight. */
__attribute__((target("avx512f,avx512bw,avx512bf16"), optimize("fp-contract=off")))
static void dequant_int4_row_avx512(const uint8_t *row, const void *scale, const void *offset, int scale_bf16,
                                    int64_t g_first, int64_t group, int64_t k_out, void *out, int out_bf16) {
    if (out_bf16) {
        for (int64_t g0 = 0; g0 < k_out; g0 += group) {
            const __m512i table = int4_table_avx512(scale, offset, scale_bf16, g_first + g0 / group);
            const int64_t end = g0 + group < k_out ? g0 + group : k_out;
            for (int64_t i = g0; i < end; i += 32) {
                /* words 0-15: bytes 0-15, words 16-31: the same bytes shifted down by 4. vpermw reads
                 * an index's low 5 bits and the table holds its 16 values twice, so a word's bits
                 * past its low nibble never matter: no masking */
                const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(
                    _mm_loadu_si128((const __m128i *)(row + i / 2))));
                const __m512i w = _mm512_permutexvar_epi16(_mm512_mask_srli_epi16(bytes, 0xFFFF0000u, bytes, 4), table);
                if (k_out - i >= 32)
                    _mm512_storeu_si512((uint16_t *)out + i, w);
                else
                    _mm512_mask_storeu_epi16((uint16_t *)out + i, (__mmask32)((1u << (k_out - i)) - 1), w);
            }
        }
        return;
    }
    for (int64_t i = 0; i < k_out; i += 32) {
        const int64_t g = g_first + i / group;
        const __m512 s = _mm512_set1_ps(param(scale, g, scale_bf16));
        const __m512 z = _mm512_set1_ps(param(offset, g, scale_bf16));
        const __m128i packed = _mm_loadu_si128((const __m128i *)(row + i / 2));
        const __m128i lo = _mm_and_si128(packed, _mm_set1_epi8(0x0F));              /* values i .. i+15 */
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F)); /* i+16 .. i+31 */
        const __m512 a = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), s), z);
        const __m512 b = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), s), z);
        store32_avx512(out, out_bf16, i, a, b, k_out - i);
    }
}

static inline int dequant_avx512(int level) {
    __builtin_cpu_init();
    return level != 1 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vl");
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void dequant_int8_row_avx512(const int8_t *row, float scale, int64_t k, void *out, int out_bf16) {
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < k; i += 32) {
        const int64_t left = k - i;
        const __m256i q = left >= 32 ? _mm256_loadu_si256((const __m256i *)(row + i))
                                     : _mm256_maskz_loadu_epi8((__mmask32)((1u << left) - 1), row + i);  /* not past the row */
        const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), s);
        const __m512 b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), s);
        store32_avx512(out, out_bf16, i, a, b, left);
    }
}

#endif
