/* Prefill products over quantized weights: out (M, N) bf16 = x (M, K) bf16 @ dequant(w) (N, K) ^T for
 * tens to hundreds of rows of x (a prompt), int8 or int4 weights (csrc/gemm_small.c's formats), with
 * AVX-512 BF16 and no AMX.
 *
 * Dequantizing the whole weight to bf16 and calling the library GEMM writes and reads back two bytes
 * a weight (a quarter of the GEMM's time at 64 rows, benchmarks/RESULTS.md). Here a work item of NB
 * weight rows is dequantized KC values at a time into a buffer that stays in cache, and every row of x
 * passes over it there: an outer-product GEMM with vdpbf16ps, whose lanes are 16 rows of x (each lane
 * a pair of consecutive k values) and whose other operand is a pair of one weight row's values,
 * broadcast. A tile holds MV x NR accumulators (64 rows of x against 6 weight rows); x is packed once
 * a call into that pair layout, 64 rows a panel. The sums are float32 in one order per output (pair
 * after pair along k, whatever M is): a row's result does not depend on the rows beside it. The
 * dequantized values are those of mllama_dequant_int8 / _int4 (dequant.h); int4 in groups of 64 or
 * more is dequantized in an order of its own (two table lookups for 64 values, see dequant_int4_pairs)
 * and x packed in that same order, so each pair still multiplies the weights it belongs to.
 * Built at first use by mllama/cpu_prefill.py; OpenMP is the runtime torch loaded (same soname). */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dequant.h"

#define MV 4              /* vectors of 16 rows of x a tile */
#define LANES (16 * MV)   /* rows of x a packed panel */
#define NR 6              /* weight rows a tile (MV x NR = 24 accumulators, 4 x loads and 6 broadcasts a pair) */
#define KC 512            /* values of k a block (a multiple of every int4 group size; cpu_prefill.BLOCK_VALUES) */
#define NB 48             /* weight rows a work item (a multiple of NR) */

/* V vectors of x (the panel at xt, LANES lanes a pair) against NR weight rows (wb, KC values apart)
 * over `pairs` pairs; the sums start at zero (first) or from part (rows pstride apart) and go back there. */
#define DEFINE_TILE(NAME, V)                                                                        \
    __attribute__((target("avx512f,avx512bw,avx512bf16")))                                          \
    static void NAME(const uint32_t *xt, const uint16_t *wb, int64_t pairs, float *part, int64_t pstride, \
                     int first) {                                                                   \
        __m512 acc[V][NR];                                                                          \
        for (int j = 0; j < NR; j++)                                                                \
            for (int v = 0; v < V; v++)                                                             \
                acc[v][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + j * pstride + v * 16); \
        for (int64_t p = 0; p < pairs; p++) {                                                       \
            __m512bh xv[V];                                                                         \
            for (int v = 0; v < V; v++) xv[v] = (__m512bh)_mm512_loadu_si512(xt + p * LANES + v * 16); \
            _Pragma("GCC unroll 6") for (int j = 0; j < NR; j++) {                                  \
                int32_t both;                                                                       \
                memcpy(&both, wb + j * KC + 2 * p, sizeof both);                                    \
                const __m512bh b = (__m512bh)_mm512_set1_epi32(both);                               \
                for (int v = 0; v < V; v++) acc[v][j] = _mm512_dpbf16_ps(acc[v][j], xv[v], b);     \
            }                                                                                       \
        }                                                                                           \
        for (int j = 0; j < NR; j++)                                                                \
            for (int v = 0; v < V; v++) _mm512_storeu_ps(part + j * pstride + v * 16, acc[v][j]);  \
    }
DEFINE_TILE(tile1, 1)
DEFINE_TILE(tile2, 2)
DEFINE_TILE(tile3, 3)
DEFINE_TILE(tile4, 4)
typedef void (*tile_fn)(const uint32_t *, const uint16_t *, int64_t, float *, int64_t, int);
static const tile_fn TILES[MV + 1] = {NULL, tile1, tile2, tile3, tile4};

