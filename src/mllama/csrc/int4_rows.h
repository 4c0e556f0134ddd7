/* int4 weights in blocks of 32 rows ("int4 rows" layout) against rows of x with 512-bit VNNI: a layout
 * for decode's one-row products first, and its entry points (mllama_int4_rows*). Included by gemm_small.c
 * only, after small_int4.h and silu.h.
 *
 * Row-major int4 (gemm_small.c's format) puts one weight row in each vector, so every group of every
 * row ends in its own int32 -> float conversion, scale shuffle and FMA: about 10 instructions per 64
 * bytes, too many to keep up with a fast memory (benchmarks/RESULTS.md). Here a vector's 16 lanes
 * are 16 weight rows and its bytes 4 values of k for each: a block of 32 rows is stored as k / 4 steps of 64 bytes, byte 4 r + b of
 * step s holding row r's value 4 s + b in its low nibble and row 16 + r's in its high nibble. One x
 * value quad broadcast serves both nibbles (the high ones taken as 16 q with one mask, the 16 folded
 * into their scale: exact), so 128 weights cost a load, two masks and two vpdpbusd; the per-group
 * float work is shared by 16 rows. Scales and offsets are stored alike, (n / 32, groups, 32).
 * x is rounded per group as for the other int4 kernels (quantize_x, the natural order), and each
 * group's sum is s sx sum q xq + s centre + z sum x, the int4m tiles' terms: a row of x gets the same
 * bits in any batch, but not the row-major kernels' bits (the lanes sum k in another order). */
#ifndef MLLAMA_INT4_ROWS_H
#define MLLAMA_INT4_ROWS_H

#define ROWS_BLOCK 32      /* weight rows a block */
#define ROWS_TASK 8        /* blocks a work item */

/* Block b0 against rows j0 .. j0 + M - 1 of x (xq8 in the natural order, k values a row; centres:
 * each group's 8 (sum x - sx sum xq)) -> out[j n + 32 b0 ...]. */
#define DEFINE_INT4_ROWS(NAME, M)                                                                   \
    __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))                        \
    static void NAME(const wdesc *d, const xdesc *x, const float *centres, int64_t b0, int64_t j0, float *out, \
                     int64_t n) {                                                                    \
        const int64_t groups = d->k / d->group, steps = d->group / 4;                               \
        const __m512i lo4 = _mm512_set1_epi8(0x0F), hi4 = _mm512_set1_epi8((char)0xF0);            \
        __m512 lo[M], hi[M];                                                                        \
        _Pragma("GCC unroll 2") for (int j = 0; j < M; j++) lo[j] = hi[j] = _mm512_setzero_ps();    \
        const uint8_t *w = (const uint8_t *)d->w + b0 * (ROWS_BLOCK / 2) * d->k;                    \
        for (int64_t g = 0; g < groups; g++) {                                                      \
            __m512i alo[M], ahi[M];                                                                 \
            _Pragma("GCC unroll 2") for (int j = 0; j < M; j++) alo[j] = ahi[j] = _mm512_setzero_si512(); \
            const uint8_t *wg = w + g * steps * 64;                                                 \
            const int8_t *xg = x->xq8 + j0 * d->k + g * d->group;                                   \
            for (int64_t s = 0; s < steps; s++) {                                                   \
                const __m512i v = _mm512_loadu_si512(wg + s * 64);                                  \
                const __m512i vl = _mm512_and_si512(v, lo4), vh = _mm512_and_si512(v, hi4);         \
                _Pragma("GCC unroll 2") for (int j = 0; j < M; j++) {                               \
                    const __m512i bx = _mm512_set1_epi32(*(const int32_t *)(xg + j * d->k + 4 * s)); \
                    alo[j] = _mm512_dpbusd_epi32(alo[j], vl, bx);                                   \
                    ahi[j] = _mm512_dpbusd_epi32(ahi[j], vh, bx);                                   \
                }                                                                                   \
            }                                                                                       \
            const int64_t p = (b0 * groups + g) * ROWS_BLOCK;                                       \
            const __m512 sl = params16(d->scale, p, 16, d->scale_bf16);                             \
            const __m512 sh = params16(d->scale, p + 16, 16, d->scale_bf16);                        \
            const __m512 zl = params16(d->offset, p, 16, d->scale_bf16);                            \
            const __m512 zh = params16(d->offset, p + 16, 16, d->scale_bf16);                       \
            _Pragma("GCC unroll 2") for (int j = 0; j < M; j++) {                                   \
                const int64_t q = (j0 + j) * x->groups + g;                                         \
                const float sx = x->sx[q];                                                          \
                const __m512 centre = _mm512_set1_ps(centres[q]), xs = _mm512_set1_ps(x->xsum[q]);  \
                lo[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(alo[j]), _mm512_mul_ps(sl, _mm512_set1_ps(sx)), lo[j]); \
                hi[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ahi[j]),                                 \
                                        _mm512_mul_ps(sh, _mm512_set1_ps(sx * 0.0625f)), hi[j]);    \
                lo[j] = _mm512_fmadd_ps(zl, xs, _mm512_fmadd_ps(sl, centre, lo[j]));                \
                hi[j] = _mm512_fmadd_ps(zh, xs, _mm512_fmadd_ps(sh, centre, hi[j]));                \
            }                                                                                       \
        }                                                                                           \
        for (int j = 0; j < M; j++) {                                                               \
            _mm512_storeu_ps(out + (j0 + j) * n + b0 * ROWS_BLOCK, lo[j]);                          \
            _mm512_storeu_ps(out + (j0 + j) * n + b0 * ROWS_BLOCK + 16, hi[j]);                     \
        }                                                                                           \
    }
