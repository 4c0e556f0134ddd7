"""A self-attention decoder layer's one-token decode step in one C call (mllama.decode_layer,
csrc/decode_layer.c): the bits of the layer's modules and the same cache rows, every quantized form,
the modules' route wherever the call does not apply, and a plan that follows the layer's modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mllama import decode_layer
from mllama.cache import KVCache, KVWindow
from mllama.config import MllamaTextConfig
from mllama.int4_rows import pack_int4_rows
from mllama.linear import apply_cpu_kernels
from mllama.model import MllamaForCausalLM
from mllama.quantize import QuantizationConfig, quantize_model
from mllama.text import SelfAttentionDecoderLayer
from tiny import randomize_

CONFIG = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2, intermediate_size=256,
              num_hidden_layers=3, cross_attention_layers=[1], vocab_size=300, bos_token_id=1, eos_token_id=None,
              pad_token_id=0)
FORMS = ["int4 rows", "int4", "int8"]


def _model(form: str, *, seed: int = 0, image: bool = False, cross_layers: tuple[int, ...] = (1,)):
    """A MllamaForCausalLM of CONFIG (a cross-attention layer at 1), or with image a
    MllamaForConditionalGeneration of that text model (its cross-attention layers at cross_layers) under
    tiny config a's vision encoder; every parameter random and non-zero, quantized in `form` and on the
    kernels."""
    if image:
        from mllama.config import MllamaConfig
        from mllama.model import MllamaForConditionalGeneration
        from tiny import CONFIGS
        text = dict(CONFIG, cross_attention_layers=list(cross_layers))
        config = MllamaConfig.from_dict({"text_config": text, "vision_config": dict(CONFIGS["a"]["vision_config"]),
                                         "image_token_index": 300})
        model = MllamaForConditionalGeneration(config)
    else:
        model = MllamaForCausalLM(MllamaTextConfig.from_dict(CONFIG))
    randomize_(model, seed, scale=0.1)
    model = model.to(torch.bfloat16).eval()
    quantize_model(model, QuantizationConfig("int8") if form == "int8" else QuantizationConfig("int4", group_size=32))
    if form == "int4 rows":
        pack_int4_rows(model)
    return apply_cpu_kernels(model)


def _runs() -> bool:
    model = _model("int8")
    layer = model.model.layers[0]
    cache = KVCache(layers=[0], slots=1, heads=2, max_len=4, head_dim=16, dtype=torch.bfloat16, device="cpu")
    cos, sin = model.model.rotary_emb(torch.tensor([[0]]), torch.bfloat16)
    window = KVWindow(cache, slots=torch.tensor([0]), positions=torch.tensor([[0]]), first=0, length=1)
    with torch.inference_mode():
        return decode_layer.one_token(layer, torch.zeros(1, 1, 128, dtype=torch.bfloat16), cos, sin, None, window, 0,
                                      kernel_types=_kernel_types()) is not None


def _kernel_types():
    from mllama.row_kernels import _LAYER_KERNELS
    return _LAYER_KERNELS


needs_call = pytest.mark.skipif(not _runs(), reason="the one-call decode layer does not run here (no AVX-512 / kernels)")


def _step_inputs(model, *, position: int, slots: int = 3, slot: int = 1, seed: int = 0):
    """A token's hidden state, its RoPE, and a KV cache whose slot `slot` holds `position` random keys."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, 1, 128, generator=gen) * 2).bfloat16()
    cos, sin = model.model.rotary_emb(torch.tensor([[position]]), torch.bfloat16)
    cache = KVCache(layers=[0, 2], slots=slots, heads=2, max_len=position + 5, head_dim=16, dtype=torch.bfloat16,
                    device="cpu")
    for buffers in (cache.k, cache.v):
        for buf in buffers.values():
            buf.copy_(torch.randn(buf.shape, generator=gen))
    window = KVWindow(cache, slots=torch.tensor([slot]), positions=torch.tensor([[position]]), first=slot,
                      length=position + 1)
    return x, cos, sin, window


def _both_routes(layer, x, cos, sin, mask, window, layer_idx):
    """(one call's output and cache, the modules' output and cache), each from its own copy of the cache."""
    modules_window = copy.deepcopy(window)
    with torch.inference_mode():
        fast = decode_layer.one_token(layer, x, cos, sin, mask, window, layer_idx, kernel_types=_kernel_types())
        assert fast is not None, "the one call did not run"
        slow = SelfAttentionDecoderLayer.forward(layer, x, cos, sin, mask, cache=modules_window, layer_idx=layer_idx)
    return (fast, window.cache), (slow, modules_window.cache)


