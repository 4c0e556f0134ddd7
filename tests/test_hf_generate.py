"""generate() with transformers' options and config objects, against transformers (issue 13, item 5)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import hf_pair

from mllama import GenerationConfig

IDS = torch.tensor([[1, 5, 6, 7], [1, 9, 4, 3]])


@pytest.fixture(scope="module")
def pair():
    return hf_pair("b", seed=3)  # eos ids [2, 3]


def _ref(hf, **kwargs):
    return hf.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), do_sample=False, eos_token_id=[2, 3],
                       pad_token_id=0, **kwargs)


def test_transformers_generation_config_object(pair):
    import transformers

    hf, ours = pair
    ref = _ref(hf, max_new_tokens=12)
    out = ours.generate(IDS, generation_config=transformers.GenerationConfig(max_new_tokens=12, do_sample=False))
    assert torch.equal(out, ref)
    assert (ref[:, 4:] == 2).any() or (ref[:, 4:] == 3).any()  # an EOS is hit: the model's ids were kept


def test_explicit_mllama_config_keeps_the_models_eos(pair):
    hf, ours = pair
    ours.generation_config = GenerationConfig(eos_token_id=[2, 3], pad_token_id=0, max_new_tokens=4)
    try:
        out = ours.generate(IDS, generation_config=GenerationConfig(max_new_tokens=12))
    finally:
        ours.generation_config = None
    assert torch.equal(out, _ref(hf, max_new_tokens=12))


def test_unimplemented_options_warn_or_refuse(pair):
    _, ours = pair
    with pytest.warns(UserWarning, match="typical_p"):
        ours.generate(IDS, max_new_tokens=2, typical_p=0.5)
    with pytest.warns(UserWarning, match="encoder_no_repeat_ngram_size"):
        ours.generate(IDS, generation_config={"max_new_tokens": 2, "encoder_no_repeat_ngram_size": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neutral values and options that do not change the tokens
        ours.generate(IDS, max_new_tokens=2, num_beams=1, use_cache=True, min_new_tokens=None, logits_processor=[])
    with pytest.raises(NotImplementedError, match="assistant_model"):
        ours.generate(IDS, max_new_tokens=2, assistant_model=ours)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ours.generate(IDS, max_new_tokens=2, not_an_option=1)


def test_num_return_sequences(pair):
    _, ours = pair
    out = ours.generate(IDS, max_new_tokens=5, do_sample=True, num_return_sequences=3, seed=0)
    assert out.shape[0] == 6
    assert torch.equal(out[:3, :4], IDS[:1].expand(3, 4)) and torch.equal(out[3:, :4], IDS[1:].expand(3, 4))
    assert len({tuple(row.tolist()) for row in out[:3]}) > 1  # sampled independently
    with pytest.raises(ValueError, match="do_sample"):
        ours.generate(IDS, max_new_tokens=2, num_return_sequences=2)


def test_scores_and_dict_output_match_transformers(pair):
    hf, ours = pair
    ref = _ref(hf, max_new_tokens=3, output_scores=True, output_logits=True, return_dict_in_generate=True)
    out = ours.generate(IDS, max_new_tokens=3, output_scores=True, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out[0], out["sequences"])
    assert len(out.scores) == len(ref.scores) == 3
    for a, b in zip(out.scores, ref.scores):
        assert (a - b).abs().max() <= 1e-4
    for a, b in zip(out.logits, ref.logits):
        assert (a - b).abs().max() <= 1e-4


def test_min_new_tokens_and_min_length_match_transformers(pair):
    hf, ours = pair
    free = _ref(hf, max_new_tokens=16)
    first_eos = [next(i for i, t in enumerate(row[4:].tolist()) if t in (2, 3)) for row in free]
    assert min(first_eos) < 5  # without the rule a row stops early
    for options in ({"min_new_tokens": 9}, {"min_length": 13}):
        ref = _ref(hf, max_new_tokens=16, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # implemented: nothing to warn about
            out = ours.generate(IDS, max_new_tokens=16, **options)
        assert torch.equal(out, ref), options
        assert not ((ref[:, 4:13] == 2) | (ref[:, 4:13] == 3)).any() and not torch.equal(ref, free)


def test_no_repeat_ngram_size_matches_transformers_on_a_batch(pair):
    hf, ours = pair
    ids = torch.tensor([[1, 5, 6, 7, 5, 6], [1, 9, 4, 3, 8, 8], [1, 11, 12, 11, 12, 11]])
    for n in (1, 2, 3):
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=[2, 3],
                          pad_token_id=0, max_new_tokens=14, no_repeat_ngram_size=n)
        out = ours.generate(ids, max_new_tokens=14, no_repeat_ngram_size=n)
        assert torch.equal(out, ref), n
    free = ours.generate(ids, max_new_tokens=14)
    assert not torch.equal(free, ours.generate(ids, max_new_tokens=14, no_repeat_ngram_size=2))


def test_rules_refuse_bad_values(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="min_new_tokens"):
        ours.generate(IDS, max_new_tokens=2, min_new_tokens=-1)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        ours.generate(IDS, max_new_tokens=2, no_repeat_ngram_size=1.5)


@pytest.mark.parametrize("options", [dict(min_new_tokens=6, no_repeat_ngram_size=2), dict(repetition_penalty=1.4)],
                         ids=["rules", "penalty"])
def test_greedy_scores_with_rules_match_transformers(pair, options):
    hf, ours = pair
    ref = _ref(hf, max_new_tokens=6, output_scores=True, return_dict_in_generate=True, **options)
    out = ours.generate(IDS, max_new_tokens=6, output_scores=True, return_dict_in_generate=True, **options)
    assert torch.equal(out.sequences, ref.sequences) and len(out.scores) == len(ref.scores)
    banned = 0
    finished_rows = 0
    for t, (a, b) in enumerate(zip(out.scores, ref.scores)):
        # Rows that have finished go on with the pad id, in both: their scores must agree too.
        finished_rows += int(((ref.sequences[:, 4:4 + t] == 2) | (ref.sequences[:, 4:4 + t] == 3)).any(dim=1).sum())
        finite = b.isfinite()
        banned += int((~finite).sum())
        assert torch.equal(a.isfinite(), finite) and (a[finite] - b[finite]).abs().max() <= 1e-4
    assert banned > 0 or "repetition_penalty" in options  # the rules forbade ids at some step
    assert finished_rows > 0 or "min_new_tokens" in options  # a row ended before the last step
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(out.scores, out.logits)) or banned
