"""The generation engine against transformers, against itself uncached, and row by row."""

from __future__ import annotations

import pytest
import torch

from test_model import _inputs
from tiny import MetaSemantics, hf_pair, tiny_config

NEW = 32


def _greedy_uncached_hf(hf, inputs, steps: int) -> torch.Tensor:
    """Reference for left-padded batches: re-run transformers' forward on the growing sequence
    (its generate crashes on such batches), extending the masks as generate does, with Meta's
    zero cross-attention output for rows that see no image (the text-only row here)."""
    ids, am, cam = inputs["input_ids"], inputs["attention_mask"], inputs.get("cross_attention_mask")
    positions = (am.cumsum(-1) - 1).clamp(min=0)
    extra = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask") if k in inputs}
    meta = MetaSemantics(hf)
    for _ in range(steps):
        kwargs = dict(extra)
        if cam is not None:
            kwargs["cross_attention_mask"] = meta.cross_attention_mask = cam
        with torch.no_grad():
            logits = hf(input_ids=ids, attention_mask=am, position_ids=positions, **kwargs).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
        am = torch.cat([am, torch.ones_like(token)], 1)
        positions = torch.cat([positions, positions[:, -1:] + 1], 1)
        if cam is not None:
            cam = torch.cat([cam, cam[:, -1:]], 1)
    meta.__exit__()
    return ids


