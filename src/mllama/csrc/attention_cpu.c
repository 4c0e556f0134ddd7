/* Unmasked softmax attention over bf16 q, k, v, for the vision encoder's thousands of positions per
 * image, on AMX-BF16 tiles or with AVX-512 BF16 (speed against torch's CPU flash attention:
 * benchmarks/RESULTS.md):
 *   out[i] = sum_j softmax_j(scale * q[i] . k[j] + b[j]) v[j],   float32 sums, out rounded to bf16 once,
 * where b[j] is `bias` for keys j >= bias_from and 0 before: a key that stands for exp(bias) equal
 * keys (one padded tile run for several, mllama/tile_attention.py).
 *
 * Keys and values are packed once per call into the second tile operand's layout (pairs of the
 * summed index), which is also vdpbf16ps's: a 64-byte row of kpack is 16 keys' values at two dims,
 * one of vpack 16 dims' values at two keys:
 *   kpack[key block of 16][d chunk of 32][pair r][key n][2] = k[16 kb + n][32 c + 2 r + i]
 *   vpack[key chunk of 32][d block of 16][pair r][dim n][2] = v[32 kc + 2 r + i][16 e + n]
 * zero past lk and d, so padding adds nothing to any sum. A work item is QROWS query rows of one
 * (batch, head) pair: each packed key and value is read from L3 once for all of them. It walks the
 * keys in blocks of KEYS (scores of 32 rows, the row softmax running over the blocks, the
 * probabilities rounded to bf16 as torch's CPU flash attention does before its second product, p v
 * accumulated in float32) and scales each row by 1 / sum at the end. head_dim up to 96 (six result
 * tiles of 16 dims beside one tile of probabilities and one of values). The tiles run only where
 * gemm_amx.c's mllama_amx_usable said yes (the process then holds the tile state); the AVX-512 BF16
 * products take each q (or p) pair broadcast against a packed row. Built at first use by
 * mllama/cpu_attention.py; the OpenMP runtime is the one torch loaded.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "exp2.h"

#ifndef QROWS
#define QROWS 256       /* query rows per work item: each key and value streams in once for all of them */
#endif
#ifndef KEYS
#define KEYS 512        /* keys per block: a multiple of 32 */
#endif
#define RESCALE 8.0f    /* log2 of how far probabilities may exceed 1 before a row's sums are rescaled */
#define MAX_D 96

/* Key tiles kt and kt + 1 of a row's raw scores in a block (tile kt at srow + 256 kt), each tile's
 * `add` added (none: NULL). */
__attribute__((target("avx512f")))
static inline void load_scores(const float *srow, const __m512 *add, int64_t kt, __m512 *x0, __m512 *x1) {
    *x0 = _mm512_loadu_ps(srow + kt * 256);
    *x1 = _mm512_loadu_ps(srow + kt * 256 + 256);
    if (add) {
        *x0 = _mm512_add_ps(*x0, add[kt]);
        *x1 = _mm512_add_ps(*x1, add[kt + 1]);
    }
}

