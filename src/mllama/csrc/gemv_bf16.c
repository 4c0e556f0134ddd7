/* Matrix-vector products for decoding: out (M, N) float32 = x (M, K) bf16 @ w (N, K) bf16 ^T, M small.
 *
 * Decoding one token reads every weight once, so its speed is the rate at which the weights stream
 * from memory. Threads take blocks of 8 weight rows (dynamically, so a thread slowed by another
 * process does not hold the rest back) and read the 8 rows side by side, one accumulator each;
 * measured on the project's AMD EPYC this streamed faster than one row at a time or 2-4 rows.
 * The block is then reused (from cache) for each of the M input rows. Accumulation is in float32,
 * as in the library GEMM. Built at first use by mllama/cpu_kernels.py; the OpenMP runtime is the
 * one torch already loaded (same soname), so both share one thread pool.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BLOCK 8
#ifndef PREFETCH
#define PREFETCH 512  /* bytes ahead in each weight row (2-4 rows of x: +11-14%; benchmarks/RESULTS.md) */
#endif

static float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* AVX-512 BF16: vdpbf16ps multiplies pairs of bf16 and adds both products to float32 lanes.
 * ROWS rows of w starting at w, against x; only the last partial vector of 32 is loaded masked
 * (masked loads on every step streamed 38 GB/s against 45 unmasked: benchmarks/RESULTS.md). */
#define DEFINE_AVX512(NAME, ROWS)                                                                   \
    __attribute__((target("avx512f,avx512bw,avx512bf16")))                                          \
    static void NAME(const uint16_t *x, const uint16_t *w, float *out, int64_t k) {                  \
        __m512 acc[ROWS];                                                                           \
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();                                \
        const int64_t kmain = k / 32 * 32;  /* plain loads there: masked ones every step were slower */ \
        for (int64_t i = 0; i < kmain; i += 32) {                                                   \
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + i));                      \
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                \
                if (PREFETCH) __builtin_prefetch((const char *)(w + r * k + i) + PREFETCH);          \
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512((const void *)(w + r * k + i)), xv); \
            }                                                                                       \
        }                                                                                           \
        for (int64_t i = kmain; i < k; i += 32) {                                                   \
            const __mmask32 take = k - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (k - i)) - 1); \
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(take, x + i);                          \
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {                                \
                if (PREFETCH) __builtin_prefetch((const char *)(w + r * k + i) + PREFETCH);          \
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(take, w + r * k + i), xv); \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(acc[r]);                       \
    }
DEFINE_AVX512(rows_avx512bf16_block, BLOCK)
DEFINE_AVX512(rows_avx512bf16_one, 1)

/* AMX-BF16 (Intel Sapphire Rapids and later): one tile product multiplies a 16 x 32 bf16 tile by a
 * 32 x 16 one into 16 x 16 float32, pairs of products accumulated in float32 as vdpbf16ps does. The
 * weight block is the first operand, read in place (16 rows of 32 values each, a row stride apart):
 * no repacking. x, packed once per call into pairs of k (the second operand's layout), fills 16
 * columns per tile; a tile product costs the same for 1 or 16 of them, so up to 16 rows of x stream
 * the weights once at memory speed, where the AVX-512 loop rereads each block once per row of x.
 * A block of 32 weight rows (two tiles) meets 32 rows of x (two tiles, four results) per pass over
 * k; more rows of x pass over the same block again, from cache. Each output is its own row of x
 * against the weights, summed in one order: a row gets the same bits in any batch of 2 or more. */
