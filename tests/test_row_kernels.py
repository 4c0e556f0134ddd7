"""RMSNorm and RoPE of bf16 rows through csrc/scans.c, and a quantized MLP's gate, up and silu in one call
(mllama.row_kernels): the model's arithmetic (RoPE bit for bit), one order of sums for every batch,
torch's code everywhere else."""

from __future__ import annotations

import pytest
import torch

from mllama import cpu_kernels, cpu_scans, decode_layer
from mllama.attention import TextSelfAttention
from mllama.layers import RMSNorm, TextMLP, apply_rotary
from mllama.model import MllamaForConditionalGeneration
from mllama.quantize import QuantizationConfig, quantize_model
from mllama.row_kernels import KernelRMSNorm, KernelTextMLP, KernelTextSelfAttention, apply_row_kernels
from tiny import randomize_, tiny_config

needs_kernel = pytest.mark.skipif(not cpu_scans.row_kernels_available(), reason="csrc/scans.c does not run here")


def _norms(d: int, *, seed: int = 0, eps: float = 1e-5) -> tuple[RMSNorm, KernelRMSNorm]:
    gen = torch.Generator().manual_seed(seed)
    plain = RMSNorm(d, eps=eps).bfloat16()
    with torch.no_grad():
        plain.weight.copy_(torch.rand(d, generator=gen) * 2 - 0.5)
    kernel = apply_row_kernels(torch.nn.Sequential(RMSNorm(d, eps=eps).bfloat16()))[0]
    kernel.load_state_dict(plain.state_dict())
    return plain, kernel


@needs_kernel
@pytest.mark.parametrize("d", [1, 33, 100, 128, 4096])
def test_kernel_norm_is_the_model_arithmetic(d):
    """Against float64 (normalised, rounded to bf16, times the weight, rounded): within the two bf16
    roundings; against torch's formula at most a bf16 step where a sum's last bit moves a rounding; a
    batch's rows (threads past 8 rows) equal each row alone; NaN and infinity as torch."""
    plain, kernel = _norms(d, seed=d)
    gen = torch.Generator().manual_seed(d + 1)
    x = (torch.randn(40, d, generator=gen) * torch.logspace(-3, 3, 40)[:, None]).bfloat16()
    with torch.no_grad():
        out = kernel(x)
        ref = plain(x)
        x64, w64 = x.double(), plain.weight.double()
        normed = x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
        bound = (normed.abs() * 2**-8 + 1e-6) * w64.abs() + (normed * w64).abs() * 2**-8
        assert ((out.double() - normed * w64).abs() <= bound).all()
        assert ((out.double() - ref.double()).abs() <= (ref.double().abs() * 2**-7)).all()
        assert (out != ref).float().mean() < 0.01
        for r in (0, 9, 39):
            assert torch.equal(kernel(x[r:r + 1]).view(torch.int16), out[r:r + 1].view(torch.int16))
        assert torch.equal(kernel(x.reshape(8, 5, d)).view(torch.int16), out.reshape(8, 5, d).view(torch.int16))
        odd = x[:3].clone()
        odd[0, 0] = float("nan")
        odd[1, -1] = float("inf")
        assert torch.equal(kernel(odd).isnan(), plain(odd).isnan())


@needs_kernel
def test_kernel_norm_falls_back_to_the_formula_where_it_does_not_run(monkeypatch):
    plain, kernel = _norms(96)
    calls = []
    norm = cpu_scans.rms_norm_bf16
    monkeypatch.setattr(cpu_scans, "rms_norm_bf16", lambda *a: calls.append(1) or norm(*a))
    x = torch.randn(3, 96).bfloat16()
    with torch.no_grad():
        kernel(x)
        assert calls == [1]
        kernel(torch.randn(96, 3).bfloat16().t())  # not contiguous
        f32 = RMSNorm(96)
        f32.load_state_dict({name: t.float() for name, t in plain.state_dict().items()})
        apply_row_kernels(torch.nn.Sequential(f32))
        x32 = torch.randn(3, 96)
        assert type(f32) is KernelRMSNorm and torch.equal(f32(x32), RMSNorm.forward(f32, x32))  # float32
    out = kernel(x.clone().requires_grad_())  # autograd: torch's ops, differentiable
    out.float().sum().backward()
    assert calls == [1]