/* The largest of a row's raw scores in a block, each tile's `add` added. */
__attribute__((target("avx512f")))
static inline float block_max(const float *srow, const __m512 *add, int64_t ntiles) {
    __m512 m0 = _mm512_set1_ps(-__builtin_inff()), m1 = m0;
    for (int64_t kt = 0; kt < ntiles; kt += 2) {
        __m512 x0, x1;
        load_scores(srow, add, kt, &x0, &x1);
        m0 = _mm512_max_ps(m0, x0);
        m1 = _mm512_max_ps(m1, x1);
    }
    return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

/* 2^(c x - shift) of a row's raw scores x in a block (each tile's `add` added) into prow as bf16; returns
 * their float32 sum and, with `seen`, the largest x (one pass over the scores instead of two). */
__attribute__((target("avx512f,avx512bf16")))
static inline float exp_row(const float *srow, const __m512 *add, int64_t ntiles, __m512 cv, __m512 shift,
                            uint16_t *prow, float *seen) {
    __m512 t0 = _mm512_setzero_ps(), t1 = _mm512_setzero_ps();
    __m512 m0 = _mm512_set1_ps(-__builtin_inff()), m1 = m0;
    for (int64_t kt = 0; kt < ntiles; kt += 2) {
        __m512 x0, x1;
        load_scores(srow, add, kt, &x0, &x1);
        if (seen) {
            m0 = _mm512_max_ps(m0, x0);
            m1 = _mm512_max_ps(m1, x1);
        }
        const __m512 e0 = exp2_neg(_mm512_fmsub_ps(x0, cv, shift)), e1 = exp2_neg(_mm512_fmsub_ps(x1, cv, shift));
        t0 = _mm512_add_ps(t0, e0);
        t1 = _mm512_add_ps(t1, e1);
        _mm512_storeu_si512(prow + kt * 16, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    }
    if (seen) *seen = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    return _mm512_reduce_add_ps(_mm512_add_ps(t0, t1));
}

/* Key block kb (16 keys) into kpack: a tile per d chunk, row r holding dims (2r, 2r + 1) of each key. */
static void pack_k(const uint16_t *k, int64_t k_l, int64_t lk, int64_t d, int64_t dchunks, int64_t kb,
                   uint16_t *kpack) {
    uint16_t *dst = kpack + kb * dchunks * 512;
    memset(dst, 0, (size_t)dchunks * 1024);
    for (int64_t n = 0; n < 16 && kb * 16 + n < lk; n++) {
        const uint16_t *row = k + (kb * 16 + n) * k_l;
        int64_t j = 0;
        for (; j + 1 < d; j += 2) {  /* a pair of dims moves as one 32-bit word */
            uint32_t pair;
            memcpy(&pair, row + j, 4);
            memcpy(dst + (j / 32) * 512 + ((j % 32) / 2) * 32 + n * 2, &pair, 4);
        }
        if (j < d) dst[(j / 32) * 512 + ((j % 32) / 2) * 32 + n * 2] = row[j];
    }
}

/* Key chunk kc (32 keys) of v into vpack: a tile per 16 dims, row r interleaving keys 2r and 2r + 1. */
__attribute__((target("avx512f,avx512bw")))
static void pack_v(const uint16_t *v, int64_t v_l, int64_t lk, int64_t d, int64_t dblocks, int64_t kc,
                   uint16_t *vpack) {
    uint16_t *dst = vpack + kc * dblocks * 512;
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t r = 0; r < 16; r++) {
        const int64_t key = kc * 32 + 2 * r;
        for (int64_t j = 0; j < dblocks * 16; j += 32) {
            const __mmask32 dims = d - j >= 32 ? 0xffffffffu : (__mmask32)((1u << (d - j)) - 1);
            const __m512i a = key < lk ? _mm512_maskz_loadu_epi16(dims, v + key * v_l + j) : _mm512_setzero_si512();
            const __m512i b = key + 1 < lk ? _mm512_maskz_loadu_epi16(dims, v + (key + 1) * v_l + j)
                                           : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + (j / 16) * 512 + r * 32, _mm512_permutex2var_epi16(a, lo, b));
            if (j / 16 + 1 < dblocks)
                _mm512_storeu_si512(dst + (j / 16 + 1) * 512 + r * 32, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

/* Scores of the 32 query rows at qbuf (rows dq apart) against the ntiles key tiles (16 keys each) of
 * a block, into s: key tile kt of row i at s + (i / 16) * 16 * KEYS + kt * 256 + (i % 16) * 16 (the
 * layout of the tiles' stores). Tiles: two query tiles x two key tiles per pass over d. */
__attribute__((target("amx-tile,amx-bf16")))
static void scores_tiles(const uint16_t *qbuf, int64_t dq, int64_t dchunks, const uint16_t *kblock, int64_t ntiles,
                         float *s) {
    for (int64_t kt = 0; kt < ntiles; kt += 2) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t ch = 0; ch < dchunks; ch++) {
            _tile_loadd(4, qbuf + ch * 32, dq * 2);
            _tile_loadd(5, qbuf + 16 * dq + ch * 32, dq * 2);
            _tile_loadd(6, kblock + (kt * dchunks + ch) * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
            _tile_loadd(7, kblock + ((kt + 1) * dchunks + ch) * 512, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, s + kt * 256, 64);
        _tile_stored(1, s + 16 * KEYS + kt * 256, 64);
        _tile_stored(2, s + kt * 256 + 256, 64);
        _tile_stored(3, s + 16 * KEYS + kt * 256 + 256, 64);
    }
}

/* The same with AVX-512 BF16: SROWS query rows (a divisor of 32) x STILES key tiles (even) of sums in
 * registers, each packed key row (16 keys at a pair of dims) loaded once for the SROWS rows' broadcast
 * q pairs. */
#ifndef SROWS
#define SROWS 8
#endif
#ifndef STILES
#define STILES 2  /* 8 x 2 against 4 x 4 or 2 x 8: 1.09x / 1.34x on the AMD EPYC */
#endif
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void scores_avx512(const uint16_t *qbuf, int64_t dq, int64_t d, int64_t dchunks, const uint16_t *kblock,
                          int64_t ntiles, float *s) {
    const int64_t dpairs = (d + 1) / 2;  /* an odd d's last pair holds a zero in q and in k */
    for (int64_t i0 = 0; i0 < 32; i0 += SROWS) {
        for (int64_t kt0 = 0; kt0 < ntiles; kt0 += STILES) {
            const int tiles = ntiles - kt0 < STILES ? (int)(ntiles - kt0) : STILES;  /* ntiles is even */
            __m512 acc[SROWS][STILES];
            for (int i = 0; i < SROWS; i++)
                for (int t = 0; t < STILES; t++) acc[i][t] = _mm512_setzero_ps();
            for (int64_t pp = 0; pp < dpairs; pp++) {
                const uint16_t *krow = kblock + (kt0 * dchunks + pp / 16) * 512 + (pp % 16) * 32;
                __m512bh qv[SROWS];
                for (int i = 0; i < SROWS; i++) {
                    uint32_t pair;
                    memcpy(&pair, qbuf + (i0 + i) * dq + 2 * pp, 4);
                    qv[i] = (__m512bh)_mm512_set1_epi32((int)pair);
                }
                for (int t = 0; t < STILES; t++) {
                    if (t >= tiles) break;
                    const __m512bh kv = (__m512bh)_mm512_loadu_si512(krow + t * dchunks * 512);
                    for (int i = 0; i < SROWS; i++) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], kv, qv[i]);
                }
            }
            for (int i = 0; i < SROWS; i++)
                for (int t = 0; t < tiles; t++)
                    _mm512_storeu_ps(s + ((i0 + i) / 16) * 16 * KEYS + (kt0 + t) * 256 + ((i0 + i) % 16) * 16, acc[i][t]);
        }
    }
}

/* The six result tiles of 16 dims (tile numbers must be immediates). */
#define TILE_EACH(dblocks, OP) do {                          \
        OP(0);                                              \
        if ((dblocks) > 1) OP(1);                           \
        if ((dblocks) > 2) OP(2);                           \
        if ((dblocks) > 3) OP(3);                           \
        if ((dblocks) > 4) OP(4);                           \
        if ((dblocks) > 5) OP(5);                           \
    } while (0)

/* acc (rows da apart) += p v for the first `rows` (<= 32) of the block's probability rows p (KEYS
 * apart) and its nkp keys' packed values, a query tile at a time, its sums in up to six tiles. */
__attribute__((target("amx-tile,amx-bf16")))
static void pv_tiles(const uint16_t *p, const uint16_t *vblock, int64_t nkp, int64_t dblocks, int64_t da,
                     int64_t rows, float *acc) {
    for (int64_t qt = 0; qt < 2 && qt * 16 < rows; qt++) {
        float *a = acc + qt * 16 * da;
#define LOAD_ACC(e) _tile_loadd(e, a + (e) * 16, da * 4)
#define STORE_ACC(e) _tile_stored(e, a + (e) * 16, da * 4)
#define PV(e) do { _tile_loadd(7, vt + (e) * 512, 64); _tile_dpbf16ps(e, 6, 7); } while (0)
        TILE_EACH(dblocks, LOAD_ACC);
        for (int64_t kc = 0; kc < nkp / 32; kc++) {
            _tile_loadd(6, p + qt * 16 * KEYS + kc * 32, KEYS * 2);
            const uint16_t *vt = vblock + kc * dblocks * 512;
            TILE_EACH(dblocks, PV);
        }
        TILE_EACH(dblocks, STORE_ACC);
#undef LOAD_ACC
#undef STORE_ACC
#undef PV
    }
}

/* The same with AVX-512 BF16: PROWS rows (a divisor of 32) x up to six blocks of 16 dims in registers, each packed
 * value row (16 dims at a pair of keys) loaded once for the PROWS rows' broadcast p pairs. */
#ifndef PROWS
#define PROWS 4
#endif
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void pv_avx512(const uint16_t *p, const uint16_t *vblock, int64_t nkp, int64_t dblocks, int64_t da,
                      int64_t rows, float *acc) {
    for (int64_t i0 = 0; i0 < rows; i0 += PROWS) {
        __m512 sum[PROWS][MAX_D / 16];
        for (int i = 0; i < PROWS; i++)
            for (int e = 0; e < MAX_D / 16; e++)
                sum[i][e] = e < dblocks ? _mm512_loadu_ps(acc + (i0 + i) * da + e * 16) : _mm512_setzero_ps();
        for (int64_t kp = 0; kp < nkp / 2; kp++) {  /* keys 2 kp and 2 kp + 1 */
            const uint16_t *vrow = vblock + (kp / 16) * dblocks * 512 + (kp % 16) * 32;
            __m512bh pv[PROWS];
            for (int i = 0; i < PROWS; i++) {
                uint32_t pair;
                memcpy(&pair, p + (i0 + i) * KEYS + 2 * kp, 4);
                pv[i] = (__m512bh)_mm512_set1_epi32((int)pair);
            }
            for (int e = 0; e < MAX_D / 16; e++) {
                if (e >= dblocks) break;
                const __m512bh vv = (__m512bh)_mm512_loadu_si512(vrow + e * 512);
                for (int i = 0; i < PROWS; i++) sum[i][e] = _mm512_dpbf16_ps(sum[i][e], vv, pv[i]);
            }
        }
        for (int i = 0; i < PROWS; i++)
            for (int e = 0; e < dblocks; e++) _mm512_storeu_ps(acc + (i0 + i) * da + e * 16, sum[i][e]);
    }
}

/* One work item: rows [0, rows) of q (at most QROWS) against all lk keys, a block of KEYS keys at a
 * time, the softmax running over the blocks. Each row's reference maximum moves only when a block's
 * maximum exceeds it by more than 2^RESCALE (then the row's sums so far are scaled down): the
 * probabilities stay below 2^RESCALE, and the result is the same softmax. Buffers (thread's own):
 * qbuf QROWS x (32 * dchunks) bf16, acc QROWS x (16 * dblocks) float32, s 32 x KEYS float32, p 32 x KEYS
 * bf16. tiles: the products on AMX tiles, else AVX-512 BF16. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
static void attend_rows(const uint16_t *q, int64_t q_l, int64_t rows, const uint16_t *kpack, const uint16_t *vpack,
                        uint16_t *out, int64_t o_l, int64_t lk, int64_t d, float scale, int64_t bias_from,
                        float bias, uint16_t *qbuf, float *acc, float *s, uint16_t *p, int tiles) {
    const int64_t dchunks = (d + 31) / 32, dblocks = (d + 15) / 16, dq = dchunks * 32, da = dblocks * 16;
    const int64_t pairs = (rows + 31) / 32;
    float mx[QROWS], sum[QROWS];
    memset(qbuf, 0, (size_t)(pairs * 32 * dq) * 2);
    for (int64_t i = 0; i < rows; i++) memcpy(qbuf + i * dq, q + i * q_l, (size_t)d * 2);
    memset(acc, 0, (size_t)(pairs * 32 * da) * 4);
    for (int64_t i = 0; i < QROWS; i++) {
        mx[i] = -__builtin_inff();
        sum[i] = 0.0f;
    }
    const float c = scale * 1.44269504088896341f;  /* exp(scale * x) = 2^(c * x) */
    const __m512 cv = _mm512_set1_ps(c);
    const __m512 raw_bias = _mm512_set1_ps(bias / scale);  /* in units of q . k, as the stored scores */
    __m512 add[KEYS / 16];

    for (int64_t key0 = 0; key0 < lk; key0 += KEYS) {
        const int64_t nk = lk - key0 < KEYS ? lk - key0 : KEYS, nkp = (nk + 31) / 32 * 32;
        const uint16_t *kblock = kpack + (key0 / 16) * dchunks * 512, *vblock = vpack + (key0 / 32) * dblocks * 512;
        const int64_t ntiles = nkp / 16;
        for (int64_t pair = 0; pair < pairs; pair++) {
            const int64_t r0 = pair * 32;
            if (tiles)
                scores_tiles(qbuf + r0 * dq, dq, dchunks, kblock, ntiles, s);
            else
                scores_avx512(qbuf + r0 * dq, dq, d, dchunks, kblock, ntiles, s);
            /* What each key tile of the block adds to its raw scores (units of q . k): the bias for keys
             * from bias_from on, -inf for the padding keys past lk (zero keys whose scores must not
             * count), 0 elsewhere; none at all for a block of plain keys. */
            const int plain = key0 + nkp <= bias_from && nk == nkp;
            if (!plain) {
                const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
                const __m512i first_biased = _mm512_set1_epi32((int)(bias_from - key0 < nkp ? bias_from - key0 : nkp));
                const __m512i first_pad = _mm512_set1_epi32((int)nk);
                for (int64_t kt = 0; kt < ntiles; kt++) {
                    const __m512i key = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(kt * 16)));
                    __m512 b = _mm512_maskz_mov_ps(_mm512_cmpge_epi32_mask(key, first_biased), raw_bias);
                    add[kt] = _mm512_mask_mov_ps(b, _mm512_cmpge_epi32_mask(key, first_pad),
                                                 _mm512_set1_ps(-__builtin_inff()));
                }
            }
            /* the block's probabilities, unnormalized, into bf16; padding keys and rows get 0. A row's
             * block maximum decides whether its reference maximum moves; past its first block the
             * exponentials are taken at the current reference while the maximum is found, and taken
             * again only in the rare block that moves it. */
            for (int64_t i = 0; i < 32; i++) {
                const float *srow = s + (i / 16) * 16 * KEYS + (i % 16) * 16;  /* key tile kt at srow + 256 kt */
                uint16_t *prow = p + i * KEYS;
                const int64_t row = r0 + i;
                if (row >= rows) {
                    memset(prow, 0, (size_t)nkp * 2);
                    continue;
                }
                const __m512 *adds = plain ? NULL : add;
                float part;
                if (mx[row] == -__builtin_inff()) {  /* the row's first block: nothing to rescale yet */
                    mx[row] = block_max(srow, adds, ntiles) * c;
                    part = exp_row(srow, adds, ntiles, cv, _mm512_set1_ps(mx[row]), prow, NULL);
                } else {
                    float seen;
                    part = exp_row(srow, adds, ntiles, cv, _mm512_set1_ps(mx[row]), prow, &seen);
                    if (seen * c > mx[row] + RESCALE) {
                        const float alpha = __builtin_exp2f(mx[row] - seen * c);
                        mx[row] = seen * c;
                        sum[row] *= alpha;
                        float *arow = acc + row * da;
                        for (int64_t e = 0; e < da; e += 16)
                            _mm512_storeu_ps(arow + e, _mm512_mul_ps(_mm512_loadu_ps(arow + e), _mm512_set1_ps(alpha)));
                        part = exp_row(srow, adds, ntiles, cv, _mm512_set1_ps(mx[row]), prow, NULL);
                    }
                }
                if (nk < nkp) memset(prow + nk, 0, (size_t)(nkp - nk) * 2);
                sum[row] += part;
            }
            const int64_t live = rows - r0 < 32 ? rows - r0 : 32;
            if (tiles)
                pv_tiles(p, vblock, nkp, dblocks, da, live, acc + r0 * da);
            else
                pv_avx512(p, vblock, nkp, dblocks, da, live, acc + r0 * da);
        }
    }
    const __mmask16 last = (__mmask16)((1u << (d - (dblocks - 1) * 16)) - 1);
    for (int64_t i = 0; i < rows; i++) {
        const __m512 inv = _mm512_set1_ps(1.0f / sum[i]);
        for (int64_t e = 0; e < dblocks; e++) {
            const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + i * da + e * 16), inv);
            _mm256_mask_storeu_epi16(out + i * o_l + e * 16, e + 1 < dblocks ? (__mmask16)0xffff : last,
                                     (__m256i)_mm512_cvtneps_pbh(o));
        }
    }
}

