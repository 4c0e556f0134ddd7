"""The CPU attention kernel (csrc/attention_cpu.c), its products on AMX tiles and with AVX-512 BF16 (each
path this CPU has): against a float64 reference and torch's SDPA on odd shapes, the running softmax's
rescaling, the fallbacks, and the vision encoder with it swapped in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllama.config import MllamaVisionConfig
from mllama.cpu_attention import (KernelTileAttentionCore, _attend, apply_cpu_attention, attention_kernel_available,
                                  kernel_attention)
from mllama.cpu_kernels import amx_available
from mllama.linear import apply_cpu_kernels
import mllama.tile_attention as tile_attention_module
from mllama.tile_attention import KeyCopies, sdpa_attend
from mllama.vision import MllamaVisionModel, TileAttentionCore, TileLayout, tile_attention

needs_kernel = pytest.mark.skipif(not attention_kernel_available(),
                                  reason="needs AVX-512 BF16 or AMX-BF16 and the kernel build")
# The products' paths this CPU runs: AMX tiles (True) where it has them, AVX-512 BF16 (False) wherever the kernel runs.
PATHS = [path for path, here in ((True, amx_available()), (False, attention_kernel_available())) if here] or [False]
paths = pytest.mark.parametrize("tiles", PATHS, ids=lambda t: "tiles" if t else "avx512")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double())


def check_close(got: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Within bf16 rounding of the exact result: no further from float64 than twice torch's own bf16
    SDPA, plus half a bf16 step of the output's size."""
    want = reference(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    err = (got.double() - want).abs().max().item()
    bound = 2 * (sdpa.double() - want).abs().max().item() + 2 ** -9 * want.abs().max().item()
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.isfinite(got).all()
    assert err <= bound, (err, bound)


@needs_kernel
@pytest.mark.parametrize("n1, n2, lq, lk, d", [
    (1, 1, 1, 1, 1),        # one query, one key: the output is v
    (1, 1, 5, 7, 8),        # everything under one tile
    (2, 3, 33, 50, 80),     # the vision head_dim, rows and keys past a tile
    (1, 2, 300, 1100, 40),  # more than one work item of 256 rows, three key blocks of 512, the last partial
    (1, 1, 64, 513, 96),    # the largest head_dim; one key past a block
    (3, 1, 17, 31, 72),     # d a multiple of 8 but not of 16 or 32
])
@paths
def test_kernel_matches_reference(n1, n2, lq, lk, d, tiles):
    gen = torch.Generator().manual_seed(lq * 7 + lk)
    q, k, v = (torch.randn(n, n2, length, d, generator=gen).bfloat16() for n, length in ((n1, lq), (n1, lk), (n1, lk)))
    got = kernel_attention(q, k, v, tiles=tiles)
    assert got is not None
    check_close(got, q, k, v)


@needs_kernel
@paths
def test_kernel_reads_strided_views(tiles):
    """A head slice of (m, heads, L, d) and a sequence slice, as tile_attention passes them."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 80, 4, 40, generator=gen).bfloat16().transpose(1, 2) for _ in range(3))
    for qs, ks, vs in ((q[:, 1:2], k[:, 1:2], v[:, 1:2]), (q[:, :, 10:50], k, v), (q, k[:, :, 3:70], v[:, :, 3:70])):
        got = kernel_attention(qs, ks, vs, tiles=tiles)
        assert got is not None
        check_close(got, qs, ks, vs)


@needs_kernel
@paths
def test_running_softmax_rescales(tiles):
    """Scores that grow block after block (each block of 512 keys far above the last) and one huge
    score: the running maximum must move and scale the sums so far; nothing overflows."""
    gen = torch.Generator().manual_seed(5)
    d, lk = 32, 1600
    q = torch.randn(1, 1, 40, d, generator=gen)
    k = torch.randn(1, 1, lk, d, generator=gen)
    k = k * (2.0 * 6.0 ** (torch.arange(lk) // 512)).view(1, 1, lk, 1)  # each block's keys score 6x the last's
    k[0, 0, 1300] = q[0, 0, 0] * 20  # one key with a score of hundreds for the first query
    v = torch.randn(1, 1, lk, d, generator=gen)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    scores = (q.double() @ k.double().transpose(-1, -2))[0, 0] * d ** -0.5
    assert (scores[:, 512:1024].amax(1) - scores[:, :512].amax(1)).min() > 8  # blocks really move the maximum
    assert (scores[:, 1024:].amax(1) - scores[:, 512:1024].amax(1)).min() > 8
    got = kernel_attention(q, k, v, tiles=tiles)
    assert got is not None
    check_close(got, q, k, v)


def test_fallbacks_are_sdpa():
    q = torch.randn(1, 2, 9, 16)
    assert kernel_attention(q, q, q) is None  # float32
    qb = q.bfloat16()
    assert kernel_attention(qb[..., :8].expand(1, 2, 9, 8).clone().requires_grad_(), qb[..., :8], qb[..., :8]) is None
    big = torch.randn(1, 1, 9, 128).bfloat16()
    assert kernel_attention(big, big, big) is None  # head_dim > 96
    assert kernel_attention(qb, qb[:, :1], qb[:, :1]) is None  # heads differ
    if not amx_available():
        assert kernel_attention(qb, qb, qb, tiles=True) is None  # no tiles here
    for args in ((q, q, q), (big, big, big)):
        assert torch.equal(_attend(*args), F.scaled_dot_product_attention(*args))


@needs_kernel
@pytest.mark.parametrize("real_tiles", [[3], [1, 3, 2]])
def test_tile_attention_with_kernel(real_tiles):
    """tile_attention's masked pattern, each part through the kernel, against the float64 dense mask."""
    gen = torch.Generator().manual_seed(sum(real_tiles))
    tiles, tile_len, real_len, heads, d = 3, 40, 33, 2, 80
    m = len(real_tiles)
    q, k, v = (torch.randn(m, tiles * tile_len, heads, d, generator=gen).transpose(1, 2).contiguous().bfloat16()
               for _ in range(3))
    layout = TileLayout.from_counts(real_tiles, num_tiles=tiles, tile_len=tile_len, real_len=real_len)
    got = tile_attention(q, k, v, layout, attend=_attend)
    exact = tile_attention(q.double(), k.double(), v.double(), layout)
    torch_bf16 = tile_attention(q, k, v, layout)
    err = (got.double() - exact).abs().max().item()
    assert err <= 2 * (torch_bf16.double() - exact).abs().max().item() + 2 ** -9 * exact.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("lq, lk, start, copies", [
    (40, 100, 37, 2),       # the biased keys start inside a tile of 16 and inside the first block
    (300, 1100, 520, 3),    # inside the second block of 512, two work items of rows
    (33, 530, 513, 5),      # only the last, partial block
    (20, 64, 0, 3),         # every key (then the bias changes nothing)
])
@paths
def test_kernel_weighs_keys_as_copies(lq, lk, start, copies, tiles):
    """KeyCopies(start, c): log(c) on the scores of keys [start, lk), as if those keys and values were
    there c times."""
    gen = torch.Generator().manual_seed(lq + start)
    q, k, v = (torch.randn(1, 2, n, 80, generator=gen).bfloat16() for n in (lq, lk, lk))

    def repeated(x):
        return torch.cat([x[:, :, :start]] + [x[:, :, start:]] * copies, dim=2)

    got = kernel_attention(q, k, v, key_copies=KeyCopies(start, copies), tiles=tiles)
    assert got is not None
    check_close(got, q, repeated(k), repeated(v))
    if start:  # without the bias the result is measurably different
        assert (kernel_attention(q, k, v, tiles=tiles).double() - reference(q, repeated(k), repeated(v))).abs().max() > 0.02


@needs_kernel
def test_tile_attention_with_copies_through_kernel():
    """One padded tile for three, through the kernel, against the float64 tiles written out."""
    gen = torch.Generator().manual_seed(8)
    real, copies, tile_len, real_len = 1, 3, 40, 33
    q, k, v = (torch.randn(2, (real + 1) * tile_len, 2, 80, generator=gen).transpose(1, 2).contiguous().bfloat16()
               for _ in range(3))
    shared = TileLayout.from_counts([real, real], num_tiles=real + 1, tile_len=tile_len, real_len=real_len,
                                    padded_copies=copies)
    got = tile_attention(q, k, v, shared, attend=_attend)
    exact = tile_attention(q.double(), k.double(), v.double(), shared)
    torch_bf16 = tile_attention(q, k, v, shared)
    err = (got.double() - exact).abs().max().item()
    assert err <= 2 * (torch_bf16.double() - exact).abs().max().item() + 2 ** -9 * exact.abs().max().item()


def test_key_copies_fallback_is_sdpa():
    q = torch.randn(1, 2, 9, 16)
    copies = KeyCopies(4, 2)
    assert kernel_attention(q, q, q, key_copies=copies) is None  # float32
    assert torch.equal(_attend(q, q, q, key_copies=copies), sdpa_attend(q, q, q, key_copies=copies))


def test_sdpa_key_copies_mask_and_written_out_agree(monkeypatch):
    """The float32 mask (CPU) and the keys written out (where a backend takes no float32 mask with a
    16-bit q) are the same attention: both against float64 with the copies written out."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen).bfloat16() for n in (9, 20, 20))
    copies = KeyCopies(12, 3)
    want = reference(q, torch.cat([k] + [k[:, :, 12:]] * 2, 2), torch.cat([v] + [v[:, :, 12:]] * 2, 2))
    masked = sdpa_attend(q, k, v, key_copies=copies)
    monkeypatch.setattr(tile_attention_module, "_float_mask_exact", lambda q: False)  # as on a GPU
    written = sdpa_attend(q, k, v, key_copies=copies)
    assert not torch.equal(masked, written)  # the two routes really ran
    for got in (masked, written):
        assert (got.double() - want).abs().max() <= 2 ** -7 * want.abs().max()


def vision_model() -> MllamaVisionModel:
    config = MllamaVisionConfig(hidden_size=160, attention_heads=2, intermediate_size=320, image_size=56, patch_size=7,
                                num_hidden_layers=3, num_global_layers=2, intermediate_layers_indices=[2, 0],
                                max_num_tiles=4, vision_output_dim=480)
    torch.manual_seed(0)
    model = MllamaVisionModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "gate" in name:
                param.uniform_(0.5, 1.0)  # every gate open
    return model.eval()


def test_apply_swaps_every_core():
    model = vision_model()
    assert apply_cpu_attention(model) is model
    cores = [m for m in model.modules() if isinstance(m, TileAttentionCore)]
    assert len(cores) == 5 and all(type(c) is KernelTileAttentionCore for c in cores)
    plain = vision_model()
    apply_cpu_kernels(plain)  # what from_pretrained applies
    assert all(type(m) is KernelTileAttentionCore for m in plain.modules() if isinstance(m, TileAttentionCore))


@needs_kernel
def test_vision_encoder_with_kernel():
    """bf16 encoder with the kernel against the same weights in float32 with SDPA: as close as the bf16
    encoder with SDPA is (real tiles 4 and 2, head_dim 80)."""
    model = vision_model()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 2, 4, 3, 56, 56, generator=gen)
    ids = torch.tensor([[6, 2]])
    mask = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]]])
    with torch.inference_mode():
        exact = model.features(pixels, ids, mask).double()
        bf16 = model.to(torch.bfloat16)
        with_sdpa = bf16.features(pixels.bfloat16(), ids, mask).double()
        apply_cpu_attention(bf16)
        with_kernel = bf16.features(pixels.bfloat16(), ids, mask).double()
    assert not torch.equal(with_kernel, with_sdpa)  # the kernel ran

    def rel(a: torch.Tensor) -> float:
        return ((a - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().item()

    assert rel(with_kernel) <= 1.5 * rel(with_sdpa) + 1e-4, (rel(with_kernel), rel(with_sdpa))
