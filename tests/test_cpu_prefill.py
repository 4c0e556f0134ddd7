"""The prefill kernel (csrc/gemm_prefill.c via mllama.cpu_prefill): prompt-sized bf16 x against int8 /
int4 weights dequantized a block at a time in cache, on CPUs with AVX-512 BF16 and no AMX."""

from __future__ import annotations

import copy

import pytest
import torch

from mllama import cpu_prefill
from mllama.model import MllamaForConditionalGeneration
from mllama.quantize import Int4Linear, Int8Linear, QuantizationConfig, dequantize_model, quantize_model
from tiny import randomize_, tiny_config

pytestmark = pytest.mark.skipif(not cpu_prefill.prefill_available(), reason="no AVX-512 BF16 without AMX here")


def _module(mode: str, n: int, k: int, *, group_size: int = 128, scale_dtype=torch.bfloat16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.1 + 0.02 * torch.randn(n, 1, generator=gen))
    holder = torch.nn.Sequential(linear.to(scale_dtype))
    quantize_model(holder, QuantizationConfig(mode=mode, group_size=group_size))
    return holder[0]


def _weights(q) -> tuple[torch.Tensor, ...]:
    if isinstance(q, Int8Linear):
        return q.weight, q.weight_scale
    return q.weight_packed, q.weight_scale, q.weight_offset


def _product(q, x: torch.Tensor) -> torch.Tensor:
    return cpu_prefill.prefill_product(x, q.mode, *_weights(q), group_size=q.group_size)


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256)])
@pytest.mark.parametrize("n,k", [(37, 300), (50, 1030), (97, 96), (7, 33), (49, 1100)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_product_is_the_dequantized_weight_in_float32(mode, group, n, k, scale_dtype):
    """Odd shapes: k odd (int8's last pair half padding), not a multiple of the group (int4 rows padded)
    nor of the kernel's 512-value blocks, n not a multiple of a tile's 6 or a work item's 48 rows, rows
    not a multiple of 16 or 64. The weights are those of the module's dequantize (bf16), the sums
    float32, the result rounded to bf16 once."""
    q = _module(mode, n, k, group_size=group or 128, scale_dtype=scale_dtype, seed=n + k)
    w = q.dequantize(torch.bfloat16).double()
    gen = torch.Generator().manual_seed(k)
    for rows in (33, 64, 65, 130):
        x = torch.randn(rows, k, generator=gen).bfloat16()
        out = _product(q, x)
        ref = x.double() @ w.T
        bound = ref.abs() * 2**-8 + 1e-5 * (x.double().abs() @ w.abs().T) + 1e-30
        assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
        assert ((out.double() - ref).abs() <= bound).all(), f"{rows} rows"


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 32), ("int4", 128)])
def test_a_row_does_not_depend_on_the_rows_beside_it(mode, group):
    """Lanes are rows of x, each summed in one order: the same row gives the same bits in a batch of 33
    or of 200, first or last; a NaN in one row reaches that row's outputs only."""
    q = _module(mode, 61, 700, group_size=group or 128, seed=4)
    x = torch.randn(200, 700).bfloat16()
    big = _product(q, x)
    small = _product(q, torch.cat([x[150:], x[:1]]))  # 51 rows: rows 150.. first, row 0 last
    assert torch.equal(small[:50], big[150:]) and torch.equal(small[50], big[0])
    x[77, 5] = float("nan")
    poisoned = _product(q, x)
    assert poisoned[77].isnan().all()
    assert torch.equal(torch.cat([poisoned[:77], poisoned[78:]]), torch.cat([big[:77], big[78:]]))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_modules_take_it_for_prompt_rows_only(mode, monkeypatch):
    """bf16 x of PREFILL_MIN_ROWS to PREFILL_MAX_ROWS rows (here in a (batch, tokens) shape, with a bias)
    takes the kernel and its bits; fewer rows stay with the small-row kernels, more with the whole-weight
    route, float32 x and autograd never take it."""
    q = _module(mode, 40, 256, group_size=64, seed=7)
    q.bias = torch.nn.Parameter(torch.randn(40).bfloat16(), requires_grad=False)
    calls = []
    original = cpu_prefill.prefill_product
    monkeypatch.setattr(cpu_prefill, "prefill_product",
                        lambda x, *a, **kw: calls.append(x.shape) or original(x, *a, **kw))
    x = torch.randn(3, 20, 256).bfloat16()
    with torch.no_grad():
        out = q(x)
        assert calls == [(3, 20, 256)]
        assert torch.equal(out, original(x, mode, *_weights(q), group_size=q.group_size) + q.bias)
        for rows in (cpu_prefill.PREFILL_MIN_ROWS - 1, cpu_prefill.PREFILL_MAX_ROWS + 1):
            q(torch.randn(rows, 256).bfloat16())
        q(torch.randn(64, 256))
    q(torch.randn(64, 256).bfloat16().requires_grad_())
    assert len(calls) == 1


def test_bad_input_is_named():
    q = _module("int8", 16, 100)
    with pytest.raises(ValueError, match="input of 99 features against an int8 weight of shape"):
        _product(q, torch.randn(40, 99).bfloat16())
    q4 = _module("int4", 16, 100, group_size=64)  # rows padded to 128 values
    with pytest.raises(ValueError, match="input of 130 features against an int4 weight"):
        _product(q4, torch.randn(40, 130).bfloat16())
    with pytest.raises(ValueError, match="scales and offsets must be all float32 or all bf16"):
        cpu_prefill.prefill_product(torch.randn(40, 100).bfloat16(), "int4", q4.weight_packed, q4.weight_scale,
                                    q4.weight_offset.float(), group_size=64)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_with_a_long_prompt_matches_the_dequantized_model(mode):
    """A 40-token prompt (two rows: 80 rows of x a linear) prefills through the kernel: the first token's
    logits equal those of the same weights dequantized into plain nn.Linear within bf16 rounding, and
    the greedy tokens are the same (int8 for 8 tokens; int4's one-row decode kernel rounds x to int8 per
    group, which the reference does not: its later tokens are test_quantize's)."""
    model = MllamaForConditionalGeneration(tiny_config("a"))
    randomize_(model, 9)
    quantized = quantize_model(model.bfloat16().eval(), mode)
    reference = dequantize_model(copy.deepcopy(quantized))
    assert any(isinstance(m, (Int8Linear, Int4Linear)) for m in quantized.modules())
    ids = torch.randint(3, 90, (2, 40), generator=torch.Generator().manual_seed(1))
    calls = []
    original = cpu_prefill.prefill_product

    def spy(x, *args, **kwargs):
        calls.append(x.shape[:-1].numel())
        return original(x, *args, **kwargs)

    kwargs = dict(max_new_tokens=8 if mode == "int8" else 1, eos_token_id=[], pad_token_id=0,
                  return_dict_in_generate=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_prefill, "prefill_product", spy)
        a = quantized.generate(ids, **kwargs)
    b = reference.generate(ids, **kwargs)
    assert calls and min(calls) == 80
    assert torch.equal(a.sequences, b.sequences)
    assert (a.logits[0] - b.logits[0]).abs().max().item() <= 0.02 * b.logits[0].abs().max().item()