/* The k of buffer position `at` for int4 dequantized by dequant_int4_pairs: in each run of 64 values
 * (32 bytes, two of the format's 16-byte runs), positions 0-31 hold the bytes' low nibbles, 32-63
 * their high nibbles; a 16-byte run's byte i holds values i (low) and i + 16 (high). */
static inline int64_t k_of(int64_t at, int paired) {
    if (!paired) return at;
    const int64_t run = at / 64 * 64, j = at % 64, byte = j % 32;
    return run + byte / 16 * 32 + (j >= 32 ? 16 : 0) + byte % 16;
}

/* x (m, k_in) bf16 -> panels of LANES rows: xp[panel][pair][lane] = the two bf16 of that row at the
 * pair's positions (k_of), zero past k_in and past m. */
static void pack_x(const uint16_t *x, int64_t m, int64_t k_in, int64_t pairs, int paired, uint32_t *xp,
                   int threads) {
    const int64_t panels = (m + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t row = 0; row < panels * LANES; row++) {
        uint32_t *dst = xp + row / LANES * pairs * LANES + row % LANES;
        const uint16_t *src = x + row * k_in;
        for (int64_t p = 0; p < pairs; p++) {
            uint32_t both = 0;
            if (row < m) {
                const int64_t k0 = k_of(2 * p, paired), k1 = k_of(2 * p + 1, paired);
                both = (k0 < k_in ? src[k0] : 0u) | (k1 < k_in ? (uint32_t)src[k1] << 16 : 0u);
            }
            dst[p * LANES] = both;
        }
    }
}

/* One int4 row's `len` values (a multiple of 64, from the start of a group of 64 or more) -> bf16 at
 * out, in k_of's order: per 32 bytes, the low nibbles' values then the high nibbles', each by one
 * vpermw into the group's table (dequant.h's int4_table_avx512, as dequant_int4_row_avx512): half its
 * instructions a value. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void dequant_int4_pairs(const uint8_t *row, const void *scale, const void *offset, int scale_bf16,
                               int64_t g_first, int64_t group, int64_t len, uint16_t *out) {
    for (int64_t g0 = 0; g0 < len; g0 += group) {
        const __m512i table = int4_table_avx512(scale, offset, scale_bf16, g_first + g0 / group);
        const int64_t end = g0 + group < len ? g0 + group : len;
        for (int64_t i = g0; i < end; i += 64) {
            /* vpermw reads an index's low 5 bits and the table holds its values twice: a byte's high
             * nibble (bits 4-7 of the word) never reaches the table in the first lookup */
            const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(row + i / 2)));
            _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(bytes, table));
            _mm512_storeu_si512(out + i + 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table));
        }
    }
}

typedef struct {
    qweight weight;
    int64_t n, k;        /* k: the stored row length (int4: padded to the group) */
    int paired;          /* int4 in dequant_int4_pairs' order */
} qdesc;

/* Rows [row, row + NB) of the weight over values [i0, i0 + len) -> buf (NB rows of KC), rows past n
 * zero. First the bytes of the next block (or of the next item's first) are prefetched: a block is a
 * short run of each of NB rows, too short for the hardware prefetcher to start on in time. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void dequant_block(const qdesc *q, int64_t row, int64_t i0, int64_t len, int64_t next_row, int64_t next_i0,
                          uint16_t *buf) {
    const int int4 = q->weight.fmt == FMT_INT4;
    const int64_t row_bytes = int4 ? q->k / 2 : q->k, chunk = int4 ? KC / 2 : KC, at = int4 ? next_i0 / 2 : next_i0;
    const int64_t bytes = row_bytes - at < chunk ? row_bytes - at : chunk, groups = int4 ? q->k / q->weight.group : 0;
    for (int64_t r = next_row; r < next_row + NB && r < q->n; r++)
        for (int64_t b = 0; b < bytes; b += 64)
            __builtin_prefetch((const char *)q->weight.w + r * row_bytes + at + b);
    for (int64_t r = 0; r < NB; r++) {
        uint16_t *dst = buf + r * KC;
        const int64_t n_row = row + r;
        if (n_row >= q->n) {
            memset(dst, 0, KC * sizeof *dst);
            continue;
        }
        if (!int4)
            dequant_int8_row_avx512((const int8_t *)q->weight.w + n_row * q->k + i0,
                                    param(q->weight.scale, n_row, q->weight.scale_bf16), len, dst, 1);
        else if (q->paired)
            dequant_int4_pairs((const uint8_t *)q->weight.w + n_row * row_bytes + i0 / 2, q->weight.scale,
                               q->weight.offset, q->weight.scale_bf16, n_row * groups + i0 / q->weight.group,
                               q->weight.group, len, dst);
        else
            dequant_int4_row_avx512((const uint8_t *)q->weight.w + n_row * row_bytes + i0 / 2, q->weight.scale,
                                    q->weight.offset, q->weight.scale_bf16, n_row * groups + i0 / q->weight.group,
                                    q->weight.group, len, dst, 1);
        if (len & 1) dst[len] = 0;  /* int8 of odd k: the last pair's second weight meets x's zero */
    }
}

