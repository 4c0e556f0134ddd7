"""The transformers surface: from_pretrained keywords, forward outputs and options, training helpers,
peft and Trainer; each checked against transformers on the same weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny import cross_mask, hf_pair, random_images, tap_layer_inputs, tiny_config

from mllama import (
    MllamaConfig,
    MllamaForCausalLM,
    MllamaForConditionalGeneration,
    MllamaModel,
)

TOL = 1e-4


@pytest.fixture(scope="module")
def pair():
    return hf_pair("a", seed=11)


@pytest.fixture(scope="module")
def saved(pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    pair[1].save_pretrained(path)
    return path


def _image_inputs(seq_len: int = 7):
    config = tiny_config("a")
    tiles, positions = [[2], [1]], [[0], [0]]  # every row sees its image: Meta and transformers agree
    ids = torch.randint(3, config.text_config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = config.image_token_index
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "cross_attention_mask": cross_mask(tiles, positions, seq_len, config.vision_config.max_num_tiles),
            **random_images(config, tiles, seed=2)}


# ---- 1. from_pretrained keywords ----

def test_from_pretrained_transformers_keywords(pair, saved):
    _, ours = pair
    inputs = _image_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these need no warning: they mean what mllama does anyway
        model = MllamaForConditionalGeneration.from_pretrained(
            saved, attn_implementation="sdpa", low_cpu_mem_usage=True, device_map={"": "cpu"},
            use_safetensors=True, dtype=torch.float32, local_files_only=True)
    assert model.name_or_path == str(saved)
    with torch.no_grad():
        assert (model(**inputs).logits - ours(**inputs).logits).abs().max() == 0
    for device_map in ("sequential", "auto", "cpu", {"model": "cpu", "lm_head": "cpu"}):
        assert MllamaForConditionalGeneration.from_pretrained(saved, device_map=device_map).device.type == "cpu"
    with pytest.raises(ValueError, match="one device"):
        MllamaForConditionalGeneration.from_pretrained(saved, device_map={"model": "cpu", "lm_head": "disk"})
    with pytest.raises(ValueError, match="attn_implementation"):
        MllamaForConditionalGeneration.from_pretrained(saved, attn_implementation="fast")


@pytest.mark.parametrize("keyword,value", [("attn_implementation", "flash_attention_2"), ("max_memory", {0: "1GB"}),
                                           ("use_safetensors", False), ("low_cpu_mem_usage", False)])
def test_inapplicable_keywords_warn_why(saved, keyword, value):
    import mllama.hf_surface as surface

    surface._warned.clear()
    with pytest.warns(UserWarning, match=f"{keyword}.*ignored"):
        MllamaForConditionalGeneration.from_pretrained(saved, **{keyword: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        MllamaForConditionalGeneration.from_pretrained(saved, **{keyword: value})


def test_config_keyword_replaces_config_json(saved):
    import transformers

    hf_config = transformers.MllamaConfig.from_pretrained(saved)
    hf_config.text_config.rms_norm_eps = 0.25
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(saved, config=hf_config).eval()
    ours = MllamaForConditionalGeneration.from_pretrained(saved, config=hf_config, dtype=torch.float32)
    assert ours.config.text_config.rms_norm_eps == 0.25
    ids = torch.randint(3, 90, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() <= TOL
    ours = MllamaForConditionalGeneration.from_pretrained(saved, config=MllamaConfig.from_pretrained(saved))
    assert ours.config.text_config.rms_norm_eps != 0.25
    text = MllamaForCausalLM.from_pretrained(saved, config=hf_config)
    assert text.config.rms_norm_eps == 0.25


def test_hub_keywords_reach_the_download(monkeypatch, tmp_path):
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(FileNotFoundError, match="not cached"):
        MllamaForConditionalGeneration.from_pretrained("someone/model", token="hf_x", cache_dir=tmp_path,
                                                       local_files_only=True, revision="r1")
    assert seen["token"] == "hf_x" and seen["cache_dir"] == str(tmp_path) and seen["local_files_only"]
    assert seen["revision"] == "r1" and seen["repo_id"] == "someone/model"


# ---- 3. forward outputs and options ----

def test_outputs_are_subscriptable_like_transformers(pair):
    hf, ours = pair
    inputs = _image_inputs()
    with torch.no_grad():
        out = ours(**inputs)
        ref = hf(**inputs)
        assert torch.equal(out[0], out["logits"]) and torch.equal(out[0], out.logits)
        assert list(out.keys()) == ["logits"] and len(out.to_tuple()) == 1
        assert (out[0] - ref[0]).abs().max() <= TOL
        labelled = ours(**inputs, labels=inputs["input_ids"])
        ref_labelled = hf(**inputs, labels=inputs["input_ids"])
        assert torch.equal(labelled[0], labelled["loss"]) and torch.equal(labelled[1], labelled.logits)
        assert (labelled[0] - ref_labelled[0]).abs() <= TOL
        loss, logits = ours(**inputs, labels=inputs["input_ids"], return_dict=False)
        assert torch.equal(loss, labelled.loss) and torch.equal(logits, labelled.logits)
    with pytest.raises(KeyError):
        out["loss"]


@pytest.mark.parametrize("with_images", [False, True])
def test_output_hidden_states_match_transformers(pair, with_images):
    hf, ours = pair
    inputs = _image_inputs() if with_images else {"input_ids": _image_inputs()["input_ids"][:, 1:]}
    with torch.no_grad():
        out = ours(**inputs, output_hidden_states=True, use_cache=True)
        ref = hf(**inputs, output_hidden_states=True)
        base = ours.model(**inputs, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == (6 if with_images else 4)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert (a - b).abs().max() <= TOL
    assert out.past_key_values is None
    assert torch.equal(base.last_hidden_state, out.hidden_states[-1]) and len(base.hidden_states) == len(out.hidden_states)


def test_logits_to_keep_and_positional_order(pair):
    hf, ours = pair
    inputs = _image_inputs()
    with torch.no_grad():
        full = ours(**inputs).logits
        assert torch.allclose(ours(**inputs, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)
        assert (ours(**inputs, logits_to_keep=2).logits - hf(**inputs, logits_to_keep=2).logits).abs().max() <= TOL
        index = torch.tensor([0, 3])
        assert torch.allclose(ours(**inputs, logits_to_keep=index).logits, full[:, index], atol=1e-6)
        positional = ours(inputs["input_ids"], inputs["pixel_values"], inputs["aspect_ratio_mask"],
                          inputs["aspect_ratio_ids"], inputs["attention_mask"], inputs["cross_attention_mask"])
        assert torch.equal(positional.logits, full)
        ref = hf(inputs["input_ids"], inputs["pixel_values"], inputs["aspect_ratio_mask"],
                 inputs["aspect_ratio_ids"], inputs["attention_mask"], inputs["cross_attention_mask"])
        assert (positional.logits - ref.logits).abs().max() <= TOL
    with pytest.raises(ValueError, match="positional arguments follow transformers' order"):
        ours(inputs["input_ids"], inputs["attention_mask"])
    with pytest.raises(ValueError, match="labels need the logits"):
        ours(**inputs, labels=inputs["input_ids"], logits_to_keep=1)


def test_cache_and_attention_options_are_explained(pair):
    _, ours = pair
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="without a KV cache"):
        ours(ids, past_key_values=object())
    with pytest.raises(ValueError, match="output_attentions"):
        ours(ids, output_attentions=True)
    assert ours(ids, output_attentions=False, use_cache=False).logits.shape == (1, 3, 96)


def test_causal_lm_positional_mask_matches_transformers(saved):
    import transformers

    hf = transformers.MllamaForCausalLM.from_pretrained(saved).eval()
    ours = MllamaForCausalLM.from_pretrained(saved, dtype=torch.float32)
    ids = torch.tensor([[0, 0, 1, 7, 9, 11], [1, 4, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out, ref = ours(ids, mask, output_hidden_states=True), hf(ids, mask, output_hidden_states=True)
    assert (out.logits - ref.logits)[mask.bool()].abs().max() <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert (out.hidden_states[-1] - ref.hidden_states[-1])[mask.bool()].abs().max() <= TOL


# ---- 8. entry points ----

def test_entry_points_and_pipeline_attributes(pair, saved):
    import transformers

    import mllama

    inputs = _image_inputs()
    assert mllama.AutoModelForImageTextToText.from_pretrained(saved).__class__ is MllamaForConditionalGeneration
    assert mllama.AutoModelForCausalLM is MllamaForCausalLM and mllama.AutoModel is MllamaModel
    backbone = MllamaModel.from_pretrained(saved, dtype=torch.float32)
    ref_backbone = transformers.MllamaModel.from_pretrained(saved).eval()
    tap_layer_inputs(ref_backbone)  # Meta's vision taps (layer inputs), as in every comparison
    with torch.no_grad():
        out, ref = backbone(**inputs), ref_backbone(**inputs)
        assert (out.last_hidden_state - ref.last_hidden_state).abs().max() <= TOL
        assert torch.equal(backbone(**inputs, return_dict=False)[0], out[0])
    assert backbone.name_or_path == str(saved) and not hasattr(backbone, "lm_head")

    vision = mllama.MllamaVisionModel.from_pretrained(saved, dtype=torch.float32)
    ref_vision = transformers.MllamaVisionModel.from_pretrained(saved).eval()
    tap_layer_inputs(ref_vision)
    args = (inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    with torch.no_grad():
        out, ref = vision(*args), ref_vision(*args)
        assert (out.last_hidden_state - ref.last_hidden_state).abs().max() <= TOL
        # the output object as transformers': same fields set, out[0] / out["last_hidden_state"], tuples
        assert list(out.keys()) == list(ref.keys()) == ["last_hidden_state"]
        assert out[0] is out["last_hidden_state"] is out.last_hidden_state and out.hidden_states is None
        assert len(out.to_tuple()) == len(ref.to_tuple()) == 1
        assert torch.equal(vision(*args, return_dict=False)[0], out[0])
        assert torch.equal(vision.features(*args), out[0])

    loaded = MllamaForConditionalGeneration.from_pretrained(saved)
    ref_loaded = transformers.MllamaForConditionalGeneration.from_pretrained(saved)
    assert loaded.config.architectures == ref_loaded.config.architectures == ["MllamaForConditionalGeneration"]
    assert loaded.config.get_text_config() is loaded.config.text_config
    assert loaded.config.get_text_config().vocab_size == ref_loaded.config.get_text_config().vocab_size
    assert loaded.can_generate() and loaded.name_or_path == str(saved)


# ---- 9. torch.compile ----

def test_vision_input_checks_do_not_break_the_compiled_graph(pair):
    import torch._dynamo

    _, ours = pair
    inputs = _image_inputs()
    args = (inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    explained = torch._dynamo.explain(ours.model.vision_model)(*args)
    frames = [frame.name for reason in explained.break_reasons for frame in reason.user_stack]
    assert "_check_inputs" not in frames
    # The remaining breaks read the per-image tile counts on the host (the exact tile layout).
    assert explained.graph_break_count <= 4
    torch._dynamo.reset()
    compiled = torch.compile(ours.model.vision_model)
    with torch.no_grad():
        assert (compiled(*args)[0] - ours.model.vision_model(*args)[0]).abs().max() <= 1e-5
