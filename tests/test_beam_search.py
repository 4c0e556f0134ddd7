"""Beam search (num_beams > 1) against transformers' generate, token for token, on tiny models with
images and text only, with EOS made likely so that some beams finish early (issue 13, item 5)."""

from __future__ import annotations

import pytest
import torch

from test_model import _inputs
from tiny import hf_pair, tiny_config

EOS = 2


def _eos_likely(hf, ours, top: int) -> None:
    """EOS's output row a shrunk copy of the most generated id's: EOS ranks just below it, so beams
    end early (on the same weights in both libraries)."""
    for model in (hf, ours):
        with torch.no_grad():
            model.lm_head.weight[EOS] = model.lm_head.weight[top] * 0.9


@pytest.fixture(scope="module", params=[("a", [[2], [1]], [[0], [0]], 6), ("c", [[3]], [[0]], 5)],
                ids=["a-batch2", "c-3tiles"])
def case(request):
    name, tiles, positions, seq_len = request.param
    hf, ours = hf_pair(name, seed=5)
    inputs = _inputs(name, tiles, positions, seq_len, seed=1)
    free = ours.generate(**inputs, max_new_tokens=10, eos_token_id=[])
    _eos_likely(hf, ours, torch.mode(free[:, seq_len:].flatten()).values.item())
    return hf, ours, inputs


def _both(hf, ours, inputs, *, seed: int | None = None, **kw):
    """transformers' and mllama's outputs; with a seed, both sample from torch's default generator
    seeded the same way (beam sampling draws in the same order in both)."""
    common = dict(eos_token_id=EOS, pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kw)
    common.setdefault("do_sample", False)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        ref = hf.generate(**inputs, **common)
    if seed is not None:
        torch.manual_seed(seed)
    return ref, ours.generate(**inputs, **common)


def _assert_same(ref, out):
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.beam_indices, ref.beam_indices)
    assert (out.sequences_scores - ref.sequences_scores).abs().max() <= 1e-4
    assert len(out.scores) == len(ref.scores)
    for a, b in zip(out.scores, ref.scores):
        finite = b.isfinite()
        assert torch.equal(a.isfinite(), finite) and (a[finite] - b[finite]).abs().max() <= 1e-4


@pytest.mark.parametrize("options", [
    dict(num_beams=3, max_new_tokens=12, num_return_sequences=3),
    dict(num_beams=4, max_new_tokens=12, num_return_sequences=2, length_penalty=-0.5, early_stopping=True),
    dict(num_beams=3, max_new_tokens=12, early_stopping="never", length_penalty=2.0),
    dict(num_beams=2, max_new_tokens=12, early_stopping=True),
    dict(num_beams=3, max_new_tokens=10, num_return_sequences=2, no_repeat_ngram_size=2, min_new_tokens=3),
], ids=["return3", "negative-penalty-early", "never", "early2", "ngram-min"])
def test_beam_search_matches_transformers(case, options):
    hf, ours, inputs = case
    ref, out = _both(hf, ours, inputs, **options)
    _assert_same(ref, out)


def test_some_beams_end_early_and_the_search_stops_early(case):
    hf, ours, inputs = case
    s = inputs["input_ids"].shape[1]
    encodes = []
    hook = ours.model.vision_model.patch_embedding.register_forward_hook(lambda *a: encodes.append(1))
    try:
        ref, out = _both(hf, ours, inputs, num_beams=4, max_new_tokens=12, num_return_sequences=2, length_penalty=-0.5)
    finally:
        hook.remove()
    _assert_same(ref, out)
    assert len(encodes) == inputs["pixel_values"].shape[0]  # each prompt's one image once, not once per beam
    ended = (ref.sequences[:, s:] == EOS).any(dim=1)
    assert ended.any()  # EOS finished some returned hypotheses before max_new_tokens
    ref, out = _both(hf, ours, inputs, num_beams=2, max_new_tokens=12, early_stopping=True)
    _assert_same(ref, out)
    assert ref.sequences.shape[1] < s + 12  # every prompt's set filled before the budget


