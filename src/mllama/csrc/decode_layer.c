/* A text decoder's self-attention layer for one decode token (one row) in one call: the kernels that
 * a decode step already runs (RMSNorm and RoPE from scans.c, the quantized row products from
 * gemm_small.c and int4_rows.h, the attention from decode_attention.c), called through the pointers
 * they are given here in the order and with the arguments that the layer's modules give them, and the
 * two residual adds rounded to bf16 as torch rounds them. So the output has the bits of the modules'
 * route; what goes is the time between the calls: each torch op and Python line there ran right after
 * a weight had streamed through every cache (benchmarks/RESULTS.md). mllama.decode_layer drives it. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

typedef int (*rows_row_fn)(const uint16_t *, int64_t, int64_t, int64_t, const void *, const void *,
                           const void *, int, int64_t, uint16_t *, int);
typedef int (*rows_silu_fn)(const uint16_t *, int64_t, int64_t, int64_t, const void *, const void *,
                            const void *, const void *, const void *, const void *, int, int64_t, uint16_t *, int);
typedef int (*small_row_fn)(int, const uint16_t *, int64_t, int64_t, int64_t, const void *, const void *,
                            const void *, int, int64_t, uint16_t *, int, int);
typedef int (*small_silu_fn)(int, const uint16_t *, int64_t, int64_t, int64_t, const void *, const void *,
                             const void *, const void *, const void *, const void *, int, int64_t, uint16_t *,
                             int, int);
typedef int (*rms_fn)(const uint16_t *, const uint16_t *, int64_t, int64_t, float, uint16_t *, int);
typedef int (*rope_fn)(const uint16_t *, const uint16_t *, int64_t, int64_t, int64_t, int64_t, const uint16_t *,
                       const uint16_t *, uint16_t *, uint16_t *, int);
typedef int (*attend_fn)(const uint16_t *, const uint16_t *, const uint16_t *, const uint8_t *, const int64_t *,
                         int64_t, int64_t, int64_t, int64_t, int64_t, float, uint16_t *, int, int);

#define KIND_INT4_ROWS 0  /* int4_rows.h's blocks of 32 rows: mllama_int4_rows_row_bf16 / _silu_bf16 */
#define KIND_SMALL 1      /* gemm_small.c's formats: mllama_gemm_small_row_bf16 / _silu_bf16 */

/* One linear as its one-row kernel takes it (mllama.decode_layer.row_linear fills it). */
typedef struct {
    void *row;        /* the one-row product */
    void *silu;       /* the fused silu(gate) * up entry of the same kind (read from the gate only) */
    int64_t kind, fmt, level, scale_bf16, group;
    int64_t n, k_in, k;  /* outputs, input values, values a stored row holds (int4: padded) */
    const void *w, *scale, *offset;
} row_linear;

typedef struct {
    row_linear q, k, v, o, gate, up, down;
    const uint16_t *norm_in, *norm_post;  /* input_layernorm, post_attention_layernorm weights */
    void *rms, *rope, *attend;
    int64_t hidden, heads, kv_heads, head_dim;
    float eps_in, eps_post, scale;  /* as the modules pass them: eps, head_dim ** -0.5 */
} layer;

static int product(const row_linear *l, const uint16_t *x, uint16_t *out, int threads) {
    if (l->kind == KIND_INT4_ROWS)
        return ((rows_row_fn)l->row)(x, l->k_in, l->n, l->k, l->w, l->scale, l->offset, (int)l->scale_bf16,
                                     l->group, out, threads);
    return ((small_row_fn)l->row)((int)l->fmt, x, l->k_in, l->n, l->k, l->w, l->scale, l->offset,
                                  (int)l->scale_bf16, l->group, out, threads, (int)l->level);
}

static int silu_product(const row_linear *g, const row_linear *u, const uint16_t *x, uint16_t *out, int threads) {
    if (g->kind == KIND_INT4_ROWS)
        return ((rows_silu_fn)g->silu)(x, g->k_in, g->n, g->k, g->w, g->scale, g->offset, u->w, u->scale,
                                       u->offset, (int)g->scale_bf16, g->group, out, threads);
    return ((small_silu_fn)g->silu)((int)g->fmt, x, g->k_in, g->n, g->k, g->w, g->scale, g->offset, u->w,
                                    u->scale, u->offset, (int)g->scale_bf16, g->group, out, threads, (int)g->level);
}

