"""The bf16 decode kernel (cpu_kernels.py, csrc/gemv_bf16.c): values, dispatch and fallbacks."""

from __future__ import annotations

import fnmatch
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mllama import cpu_kernels, cpu_scans, host_memory
from mllama import linear as linear_module
from mllama.linear import DecodeLinear, apply_cpu_kernels, swap_linears

needs_kernel = pytest.mark.skipif(not cpu_kernels.gemv_available(), reason="no C compiler or x86 SIMD here")


def _levels() -> list[int]:
    return [lvl for lvl in (1, 2, 3) if lvl <= cpu_kernels.gemv_level()]


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 4, 32), (1, 7, 33), (3, 130, 100), (4, 257, 4096), (2, 9, 14336), (1, 1, 1),
                                   (16, 100, 64), (5, 33, 96), (2, 31, 32), (9, 64, 4096), (1, 600, 64), (3, 523, 96)])
def test_gemv_matches_float64_reference(m, n, k):
    """(600 and 523 rows: up to three rows of x take work items of 256 rows, blocks of 8 rows 32 apart,
    then consecutive blocks, then single rows.)"""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    ref = x.double() @ w.double().T
    scale = (x.double().abs() @ w.double().abs().T)  # bound on the rounding error of any order of summation
    assert _levels(), "the kernel loaded but reports no usable instruction set"
    for level in _levels():
        out = cpu_kernels.gemv_float32(x, w, level=level)
        assert out.shape == (m, n) and out.dtype == torch.float32
        assert ((out.double() - ref).abs() <= 1e-6 * scale + 1e-30).all(), f"level {level}"


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 15, 16, 17, 31, 32])
@pytest.mark.parametrize("n,k", [(7, 33), (29, 100), (50, 1030), (24, 64)])
def test_small_row_bf16_kernel_matches_float64(m, n, k):
    """csrc/gemm_small.c (the AVX2 path of batched decode steps) on odd shapes: k not a multiple of 32
    or of the cache block, n not a multiple of the 24-row work item or of the 8/4/3-row tiles."""
    if not cpu_kernels.quant_kernels_available():
        pytest.skip("no AVX2 kernels here")
    gen = torch.Generator().manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    ref = x.double() @ w.double().T
    bound = 1e-6 * (x.double().abs() @ w.double().abs().T) + 1e-30
    out = cpu_kernels.small_gemm(x, "bf16", w)
    assert out.shape == (m, n) and ((out.double() - ref).abs() <= bound).all()
    if m <= cpu_kernels.MAX_ROWS:  # the op the model calls, on the AVX2 path
        assert ((cpu_kernels.gemv_float32(x, w, level=1).double() - ref).abs() <= bound).all()


def test_apply_cpu_kernels_swaps_plain_linears_and_keeps_state():
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    before = model(x)
    apply_cpu_kernels(model)
    assert type(model[0]) is DecodeLinear and type(model[1][0]) is DecodeLinear
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(model(x), before)  # float32: F.linear as before
    assert swap_linears(model, lambda name, lin: None) == []
    assert swap_linears(model, lambda name, lin: torch.nn.Identity() if name == "0" else None) == ["0"]
    assert isinstance(model[0], torch.nn.Identity)


@needs_kernel
def test_gemv_op_rounds_like_f_linear_and_keeps_leading_shape():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 96, generator=gen).bfloat16()
    w = torch.randn(40, 96, generator=gen).bfloat16()
    out = cpu_kernels.gemv_bf16(x, w)
    assert out.shape == (2, 1, 40) and out.dtype == torch.bfloat16
    ref = F.linear(x.float(), w.float()).bfloat16()
    # Both accumulate in float32 and round once: at most one bf16 step apart.
    assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-7 + 1e-6).all()
    with pytest.raises(ValueError, match="features"):
        cpu_kernels.gemv_bf16(x, w[:, :50])


