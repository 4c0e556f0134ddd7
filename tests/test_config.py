"""Configs: the published config.json files load unchanged, round trip, and bad values name their field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllama import MllamaConfig, MllamaTextConfig, MllamaVisionConfig

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
PUBLISHED = ["config-11b.json", "config-11b-base.json", "config-90b.json", "config-90b-base.json"]
PRESET_OF = {"config-11b.json": "11b", "config-11b-base.json": "11b-base",
             "config-90b.json": "90b", "config-90b-base.json": "90b-base"}


def _published(name: str) -> dict:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_load_and_equal_presets(name, tmp_path):
    raw = _published(name)
    config = MllamaConfig.from_dict(raw)
    preset = MllamaConfig.preset(PRESET_OF[name])
    for sub in ("text_config", "vision_config"):
        ours = getattr(config, sub).to_dict()
        want = getattr(preset, sub).to_dict()
        assert {k: ours[k] for k in want if k != "extra"} == {k: want[k] for k in want if k != "extra"}
    assert config.text_config.rope_parameters["rope_type"] == "llama3"
    assert config.text_config.rope_theta == 500000.0
    assert config.torch_dtype == "bfloat16"
    # Generic fields (bad_words_ids, chunk_size_feed_forward, ...) survive a round trip.
    (tmp_path / "config.json").write_text(json.dumps(raw))
    again = MllamaConfig.from_pretrained(tmp_path).to_dict()
    assert again["text_config"]["chunk_size_feed_forward"] == raw["text_config"]["chunk_size_feed_forward"]
    assert again["vision_config"]["bad_words_ids"] is None
    assert MllamaConfig.from_dict(again).to_dict() == again


def test_round_trip_through_transformers(tmp_path):
    import transformers

    config = MllamaConfig.from_dict(_published("config-11b.json"))
    config.save_pretrained(tmp_path)
    hf = transformers.MllamaConfig.from_pretrained(tmp_path)
    assert hf.text_config.rope_parameters["rope_type"] == "llama3"
    assert hf.text_config.cross_attention_layers == config.text_config.cross_attention_layers
    assert hf.vision_config.image_size == 560
    hf.save_pretrained(tmp_path / "hf")
    back = MllamaConfig.from_pretrained(tmp_path / "hf")
    assert back.text_config.rope_parameters == config.text_config.rope_parameters
    assert back.vision_config.supported_aspect_ratios == config.vision_config.supported_aspect_ratios
    assert back.torch_dtype == "bfloat16"


def test_rope_parameters_and_rope_scaling_are_the_same_thing():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    old = MllamaTextConfig(rope_theta=10000.0, rope_scaling=scaling)
    new = MllamaTextConfig(rope_parameters={**scaling, "rope_theta": 10000.0})
    assert old.rope_parameters == new.rope_parameters
    assert new.rope_theta == 10000.0 and new.rope_scaling == scaling
    legacy = MllamaTextConfig(rope_scaling={**{k: v for k, v in scaling.items() if k != "rope_type"}, "type": "llama3"})
    assert legacy.rope_parameters["rope_type"] == "llama3"
    assert MllamaTextConfig().rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}


def test_dtype_aliases():
    assert MllamaConfig.from_dict({"dtype": "float32"}).torch_dtype == "float32"
    assert MllamaConfig.from_dict({"torch_dtype": "bfloat16"}).dtype == "bfloat16"
    assert MllamaConfig.from_dict({"image_token_id": 128257}).image_token_index == 128257


@pytest.mark.parametrize("make,field", [
    (lambda: MllamaTextConfig(hidden_size=100, num_attention_heads=8), "num_attention_heads"),
    (lambda: MllamaTextConfig(num_attention_heads=32, num_key_value_heads=5), "num_key_value_heads"),
    (lambda: MllamaTextConfig(num_hidden_layers=4, cross_attention_layers=[1, 4]), "cross_attention_layers"),
    (lambda: MllamaTextConfig(cross_attention_layers=[3, 3]), "cross_attention_layers"),
    (lambda: MllamaTextConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_parameters"),
    (lambda: MllamaTextConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_parameters"),
    (lambda: MllamaTextConfig(rope_parameters={"rope_type": "default", "rope_theta": 1.0},
                              rope_scaling={"rope_type": "llama3"}), "rope_scaling"),
    (lambda: MllamaVisionConfig(num_hidden_layers=8), "intermediate_layers_indices"),
    (lambda: MllamaVisionConfig(hidden_size=1000, attention_heads=16), "attention_heads"),
    (lambda: MllamaVisionConfig(max_num_tiles=2), "supported_aspect_ratios"),
    (lambda: MllamaVisionConfig(image_size=500), "patch_size"),
    (lambda: MllamaVisionConfig(vision_output_dim=1280), "vision_output_dim"),
    (lambda: MllamaConfig(image_token_index=128256 + 8), "image_token_index"),
    (lambda: MllamaConfig(image_token_index=-1), "image_token_index"),
    (lambda: MllamaConfig.from_dict({"text_config": {"num_hidden_layers": 2}}), "cross_attention_layers"),
])
def test_inconsistent_fields_raise_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MllamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MllamaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        MllamaConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="preset"):
        MllamaConfig.preset("7b")
