/* Scans that read an array once, so they run at the speed of memory (built at first use by
 * mllama/cpu_kernels.py; OpenMP is the runtime torch loaded):
 * - counting the NaN and infinite values of a bf16, fp16 or float32 array: the load-time check of every
 *   weight (mllama.checks). A value is NaN or infinite exactly when its exponent bits are all ones.
 *   AVX2 where the CPU has it, else plain C; OpenMP threads over equal slices.
 * - RMSNorm and RoPE of bf16 rows (mllama.row_kernels): one call where torch takes eight ops (RMSNorm)
 *   or eighteen (RoPE of q and k), each of which costs tens of microseconds in a decode step, whose
 *   weights have just streamed through every cache (benchmarks/RESULTS.md).
 * - the argmax of each row of float32 or bf16 logits (greedy decoding): torch 2.13's CPU argmax over a 128k
 *   vocabulary took about 0.3 ms a row here, several % of a quantized decode step (benchmarks/RESULTS.md).
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include "bf16.h"

enum { KIND_BF16 = 0, KIND_F16 = 1, KIND_F32 = 2 };

static int64_t count_scalar(const void *p, int64_t begin, int64_t end, int kind) {
    int64_t bad = 0;
    if (kind == KIND_F32) {
        const uint32_t *v = (const uint32_t *)p;
        for (int64_t i = begin; i < end; i++) bad += (v[i] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t *v = (const uint16_t *)p;
        const uint16_t mask = kind == KIND_BF16 ? 0x7F80 : 0x7C00;
        for (int64_t i = begin; i < end; i++) bad += (v[i] & mask) == mask;
    }
    return bad;
}

/* [begin, end) in 256-bit steps: lanes whose exponent equals the mask, counted by movemask. */
__attribute__((target("avx2,popcnt")))
static int64_t count_avx2(const void *p, int64_t begin, int64_t end, int kind) {
    const int per = kind == KIND_F32 ? 8 : 16;  /* values per 32 bytes */
    const int64_t stop = begin + (end - begin) / per * per;
    int64_t bad_bytes = 0;  /* matching lanes x their bytes (the movemask counts bytes) */
    const __m256i mask = kind == KIND_F32 ? _mm256_set1_epi32(0x7F800000) :
                         _mm256_set1_epi16((short)(kind == KIND_BF16 ? 0x7F80 : 0x7C00));
    const char *base = (const char *)p + begin * (kind == KIND_F32 ? 4 : 2);
    for (int64_t i = begin; i < stop; i += per, base += 32) {
        const __m256i v = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)base), mask);
        const __m256i eq = kind == KIND_F32 ? _mm256_cmpeq_epi32(v, mask) : _mm256_cmpeq_epi16(v, mask);
        bad_bytes += __builtin_popcount((unsigned)_mm256_movemask_epi8(eq));
    }
    return bad_bytes / (kind == KIND_F32 ? 4 : 2) + count_scalar(p, stop, end, kind);
}

/* The number of NaN or infinite values among p[0..n) of the given kind, or -1 for an unknown kind. */
int64_t mllama_count_nonfinite(const void *p, int64_t n, int kind, int threads) {
    if (kind < KIND_BF16 || kind > KIND_F32 || n < 0) return -1;
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2");
    const int64_t slices = threads > 0 ? threads : 1;
    int64_t bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t s = 0; s < slices; s++) {
        const int64_t begin = n * s / slices, end = n * (s + 1) / slices;
        bad += avx2 ? count_avx2(p, begin, end, kind) : count_scalar(p, begin, end, kind);
    }
    return bad;
}


/* The value at row[i] of float32 or bf16 (bf16) values, exactly as float32. */
static inline float value_at(const void *row, int bf16, int64_t i) {
    return bf16 ? bf16_to_float(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* The first index of row's largest value, NaN counting as larger than every number (as torch.argmax):
 * per lane the first strictly larger value, then the smallest index among the lanes holding the
 * maximum; a row with a NaN is scanned again for its first NaN. bf16 values are widened exactly, so
 * both kinds give torch's argmax of the same numbers. */
__attribute__((target("avx512f")))
static int64_t argmax_avx512(const void *row, int bf16, int64_t v) {
    __m512 best = _mm512_set1_ps(-__builtin_inff());
    __m512i at = _mm512_set1_epi32(0), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < v; i += 16) {
        const __mmask16 take = v - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (v - i)) - 1);
        /* past the end: best itself, never larger */
        __m512 x;
        if (bf16) {
            uint16_t tail[16] = {0};
            const uint16_t *h = (const uint16_t *)row + i;
            if (take != 0xFFFF) h = memcpy(tail, h, (size_t)(v - i) * sizeof *tail);
            x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)h)), 16));
            x = _mm512_mask_mov_ps(best, take, x);
        } else {
            x = _mm512_mask_loadu_ps(best, take, (const float *)row + i);
        }
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        const __mmask16 larger = _mm512_cmp_ps_mask(x, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, larger, x);
        at = _mm512_mask_mov_epi32(at, larger, idx);
        idx = _mm512_add_epi32(idx, sixteen);
    }
    if (nan) {
        for (int64_t i = 0; i < v; i++)
            if (value_at(row, bf16, i) != value_at(row, bf16, i)) return i;
    }
    const float top = _mm512_reduce_max_ps(best);
    const __mmask16 holders = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    return (int64_t)_mm512_mask_reduce_min_epi32(holders, at);
}

