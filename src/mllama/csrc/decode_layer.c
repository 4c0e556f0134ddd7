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

/* A cross-attention layer's decode step: its K/V are the image's (computed at the prompt), so only q, o
 * and the MLP stream; the two tanh gates are read from their parameters (bf16, one value each). */
typedef struct {
    row_linear q, o, gate, up, down;
    const uint16_t *norm_in, *norm_post, *q_norm;  /* input_layernorm, post_attention_layernorm, q_norm */
    const uint16_t *attn_gate, *mlp_gate;          /* cross_attn_attn_gate, cross_attn_mlp_gate */
    void *rms, *attend;
    int64_t hidden, heads, kv_heads, head_dim;
    float eps_in, eps_post, eps_q, scale;
} cross_layer;

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

/* torch's tanh of a bf16 scalar: the float tanh of its value rounded to bf16 (exported for the tests,
 * which compare it with torch over every bf16 value). */
uint16_t mllama_tanh_bf16(uint16_t v) { return round_bf16(tanhf(bf16_to_float(v))); }

/* out = bf16(a + bf16(bf16(b * row) * gate)), n values: `x + gate.tanh() * (b * text_row_mask)` as torch
 * rounds each op (row 1 or 0: the product by it is b or a signed zero, as torch's). */
static void add_gated(const uint16_t *a, const uint16_t *b, float row, float gate, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) {
        const float masked = bf16_to_float(round_bf16(bf16_to_float(b[i]) * row));
        out[i] = round_bf16(bf16_to_float(a[i]) + bf16_to_float(round_bf16(gate * masked)));
    }
}

/* x (hidden) bf16 -> out (hidden): a cross-attention layer's forward for one token whose row of
 * text_row_mask is *row_mask (bf16: 1, or 0 for a row that sees no image), against the image's k and v
 * ((kv_heads, tokens, head_dim) bf16, rows head_dim apart, heads kv_stride apart) where mask (tokens
 * bytes, or NULL for all) allows. Returns 0, or -1 for arguments it does not take or a kernel that
 * refused (out may then be partly written). */
int mllama_decode_cross_layer(const cross_layer *L, const uint16_t *x, uint16_t *out, const uint16_t *k,
                              const uint16_t *v, int64_t kv_stride, int64_t tokens, const uint8_t *mask,
                              const uint16_t *row_mask, int threads) {
    const int64_t hidden = L->hidden, d = L->head_dim, hq = L->heads, inter = L->gate.n;
    if (tokens < 1 || kv_stride < tokens * d || L->q.n != hq * d || L->q.k_in != hidden || L->o.k_in != hq * d
        || L->o.n != hidden || L->gate.k_in != hidden || L->up.k_in != hidden || L->up.n != inter
        || L->down.k_in != inter || L->down.n != hidden)
        return -1;
    const float row = bf16_to_float(*row_mask);
    const float attn_gate = bf16_to_float(mllama_tanh_bf16(*L->attn_gate));
    const float mlp_gate = bf16_to_float(mllama_tanh_bf16(*L->mlp_gate));
    uint16_t *buf = malloc((size_t)(3 * hidden + 3 * hq * d + inter) * sizeof(uint16_t));
    if (!buf) return -1;
    uint16_t *normed = buf, *q = normed + hidden, *qn = q + hq * d, *attended = qn + hq * d,
             *mid = attended + hq * d, *gated = mid + hidden, *down = gated + inter;
    int rc = ((rms_fn)L->rms)(x, L->norm_in, 1, hidden, L->eps_in, normed, threads);
    if (rc == 0) rc = product(&L->q, normed, q, threads);
    if (rc == 0) rc = ((rms_fn)L->rms)(q, L->q_norm, hq, d, L->eps_q, qn, threads);
    if (rc == 0) {
        /* a row that sees no image attends everywhere (the modules open its mask row) and is zeroed after */
        const int64_t strides[9] = {hq * d, d, L->kv_heads * kv_stride, kv_stride, d, L->kv_heads * kv_stride,
                                    kv_stride, d, tokens};
        rc = ((attend_fn)L->attend)(qn, k, v, row == 0.0f ? NULL : mask, strides, 1, hq, L->kv_heads, tokens, d,
                                    L->scale, attended, 0, threads);
    }
    if (rc == 0)
        for (int64_t i = 0; i < hq * d; i++) attended[i] = round_bf16(bf16_to_float(attended[i]) * row);
    if (rc == 0) rc = product(&L->o, attended, down, threads);
    if (rc == 0) {
        add_gated(x, down, 1.0f, attn_gate, hidden, mid);
        rc = ((rms_fn)L->rms)(mid, L->norm_post, 1, hidden, L->eps_post, normed, threads);
    }
    if (rc == 0) rc = silu_product(&L->gate, &L->up, normed, gated, threads);
    if (rc == 0) rc = product(&L->down, gated, down, threads);
    if (rc == 0) add_gated(mid, down, row, mlp_gate, hidden, out);
    free(buf);
    return rc;
}

/* A decode step's text layers in turn, x -> out, in one call: layer i is a self-attention layer
 * (kinds[i] 0: mllama_decode_layer with the cache a[i], b[i]) or a cross-attention layer (kinds[i] 1:
 * mllama_decode_cross_layer with the image's k a[i] and v b[i], heads kv_stride apart, `tokens` of them
 * under cross_mask and *row_mask; every cross layer's K/V laid out alike). Returns 0, or -1 as those do
 * (the caches of the layers before may then hold this token's rows; the modules' route writes them
 * again). */
int mllama_decode_stack(const void *const *layers, const int64_t *kinds, int64_t count, const uint16_t *x,
                        uint16_t *out, const uint16_t *cos, const uint16_t *sin, void *const *a, void *const *b,
                        int64_t slots, int64_t max_len, const int64_t *slot, const int64_t *position, int64_t first,
                        int64_t length, const uint8_t *mask, int64_t kv_stride, int64_t tokens,
                        const uint8_t *cross_mask, const uint16_t *row_mask, int threads) {
    if (count < 1) return -1;
    int64_t hidden = -1;
    for (int64_t i = 0; i < count; i++) {
        if (kinds[i] != 0 && (kinds[i] != 1 || !row_mask)) return -1;
        const int64_t h = kinds[i] == 0 ? ((const layer *)layers[i])->hidden : ((const cross_layer *)layers[i])->hidden;
        if (hidden >= 0 && h != hidden) return -1;
        hidden = h;
    }
    uint16_t *between = count > 1 ? malloc((size_t)(2 * hidden) * sizeof *between) : NULL;
    if (count > 1 && !between) return -1;
    int rc = 0;
    const uint16_t *in = x;
    for (int64_t i = 0; i < count && rc == 0; i++) {
        uint16_t *to = i == count - 1 ? out : between + (i % 2) * hidden;
        if (kinds[i] == 0)
            rc = mllama_decode_layer(layers[i], in, to, cos, sin, a[i], b[i], slots, max_len, slot, position, first,
                                     length, mask, threads);
        else
            rc = mllama_decode_cross_layer(layers[i], in, to, a[i], b[i], kv_stride, tokens, cross_mask, row_mask,
                                           threads);
        in = to;
    }
    free(between);
    return rc;
}