@needs_kernel
def test_compiled_norm_is_the_eager_kernel():
    _, kernel = _norms(64)
    x = torch.randn(5, 64).bfloat16()
    with torch.no_grad():
        compiled = torch.compile(kernel, fullgraph=True)  # the custom op: no graph break
        assert torch.equal(compiled(x).view(torch.int16), kernel(x).view(torch.int16))


def _rope_inputs(b: int, s: int, hq: int, hk: int, d: int, *, seed: int):
    """q (B, H, S, D), k (B, H_kv, S, D) as _attend sees them (views of (B, S, H, D) projections) and
    the model's cos, sin (B, S, D) for positions from 0 to a long context."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, s, hq * d, generator=gen) * 3).bfloat16().view(b, s, hq, d).transpose(1, 2)
    k = (torch.randn(b, s, hk * d, generator=gen) * 3).bfloat16().view(b, s, hk, d).transpose(1, 2)
    positions = torch.randint(0, 100_000, (b, s), generator=gen)
    freqs = positions.float()[..., None] * (1.0 / 500000.0 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((freqs, freqs), dim=-1)
    return q, k, emb.cos().bfloat16(), emb.sin().bfloat16()


@needs_kernel
@pytest.mark.parametrize("b,s,hq,hk,d", [(1, 1, 32, 8, 128), (3, 1, 4, 2, 16), (2, 37, 4, 1, 64), (1, 5, 2, 2, 2)])
def test_kernel_rope_is_apply_rotary_bit_for_bit(b, s, hq, hk, d):
    q, k, cos, sin = _rope_inputs(b, s, hq, hk, d, seed=b * s + d)
    q[0, 0, 0, 0] = float("inf")
    k[-1, -1, -1, -1] = float("nan")
    attention = KernelTextSelfAttention.__new__(KernelTextSelfAttention)
    with torch.no_grad():
        q_out, k_out = attention.rotate(q, k, cos, sin)
    for got, x in ((q_out, q), (k_out, k)):
        want = apply_rotary(x, cos, sin)
        assert got.shape == want.shape
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num().view(torch.int16), want.nan_to_num().view(torch.int16))


@needs_kernel
def test_kernel_rope_falls_back_where_it_does_not_run(monkeypatch):
    calls = []
    rope = cpu_scans.rope_bf16
    monkeypatch.setattr(cpu_scans, "rope_bf16", lambda *a: calls.append(1) or rope(*a))
    attention = KernelTextSelfAttention.__new__(KernelTextSelfAttention)
    q, k, cos, sin = _rope_inputs(2, 3, 4, 2, 16, seed=0)
    with torch.no_grad():
        attention.rotate(q, k, cos, sin)
        assert calls == [1]
        for args in [(q.float(), k.float(), cos.float(), sin.float()),  # float32
                     (q, k, cos[:1].expand(2, 3, 16), sin[:1].expand(2, 3, 16)),  # broadcast cos / sin
                     (q.contiguous(), k, cos, sin)]:  # (B, H, S, D) memory
            got = attention.rotate(*args)
            assert all(torch.equal(g, apply_rotary(x, args[2], args[3])) for g, x in zip(got, args[:2]))
    attention.rotate(q.clone().requires_grad_(), k, cos, sin)[0].float().sum().backward()  # autograd
    assert calls == [1]


@needs_kernel
def test_compiled_rope_is_the_eager_kernel():
    attention = KernelTextSelfAttention.__new__(KernelTextSelfAttention)
    q, k, cos, sin = _rope_inputs(1, 1, 4, 2, 32, seed=1)
    with torch.no_grad():
        compiled = torch.compile(attention.rotate, fullgraph=True)  # the custom op: no graph break
        for got, want in zip(compiled(q, k, cos, sin), attention.rotate(q, k, cos, sin)):
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_every_norm_and_self_attention_of_a_loaded_model_is_swapped(tmp_path):
    MllamaForConditionalGeneration(tiny_config("a")).save_pretrained(tmp_path)
    model = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) > 10 and all(type(m) is KernelRMSNorm for m in norms)
    attentions = [m for m in model.modules() if isinstance(m, TextSelfAttention)]
    assert attentions and all(type(m) is KernelTextSelfAttention for m in attentions)
    mlps = [m for m in model.modules() if isinstance(m, TextMLP)]
    assert mlps and all(type(m) is KernelTextMLP for m in mlps)


needs_quant = pytest.mark.skipif(not cpu_kernels.quant_kernels_available(), reason="no quantized kernels here")


def _quantized_mlp(mode: str, hidden: int, inner: int, *, group_size: int = 64, seed: int = 0) -> KernelTextMLP:
    gen = torch.Generator().manual_seed(seed)
    mlp = TextMLP(hidden, inner).bfloat16()
    with torch.no_grad():
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.05)
    quantize_model(torch.nn.Sequential(mlp), QuantizationConfig(mode, group_size=group_size))
    return apply_row_kernels(mlp)


def _unfused(mlp: TextMLP, x: torch.Tensor) -> torch.Tensor:
    return TextMLP.gated(mlp, x)  # each linear alone (one-row kernels), then torch's silu and product


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: the same bf16 bits, or both NaN."""
    return (a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())