static int64_t argmax_scalar(const void *row, int bf16, int64_t v) {
    int64_t at = 0;
    float top = value_at(row, bf16, 0);
    for (int64_t i = 0; i < v; i++) {
        const float x = value_at(row, bf16, i);
        if (x != x) return i;
        if (x > top) {
            top = x;
            at = i;
        }
    }
    return at;
}

/* out[r] = the argmax of logits[r, 0..v) for r < b, float32 or bf16 (bf16) logits; -1 for arguments it
 * does not take (v past int32, whose lane indices are 32-bit). plain_c: the loop CPUs without AVX-512
 * run (for tests). */
int mllama_argmax_rows(const void *logits, int64_t b, int64_t v, int64_t *out, int threads, int plain_c, int bf16) {
    if (b < 0 || v < 1 || v > 0x7FFFFFF0) return -1;
    __builtin_cpu_init();
    const int avx512 = !plain_c && __builtin_cpu_supports("avx512f");
#pragma omp parallel for schedule(static) num_threads(threads > 0 && b > 1 ? threads : 1)
    for (int64_t r = 0; r < b; r++)
    {
        const void *row = (const char *)logits + r * v * (bf16 ? 2 : 4);
        out[r] = avx512 ? argmax_avx512(row, bf16, v) : argmax_scalar(row, bf16, v);
    }
    return 0;
}

#define NORM_LANES 16
/* out = weight * bf16(x * 1 / sqrt(mean(x^2) + eps)) for each of `rows` rows of d bf16 values, in
 * float32 and rounded twice as the model's RMSNorm (layers.py; Meta's: normalise in float32, round to
 * the activation dtype, then multiply by the weight). The squares are summed in NORM_LANES partial
 * sums, lane i % NORM_LANES, added in lane order: one order on every CPU and for every batch, which
 * torch's reduction may not share in the last bit. Returns 0, or -1 for arguments it does not take. */
int mllama_rms_norm_bf16(const uint16_t *x, const uint16_t *weight, int64_t rows, int64_t d, float eps,
                         uint16_t *out, int threads) {
    if (rows < 0 || d < 1) return -1;
#pragma omp parallel for schedule(static) num_threads(threads > 0 && rows > 8 ? threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * d;
        float lanes[NORM_LANES] = {0};
        int64_t i = 0;
        for (; i + NORM_LANES <= d; i += NORM_LANES)
            for (int j = 0; j < NORM_LANES; j++) {
                const float v = bf16_to_float(row[i + j]);
                lanes[j] += v * v;
            }
        for (; i < d; i++) {
            const float v = bf16_to_float(row[i]);
            lanes[i % NORM_LANES] += v * v;
        }
        float sum = 0.0f;
        for (int j = 0; j < NORM_LANES; j++) sum += lanes[j];
        const float inv = 1.0f / sqrtf(sum / (float)d + eps);
        for (i = 0; i < d; i++)
            out[r * d + i] = round_bf16(bf16_to_float(weight[i]) * bf16_to_float(round_bf16(bf16_to_float(row[i]) * inv)));
    }
    return 0;
}

/* RoPE (the half-split layout of layers.apply_rotary) of bf16 q (rows, hq, d) and k (rows, hk, d) with
 * cos, sin (rows, d): out = x * cos + rotate_half(x) * sin, each product and the sum rounded to bf16
 * as torch's three bf16 ops round them (elementwise: the same bits). Returns 0, or -1 for arguments it
 * does not take. */
int mllama_rope_bf16(const uint16_t *q, const uint16_t *k, int64_t rows, int64_t hq, int64_t hk, int64_t d,
                     const uint16_t *cos, const uint16_t *sin, uint16_t *q_out, uint16_t *k_out, int threads) {
    if (rows < 0 || hq < 0 || hk < 0 || d < 2 || d % 2) return -1;
    const int64_t half = d / 2, heads = hq + hk;
#pragma omp parallel for schedule(static) num_threads(threads > 0 && rows > 8 ? threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + r * d, *s = sin + r * d;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *x = h < hq ? q + (r * hq + h) * d : k + (r * hk + h - hq) * d;
            uint16_t *o = h < hq ? q_out + (r * hq + h) * d : k_out + (r * hk + h - hq) * d;
            for (int64_t i = 0; i < d; i++) {
                const float turned = i < half ? -bf16_to_float(x[i + half]) : bf16_to_float(x[i - half]);
                const float a = bf16_to_float(round_bf16(bf16_to_float(x[i]) * bf16_to_float(c[i])));
                const float b = bf16_to_float(round_bf16(turned * bf16_to_float(s[i])));
                o[i] = round_bf16(a + b);
            }
        }
    }
    return 0;
}