@pytest.mark.skipif(cpu_kernels.gemv_level() < 2, reason="no AVX-512 BF16 on this CPU")
@pytest.mark.parametrize("n,k", [(100, 64), (4096, 4096), (33, 14336), (31, 45)])
def test_avx512_rows_get_the_same_bits_in_any_batch(n, k):
    """The AVX-512 loop takes three rows of x a pass (two or one for the rest), each row summed in the
    same order, in chunks of k from four rows and in slices of 16 past 16: every batch of 1 to
    MAX_AVX512_ROWS rows gives each row the bits it gets alone."""
    gen = torch.Generator().manual_seed(n + k + 1)
    x = torch.randn(cpu_kernels.MAX_AVX512_ROWS, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    alone = torch.cat([cpu_kernels.gemv_float32(x[i:i + 1], w, level=2) for i in range(x.shape[0])])
    ref = x.double() @ w.double().T
    assert ((alone.double() - ref).abs() <= 1e-6 * (x.double().abs() @ w.double().abs().T) + 1e-30).all()
    for m in range(2, cpu_kernels.MAX_AVX512_ROWS + 1):
        assert torch.equal(cpu_kernels.gemv_float32(x[:m], w, level=2), alone[:m]), m
        assert torch.equal(cpu_kernels.gemv_float32(x[-m:], w, level=2), alone[-m:]), m


@pytest.mark.skipif(cpu_kernels.gemv_level() < 3, reason="no AMX-BF16 on this CPU")
@pytest.mark.parametrize("n,k", [(100, 64), (4096, 4096), (33, 14336), (31, 32)])
def test_amx_rows_get_the_same_bits_in_any_batch(n, k):
    """The tiles sum each row of x against the weights in one order whatever else is in the batch:
    every batch of 2 to MAX_AMX_ROWS rows gives each row the bits it gets in any other such batch
    (one to four tiles of x per pass, a partial last tile)."""
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(cpu_kernels.MAX_AMX_ROWS, k, generator=gen).bfloat16()
    w = torch.randn(n, k, generator=gen).bfloat16()
    full = cpu_kernels.gemv_float32(x, w, level=3)
    ref = x.double() @ w.double().T
    assert ((full.double() - ref).abs() <= 1e-6 * (x.double().abs() @ w.double().abs().T) + 1e-30).all()
    for m in (2, 3, 15, 16, 17, 31, 32, 33, 48, 63):
        assert torch.equal(cpu_kernels.gemv_float32(x[:m], w, level=3), full[:m]), m
        assert torch.equal(cpu_kernels.gemv_float32(x[-m:], w, level=3), full[-m:]), m


@needs_kernel
def test_linear_uses_kernel_only_for_few_rows_without_autograd(monkeypatch):
    from mllama import linear

    layer = DecodeLinear(64, 48, bias=True).bfloat16()
    with torch.no_grad():
        layer.bias.normal_()
    few = torch.randn(1, cpu_kernels.MAX_ROWS, 64).bfloat16()
    many = torch.randn(1, cpu_kernels.MAX_ROWS + 1, 64).bfloat16()
    with torch.no_grad():
        monkeypatch.setattr(linear, "cpu_has_native_bf16", lambda: False)
        assert torch.equal(layer(few), cpu_kernels.gemv_bf16(few, layer.weight) + layer.bias)
        monkeypatch.setattr(linear, "cpu_has_native_bf16", lambda: True)
        if cpu_kernels.gemv_level() == 3:  # AMX tiles: the kernel up to MAX_AMX_ROWS
            assert torch.equal(layer(many), cpu_kernels.gemv_bf16(many, layer.weight) + layer.bias)
            most = torch.randn(1, cpu_kernels.MAX_AMX_ROWS, 64).bfloat16()
            assert torch.equal(layer(most), cpu_kernels.gemv_bf16(most, layer.weight) + layer.bias)
            more = torch.randn(1, cpu_kernels.MAX_AMX_ROWS + 1, 64).bfloat16()
            assert torch.equal(layer(more), F.linear(more, layer.weight, layer.bias))
        monkeypatch.setattr(cpu_kernels, "_amx_lib", None)  # no AMX: torch's GEMM past gemv_max_rows()
        most = torch.randn(1, cpu_kernels.gemv_max_rows(), 64).bfloat16()
        more = torch.randn(1, cpu_kernels.gemv_max_rows() + 1, 64).bfloat16()
        assert cpu_kernels.gemv_max_rows() == (cpu_kernels.MAX_AVX512_ROWS if cpu_kernels.gemv_level() == 2
                                              else cpu_kernels.MAX_ROWS)
        assert torch.equal(layer(more), F.linear(more, layer.weight, layer.bias))
        assert torch.equal(layer(most), cpu_kernels.gemv_bf16(most, layer.weight) + layer.bias)
        assert torch.equal(layer(few), cpu_kernels.gemv_bf16(few, layer.weight) + layer.bias)
        monkeypatch.setattr(linear, "cpu_has_native_bf16", lambda: False)  # else: the kernel, MAX_ROWS at a time
        blocks = torch.cat([cpu_kernels.gemv_bf16(many[0, :cpu_kernels.MAX_ROWS], layer.weight),
                            cpu_kernels.gemv_bf16(many[0, cpu_kernels.MAX_ROWS:], layer.weight)])
        assert torch.equal(layer(many), (blocks + layer.bias)[None])
    out = layer(few)  # autograd on: F.linear, with a gradient
    assert torch.equal(out, F.linear(few, layer.weight, layer.bias))
    out.float().sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():  # float32 never goes through the bf16 kernel
        layer32 = DecodeLinear(64, 48).float()
        x32 = few.float()
        assert torch.equal(layer32(x32), F.linear(x32, layer32.weight, layer32.bias))


def test_installed_package_carries_every_file_the_kernels_include():
    """The kernels are compiled from the installed package's csrc/ on first use: every local header a
    .c file includes must be package data too (a wheel without it builds no kernel at all)."""
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mllama"]
    csrc = root / "src" / "mllama" / "csrc"
    sources = sorted(csrc.glob("*.c"))
    assert sources
    for source in sources:
        names = [f"csrc/{source.name}"] + [f"csrc/{h}" for h in re.findall(r'#include "([^"]+)"', source.read_text())]
        for name in names:
            assert (csrc.parent / name).is_file(), name
            assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} (included by {source.name}) is not package data"


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_level", 0)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setenv("MLLAMA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.delenv("MLLAMA_NO_KERNELS", raising=False)
    with pytest.warns(RuntimeWarning, match="kernels unavailable"):
        assert not cpu_kernels.gemv_available()
    layer = DecodeLinear(8, 4, bias=False).bfloat16()
    x = torch.randn(1, 8).bfloat16()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every call
        assert torch.equal(layer(x), F.linear(x, layer.weight))
    with pytest.raises(RuntimeError, match="not available"):
        cpu_kernels.gemv_bf16(x, layer.weight)
    assert not list(tmp_path.rglob("*.so"))