#define AMX_ROWS 32        /* weight rows per block: two tiles (streamed faster than one or four) */
#define AMX_MAX_M 64       /* more rows of x: the AVX-512 loop (torch's GEMM wins from about 128) */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Linux hands out the AMX register state only to processes that ask (once; every thread then has it). */
static int amx_usable(void) {
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile")) return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* Tile t of c ([tile][weight row][column of x]) to out, for `cols` rows of x from j0 and 16 weight rows from row. */
static void amx_put(const float c[16][16], float *out, int64_t n, int64_t row, int64_t j0, int64_t cols) {
    for (int64_t j = 0; j < cols; j++)
        for (int r = 0; r < 16; r++) out[(j0 + j) * n + row + r] = c[r][j];
}

/* Rows [row0, row0 + 32) of w against every row of x (xpack: (m tiles, k / 32, 16, 16) pairs). */
__attribute__((target("amx-tile,amx-bf16,avx512f")))
static void amx_block(const uint16_t *w, const uint32_t *xpack, float *out, int64_t row0, int64_t m, int64_t n,
                      int64_t k) {
    const uint16_t *w0 = w + row0 * k, *w1 = w + (row0 + 16) * k;
    const int64_t kblocks = k / 32, stride = k * 2;
    float c[4][16][16] __attribute__((aligned(64)));  /* [result tile][weight row][column of x] */
    int64_t j0 = 0;
    for (; m - j0 > 16; j0 += 32) {  /* two tiles of x: results (w0, x0) (w1, x0) (w0, x1) (w1, x1) */
        const uint32_t *x0 = xpack + (j0 / 16) * kblocks * 256, *x1 = x0 + kblocks * 256;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < kblocks; kb++) {
            _tile_loadd(6, x0 + kb * 256, 64);
            _tile_loadd(7, x1 + kb * 256, 64);
            _tile_loadd(4, w0 + kb * 32, stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, w1 + kb * 32, stride);
            _tile_dpbf16ps(1, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        const int64_t cols1 = m - j0 - 16 < 16 ? m - j0 - 16 : 16;
        amx_put(c[0], out, n, row0, j0, 16);
        amx_put(c[1], out, n, row0 + 16, j0, 16);
        amx_put(c[2], out, n, row0, j0 + 16, cols1);
        amx_put(c[3], out, n, row0 + 16, j0 + 16, cols1);
    }
    if (j0 < m) {  /* one tile of x left: results (w0, x) (w1, x) */
        const uint32_t *x0 = xpack + (j0 / 16) * kblocks * 256;
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t kb = 0; kb < kblocks; kb++) {
            _tile_loadd(6, x0 + kb * 256, 64);
            _tile_loadd(4, w0 + kb * 32, stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_loadd(5, w1 + kb * 32, stride);
            _tile_dpbf16ps(1, 5, 6);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        amx_put(c[0], out, n, row0, j0, m - j0);
        amx_put(c[1], out, n, row0 + 16, j0, m - j0);
    }
}

/* x: (m <= AMX_MAX_M, k) with k a multiple of 32; weight rows past the last whole block of 32 go to
 * the AVX-512 loop. Returns 0, or -1 without memory for the packed x. */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))
static int gemv_amx(const uint16_t *x, const uint16_t *w, float *out, int64_t m, int64_t n, int64_t k, int threads) {
    const int64_t mtiles = (m + 15) / 16, kblocks = k / 32;
    /* (m tiles, k / 32, 16, 16) pairs: [tile of x][k block][pair of k][row of x in the tile], 0 past m */
    const size_t bytes = (size_t)(mtiles * kblocks) * 1024;
    uint32_t *xpack = aligned_alloc(64, bytes);
    if (!xpack) return -1;
    memset(xpack, 0, bytes);
    for (int64_t j = 0; j < m; j++) {
        const uint32_t *pairs = (const uint32_t *)(x + j * k);
        uint32_t *tile = xpack + (j / 16) * kblocks * 256 + j % 16;
        for (int64_t p = 0; p < k / 2; p++) tile[(p / 16) * 256 + (p % 16) * 16] = pairs[p];
    }
    tile_config cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    const int64_t blocks = n / AMX_ROWS;
#pragma omp parallel num_threads(threads)
    {
        _tile_loadconfig(&cfg);
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t b = 0; b < blocks; b++) amx_block(w, xpack, out, b * AMX_ROWS, m, n, k);
        _tile_release();
#pragma omp for schedule(static)
        for (int64_t row = blocks * AMX_ROWS; row < n; row++)
            for (int64_t j = 0; j < m; j++) rows_avx512bf16_one(x + j * k, w + row * k, out + j * n + row, k);
    }
    free(xpack);
    return 0;
}

/* AVX2 + FMA: widen bf16 to float32 (a 16-bit shift) and fused multiply-add; scalar tail. */
__attribute__((target("avx2,fma")))
static inline __m256 widen(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

#define DEFINE_AVX2(NAME, ROWS)                                                                     \
    __attribute__((target("avx2,fma")))                                                             \
    static void NAME(const uint16_t *x, const uint16_t *w, float *out, int64_t k) {                  \
        __m256 acc[ROWS];                                                                           \
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();                                \
        const int64_t main_k = k - k % 8;                                                           \
        for (int64_t i = 0; i < main_k; i += 8) {                                                   \
            __m256 xv = widen(x + i);                                                               \
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++)                                  \
                acc[r] = _mm256_fmadd_ps(widen(w + r * k + i), xv, acc[r]);                         \
        }                                                                                           \
        for (int r = 0; r < ROWS; r++) {                                                            \
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1)); \
            s = _mm_hadd_ps(s, s);                                                                  \
            s = _mm_hadd_ps(s, s);                                                                  \
            float total = _mm_cvtss_f32(s);                                                         \
            for (int64_t i = main_k; i < k; i++) total += bf16_to_float(x[i]) * bf16_to_float(w[r * k + i]); \
            out[r] = total;                                                                         \
        }                                                                                           \
    }
DEFINE_AVX2(rows_avx2_block, BLOCK)
DEFINE_AVX2(rows_avx2_one, 1)

/* Which instruction set this CPU can run: 3 = AMX-BF16 (with AVX-512 BF16), 2 = AVX-512 BF16,
 * 1 = AVX2 + FMA, 0 = neither. */
int mllama_gemv_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"))
        return amx_usable() ? 3 : 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
}

void mllama_gemv_bf16(const uint16_t *x, const uint16_t *w, float *out, int64_t m, int64_t n, int64_t k,
                      int threads, int level) {
    /* one row: the AVX-512 loop streams a little faster than the tiles (benchmarks/RESULTS.md) */
    if (level == 3 && 2 <= m && m <= AMX_MAX_M && k % 32 == 0 && gemv_amx(x, w, out, m, n, k, threads) == 0) return;
    if (level == 3) level = 2;
    const int64_t blocks = n / BLOCK;
#pragma omp parallel num_threads(threads)
    {
        float part[BLOCK];
#pragma omp for schedule(dynamic, 64) nowait
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t row = b * BLOCK;
            for (int64_t j = 0; j < m; j++) {
                if (level == 2)
                    rows_avx512bf16_block(x + j * k, w + row * k, part, k);
                else
                    rows_avx2_block(x + j * k, w + row * k, part, k);
                memcpy(out + j * n + row, part, sizeof part);
            }
        }
#pragma omp for schedule(static)
        for (int64_t row = blocks * BLOCK; row < n; row++) {  /* the last n % BLOCK rows */
            for (int64_t j = 0; j < m; j++) {
                if (level == 2)
                    rows_avx512bf16_one(x + j * k, w + row * k, out + j * n + row, k);
                else
                    rows_avx2_one(x + j * k, w + row * k, out + j * n + row, k);
            }
        }
    }
}