@needs_call
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("masked", [False, True])
def test_one_call_gives_the_modules_bits_and_cache(form, masked):
    """A token at position 9 of slot 1 (of 3) through a layer of each quantized form: the output's bits
    and the K/V written into the cache are the modules' (the same kernels, the residual adds rounded as
    torch's), with every key visible and with a mask hiding some."""
    model = _model(form)
    x, cos, sin, window = _step_inputs(model, position=9)
    mask = None
    if masked:
        mask = torch.ones(1, 1, 1, 10, dtype=torch.bool)
        mask[..., [0, 3, 4]] = False
    for idx in (0, 2):
        (fast, fast_cache), (slow, slow_cache) = _both_routes(model.model.layers[idx], x, cos, sin, mask, window, idx)
        assert torch.equal(fast, slow)
        for a, b in ((fast_cache.k, slow_cache.k), (fast_cache.v, slow_cache.v)):
            assert torch.equal(a[idx], b[idx])
    assert not torch.equal(fast, x)


def _counted(monkeypatch, name: str) -> list[bool]:
    """decode_layer.<name> wrapped: each call's whether it ran, appended to the returned list."""
    calls: list[bool] = []
    original = getattr(decode_layer, name)

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(decode_layer, name, counted)
    return calls


@needs_call
@pytest.mark.parametrize("form", ["int4 rows", "int8"])
def test_generation_through_the_one_call_equals_the_modules(form, monkeypatch):
    """Greedy generation: each decode step runs both self-attention layers in one call (the stack; the
    cross-attention layer skipped as without an image), or with the stack off each layer in a call of
    its own; the tokens and every step's logits equal the modules' route bit for bit. A batch of two
    prompts takes neither; a forward hook on a layer keeps the stack off and still fires."""
    model = _model(form, seed=3)
    ids = torch.randint(2, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    stack, layer = _counted(monkeypatch, "stack_one_token"), _counted(monkeypatch, "one_token")
    whole = model.generate(ids, **kwargs)
    assert (stack, layer) == ([True] * 7, [])
    monkeypatch.setattr(decode_layer, "stack_one_token", lambda *args, **kwargs: None)
    per_layer = model.generate(ids, **kwargs)
    assert layer == [True] * 7 * 2
    monkeypatch.setattr(decode_layer, "one_token", lambda *args, **kwargs: None)
    modules = model.generate(ids, **kwargs)
    for fast in (whole, per_layer):
        assert torch.equal(fast.sequences, modules.sequences)
        assert all(torch.equal(a, b) for a, b in zip(fast.logits, modules.logits))
    monkeypatch.undo()
    stack, layer = _counted(monkeypatch, "stack_one_token"), _counted(monkeypatch, "one_token")
    model.generate(torch.cat([ids, ids.flip(1)]), **kwargs)
    assert (stack, layer) == ([], [])
    seen = []
    model.model.layers[2].register_forward_hook(lambda *args: seen.append(1))
    hooked = model.generate(ids, **kwargs)
    assert stack == [False] * 7 and layer == [True] * 7 * 2 and len(seen) == 8
    assert torch.equal(hooked.sequences, modules.sequences)


@needs_call
def test_modules_route_where_the_call_does_not_apply():
    """None (nothing written) for a forward hook on one of the layer's linears, a plain bf16 linear among
    them, float32 x, two rows, a mask of another shape; the layer's forward then takes its modules."""
    model = _model("int8")
    layer = model.model.layers[0]
    x, cos, sin, window = _step_inputs(model, position=4)
    before = window.cache.k[0].clone()
    kinds = _kernel_types()
    with torch.inference_mode():
        seen = []
        handle = layer.self_attn.v_proj.register_forward_hook(lambda *args: seen.append(1))
        assert decode_layer.one_token(layer, x, cos, sin, None, window, 0, kernel_types=kinds) is None
        layer(x, cos, sin, None, cache=window, layer_idx=0)
        assert seen == [1]
        handle.remove()
        window.cache.k[0].copy_(before)
        assert decode_layer.one_token(layer, x.float(), cos, sin, None, window, 0, kernel_types=kinds) is None
        assert decode_layer.one_token(layer, x, cos, sin, torch.ones(1, 1, 1, 3, dtype=torch.bool), window, 0,
                                      kernel_types=kinds) is None
        two = KVWindow(window.cache, slots=torch.tensor([0, 1]), positions=torch.tensor([[4], [4]]), first=0, length=5)
        assert decode_layer.one_token(layer, x.expand(2, 1, 128).contiguous(), cos.expand(2, 1, 16).contiguous(),
                                      sin.expand(2, 1, 16).contiguous(), None, two, 0, kernel_types=kinds) is None
        assert torch.equal(window.cache.k[0], before)
        plain = nn.Linear(128, 32, bias=False, dtype=torch.bfloat16)
        layer.self_attn.k_proj = plain
        assert decode_layer.one_token(layer, x, cos, sin, None, window, 0, kernel_types=kinds) is None
        assert torch.equal(window.cache.k[0], before)


@needs_call
def test_the_plan_follows_the_layers_modules_and_weights():
    """After a first call, a linear replaced by another quantized one, a norm's weight given new memory
    and a linear's buffer replaced: each next call has the modules' bits with the new weights."""
    model = _model("int4 rows")
    other = _model("int4 rows", seed=7)
    layer = model.model.layers[0]
    x, cos, sin, window = _step_inputs(model, position=5)

    def check():
        (fast, _), (slow, _) = _both_routes(layer, x, cos, sin, None, window, 0)
        assert torch.equal(fast, slow)
        return fast

    first = check()
    layer.mlp.down_proj = other.model.layers[0].mlp.down_proj
    second = check()
    assert not torch.equal(first, second)
    norm = layer.post_attention_layernorm
    norm.weight.data = norm.weight.data * 2
    third = check()
    assert not torch.equal(second, third)
    q = layer.self_attn.q_proj
    q.rows_scale = q.rows_scale * 3
    assert not torch.equal(third, check())


def test_tanh_of_every_bf16_value_is_torchs():
    """The gates' tanh in C (decode_layer.c) against torch's tanh of a one-value bf16 parameter, for every
    bf16 value but NaNs."""
    lib = decode_layer._library()
    if lib is None:
        pytest.skip("the one-call decode layer is not built here")
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    keep = ~values.isnan()
    expected = torch.stack([v.reshape(1).tanh() for v in values[keep]]).view(torch.int16).flatten()
    ours = torch.tensor([lib.mllama_tanh_bf16(int(b) & 0xFFFF) for b in bits[keep]], dtype=torch.int32).to(torch.int16)
    assert torch.equal(ours, expected)


def _image_step(model, *, tokens: int = 37, seed: int = 0, masked: bool = False, row: float = 1.0):
    """A token's hidden state and a cross layer's inputs: the image's K/V (1, 2, tokens, 16) as the
    engine stores them, a vision mask (None, or some tokens hidden) and the token's text_row_mask."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, 1, 128, generator=gen) * 2).bfloat16()
    kv = tuple(torch.randn(1, 2, tokens, 16, generator=gen).bfloat16() for _ in range(2))
    mask = None
    if masked:
        mask = torch.ones(1, 1, 1, tokens, dtype=torch.bool)
        mask[..., 5:20] = False
    return x, kv, mask, torch.full((1, 1, 1), row, dtype=torch.bfloat16)


def _cross_kernel_types():
    from mllama.row_kernels import _CROSS_KERNELS
    return _CROSS_KERNELS


@needs_call
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("row", [1.0, 0.0])
def test_cross_layer_call_gives_the_modules_bits(form, masked, row):
    """A token through a cross-attention layer of each quantized form (gates non-zero): the one call's bits
    are the modules' with every vision token visible and with some hidden, for a row that sees the
    image and for one that sees none (its attention output and MLP zeroed: the layer passes x through)."""
    from mllama.text import CrossAttentionDecoderLayer
    model = _model(form)
    layer = model.model.layers[1]
    assert isinstance(layer, CrossAttentionDecoderLayer) and float(layer.cross_attn_attn_gate.detach()) != 0
    x, kv, mask, text_row_mask = _image_step(model, masked=masked, row=row)
    with torch.inference_mode():
        fast = decode_layer.cross_one_token(layer, x, kv, mask, text_row_mask, kernel_types=_cross_kernel_types())
        assert fast is not None, "the one call did not run"
        slow = CrossAttentionDecoderLayer.forward(layer, x, kv, mask, text_row_mask)
    assert torch.equal(fast, slow)
    assert torch.equal(fast, x) == (row == 0.0)


@needs_call
@pytest.mark.parametrize("form, cross_layers", [("int4 rows", (1,)), ("int8", (1,)), ("int4 rows", (0, 2))])
def test_generation_with_an_image_through_the_one_call_equals_the_modules(form, cross_layers, monkeypatch):
    """Greedy generation after an image (2 tiles, the prompt's text partly before it): each decode step
    runs all three layers, the cross-attention layers too (in the middle; first and last), in one call
    (the stack), or with the stack off each layer in a call of its own; the tokens and every step's
    logits equal the modules' route bit for bit, and the image matters (other pixels, other logits)."""
    from tiny import cross_mask, random_images
    model = _model(form, seed=5, image=True, cross_layers=cross_layers)
    selfs, crosses = 3 - len(cross_layers), len(cross_layers)
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    ids[0, 0], ids[0, 3] = 1, 300
    images = random_images(model.config, [[2]], seed=4)
    inputs = dict(images, cross_attention_mask=cross_mask([[2]], [[3]], 9, 2))
    kwargs = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    stack, layer = _counted(monkeypatch, "stack_one_token"), _counted(monkeypatch, "one_token")
    cross = _counted(monkeypatch, "cross_one_token")
    whole = model.generate(ids, **inputs, **kwargs)
    assert (stack, layer, cross) == ([True] * 7, [], [])
    monkeypatch.setattr(decode_layer, "stack_one_token", lambda *args, **kwargs: None)
    per_layer = model.generate(ids, **inputs, **kwargs)
    assert layer == [True] * 7 * selfs and cross == [True] * 7 * crosses
    monkeypatch.setattr(decode_layer, "one_token", lambda *args, **kwargs: None)
    monkeypatch.setattr(decode_layer, "cross_one_token", lambda *args, **kwargs: None)
    modules = model.generate(ids, **inputs, **kwargs)
    for fast in (whole, per_layer):
        assert torch.equal(fast.sequences, modules.sequences)
        assert all(torch.equal(a, b) for a, b in zip(fast.logits, modules.logits))
    other = dict(inputs, **random_images(model.config, [[2]], seed=6))
    assert not torch.equal(model.generate(ids, **other, **kwargs).logits[1], modules.logits[1])


@needs_call
def test_cross_layer_call_follows_its_gates_and_keeps_the_modules_for_hooks_and_other_inputs():
    """A gate changed in place and a gate given new memory: the next call has the modules' bits with the
    new gate. None (the modules' route) for a hook on q_norm (which then fires), K/V of another layout,
    a vision mask of another length, float32 x, two rows."""
    from mllama.text import CrossAttentionDecoderLayer
    model = _model("int8")
    layer = model.model.layers[1]
    x, kv, mask, text_row_mask = _image_step(model, masked=True)
    kinds = _cross_kernel_types()

    def check():
        with torch.inference_mode():
            fast = decode_layer.cross_one_token(layer, x, kv, mask, text_row_mask, kernel_types=kinds)
            assert fast is not None
            assert torch.equal(fast, CrossAttentionDecoderLayer.forward(layer, x, kv, mask, text_row_mask))
        return fast

    first = check()
    with torch.no_grad():
        layer.cross_attn_mlp_gate.mul_(-1)
    second = check()
    assert not torch.equal(first, second)
    layer.cross_attn_attn_gate.data = layer.cross_attn_attn_gate.data * 0.5
    assert not torch.equal(second, check())
    with torch.inference_mode():
        seen = []
        handle = layer.cross_attn.q_norm.register_forward_hook(lambda *args: seen.append(1))
        assert decode_layer.cross_one_token(layer, x, kv, mask, text_row_mask, kernel_types=kinds) is None
        layer(x, kv, mask, text_row_mask)
        assert seen == [1]
        handle.remove()
        other = tuple(t.transpose(2, 3).contiguous().transpose(2, 3) for t in kv)  # keys not head_dim apart
        assert decode_layer.cross_one_token(layer, x, other, mask, text_row_mask, kernel_types=kinds) is None
        assert decode_layer.cross_one_token(layer, x, kv, mask[..., :-1], text_row_mask, kernel_types=kinds) is None
        assert decode_layer.cross_one_token(layer, x.float(), kv, mask, text_row_mask, kernel_types=kinds) is None
        two = x.expand(2, 1, 128).contiguous()
        assert decode_layer.cross_one_token(layer, two, kv, mask, text_row_mask, kernel_types=kinds) is None