def test_text_only_batch_and_causal_lm_match_transformers():
    from mllama import MllamaForCausalLM

    hf, ours = hf_pair("b", seed=3)  # eos ids [2, 3], reached within a few tokens
    ids = torch.tensor([[1, 5, 6, 7], [1, 9, 4, 3]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    common = dict(num_beams=3, max_new_tokens=12, num_return_sequences=3, eos_token_id=[2, 3], pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = hf.generate(**inputs, do_sample=False, **common)
    assert ((ref.sequences[:, 4:] == 2) | (ref.sequences[:, 4:] == 3)).any()
    _assert_same(ref, ours.generate(**inputs, **common))
    lm = MllamaForCausalLM(tiny_config("b")).eval()
    lm.load_state_dict({k.replace("model.language_model.", "model."): v for k, v in ours.state_dict().items()
                        if k.startswith("model.language_model.") or k == "lm_head.weight"})
    _assert_same(ref, lm.generate(**inputs, **common))
    plain = ours.generate(ids, num_beams=3, max_new_tokens=12, eos_token_id=[2, 3], pad_token_id=0)
    assert torch.equal(plain, ref.sequences[::3])  # one sequence per prompt by default


@pytest.mark.parametrize("options", [
    dict(num_beams=3, max_new_tokens=10, repetition_penalty=1.3),
    dict(num_beams=3, max_length=12, num_return_sequences=2),
    dict(num_beams=2, max_new_tokens=8, min_length=10),
    dict(num_beams=3, max_new_tokens=6, output_logits=True),
], ids=["repetition-penalty", "max-length", "min-length", "logits"])
def test_text_only_options_match_transformers(options):
    hf, ours = hf_pair("b", seed=3)
    ids = torch.tensor([[1, 5, 6, 7], [1, 9, 4, 3]])
    common = dict(input_ids=ids, attention_mask=torch.ones_like(ids), eos_token_id=[2, 3], pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True, **options)
    with torch.no_grad():
        ref = hf.generate(do_sample=False, **common)
    out = ours.generate(**common)
    _assert_same(ref, out)
    if options.get("output_logits"):
        assert len(out.logits) == len(ref.logits)
        assert max((a - b).abs().max() for a, b in zip(out.logits, ref.logits)) <= 1e-4


def test_transformers_generation_config_with_beams():
    import transformers

    hf, ours = hf_pair("b", seed=3)
    ids = torch.tensor([[1, 5, 6, 7], [1, 9, 4, 3]])
    config = transformers.GenerationConfig(num_beams=3, max_new_tokens=8, num_return_sequences=2, eos_token_id=[2, 3],
                                           pad_token_id=0)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, generation_config=config)
    assert ref.shape[0] == 4 and torch.equal(ours.generate(ids, generation_config=config), ref)


def test_left_padded_batch_rows_equal_each_row_alone():
    hf, ours = hf_pair("b", seed=3)
    config = tiny_config("b")
    inputs = _inputs("b", [[2, 1], [4], [1]], [[0, 1], [3], [0]], 8, seed=4)
    pads = [0, 3, 1]
    for row, pad in enumerate(pads):
        inputs["attention_mask"][row, :pad] = 0
        inputs["input_ids"][row, :pad] = config.text_config.pad_token_id
        inputs["cross_attention_mask"][row, :pad] = 0
    options = dict(num_beams=3, num_return_sequences=2, max_new_tokens=10, eos_token_id=[2, 3], pad_token_id=0,
                   return_dict_in_generate=True, output_scores=True)
    batch = ours.generate(**inputs, **options)
    for row, pad in enumerate(pads):
        alone_inputs = {k: v[row:row + 1] for k, v in inputs.items()}
        alone_inputs = {k: (v[:, pad:] if k in ("input_ids", "attention_mask", "cross_attention_mask") else v)
                        for k, v in alone_inputs.items()}
        alone = ours.generate(**alone_inputs, **options)
        got = batch.sequences[2 * row:2 * row + 2, 8:]
        want = alone.sequences[:, 8 - pad:]
        assert torch.equal(got[:, :want.shape[1]], want)
        assert (got[:, want.shape[1]:] == 2).all()  # filled as transformers fills (pad id 0: first eos)
        assert (batch.sequences_scores[2 * row:2 * row + 2] - alone.sequences_scores).abs().max() <= 1e-5


def test_bad_beam_options_are_refused(case):
    _, ours, inputs = case
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours.generate(**inputs, num_beams=2, num_return_sequences=3, max_new_tokens=2)
    with pytest.raises(ValueError, match="early_stopping"):
        ours.generate(**inputs, num_beams=2, early_stopping="sometimes", max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(**inputs, num_beams=2, do_sample=True, temperature=0.0, max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="num_beam_groups"):
        ours.generate(**inputs, num_beams=4, num_beam_groups=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams"):
        ours.generate(**inputs, num_beams=0, max_new_tokens=2)
    assert torch.equal(ours.generate(**inputs, num_beams=2, max_new_tokens=0), inputs["input_ids"])


@pytest.mark.parametrize("options", [
    dict(num_beams=3, max_new_tokens=10, num_return_sequences=2),
    dict(num_beams=2, max_new_tokens=10, temperature=0.7, top_k=40, top_p=0.9, early_stopping=True),
], ids=["plain", "warped"])
def test_beam_sampling_matches_transformers_with_the_same_seed(case, options):
    hf, ours, inputs = case
    ref, out = _both(hf, ours, inputs, do_sample=True, seed=7, **options)
    _assert_same(ref, out)
    greedy_ref, _ = _both(hf, ours, inputs, **{k: v for k, v in options.items() if k not in ("temperature", "top_k", "top_p")})
    other_ref, other = _both(hf, ours, inputs, do_sample=True, seed=8, **options)
    _assert_same(other_ref, other)
    # Sampling changed something: another seed or beam search gives other beams.
    assert not (torch.equal(out.sequences, greedy_ref.sequences) and torch.equal(out.sequences, other.sequences))


def test_beam_sampling_seed_is_reproducible(case):
    _, ours, inputs = case
    runs = [ours.generate(**inputs, num_beams=2, do_sample=True, temperature=1.5, max_new_tokens=8, eos_token_id=[],
                          seed=s) for s in (3, 3, 4, 5)]
    assert torch.equal(runs[0], runs[1])
    assert not (torch.equal(runs[0], runs[2]) and torch.equal(runs[0], runs[3]))