DEFINE_INT4_ROWS(int4_rows_1x1, 1) DEFINE_INT4_ROWS(int4_rows_1x2, 2)

/* m rows of x (quantize_x's natural int8 order) against n / 32 blocks -> out (m, n) float32: work
 * items of ROWS_TASK blocks, one block (one sequential stream) and up to two rows of x a pass. Two
 * blocks a pass (two streams), items of 2 to 16 blocks, and software prefetch ran within the noise of
 * this (benchmarks/RESULTS.md). */
__attribute__((target("avx2,fma")))
static void int4_rows_product(const wdesc *d, const xdesc *x, const float *centres, int64_t m, int64_t n, float *out,
                              int threads) {
    const int64_t blocks = n / ROWS_BLOCK, items = (blocks + ROWS_TASK - 1) / ROWS_TASK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t t = 0; t < items; t++) {
        const int64_t end = (t + 1) * ROWS_TASK < blocks ? (t + 1) * ROWS_TASK : blocks;
        for (int64_t b = t * ROWS_TASK; b < end; b++)
            for (int64_t j = 0; j < m; j += 2) (j + 1 < m ? int4_rows_1x2 : int4_rows_1x1)(d, x, centres, b, j, out, n);
    }
}

/* The value of row r (0..31 in its block), k position c, from a block's bytes in either layout. */
static inline int nibble_rows(const uint8_t *block, int64_t r, int64_t c) {
    const uint8_t byte = block[c / 4 * 64 + r % 16 * 4 + c % 4];
    return r < 16 ? byte & 0x0F : byte >> 4;
}
static inline int nibble_major(const uint8_t *row, int64_t c) {
    const uint8_t byte = row[c / 32 * 16 + c % 16];
    return c % 32 < 16 ? byte & 0x0F : byte >> 4;
}

/* Row-major int4 (n, k / 2) <-> the int4 rows layout (n a multiple of 32, k the padded row length). */
static void int4_rows_pack(const uint8_t *src, int64_t n, int64_t k, uint8_t *dst, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < n / ROWS_BLOCK; blk++) {
        const uint8_t *rows = src + blk * ROWS_BLOCK * (k / 2);
        uint8_t *out = dst + blk * ROWS_BLOCK * (k / 2);
        for (int64_t c = 0; c < k; c++)
            for (int64_t r = 0; r < 16; r++)
                out[c / 4 * 64 + r * 4 + c % 4] = (uint8_t)(nibble_major(rows + r * (k / 2), c)
                                                             | nibble_major(rows + (16 + r) * (k / 2), c) << 4);
    }
}
static void int4_rows_unpack(const uint8_t *src, int64_t n, int64_t k, uint8_t *dst, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < n / ROWS_BLOCK; blk++) {
        const uint8_t *block = src + blk * ROWS_BLOCK * (k / 2);
        for (int64_t r = 0; r < ROWS_BLOCK; r++) {
            uint8_t *row = dst + (blk * ROWS_BLOCK + r) * (k / 2);
            for (int64_t c = 0; c < k; c += 32)
                for (int64_t j = 0; j < 16; j++)
                    row[c / 2 + j] = (uint8_t)(nibble_rows(block, r, c + j) | nibble_rows(block, r, c + 16 + j) << 4);
        }
    }
}

/* m rows of bf16 x (k_in values each, zeros to k) against `count` int4 weights in the int4 rows layout
 * (int4_rows.h; n rows each, a multiple of 32; scales and offsets (n / 32, groups, 32)) -> their float32
 * sums (m, n) one weight after another in `sums`, x widened and rounded once (a thread a row), then
 * taken ROWS_CHUNK rows at a time, each chunk's rounded x in L2 while the weights stream past.
 * Needs 512-bit VNNI. Returns 0, or -1 for arguments the kernel does not take (or no memory). */