@pytest.mark.parametrize("name,tiles,positions,seq_len", [
    ("a", [[2]], [[0]], 6),
    ("b", [[1, 4]], [[0, 1]], 7),
    ("c", [[3], [2]], [[0], [0]], 5),  # equal-length batch: transformers' generate handles it
])
def test_greedy_matches_transformers_generate(name, tiles, positions, seq_len):
    hf, ours = hf_pair(name, seed=11)
    inputs = _inputs(name, tiles, positions, seq_len, seed=2)
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    out = ours.generate(**inputs, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    assert out.shape == (len(tiles), seq_len + NEW)
    assert torch.equal(out, ref)


def _mixed_batch():
    """Rows of different lengths (left padded), image counts and a text-only row."""
    config = tiny_config("b")
    inputs = _inputs("b", [[2, 1], [4], []], [[0, 1], [3], []], 8, seed=4)
    pads = [0, 3, 2]
    for row, pad in enumerate(pads):
        inputs["attention_mask"][row, :pad] = 0
        inputs["input_ids"][row, :pad] = config.text_config.pad_token_id
    # Row 1's image token sits at its first real position; row 2 has no image at all.
    inputs["input_ids"][1, 3] = config.image_token_index
    return inputs, pads


def test_left_padded_batch_matches_uncached_transformers_loop():
    hf, ours = hf_pair("b", seed=12)
    inputs, _ = _mixed_batch()
    ref = _greedy_uncached_hf(hf, inputs, 12)
    out = ours.generate(**inputs, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    assert torch.equal(out, ref)


def test_each_row_equals_that_row_generated_alone():
    _, ours = hf_pair("b", seed=13)
    inputs, pads = _mixed_batch()
    batch = ours.generate(**inputs, max_new_tokens=16, eos_token_id=[], pad_token_id=0)
    for row, pad in enumerate(pads):
        single = {k: v[row:row + 1] for k, v in inputs.items()}
        single["input_ids"] = single["input_ids"][:, pad:]
        single["attention_mask"] = single["attention_mask"][:, pad:]
        single["cross_attention_mask"] = single["cross_attention_mask"][:, pad:]
        if row == 2:  # text only: no image tensors at all
            single = {k: single[k] for k in ("input_ids", "attention_mask")}
        alone = ours.generate(**single, max_new_tokens=16, eos_token_id=[], pad_token_id=0)
        assert torch.equal(batch[row, pad:], alone[0])


def test_cached_decode_logits_equal_full_reforward():
    _, ours = hf_pair("a", seed=14)
    inputs = _inputs("a", [[2], [1, 2]], [[0], [0, 3]], 7, seed=5)
    inputs["attention_mask"][0, :1] = 0
    inputs["cross_attention_mask"][0, :1] = 0
    result = ours.generate(**inputs, max_new_tokens=10, eos_token_id=[], pad_token_id=0,
                           return_dict_in_generate=True)
    seq = result.sequences
    s = inputs["input_ids"].shape[1]
    am = inputs["attention_mask"]
    for step, logits in enumerate(result.logits):
        n = s + step
        full_am = torch.cat([am, torch.ones(2, step, dtype=am.dtype)], 1)
        cam = inputs["cross_attention_mask"]
        cam = torch.cat([cam, cam[:, -1:].expand(-1, step, -1, -1)], 1)
        with torch.no_grad():
            ref = ours(seq[:, :n], attention_mask=full_am, position_ids=(full_am.cumsum(-1) - 1).clamp(min=0),
                       pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                       aspect_ratio_mask=inputs["aspect_ratio_mask"], cross_attention_mask=cam).logits[:, -1]
        assert (ref - logits).abs().max().item() <= 1e-4


def test_text_only_causal_lm_generate_matches_full_model():
    from mllama import MllamaForCausalLM

    hf, ours = hf_pair("a", seed=15)
    lm = MllamaForCausalLM(tiny_config("a")).eval()
    lm.load_state_dict({k.replace("model.language_model.", "model."): v for k, v in ours.state_dict().items()
                        if k.startswith("model.language_model.") or k == "lm_head.weight"})
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    assert torch.equal(lm.generate(ids, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0), ref)
    with pytest.raises(ValueError, match="text-only"):
        lm.generate(ids, pixel_values=torch.zeros(1, 1, 2, 3, 28, 28))


def test_eos_ends_rows_independently_and_pads():
    _, ours = hf_pair("a", seed=16)
    inputs = _inputs("a", [[2], [1]], [[0], [0]], 6, seed=6)
    free = ours.generate(**inputs, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    new = free[:, 6:].tolist()
    stop = new[0][0]
    out = ours.generate(**inputs, max_new_tokens=12, eos_token_id=[stop], pad_token_id=0)
    ends = [6 + (row.index(stop) + 1 if stop in row else 12) for row in new]
    assert ends[0] < 18
    assert out.shape[1] == max(ends)
    for row, end in enumerate(ends):
        assert torch.equal(out[row, :end], free[row, :end])
        assert (out[row, end:] == 0).all()


class _CharDecoder:
    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return "".join(chr(65 + i % 26) for i in ids)


def test_stop_strings_end_rows_independently():
    _, ours = hf_pair("a", seed=17)
    inputs = _inputs("a", [[2], [1]], [[0], [0]], 6, seed=7)
    free = ours.generate(**inputs, max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    text0 = _CharDecoder().decode(free[0, 6:].tolist())
    stop = text0[3:5]
    out = ours.generate(**inputs, max_new_tokens=10, eos_token_id=[], pad_token_id=0,
                        stop_strings=[stop], tokenizer=_CharDecoder())
    end0 = 6 + text0.index(stop) + len(stop)
    assert torch.equal(out[0, :end0], free[0, :end0])
    assert (out[0, end0:] == 0).all()
    with pytest.raises(ValueError, match="tokenizer"):
        ours.generate(**inputs, max_new_tokens=3, stop_strings=["x"])


def test_seeded_sampling_is_reproducible():
    _, ours = hf_pair("c", seed=18)
    inputs = _inputs("c", [[3], [2]], [[0], [0]], 5, seed=8)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=20, top_p=0.95, min_p=0.01,
                  repetition_penalty=1.2, eos_token_id=[], pad_token_id=0)
    a = ours.generate(**inputs, seed=123, **kwargs)
    b = ours.generate(**inputs, seed=123, **kwargs)
    c = ours.generate(**inputs, seed=124, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generation_config_defaults_apply():
    from mllama import GenerationConfig

    _, ours = hf_pair("a", seed=19)
    ours.generation_config = GenerationConfig(max_new_tokens=5, eos_token_id=[], pad_token_id=0)
    ids = torch.tensor([[1, 4, 6]])
    assert ours.generate(ids).shape == (1, 8)
    assert ours.generate(ids, max_new_tokens=2).shape == (1, 5)


def test_bad_generate_inputs():
    _, ours = hf_pair("a", seed=20)
    inputs = _inputs("a", [[2]], [[0]], 6)
    with pytest.raises(ValueError, match="cross_attention_mask"):
        ours.generate(**{**inputs, "cross_attention_mask": inputs["cross_attention_mask"][:, :3]})
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate(inputs["input_ids"], attention_mask=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size 1"):
        ours.generate(torch.ones(2, 3, dtype=torch.long), streamer=object())


def test_compiled_decode_matches_eager_on_a_left_padded_batch():
    _, ours = hf_pair("b", seed=17)
    inputs, _ = _mixed_batch()
    kwargs = dict(max_new_tokens=12, eos_token_id=[], pad_token_id=0, return_dict_in_generate=True)
    eager = ours.generate(**inputs, **kwargs)
    compiled = ours.generate(**inputs, **kwargs, compile=True)
    assert torch.equal(compiled.sequences, eager.sequences)
    for a, b in zip(compiled.logits, eager.logits):
        assert (a - b).abs().max().item() <= 1e-5
    # A second request of another length reuses the graph (same batch size, same cache bucket).
    shorter = {k: v[:, 1:] if k in ("input_ids", "attention_mask", "cross_attention_mask") else v
               for k, v in inputs.items()}
    assert torch.equal(ours.generate(**shorter, **kwargs, compile=True).sequences,
                       ours.generate(**shorter, **kwargs).sequences)


def test_bf16_decode_kernel_matches_f_linear_decode(monkeypatch):
    from mllama import cpu_kernels

    if not cpu_kernels.gemv_available():
        pytest.skip("no bf16 decode kernel on this machine")
    from mllama.linear import DecodeLinear, apply_cpu_kernels

    _, ours = hf_pair("a", seed=18)
    ours = apply_cpu_kernels(ours.to(torch.bfloat16))  # what from_pretrained does
    assert isinstance(ours.lm_head, DecodeLinear)
    inputs = _inputs("a", [[2]], [[0]], 6, seed=7)
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    kwargs = dict(max_new_tokens=16, eos_token_id=[], pad_token_id=0, return_dict_in_generate=True)
    with_kernel = ours.generate(**inputs, **kwargs)
    compiled = ours.generate(**inputs, **kwargs, compile=True)  # the kernel as an opaque op in the graph
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    without = ours.generate(**inputs, **kwargs)
    assert torch.equal(with_kernel.sequences, without.sequences)
    assert torch.equal(compiled.sequences, without.sequences)
    for a, b in zip(with_kernel.logits, without.logits):
        assert (a - b).abs().max().item() <= 0.05 * b.abs().max().item()


def test_fast_vision_is_exact_for_full_images_and_differs_for_padded_ones():
    _, ours = hf_pair("b", seed=19)  # config b: up to 4 tiles
    kwargs = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=0, return_dict_in_generate=True)
    full = _inputs("b", [[4]], [[0]], 6, seed=8)
    assert torch.equal(ours.generate(**full, **kwargs, fast_vision=True).sequences,
                       ours.generate(**full, **kwargs).sequences)
    padded = _inputs("b", [[1]], [[0]], 6, seed=8)
    fast = ours.generate(**padded, **kwargs, fast_vision=True)
    exact = ours.generate(**padded, **kwargs)
    assert fast.sequences.shape == exact.sequences.shape
    assert (fast.logits[0] - exact.logits[0]).abs().max().item() > 1e-4