/* out = bf16(a + b), n values: torch's bf16 add (the sum in float32, rounded to nearest even). */
static void add_bf16(const uint16_t *a, const uint16_t *b, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = round_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

/* x (hidden) bf16 -> out (hidden): the layer's forward for one token at position *position, its K/V
 * written to slot *slot of the layer's cache (cache_k, cache_v: (slots, kv_heads, max_len, head_dim)
 * bf16, contiguous), attending to slot `first` over keys [0, length) where mask (length bytes, or NULL
 * for all) allows. cos, sin: (head_dim) bf16, the token's RoPE. Returns 0, or -1 for arguments it does
 * not take or a kernel that refused (out and the cache row may then be partly written; the modules'
 * route writes the same cache row again). */
int mllama_decode_layer(const layer *L, const uint16_t *x, uint16_t *out, const uint16_t *cos, const uint16_t *sin,
                        uint16_t *cache_k, uint16_t *cache_v, int64_t slots, int64_t max_len, const int64_t *slot,
                        const int64_t *position, int64_t first, int64_t length, const uint8_t *mask, int threads) {
    const int64_t hidden = L->hidden, d = L->head_dim, hq = L->heads, hkv = L->kv_heads, inter = L->gate.n;
    if (*slot < 0 || *slot >= slots || *position < 0 || *position >= max_len || first < 0 || first >= slots
        || length < 1 || length > max_len)
        return -1;
    if (L->q.n != hq * d || L->k.n != hkv * d || L->v.n != hkv * d || L->o.k_in != hq * d || L->o.n != hidden
        || L->down.k_in != inter || L->down.n != hidden || L->up.n != inter || L->q.k_in != hidden
        || L->k.k_in != hidden || L->v.k_in != hidden || L->gate.k_in != hidden || L->up.k_in != hidden)
        return -1;
    const size_t values = (size_t)(3 * hidden + 3 * hq * d + 3 * hkv * d + inter);
    uint16_t *buf = malloc(values * sizeof *buf);
    if (!buf) return -1;
    uint16_t *normed = buf, *q = normed + hidden, *k = q + hq * d, *v = k + hkv * d, *q_rot = v + hkv * d,
             *k_rot = q_rot + hq * d, *attended = k_rot + hkv * d, *mid = attended + hq * d,
             *gated = mid + hidden, *down = gated + inter;
    int rc = ((rms_fn)L->rms)(x, L->norm_in, 1, hidden, L->eps_in, normed, threads);
    if (rc == 0) rc = product(&L->q, normed, q, threads);
    if (rc == 0) rc = product(&L->k, normed, k, threads);
    if (rc == 0) rc = product(&L->v, normed, v, threads);
    if (rc == 0) rc = ((rope_fn)L->rope)(q, k, 1, hq, hkv, d, cos, sin, q_rot, k_rot, threads);
    if (rc == 0) {
        const int64_t head_stride = max_len * d, slot_stride = hkv * head_stride;
        for (int64_t h = 0; h < hkv; h++) {
            const int64_t at = *slot * slot_stride + h * head_stride + *position * d;
            memcpy(cache_k + at, k_rot + h * d, (size_t)d * sizeof *k_rot);
            memcpy(cache_v + at, v + h * d, (size_t)d * sizeof *v);
        }
        /* q (1, hq, d); k, v the slot's (hkv, length of max_len, d); the mask's one row */
        const int64_t strides[9] = {hq * d, d, slot_stride, head_stride, d, slot_stride, head_stride, d, length};
        rc = ((attend_fn)L->attend)(q_rot, cache_k + first * slot_stride, cache_v + first * slot_stride, mask,
                                    strides, 1, hq, hkv, length, d, L->scale, attended, 0, threads);
    }
    if (rc == 0) rc = product(&L->o, attended, down, threads);
    if (rc == 0) {
        add_bf16(x, down, hidden, mid);
        rc = ((rms_fn)L->rms)(mid, L->norm_post, 1, hidden, L->eps_post, normed, threads);
    }
    if (rc == 0) rc = silu_product(&L->gate, &L->up, normed, gated, threads);
    if (rc == 0) rc = product(&L->down, gated, down, threads);
    if (rc == 0) add_bf16(mid, down, hidden, out);
    free(buf);
    return rc;
}

/* mllama_decode_layer through `count` layers in turn (a text decoder's self-attention layers with no
 * cross-attention layer between them that runs), layer i with the cache of cache_k[i], cache_v[i]:
 * x -> out, one call for a decode step's whole stack. Returns 0, or -1 as mllama_decode_layer (the
 * caches of the layers before may then hold this token's rows; the modules' route writes them again). */
int mllama_decode_layers(const layer *const *layers, int64_t count, const uint16_t *x, uint16_t *out,
                         const uint16_t *cos, const uint16_t *sin, uint16_t *const *cache_k, uint16_t *const *cache_v,
                         int64_t slots, int64_t max_len, const int64_t *slot, const int64_t *position, int64_t first,
                         int64_t length, const uint8_t *mask, int threads) {
    if (count < 1) return -1;
    const int64_t hidden = layers[0]->hidden;
    for (int64_t i = 1; i < count; i++)
        if (layers[i]->hidden != hidden) return -1;
    uint16_t *between = count > 1 ? malloc((size_t)(2 * hidden) * sizeof *between) : NULL;
    if (count > 1 && !between) return -1;
    int rc = 0;
    const uint16_t *in = x;
    for (int64_t i = 0; i < count && rc == 0; i++) {
        uint16_t *to = i == count - 1 ? out : between + (i % 2) * hidden;
        rc = mllama_decode_layer(layers[i], in, to, cos, sin, cache_k[i], cache_v[i], slots, max_len, slot, position,
                                 first, length, mask, threads);
        in = to;
    }
    free(between);
    return rc;
}