#define ROWS_CHUNK 32
int mllama_gemm_small_level(void);  /* gemm_small.c */
__attribute__((target("avx2,fma")))
static int rows_sums(const uint16_t *x, int64_t m, int64_t k_in, int64_t k, int count, int64_t n,
                     const void *const *w, const void *const *scale, const void *const *offset, int scale_bf16,
                     int64_t group, float *sums, int threads) {
    if (m < 1 || n < 1 || n % ROWS_BLOCK || k_in < 1 || k_in > k || group < 32 || group % 32 || group > 256
        || k % group || count < 1 || mllama_gemm_small_level() != 2)
        return -1;
    const int64_t groups = k / group;
    float *xf = malloc((size_t)(m * k) * sizeof *xf), *params = malloc((size_t)(4 * m * groups) * sizeof *params);
    int8_t *xq = malloc((size_t)(m * k));
    if (!xf || !params || !xq) {
        free(xf);
        free(params);
        free(xq);
        return -1;
    }
    float *sx = params, *xsum = params + m * groups, *centres = params + 3 * m * groups;
    int32_t *xqsum = (int32_t *)(params + 2 * m * groups);
#pragma omp parallel for schedule(static) num_threads(threads) if (m >= 4)
    for (int64_t j = 0; j < m; j++) {
        float *row = xf + j * k;
        widen_bf16_row(x + j * k_in, k_in, k, row);
        const int64_t q = j * groups;
        quantize_x(row, 1, k, group, 3, xq + j * k, sx + q, xsum + q, xqsum + q);
        for (int64_t g = q; g < q + groups; g++) centres[g] = 8.0f * (xsum[g] - sx[g] * (float)xqsum[g]);
    }
    for (int64_t c = 0; c < m; c += ROWS_CHUNK) {
        const int64_t rows = m - c < ROWS_CHUNK ? m - c : ROWS_CHUNK, q = c * groups;
        const xdesc xd = {NULL, xq + c * k, sx + q, xsum + q, xqsum + q, groups, NULL};
        for (int i = 0; i < count; i++) {
            const wdesc d = {w[i], scale[i], offset[i], k, group, 0, scale_bf16};
            int4_rows_product(&d, &xd, centres + q, rows, n, sums + i * m * n + c * n, threads);
        }
    }
    free(xf);
    free(params);
    free(xq);
    return 0;
}

/* rows_sums of one weight -> out (m, n) float32. */
__attribute__((target("avx2,fma")))
int mllama_int4_rows(const uint16_t *x, int64_t m, int64_t k_in, int64_t n, int64_t k, const void *w,
                     const void *scale, const void *offset, int scale_bf16, int64_t group, float *out, int threads) {
    return rows_sums(x, m, k_in, k, 1, n, &w, &scale, &offset, scale_bf16, group, out, threads);
}

/* One row: rows_sums rounded to n bf16 (bf16_bits8: the bits of torch's .to(bfloat16) of the sums). */
__attribute__((target("avx2,fma")))
int mllama_int4_rows_row_bf16(const uint16_t *x, int64_t k_in, int64_t n, int64_t k, const void *w,
                              const void *scale, const void *offset, int scale_bf16, int64_t group, uint16_t *out,
                              int threads) {
    float *sums = n > 0 ? malloc((size_t)n * sizeof *sums) : NULL;
    const int rc = sums ? rows_sums(x, 1, k_in, k, 1, n, &w, &scale, &offset, scale_bf16, group, sums, threads) : -1;
    if (rc == 0) round_row_bf16(sums, n, out);
    free(sums);
    return rc;
}

/* An MLP's silu(gate(x)) * up(x) for one row, both weights in the int4 rows layout (silu_product_row). */
__attribute__((target("avx2,fma")))
int mllama_int4_rows_silu_bf16(const uint16_t *x, int64_t k_in, int64_t n, int64_t k, const void *w_gate,
                               const void *scale_gate, const void *offset_gate, const void *w_up, const void *scale_up,
                               const void *offset_up, int scale_bf16, int64_t group, uint16_t *out, int threads) {
    const void *ws[2] = {w_gate, w_up}, *scales[2] = {scale_gate, scale_up}, *offsets[2] = {offset_gate, offset_up};
    float *sums = n > 0 ? malloc((size_t)(2 * n) * sizeof *sums) : NULL;
    const int rc = sums ? rows_sums(x, 1, k_in, k, 2, n, ws, scales, offsets, scale_bf16, group, sums, threads) : -1;
    if (rc == 0) silu_product_row(sums, sums + n, n, out);
    free(sums);
    return rc;
}

/* Row-major int4 weights (n, k / 2) -> the int4 rows layout (unpack: back). Returns 0, or -1 where n is
 * not a multiple of 32 or k of 32. */
int mllama_int4_rows_pack(const uint8_t *src, int64_t n, int64_t k, uint8_t *dst, int unpack, int threads) {
    if (n < 1 || n % ROWS_BLOCK || k < 32 || k % 32) return -1;
    (unpack ? int4_rows_unpack : int4_rows_pack)(src, n, k, dst, threads);
    return 0;
}

#endif