@needs_quant
@pytest.mark.parametrize("mode,group,hidden,inner", [("int8", 0, 64, 40), ("int8", 0, 4096, 1030),
                                                     ("int4", 32, 100, 77), ("int4", 64, 4096, 14336),
                                                     ("int4", 128, 200, 300), ("int4", 128, 4096, 1030)])
def test_quantized_mlp_gate_up_and_silu_in_one_call(mode, group, hidden, inner, monkeypatch):
    """One bf16 row through KernelTextMLP.gated takes cpu_kernels.small_gemm_silu_row and gives the bits
    of the two one-row products, torch's silu and product (e^x aside: at most a bf16 step in under 0.1%
    of outputs), at magnitudes from 0.01 to 10^4 and with inf / NaN in x, on both instruction paths."""
    mlp = _quantized_mlp(mode, hidden, inner, group_size=group or 64, seed=inner)
    calls = []
    fused = cpu_kernels.small_gemm_silu_row
    monkeypatch.setattr(cpu_kernels, "small_gemm_silu_row", lambda *a, **k: calls.append(1) or fused(*a, **k))
    gen = torch.Generator().manual_seed(hidden)
    differ = total = 0
    with torch.no_grad():
        for scale in (0.01, 1.0, 30.0, 1e4):
            x = (torch.randn(1, 1, hidden, generator=gen) * scale).bfloat16()
            got, want = mlp.gated(x), _unfused(mlp, x)
            assert got.shape == want.shape == (1, 1, inner) and got.dtype == torch.bfloat16
            steps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
            assert (steps <= 1).all(), f"scale {scale}"
            differ, total = differ + int((steps != 0).sum()), total + steps.numel()
        assert differ <= total * 1e-3
        assert len(calls) == 4
        odd = torch.randn(1, hidden, generator=gen).bfloat16()
        odd[0, 0], odd[0, -1] = float("inf"), float("nan") if hidden > 64 else -float("inf")
        assert _same(mlp.gated(odd), _unfused(mlp, odd)).all()
        x = torch.randn(1, hidden, generator=gen).bfloat16()
        gate = (mlp.gate_proj.weight_packed if mode == "int4" else mlp.gate_proj.weight, mlp.gate_proj.weight_scale,
                *([mlp.gate_proj.weight_offset] if mode == "int4" else []))
        up = (mlp.up_proj.weight_packed if mode == "int4" else mlp.up_proj.weight, mlp.up_proj.weight_scale,
              *([mlp.up_proj.weight_offset] if mode == "int4" else []))
        avx2 = fused(x, mode, gate, up, group_size=mlp.gate_proj.group_size, level=1)
        want = torch.nn.functional.silu(cpu_kernels.small_gemm_row(x, mode, *gate, group_size=mlp.gate_proj.group_size,
                                                                   level=1)) * cpu_kernels.small_gemm_row(
            x, mode, *up, group_size=mlp.up_proj.group_size, level=1)
        assert (avx2.view(torch.int16).int() - want.view(torch.int16).int()).abs().max() <= 1


