"""int4 weights in blocks of 32 rows (mllama.int4_rows, csrc/int4_rows.h): the products against a float64
reference, batch invariance, the state dict's format, the model swap and what refuses it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mllama import int4_rows
from mllama.int4_rows import Int4RowsLinear, pack_int4_rows, unpack_int4_rows
from mllama.lora import apply_lora
from mllama.model import MllamaForConditionalGeneration
from mllama.quantize import Int4Linear, QuantizationConfig, dequantize_int4, dequantize_model, quantize_model
from tiny import randomize_, tiny_config

pytestmark = pytest.mark.skipif(not int4_rows.rows_available(), reason="no AVX512-VNNI kernels on this CPU")


def _int4(n: int, k: int, group: int, dtype: torch.dtype = torch.bfloat16, *, bias: bool = False,
          seed: int = 0) -> Int4Linear:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    return quantize_model(nn.Sequential(linear.to(dtype)), QuantizationConfig("int4", group_size=group))[0]


@pytest.mark.parametrize("n,k,group,rows,dtype", [
    (32, 96, 32, 1, torch.bfloat16),    # k not a multiple of the group
    (96, 200, 32, 3, torch.float32),    # float32 scales, an odd number of rows
    (64, 300, 64, 2, torch.bfloat16),
    (160, 512, 128, 5, torch.float32),
    (32, 1024, 256, 32, torch.bfloat16),
    (128, 4096, 128, 16, torch.bfloat16),
    (64, 256, 64, 70, torch.bfloat16),   # a prompt: rows taken 32 at a time
])
def test_rows_product_is_the_dequantized_weight_within_the_rounding_of_x(n, k, group, rows, dtype):
    """Against float64 products with the dequantized weight: x is rounded per group to int8 (a step of
    max|x| / 127 in the group), so each output may differ by half a step times the sum of its |w|."""
    linear = _int4(n, k, group, dtype)
    packed = Int4RowsLinear(linear)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        out = packed(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    w = dequantize_int4(linear.weight_packed, linear.weight_scale, linear.weight_offset, in_features=k,
                        dtype=torch.float64)
    xd = x.double()
    reference = xd @ w.T
    padded = F.pad(xd.abs(), (0, -k % group)).view(rows, -1, group)
    step = (padded.amax(dim=2, keepdim=True) / 127).expand_as(padded).reshape(rows, -1)[:, :k]
    bound = (step / 2) @ w.abs().T + 2**-8 * reference.abs() + 1e-5 * (xd.abs() @ w.abs().T)
    assert ((out.double() - reference).abs() <= bound).all()
    assert (out.double() - reference).abs().max() > 0  # x was rounded: not the float64 product itself


def test_a_row_gets_the_same_bits_in_any_batch():
    packed = Int4RowsLinear(_int4(96, 256, 64))
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(2)).bfloat16()  # chunks of 32 rows
    with torch.no_grad():
        batch = packed(x)
        for i in range(70):
            assert torch.equal(packed(x[i:i + 1])[0], batch[i])


def test_state_dict_is_the_row_major_format_and_loads_back():
    linear = _int4(64, 300, 64, bias=True)
    packed = Int4RowsLinear(copy.deepcopy(linear))
    assert packed.rows_packed.data_ptr() != linear.weight_packed.data_ptr()
    assert not torch.equal(packed.rows_packed, linear.weight_packed)  # another layout in memory
    ours, theirs = packed.state_dict(), linear.state_dict()
    assert sorted(ours) == sorted(theirs) == ["bias", "weight_offset", "weight_packed", "weight_scale"]
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    other = Int4RowsLinear(_int4(64, 300, 64, bias=True, seed=7))
    other.load_state_dict(theirs)
    x = torch.randn(2, 300).bfloat16()
    with torch.no_grad():
        assert torch.equal(other(x), packed(x))
    with pytest.raises(RuntimeError, match="size mismatch for weight_scale"):
        other.load_state_dict({**theirs, "weight_scale": theirs["weight_scale"][:, :2]})
    with pytest.raises(RuntimeError, match="Missing key.*weight_offset"):
        other.load_state_dict({k: v for k, v in theirs.items() if k != "weight_offset"})
    assert torch.equal(packed.to_int4().weight_packed, linear.weight_packed)


def test_float32_and_autograd_take_the_row_major_module():
    """float32 x (and x that needs gradients) get the row-major Int4Linear's product, bit for bit."""
    linear = _int4(96, 256, 128, bias=True)
    packed = Int4RowsLinear(copy.deepcopy(linear))
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert torch.equal(packed(x), linear(x))
    xg = torch.randn(2, 256).bfloat16().requires_grad_()
    out = packed(xg)
    assert torch.equal(out, linear(xg))
    out.float().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with torch.no_grad():
        with pytest.raises(ValueError, match="input of 255 features"):
            packed(torch.randn(1, 255).bfloat16())


