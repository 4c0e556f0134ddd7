"""RMSNorm of bf16 rows through csrc/scans.c (mllama.norm_kernel): the model's arithmetic, one order of
sums for every batch, torch's formula everywhere else."""

from __future__ import annotations

import pytest
import torch

from mllama import cpu_kernels
from mllama.layers import RMSNorm
from mllama.model import MllamaForConditionalGeneration
from mllama.norm_kernel import KernelRMSNorm, apply_norm_kernel
from tiny import tiny_config

needs_kernel = pytest.mark.skipif(not cpu_kernels.rms_norm_available(), reason="csrc/scans.c does not run here")


def _norms(d: int, *, seed: int = 0, eps: float = 1e-5) -> tuple[RMSNorm, KernelRMSNorm]:
    gen = torch.Generator().manual_seed(seed)
    plain = RMSNorm(d, eps=eps).bfloat16()
    with torch.no_grad():
        plain.weight.copy_(torch.rand(d, generator=gen) * 2 - 0.5)
    kernel = apply_norm_kernel(torch.nn.Sequential(RMSNorm(d, eps=eps).bfloat16()))[0]
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
    norm = cpu_kernels.rms_norm_bf16
    monkeypatch.setattr(cpu_kernels, "rms_norm_bf16", lambda *a: calls.append(1) or norm(*a))
    x = torch.randn(3, 96).bfloat16()
    with torch.no_grad():
        kernel(x)
        assert calls == [1]
        kernel(torch.randn(96, 3).bfloat16().t())  # not contiguous
        f32 = RMSNorm(96)
        f32.load_state_dict(plain.float().state_dict())
        apply_norm_kernel(torch.nn.Sequential(f32))
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


def test_every_norm_of_a_loaded_model_is_swapped(tmp_path):
    MllamaForConditionalGeneration(tiny_config("a")).save_pretrained(tmp_path)
    model = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) > 10 and all(type(m) is KernelRMSNorm for m in norms)