/* Whether this CPU runs mllama_prefill_quant (AVX-512 BF16). */
int mllama_prefill_usable(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512vl");
}

/* out (m, n) bf16 = x (m, k_in) bf16 @ dequant(w) ^T; k is the stored row length (int8: k_in; int4:
 * k_in padded to the group, which must divide KC). Returns 0; -1 for arguments it does not take, -2
 * where it could not allocate its buffers. */
int mllama_prefill_quant(int fmt, const uint16_t *x, int64_t m, int64_t k_in, int64_t n, int64_t k, const void *w,
                         const void *scale, const void *offset, int scale_bf16, int64_t group, uint16_t *out,
                         int threads) {
    if ((fmt != FMT_INT8 && fmt != FMT_INT4) || m < 1 || n < 1 || k < 1) return -1;
    if (fmt == FMT_INT8 && k != k_in) return -1;
    if (fmt == FMT_INT4 && (group < 32 || group % 32 || KC % group || k % group || k_in > k)) return -1;
    if (!mllama_prefill_usable()) return -1;
    const qdesc q = {{fmt, w, scale, offset, scale_bf16, group}, n, k, fmt == FMT_INT4 && group % 64 == 0};
    const int64_t pairs = (k + 1) / 2, panels = (m + LANES - 1) / LANES, mpad = panels * LANES;
    uint32_t *xp = aligned_alloc(64, (size_t)(panels * pairs * LANES * sizeof(uint32_t) + 63) / 64 * 64);
    if (xp == NULL) return -2;
    pack_x(x, m, k_in, pairs, q.paired, xp, threads);
    const int64_t items = (n + NB - 1) / NB;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        uint16_t *buf = aligned_alloc(64, NB * KC * sizeof(uint16_t));
        float *part = aligned_alloc(64, (size_t)NB * mpad * sizeof(float));  /* part[j * mpad + row]: item row j */
        if (buf == NULL || part == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (buf == NULL || part == NULL) continue;
            const int64_t n0 = item * NB, rows = n - n0 < NB ? n - n0 : NB;
            for (int64_t i0 = 0; i0 < k; i0 += KC) {
                const int64_t len = k - i0 < KC ? k - i0 : KC, last = i0 + KC >= k;
                dequant_block(&q, n0, i0, len, last ? n0 + NB : n0, last ? 0 : i0 + KC, buf);
                for (int64_t j0 = 0; j0 < rows; j0 += NR)
                    for (int64_t panel = 0; panel < panels; panel++) {
                        const int64_t left = m - panel * LANES, vecs = left >= LANES ? MV : (left + 15) / 16;
                        TILES[vecs](xp + (panel * pairs + i0 / 2) * LANES, buf + j0 * KC, (len + 1) / 2,
                                    part + j0 * mpad + panel * LANES, mpad, i0 == 0);
                    }
            }
            for (int64_t r = 0; r < m; r++)
                for (int64_t j = 0; j < rows; j++) out[r * n + n0 + j] = round_bf16(part[j * mpad + r]);
        }
        free(buf);
        free(part);
    }
    free(xp);
    return failed ? -2 : 0;
}