def test_scans_failed_build_warns_once_and_falls_back_to_torch(monkeypatch, tmp_path):
    """csrc/scans.c loads on its own: where it cannot be built the scans warn once and every caller gets
    torch's answer (None for the NaN count, torch.argmax, no row kernels), the other kernels untouched."""
    monkeypatch.setattr(cpu_scans, "_lib", None)
    monkeypatch.setattr(cpu_scans, "_tried", False)
    monkeypatch.setenv("MLLAMA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.delenv("MLLAMA_NO_KERNELS", raising=False)
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the scans are built on x86-64 only")
    with pytest.warns(RuntimeWarning, match="scan kernels unavailable"):
        assert cpu_scans.count_not_finite(torch.tensor([1.0, float("nan")])) is None
    logits = torch.randn(3, 1000).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every call
        assert not cpu_scans.row_kernels_available()
        assert torch.equal(cpu_scans.argmax_rows(logits), logits.argmax(dim=-1))


def test_env_switch_disables_kernel():
    code = ("from mllama import cpu_kernels, cpu_scans; import torch; "
            "print(cpu_kernels.gemv_available(), cpu_scans.count_not_finite(torch.zeros(1)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"MLLAMA_NO_KERNELS": "1", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False None"


@needs_kernel
def test_build_goes_to_cache_and_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("MLLAMA_CACHE", str(tmp_path))
    from mllama.kernel_cache import build_kernel

    first = build_kernel(cpu_kernels.SOURCE)
    assert first.exists() and first.is_relative_to(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_kernel(cpu_kernels.SOURCE) == first and first.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((1024, 1100), torch.bfloat16), ((0, 4), torch.float32)])
def test_fresh_zeros_is_a_writable_zero_tensor(shape, dtype):
    t = host_memory.fresh_zeros(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()
    assert not t.any()
    if t.numel():
        t[-1, -1] = 3
        assert t.sum().item() == 3


def test_fresh_params_share_huge_pages_without_overlap(monkeypatch):
    """Small scale / offset tensors are carved out of one shared mapping (each zero, writable, on its own
    cache lines, not overlapping the others); large ones, and a new mapping once one is full, stand alone."""
    monkeypatch.setattr(host_memory, "_shared", host_memory._SharedHugePages())
    small = [host_memory.fresh_params(shape, dtype) for shape in ((1, 32), (3, 5), (4096, 32), (100, 7))
             for dtype in (torch.bfloat16, torch.float32)]
    chunk = small[0].untyped_storage().data_ptr()
    spans = []
    for t in small:
        assert not t.any() and t.is_contiguous()
        assert t.untyped_storage().data_ptr() == chunk and t.data_ptr() % 64 == 0
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
        t.fill_(len(spans))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert [t.unique().tolist() for t in small] == [[i] for i in range(1, len(small) + 1)]  # nothing written twice
    large = host_memory.fresh_params((host_memory.HUGE_PAGE_MIN_BYTES // 2, 1), torch.bfloat16)
    assert large.untyped_storage().data_ptr() != chunk and not large.any()
    # a mapping's worth of 1 MiB tensors after those: the last ones start a second mapping
    filler = [host_memory.fresh_params((1 << 18,), torch.float32) for _ in range(host_memory.SHARED_CHUNK_BYTES >> 20)]
    assert len({t.untyped_storage().data_ptr() for t in filler}) == 2 and not any(t.any() for t in filler)


@pytest.mark.parametrize("rows, n, bias", [(48, 3000, True), (130, 1029, False), (64, 17, True)])
def test_wide_fp32_linear_matches_float64_rounded_once(rows, n, bias):
    """Many-row bf16 products as blocked float32 GEMMs: within one bf16 rounding of the float64 product,
    over block edges (n not a multiple of WIDE_BLOCK) and with a bias."""
    from mllama.linear import wide_fp32_linear

    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows // 2, 96, generator=gen).bfloat16()
    w = torch.randn(n, 96, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    got = wide_fp32_linear(x, w, b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows // 2, n)
    # One rounding of the float32 sum: relative error within bf16's half ulp (2^-9), plus float32 noise.
    torch.testing.assert_close(got.double(), ref, rtol=2 ** -8, atol=1e-5)


def test_decode_linear_routes_many_bf16_rows_through_float32_without_native_bf16(monkeypatch):
    from mllama import linear

    layer = DecodeLinear.from_linear(torch.nn.Linear(64, 40, dtype=torch.bfloat16))
    x = torch.randn(linear.WIDE_MIN_ROWS + 3, 64).bfloat16()
    calls = []
    real = linear.wide_fp32_linear
    monkeypatch.setattr(linear, "wide_fp32_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(linear, "cpu_has_native_bf16", lambda: False)
    with torch.no_grad():
        wide = layer(x)
        assert calls == [1]
        layer(x[:linear.WIDE_MIN_ROWS - 1])  # too few rows
        assert calls == [1]
    monkeypatch.setattr(linear, "cpu_has_native_bf16", lambda: True)
    with torch.no_grad():
        native = layer(x)
    assert calls == [1]
    torch.testing.assert_close(wide.float(), native.float(), rtol=2 ** -7, atol=1e-2)
    # autograd keeps F.linear (gradients flow through the weight as usual)
    monkeypatch.setattr(linear, "cpu_has_native_bf16", lambda: False)
    layer.weight.requires_grad_(True)
    layer(x).float().sum().backward()
    assert calls == [1] and layer.weight.grad is not None


def test_bf16_conv_runs_in_float32_without_native_bf16(monkeypatch):
    """The vision patch embedding: a swapped Conv2d keeps its parameters and names; without native bf16
    its bf16 convolution is one float32 convolution rounded once (within bf16's half ulp of float64)."""
    from mllama import linear

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 14, 14, bias=True)).bfloat16()
    weight = model[0].weight
    linear.apply_cpu_kernels(model)
    assert type(model[0]) is linear.Float32Conv2d and model[0].weight is weight
    assert list(model.state_dict()) == ["0.weight", "0.bias"]
    x = torch.randn(2, 3, 42, 56, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = torch.nn.functional.conv2d(x.double(), weight.double(), model[0].bias.double(), stride=14)
    calls = []
    real = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda inp, *a: calls.append(inp.dtype) or real(inp, *a))
    monkeypatch.setattr(linear, "cpu_has_native_bf16", lambda: False)
    with torch.no_grad():
        got = model(x)
    assert calls == [torch.float32] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), ref, rtol=2 ** -8, atol=1e-5)
    monkeypatch.setattr(linear, "cpu_has_native_bf16", lambda: True)
    with torch.no_grad():
        model(x)
    assert calls == [torch.float32, torch.bfloat16]  # with native bf16: torch's own bf16 convolution


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 4099])
def test_count_not_finite_equals_torch(dtype, n):
    if cpu_scans.count_not_finite(torch.zeros(1)) is None:
        pytest.skip("csrc/scans.c does not run here")
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen) * 100).to(dtype)
    top = torch.finfo(dtype).max
    for i in torch.randperm(n, generator=gen)[: max(1, n // 7)].tolist():
        x[i] = [float("nan"), float("inf"), -float("inf"), top, -top][i % 5]  # the largest finite ones too
    x[-1] = float("nan")  # the scalar tail
    assert cpu_scans.count_not_finite(x) == int((~torch.isfinite(x)).sum())
    if n > 1:
        assert cpu_scans.count_not_finite(x[::2]) is None  # not contiguous: the caller counts with torch


@pytest.mark.parametrize("rows,vocab", [(1, 1), (1, 17), (3, 128264), (17, 1000)])
def test_argmax_rows_equals_torch(rows, vocab, monkeypatch):
    """Greedy decoding's argmax (csrc/scans.c, its AVX-512 loop and its plain C one) of float32 and bf16
    logits: the first of equal maxima, a NaN as the largest value, rows of -inf, +inf and the vector
    tail past a multiple of 16, as torch.argmax."""
    if cpu_scans.count_not_finite(torch.zeros(1)) is None:
        pytest.skip("csrc/scans.c does not run here")
    gen = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=gen)
    cases = [x]
    if vocab > 16:
        ties = x.clone()
        ties[:, [3, 5, vocab - 1]] = 9.0  # equal maxima in different lanes: the first wins
        same_lane = x.clone()
        same_lane[:, [vocab - 1, 5 + 16 * ((vocab - 6) // 16)]] = 9.0  # and in one lane
        nan = x.clone()
        nan[:, [7, vocab - 2]] = float("nan")
        nan[0, 2] = float("inf")
        cases += [ties, same_lane, nan]
    cases += [torch.full((rows, vocab), -float("inf")), torch.full((rows, vocab), float("inf"))]
    calls = []
    kernel = cpu_scans._lib.mllama_argmax_rows
    monkeypatch.setattr(cpu_scans._lib, "mllama_argmax_rows", lambda *a: calls.append(1) or kernel(*a))
    for logits in cases + [c.bfloat16() for c in cases]:  # bf16: its own rounding ties more values
        expected = logits.argmax(dim=-1)
        assert torch.equal(cpu_scans.argmax_rows(logits), expected)
        assert torch.equal(cpu_scans.argmax_rows(logits, plain_c=True), expected)  # CPUs without AVX-512
    assert len(calls) == 4 * len(cases)  # in C, not the fallback
    assert torch.equal(cpu_scans.argmax_rows(x.half()), x.half().argmax(dim=-1))  # other dtypes: torch


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not (shutil.which("gcc") or shutil.which("cc"))
                    or bool(os.environ.get("MLLAMA_NO_KERNELS")), reason="the kernels are built on x86-64 with a C compiler")
def test_every_kernel_builds_and_loads_here():
    """A C file that stops compiling would only warn and fall back to torch (and the kernel tests would
    skip): on a machine that can build them, every library must load."""
    import ctypes

    from mllama import cpu_attention
    from mllama.kernel_cache import build_kernel

    for source in (cpu_kernels.SOURCE, cpu_kernels.SMALL_SOURCE, cpu_kernels.AMX_SOURCE, cpu_scans.SOURCE,
                   cpu_attention.SOURCE):
        ctypes.CDLL(str(build_kernel(source)))  # raises KernelCacheError with the compiler's message
    assert cpu_scans.count_not_finite(torch.zeros(1)) == 0
    assert cpu_scans._lib is not None  # argmax_rows runs in C
    if cpu_kernels._small_level:  # AVX2 + FMA here: every kernel in use
        assert cpu_kernels.gemv_available() and cpu_kernels.quant_kernels_available()


@needs_kernel
def test_an_amx_build_failure_costs_only_the_tiles(tmp_path, monkeypatch):
    """gemm_amx.c needs the AMX intrinsics (gcc 11 or later): where it does not build, mllama warns and
    the other kernels still load (they used to share one file and fall back to torch together)."""
    broken = tmp_path / "gemm_amx.c"
    broken.write_text("this is not C\n")
    for name in ("_lib", "_small", "_amx_lib", "_level", "_small_level", "_tried", "_amx_int8"):
        monkeypatch.setattr(cpu_kernels, name, getattr(cpu_kernels, name))  # restored afterwards
    monkeypatch.setattr(cpu_kernels, "AMX_SOURCE", broken)
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    with pytest.warns(RuntimeWarning, match="AMX tile kernels unavailable"):
        assert cpu_kernels.gemv_available()
    assert cpu_kernels.quant_kernels_available() and not cpu_kernels.amx_available()
    assert not cpu_kernels.amx_int8_tiles(64)
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(40, 64).bfloat16()
    assert cpu_kernels.amx_product(x, "bf16", w) is None
    assert torch.allclose(cpu_kernels.small_gemm(x, "bf16", w), x.float() @ w.float().T, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("call", ["linear_int4", "linear_int8", "gemv_float32"])
def test_a_kernel_op_called_first_in_a_fresh_process_loads_the_kernels(call):
    """The kernels load on first use: an int4 model's first product used to find them not yet loaded
    and raise 'not available on this machine' unless a bf16 product had run before."""
    code = {
        "linear_int4": "q = quantize_int4(w, group_size=64); "
                       "y = quant_ops.linear_int4(x, q['weight_packed'], q['weight_scale'], q['weight_offset'], 64)",
        "linear_int8": "q = quantize_int8(w); y = quant_ops.linear_int8(x, q['weight'], q['weight_scale'])",
        "gemv_float32": "y = cpu_kernels.gemv_float32(x, w, level=1)",
    }[call]
    script = ("import torch; from mllama import cpu_kernels, quant_ops; "
              "from mllama.quantize import quantize_int4, quantize_int8; "
              "w = torch.randn(16, 128).bfloat16(); x = torch.randn(1, 128).bfloat16(); "
              f"{code}; print(tuple(y.shape))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(1, 16)"


needs_onednn = pytest.mark.skipif(not linear_module.onednn_bias_available() or not linear_module.cpu_has_native_bf16(),
                                  reason="no oneDNN linear or no native bf16 here")


@needs_onednn
@pytest.mark.parametrize("shape,n,k", [((1601, 96), 40, 96), ((2, 300, 64), 130, 64), ((5, 1280), 33, 1280)])
def test_bias_products_of_many_bf16_rows_go_through_onednn(shape, n, k, monkeypatch):
    """The vision MLP's and the projector's products (a bias, many rows): oneDNN's linear adds the bias
    in its product; x W^T + b rounded once to bf16, as F.linear's addmm gives it."""
    gen = torch.Generator().manual_seed(n + k)
    layer = DecodeLinear.from_linear(torch.nn.Linear(k, n))
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=gen) * k**-0.5)
        layer.bias.copy_(torch.randn(n, generator=gen))
    layer.to(torch.bfloat16)
    x = torch.randn(*shape, generator=gen).bfloat16()
    if x.shape[:-1].numel() <= cpu_kernels.gemv_max_rows():
        x = torch.cat([x] * (cpu_kernels.gemv_max_rows() // x.shape[0] + 1))
    calls = []
    real = linear_module.onednn_linear
    monkeypatch.setattr(linear_module, "onednn_linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        out = layer(x)
    assert calls == [1]
    ref = x.double() @ layer.weight.double().T + layer.bias.double()
    bound = 2**-8 * ref.abs() + 1e-6 * (x.double().abs() @ layer.weight.double().abs().T) + 1e-30
    assert out.shape == (*x.shape[:-1], n) and out.dtype == torch.bfloat16
    assert ((out.double() - ref).abs() <= bound).all()
    expect = F.linear(x, layer.weight, layer.bias).double()
    assert ((out.double() - expect).abs() <= 2**-7 * expect.abs() + 1e-6).all()


@needs_onednn
def test_onednn_route_only_for_bias_products_of_many_rows_without_gradients():
    layer = DecodeLinear.from_linear(torch.nn.Linear(64, 40, dtype=torch.bfloat16))
    many = torch.randn(cpu_kernels.gemv_max_rows() + 1, 64).bfloat16()
    use = linear_module.use_onednn_bias
    assert layer.weight.requires_grad and not use(many, layer.weight, layer.bias)  # autograd would need it
    with torch.no_grad():
        assert use(many, layer.weight, layer.bias)
        assert not use(many, layer.weight, None)  # no bias: F.linear's mm, as fast
        assert not use(many[:cpu_kernels.gemv_max_rows()], layer.weight, layer.bias)  # the decode kernel's
        assert not use(many.float(), layer.weight.float(), layer.bias.float())
        with pytest.raises(RuntimeError, match="cannot be multiplied"):  # F.linear's message, not oneDNN's
            layer(many[:, :63])
    out = layer(many)  # autograd: F.linear, and gradients flow
    out.float().sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
