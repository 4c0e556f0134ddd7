"""A decode step's attention through csrc/decode_attention.c (mllama.decode_attention): softmax attention
within bf16 rounding, a row's bits independent of its batch, SDPA where the kernel does not apply, and
a model's decode steps through it in self- and cross-attention."""

from __future__ import annotations

import copy

import pytest
import torch

from mllama import MllamaConfig, row_kernels
from mllama.decode_attention import decode_attention
from mllama.model import MllamaForConditionalGeneration
from tiny import CONFIGS, cross_mask, randomize_, random_images


def _runs() -> bool:
    q, k = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16), torch.zeros(1, 1, 2, 16, dtype=torch.bfloat16)
    return decode_attention(q, k, k, None) is not None


needs_kernel = pytest.mark.skipif(not _runs(), reason="the decode attention kernel does not run here (no AVX-512)")


def _cache_views(b: int, h: int, h_kv: int, t: int, d: int, *, seed: int):
    """q (B, H, 1, D) as the model views its projection, k and v (B, H_kv, T, D) as views of a KV cache
    with more slots and positions than read."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, 1, h * d, generator=gen) * 2).bfloat16().view(b, 1, h, d).transpose(1, 2)
    cache_k = torch.randn(b + 2, h_kv, t + 7, d, generator=gen).bfloat16()
    cache_v = torch.randn(b + 2, h_kv, t + 7, d, generator=gen).bfloat16()
    return q, cache_k[1:1 + b, :, :t], cache_v[1:1 + b, :, :t]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """float64 softmax attention of the same bf16 values; (B, H, 1, D)."""
    groups = q.shape[1] // k.shape[1]
    k64, v64 = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = q.double() @ k64.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v64


@needs_kernel
@pytest.mark.parametrize("b,h,h_kv,t,d", [(1, 32, 8, 33, 128), (3, 4, 2, 700, 64), (2, 16, 1, 513, 136),
                                          (2, 8, 2, 40, 8), (1, 4, 4, 300, 12), (2, 16, 16, 1, 24),
                                          (1, 2, 1, 256, 16), (1, 2, 1, 257, 16)])
@pytest.mark.parametrize("plain", [False, True])
def test_kernel_is_softmax_attention(b, h, h_kv, t, d, plain):
    """Against float64 on the same bf16 inputs: within half a bf16 step of each output (the one rounding)
    and float32's sums, with and without a mask, across chunk boundaries (256 keys) and head sizes that
    are not a multiple of 16; the scores by vdpbf16ps where the CPU has it and by float32 FMAs (plain)."""
    q, k, v = _cache_views(b, h, h_kv, t, d, seed=t + d)
    gen = torch.Generator().manual_seed(t)
    mask = torch.rand(b, 1, 1, t, generator=gen) < 0.6
    mask[..., 0] = True
    for m in (None, mask):
        out = decode_attention(q, k, v, m, plain=plain)
        assert out is not None and out.shape == (b, h, 1, d) and out.dtype == torch.bfloat16
        ref = _reference(q, k, v, m)
        assert ((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-5).all()
    broadcast = mask[:1]
    torch.testing.assert_close(decode_attention(q, k, v, broadcast, plain=plain).double(), _reference(q, k, v, broadcast),
                               rtol=2**-8, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("plain", [False, True])
def test_a_row_has_the_same_bits_alone_and_in_a_ragged_batch(plain):
    """Rows of 5, 300 and 600 cached keys in one call (a mask hiding each row's positions past its
    length, the engine's ragged decode) equal each row alone over its own keys, bit for bit: chunks lie
    at fixed positions and hidden keys count exactly zero. A row that sees no key gets zeros."""
    q, k, v = _cache_views(3, 8, 2, 600, 128, seed=5)
    lengths = torch.tensor([5, 300, 600])
    mask = (torch.arange(600)[None] < lengths[:, None])[:, None, None]
    batch = decode_attention(q, k, v, mask, plain=plain)
    for r, n in enumerate(lengths.tolist()):
        alone = decode_attention(q[r:r + 1], k[r:r + 1, :, :n], v[r:r + 1, :, :n], None, plain=plain)
        assert torch.equal(batch[r:r + 1].view(torch.int16), alone.view(torch.int16))
    mask[1] = False
    blind = decode_attention(q, k, v, mask, plain=plain)
    assert torch.equal(blind[1], torch.zeros_like(blind[1]))
    assert torch.equal(blind[0].view(torch.int16), batch[0].view(torch.int16))


def test_none_where_the_kernel_does_not_apply():
    q, k, v = _cache_views(2, 8, 2, 20, 16, seed=1)
    assert decode_attention(q.float(), k.float(), v.float(), None) is None
    assert decode_attention(torch.cat([q, q], 2), k, v, None) is None  # two query tokens: a prompt
    assert decode_attention(q[:, :6], k, v, None) is None  # 6 heads over 2: groups of 3
    assert decode_attention(q, k, v[:, :, :19], None) is None
    assert decode_attention(q, k, v, torch.ones(2, 1, 2, 20, dtype=torch.bool)) is None
    assert decode_attention(q, k, v, torch.ones(2, 1, 1, 20)) is None  # not a bool mask
    assert decode_attention(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, None) is None
    wide = torch.zeros(1, 1, 1, 272, dtype=torch.bfloat16)
    assert decode_attention(wide, wide, wide, None) is None
    with torch.enable_grad():
        assert decode_attention(q.clone().requires_grad_(), k, v, None) is None


def _model_and_inputs():
    """A bf16 model with head_dim 16 (4 query heads a K/V head) and a 2-tile image seen from token 1."""
    spec = copy.deepcopy(CONFIGS["a"])
    spec["text_config"]["hidden_size"] = 128
    config = MllamaConfig.from_dict(spec)
    model = MllamaForConditionalGeneration(config).bfloat16().eval()
    randomize_(model, 11, scale=0.2)
    row_kernels.apply_row_kernels(model)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, config.text_config.vocab_size, (1, 7), generator=gen)
    ids[0, 1] = config.image_token_index
    images = {key: (val.bfloat16() if val.is_floating_point() else val) for key, val in random_images(config, [[2]], seed=3).items()}
    cam = cross_mask([[2]], [[1]], 7, config.vision_config.max_num_tiles)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "cross_attention_mask": cam, **images}


@needs_kernel
def test_decode_steps_attend_through_the_kernel(monkeypatch):
    """Greedy decoding of an image prompt: every decode step's self- and cross-attention goes through the
    kernel (none of the prompt's), the tokens equal SDPA's route and the logits agree within bf16 noise."""
    model, inputs = _model_and_inputs()
    calls: list[tuple[int, int]] = []

    def counted(q, k, v, mask):
        out = decode_attention(q, k, v, mask)
        if out is not None:
            calls.append((q.shape[2], k.shape[2]))
        return out

    monkeypatch.setattr(row_kernels, "decode_attention", counted)
    kwargs = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    kernel = model.generate(**inputs, **kwargs)
    assert len(calls) == 5 * 5  # 5 decode steps x (3 self-attention + 2 cross-attention layers), all taken
    assert all(s == 1 for s, _ in calls)
    # each step: 3 layers over the chat so far (8 .. 12 keys), then 2 over the image's vision tokens
    vision = calls[1][1]
    assert [t for _, t in calls] == [t for n in range(8, 13) for t in (n, vision, n, n, vision)]
    monkeypatch.setattr(row_kernels, "decode_attention", lambda *a: None)
    sdpa = model.generate(**inputs, **kwargs)
    assert torch.equal(kernel.sequences, sdpa.sequences)
    for a, b in zip(kernel.logits, sdpa.logits):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02)


@needs_kernel
def test_compiled_decode_steps_take_the_kernel_inside_the_graph(monkeypatch):
    """compile=True: each step attends over the whole cache behind a mask, through the custom op
    mllama::decode_attention (the kernel at run time, chunks that the mask hides skipped); the tokens of
    the eager steps, logits within bf16 noise."""
    model, inputs = _model_and_inputs()
    calls: list[int] = []

    def counted(q, k, v, mask):
        out = decode_attention(q, k, v, mask)
        if out is not None:
            calls.append(k.shape[2])
        return out

    monkeypatch.setattr(row_kernels, "decode_attention", counted)
    kwargs = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    eager = model.generate(**inputs, **kwargs)
    vision = calls[1]
    calls.clear()
    compiled = model.generate(**inputs, **kwargs, compile=True)
    cache = calls[0]
    assert cache > 12 and calls == [cache, vision, cache, cache, vision] * 5
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.logits, eager.logits):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02)


@needs_kernel
def test_a_ragged_batch_decodes_as_its_rows_alone(monkeypatch):
    """Two image prompts of different lengths in one generate call: the engine decodes them in one batch
    whose shorter row hides its cache tail behind a mask, through the kernel; each row's tokens are those
    it gets alone, its logits within bf16 noise."""
    model, inputs = _model_and_inputs()
    masks: list[bool] = []

    def counted(q, k, v, mask):
        out = decode_attention(q, k, v, mask)
        if out is not None and q.shape[0] == 2:
            masks.append(mask is not None)
        return out

    monkeypatch.setattr(row_kernels, "decode_attention", counted)
    shorter = {key: (val[:, 2:] if key in ("input_ids", "attention_mask", "cross_attention_mask") else val)
               for key, val in inputs.items()}
    shorter["input_ids"] = shorter["input_ids"].clone()
    shorter["input_ids"][0, 0] = model.config.image_token_index
    batch = {key: torch.cat([val, val]) for key, val in inputs.items()}
    pad = torch.zeros(1, 2, dtype=torch.long)
    batch["input_ids"] = torch.cat([inputs["input_ids"], torch.cat([pad, shorter["input_ids"]], 1)])
    batch["attention_mask"] = torch.cat([inputs["attention_mask"], torch.cat([pad, shorter["attention_mask"]], 1)])
    batch["cross_attention_mask"] = torch.cat([inputs["cross_attention_mask"],
                                               torch.cat([torch.zeros_like(inputs["cross_attention_mask"][:, :2]),
                                                          shorter["cross_attention_mask"]], 1)])
    kwargs = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    together = model.generate(**batch, **kwargs)
    assert masks and any(masks)  # batched steps, the shorter row's hidden tail masked
    for row, alone_inputs in enumerate((inputs, shorter)):
        alone = model.generate(**alone_inputs, **kwargs)
        assert torch.equal(together.sequences[row, -6:], alone.sequences[0, -6:])
        for a, b in zip(together.logits, alone.logits):
            torch.testing.assert_close(a[row].float(), b[0].float(), rtol=0.02, atol=0.02)