def test_silu_product_is_one_call_for_gate_and_up():
    gate, up = Int4RowsLinear(_int4(96, 128, 64, seed=3)), Int4RowsLinear(_int4(96, 128, 64, seed=4))
    x = torch.randn(1, 128).bfloat16()
    with torch.no_grad():
        fused = gate.silu_product(up, x)
        apart = F.silu(gate(x)) * up(x)
    assert fused is not None and fused.shape == (1, 96)
    # the C e^x may put a silu on the other side of a bf16 rounding (one step), as cpu_kernels says
    assert ((fused.float() - apart.float()).abs() <= 2**-7 * apart.float().abs() + 1e-6).all()
    assert gate.silu_product(Int4RowsLinear(_int4(64, 128, 64)), x) is None  # another shape
    assert gate.silu_product(up, torch.randn(2, 128).bfloat16()) is None  # not one row


def _tiny(dtype: torch.dtype) -> MllamaForConditionalGeneration:
    model = MllamaForConditionalGeneration(tiny_config("a"))
    randomize_(model, 5)
    # groups of 64: x rounded to int8 per group by both layouts' kernels (groups of 32 round it to int16
    # in the row-major ones), so both decode the same tokens
    return quantize_model(model.to(dtype).eval(), QuantizationConfig("int4", group_size=64))


def test_packed_model_decodes_as_the_row_major_one():
    model = _tiny(torch.bfloat16)
    packed = copy.deepcopy(model)
    names = pack_int4_rows(packed)
    text = packed.model.language_model
    assert isinstance(text.layers[0].mlp.gate_proj, Int4RowsLinear)
    assert type(text.layers[0].self_attn.k_proj) is Int4Linear  # 16 outputs: not a multiple of 32
    assert names and all(isinstance(packed.get_submodule(name), Int4RowsLinear) for name in names)
    ids = torch.tensor([[5, 9, 11, 3, 4, 7]])
    kwargs = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    a, b = packed.generate(ids, **kwargs), model.generate(ids, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        assert (x - y).abs().max().item() <= 0.05 * y.abs().max().item()
    assert sorted(packed.state_dict()) == sorted(model.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in packed.state_dict().items())
    assert sorted(unpack_int4_rows(packed)) == sorted(names)
    assert not any(isinstance(m, Int4RowsLinear) for m in packed.modules())


def test_transforms_unpack_or_refuse_packed_int4():
    """LoRA (trained through autograd) unpacks the blocked modules first; dequantize_model takes them as
    any quantized linear; moving to another device is refused, naming the way out."""
    model = _tiny(torch.bfloat16)
    packed = copy.deepcopy(model)
    pack_int4_rows(packed)
    plain = dequantize_model(copy.deepcopy(packed))
    reference = dequantize_model(copy.deepcopy(model))
    assert not any(isinstance(m, (Int4RowsLinear, Int4Linear)) for m in plain.modules())
    for key, value in reference.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
    with pytest.raises(RuntimeError, match="stay on the CPU.*unpack_int4_rows"):
        packed.to("meta")
    names = apply_lora(packed, r=2)
    assert names and not any(isinstance(m, Int4RowsLinear) for m in packed.modules())
    assert any(isinstance(m, Int4Linear) for m in packed.modules())


def test_from_pretrained_packs_int4_of_bf16_models_on_the_cpu(tmp_path):
    for dtype, packs in ((torch.bfloat16, True), (torch.float32, False)):
        _tiny(dtype).save_pretrained(tmp_path / str(dtype))
        loaded = MllamaForConditionalGeneration.from_pretrained(tmp_path / str(dtype))
        assert any(isinstance(m, Int4RowsLinear) for m in loaded.modules()) == packs
    saved = _tiny(torch.bfloat16)
    loaded = MllamaForConditionalGeneration.from_pretrained(tmp_path / str(torch.bfloat16))
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_compiled_product_is_the_eager_one():
    packed = Int4RowsLinear(_int4(64, 256, 64, bias=True))
    compiled = torch.compile(packed, backend="eager", fullgraph=True)  # the custom op keeps the call opaque
    with torch.no_grad():
        for rows in (1, 5):
            x = torch.randn(rows, 256).bfloat16()
            assert torch.equal(compiled(x), packed(x))
