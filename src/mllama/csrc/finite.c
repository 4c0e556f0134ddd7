/* Counting the NaN and infinite values of a bf16, fp16 or float32 array: the load-time check of every
 * weight (mllama.checks), which reads each byte once, so it runs at the speed of memory. A value is
 * NaN or infinite exactly when its exponent bits are all ones. AVX2 where the CPU has it, else plain
 * C; OpenMP threads over equal slices. Built at first use by mllama/cpu_kernels.py.
 */
#include <immintrin.h>
#include <stdint.h>

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