/* q (n1, n2, lq, d), k and v (n1, n2, lk, d), out (n1, n2, lq, d): bf16, d contiguous, strides in
 * elements: strides[0..2] q's (n1, n2, row), [3..5] k's, [6..8] v's, [9..11] out's; keys from
 * bias_from on get `bias` added to their scaled scores (bias_from >= lk: none). tiles: the products on
 * AMX tiles (only where mllama_amx_usable said yes), else with AVX-512 BF16. 0 on success, -1 for an
 * unsupported shape or no memory (nothing written then). */
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))
int mllama_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t n1,
                     int64_t n2, int64_t lq, int64_t lk, int64_t d, const int64_t *strides, float scale,
                     int64_t bias_from, float bias, int tiles, int threads) {
    if (n1 < 1 || n2 < 1 || lq < 1 || lk < 1 || d < 1 || d > MAX_D) return -1;
    const int64_t heads = n1 * n2, dchunks = (d + 31) / 32, dblocks = (d + 15) / 16;
    const int64_t kchunks = (lk + 31) / 32;
    const int64_t kpack_len = (kchunks * 2) * dchunks * 512, vpack_len = kchunks * dblocks * 512;
    uint16_t *kpack = aligned_alloc(64, (size_t)(heads * kpack_len) * 2);
    uint16_t *vpack = aligned_alloc(64, (size_t)(heads * vpack_len) * 2);
    if (!kpack || !vpack) {
        free(kpack);
        free(vpack);
        return -1;
    }
    const int64_t qblocks = (lq + QROWS - 1) / QROWS;
    const tile_config cfg = amx_config_16x64();
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < heads * (kchunks * 2); item++) {
            const int64_t h = item / (kchunks * 2), kb = item % (kchunks * 2);
            const uint16_t *kh = k + (h / n2) * strides[3] + (h % n2) * strides[4];
            pack_k(kh, strides[5], lk, d, dchunks, kb, kpack + h * kpack_len);
            if (kb < kchunks) {
                const uint16_t *vh = v + (h / n2) * strides[6] + (h % n2) * strides[7];
                pack_v(vh, strides[8], lk, d, dblocks, kb, vpack + h * vpack_len);
            }
        }
        float *s = aligned_alloc(64, (size_t)(32 * KEYS) * 4);
        uint16_t *p = aligned_alloc(64, (size_t)(32 * KEYS) * 2);
        uint16_t *qbuf = aligned_alloc(64, (size_t)(QROWS * dchunks * 32) * 2);
        float *acc = aligned_alloc(64, (size_t)(QROWS * dblocks * 16) * 4);
        if (!s || !p || !qbuf || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            if (tiles) _tile_loadconfig(&cfg);
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t item = 0; item < heads * qblocks; item++) {
                const int64_t h = item / qblocks, row0 = (item % qblocks) * QROWS;
                const int64_t rows = lq - row0 < QROWS ? lq - row0 : QROWS;
                const uint16_t *qh = q + (h / n2) * strides[0] + (h % n2) * strides[1] + row0 * strides[2];
                uint16_t *oh = out + (h / n2) * strides[9] + (h % n2) * strides[10] + row0 * strides[11];
                attend_rows(qh, strides[2], rows, kpack + h * kpack_len, vpack + h * vpack_len, oh, strides[11], lk,
                            d, scale, bias_from, bias, qbuf, acc, s, p, tiles);
            }
            if (tiles) _tile_release();
        }
        free(s);
        free(p);
        free(qbuf);
        free(acc);
    }
    free(kpack);
    free(vpack);
    return failed ? -1 : 0;
}