@needs_quant
def test_quantized_mlp_takes_the_plain_route_where_one_call_does_not_fit(monkeypatch):
    """Two rows, float32, a bias, mismatched group sizes or kinds, forward hooks on a linear, autograd:
    TextMLP.gated's route (and its values) instead of the fused call."""
    calls = []
    fused = cpu_kernels.small_gemm_silu_row
    monkeypatch.setattr(cpu_kernels, "small_gemm_silu_row", lambda *a, **k: calls.append(1) or fused(*a, **k))
    mlp = _quantized_mlp("int4", 128, 96, group_size=64)
    x = torch.randn(1, 128).bfloat16()
    with torch.no_grad():
        mlp.gated(x)
        assert len(calls) == 1, "the fused call where it fits"
        cases = {"two rows": (mlp, torch.randn(2, 128).bfloat16()), "float32": (mlp, x.float())}
        other = _quantized_mlp("int4", 128, 96, group_size=32)
        mixed = _quantized_mlp("int4", 128, 96, group_size=64)
        mixed.up_proj = other.up_proj
        cases["group sizes"] = (mixed, x)
        kinds = _quantized_mlp("int4", 128, 96, group_size=64)
        kinds.up_proj = _quantized_mlp("int8", 128, 96).up_proj
        cases["int4 gate, int8 up"] = (kinds, x)
        for name, (module, rows) in cases.items():
            assert torch.equal(module.gated(rows), _unfused(module, rows)), name
        seen = []
        handle = mlp.up_proj.register_forward_hook(lambda *args: seen.append(1))
        assert torch.equal(mlp.gated(x), _unfused(mlp, x))
        handle.remove()
        assert len(seen) == 2, "the hook ran (fused call skipped)"
        biased = _quantized_mlp("int8", 128, 96)
        biased.gate_proj.bias = torch.nn.Parameter(torch.randn(96).bfloat16(), requires_grad=False)
        assert torch.equal(biased.gated(x), _unfused(biased, x))
    assert len(calls) == 1, "none of these took the fused call"
    assert mlp.gated(x.requires_grad_()).shape == (1, 96) and len(calls) == 1



@needs_quant
def test_quantized_decode_through_the_joint_mlp_call_matches_the_plain_route(monkeypatch):
    """A tiny int4 model generating greedily: with gate, up and silu in one call, the tokens of the plain
    route (each linear alone, torch's silu) and logits within a bf16 step's effect."""
    from mllama.model import MllamaForCausalLM

    model = MllamaForCausalLM(tiny_config("a").text_config).bfloat16().eval()
    randomize_(model, 3, scale=0.1)
    quantize_model(model, QuantizationConfig("int4", group_size=32))
    apply_row_kernels(model)
    # the layers' modules: decode_layer's one calls make the same C call, not through small_gemm_silu_row
    monkeypatch.setattr(decode_layer, "stack_one_token", lambda *args, **kwargs: None)
    monkeypatch.setattr(decode_layer, "one_token", lambda *args, **kwargs: None)
    calls = []
    silu = cpu_kernels.small_gemm_silu_row
    monkeypatch.setattr(cpu_kernels, "small_gemm_silu_row", lambda *a, **k: calls.append("mlp") or silu(*a, **k))
    prompt = torch.tensor([[1, 5, 9, 33, 2, 71]])

    def run():
        return model.generate(prompt, max_new_tokens=8, eos_token_id=[], pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)

    fused = run()
    assert calls.count("mlp") >= 7 * 3  # 3 self-attention layers (their MLPs), 7 decode steps
    monkeypatch.setattr(KernelTextMLP, "gated", TextMLP.gated)
    calls.clear()
    plain = run()
    assert not calls
    assert torch.equal(fused.sequences, plain.sequences)
    for a, b in zip(fused.logits, plain.logits):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02)


@needs_quant
def test_joint_mlp_call_compiles_into_one_graph():
    """Under torch.compile (fullgraph) the joint call steps aside for the linears' own custom ops and
    torch's silu: within a bf16 step of the eager joint call."""
    mlp = _quantized_mlp("int4", 64, 96, group_size=32, seed=5)
    x = torch.randn(1, 1, 64).bfloat16()
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(mlp.gated, fullgraph=True)(x)
        eager = mlp.gated(x)
    assert (compiled.view(torch.int16).int() - eager.view(torch.int16).int()).abs().max() <= 1
