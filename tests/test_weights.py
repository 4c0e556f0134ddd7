"""Checkpoint loading/saving against transformers as the oracle, on a tiny random Mllama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mllama.safetensors_io as safetensors_io
import mllama.weights as weights
from mllama.config import MllamaConfig
from mllama.layers import rope_inv_freq
from mllama.model import MllamaForCausalLM, MllamaForConditionalGeneration
from mllama.checkpoint_keys import map_checkpoint_key, to_checkpoint_key
from mllama.saving import parse_size
from mllama.weights import CheckpointMismatchError, CorruptCheckpointError, MissingShardError, WrongModelTypeError

from tiny import tap_layer_inputs

transformers = pytest.importorskip("transformers")

VOCAB = 120
TOL = 1e-4


def tiny_config() -> MllamaConfig:
    return MllamaConfig.from_dict({
        "vision_config": {"hidden_size": 16, "attention_heads": 2, "num_hidden_layers": 3, "num_global_layers": 2,
                          "intermediate_size": 32, "image_size": 28, "patch_size": 14, "max_num_tiles": 4,
                          "intermediate_layers_indices": [0, 2], "vision_output_dim": 48},
        "text_config": {"vocab_size": VOCAB, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "num_hidden_layers": 4, "cross_attention_layers": [1, 3], "intermediate_size": 64,
                        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        "image_token_index": VOCAB,
    })


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(
        transformers.MllamaConfig.from_dict(tiny_config().to_dict())).eval()
    with torch.no_grad():
        for param in model.parameters():  # every gate non-zero, nothing left at its init value
            param.copy_(torch.randn_like(param) * 0.3 + 0.1)
    tap_layer_inputs(model)
    return model


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    b, s = 2, 7
    ids = torch.randint(3, VOCAB, (b, s))
    ids[:, 0] = VOCAB  # <|image|> first, so every row sees an image
    cross = torch.zeros(b, s, 1, 4, dtype=torch.long)
    cross[0, :, 0, :4] = 1  # 2x2 tiles
    cross[1, :, 0, :2] = 1  # 1x2 tiles, two padding tiles
    return {
        "input_ids": ids, "attention_mask": torch.ones(b, s, dtype=torch.long),
        "pixel_values": torch.randn(b, 1, 4, 3, 28, 28), "aspect_ratio_ids": torch.tensor([[6], [2]]),
        "aspect_ratio_mask": torch.tensor([[[1, 1, 1, 1]], [[1, 1, 0, 0]]]), "cross_attention_mask": cross,
    }


@pytest.fixture(scope="module")
def reference(hf_model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(**inputs).logits


@pytest.fixture(scope="module")
def hf_dirs(hf_model, tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for kind, size in (("sharded", "20KB"), ("single", "5GB")):
        dirs[kind] = tmp_path_factory.mktemp(f"hf_{kind}")
        hf_model.save_pretrained(dirs[kind], max_shard_size=size)
    assert len(list(dirs["sharded"].glob("model-*-of-*.safetensors"))) > 2
    assert (dirs["single"] / "model.safetensors").is_file()
    return dirs


def our_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        ids = inputs["input_ids"]
        return model(ids, **{k: v for k, v in inputs.items() if k != "input_ids"}).logits


def disk_keys(directory: Path) -> set[str]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    return set(load_file(directory / "model.safetensors"))


@pytest.mark.parametrize("kind", ["sharded", "single"])
def test_load_transformers_checkpoint(kind, hf_dirs, inputs, reference):
    model = MllamaForConditionalGeneration.from_pretrained(hf_dirs[kind])
    assert model.dtype == torch.float32 and not model.training
    assert (our_logits(model, inputs) - reference).abs().max() <= TOL
    assert model.generation_config is not None and model.generation_config.eos_token_id == 2
    inv_freq = model.model.language_model.rotary_emb.inv_freq
    assert not inv_freq.is_meta and torch.equal(inv_freq, rope_inv_freq(model.config.text_config))


def test_load_with_dtype(hf_dirs, hf_model):
    for dtype in (torch.bfloat16, "bfloat16"):
        model = MllamaForConditionalGeneration.from_pretrained(hf_dirs["sharded"], dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert model.config.torch_dtype == "bfloat16"
    expected = hf_model.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name
    with pytest.raises(ValueError, match="unknown dtype"):
        MllamaForConditionalGeneration.from_pretrained(hf_dirs["single"], dtype="float17")


@pytest.mark.parametrize("max_shard_size", ["20KB", 30_000, "5GB"])
def test_save_loads_in_transformers(max_shard_size, hf_dirs, inputs, reference, tmp_path):
    model = MllamaForConditionalGeneration.from_pretrained(hf_dirs["single"])
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    if max_shard_size == "5GB":
        assert not shards and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
        limit = parse_size(max_shard_size)
        for shard in shards:  # every shard within the limit unless one tensor alone is bigger
            tensors = load_file(shard)
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            assert size <= limit or len(tensors) == 1
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
        assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert disk_keys(tmp_path) == disk_keys(hf_dirs["single"])  # the hub layout
    theirs = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path).eval()
    tap_layer_inputs(theirs)
    with torch.no_grad():
        assert (theirs(**inputs).logits - reference).abs().max() <= TOL
    assert theirs.generation_config.eos_token_id == 2
    ours = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(our_logits(ours, inputs), our_logits(model, inputs))


def test_bf16_save_loads_as_bf16_by_default(hf_dirs, tmp_path):
    model = MllamaForConditionalGeneration.from_pretrained(hf_dirs["single"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["architectures"] == ["MllamaForConditionalGeneration"]
    assert {t.dtype for t in load_file(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    assert MllamaForConditionalGeneration.from_pretrained(tmp_path).dtype == torch.bfloat16  # "auto"
    assert MllamaForConditionalGeneration.from_pretrained(tmp_path, dtype="float32").dtype == torch.float32


def test_resave_replaces_old_shards(hf_dirs, inputs, reference, tmp_path):
    model = MllamaForConditionalGeneration.from_pretrained(hf_dirs["single"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert (our_logits(MllamaForConditionalGeneration.from_pretrained(tmp_path), inputs) - reference).abs().max() <= TOL


def test_in_memory_layout_loads(hf_model, hf_dirs, inputs, reference, tmp_path):
    shutil.copy(hf_dirs["single"] / "config.json", tmp_path)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert "lm_head.weight" in state and any(k.startswith("model.language_model.") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    model = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    assert (our_logits(model, inputs) - reference).abs().max() <= TOL


def test_causal_lm_from_full_checkpoint_skips_vision(hf_model, hf_dirs, inputs, monkeypatch):
    read = set()  # (file, offset) of each tensor read or mapped
    original_read, original_map = weights._read_into, weights._mapped
    monkeypatch.setattr(weights, "_read_into", lambda handle, info, out: read.add((info.file, info.offset))
                        or original_read(handle, info, out))
    monkeypatch.setattr(weights, "_mapped", lambda maps, info: read.add((info.file, info.offset))
                        or original_map(maps, info))
    model = MllamaForCausalLM.from_pretrained(hf_dirs["sharded"])
    names = [n for n, _ in model.named_parameters()]
    assert not any("vision" in n or "projector" in n for n in names)
    assert len(read) == len(names)  # the vision tensors were never read
    ids = inputs["input_ids"]
    with torch.no_grad():
        expected = hf_model(input_ids=ids).logits
        assert (model(ids).logits - expected).abs().max() <= TOL
        full = MllamaForConditionalGeneration.from_pretrained(hf_dirs["sharded"])
        assert (full(ids).logits - model(ids).logits).abs().max() <= TOL


def test_causal_lm_only_checkpoint(hf_dirs, inputs, tmp_path):
    model = MllamaForCausalLM.from_pretrained(hf_dirs["single"])
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    keys = disk_keys(tmp_path)
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    assert all(k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")) for k in keys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mllama_text_model" and config["architectures"] == ["MllamaForCausalLM"]
    ids = inputs["input_ids"]
    again = MllamaForCausalLM.from_pretrained(tmp_path)
    theirs = transformers.MllamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
        assert (theirs(input_ids=ids).logits - model(ids).logits).abs().max() <= TOL
    with pytest.raises(WrongModelTypeError, match="MllamaForCausalLM"):
        MllamaForConditionalGeneration.from_pretrained(tmp_path)
    theirs.save_pretrained(tmp_path / "theirs")
    assert disk_keys(tmp_path / "theirs") == keys
    with torch.no_grad():
        assert torch.equal(MllamaForCausalLM.from_pretrained(tmp_path / "theirs")(ids).logits, again(ids).logits)


def test_mismatches_are_reported_together(hf_dirs, tmp_path):
    shutil.copy(hf_dirs["single"] / "config.json", tmp_path)
    state = load_file(hf_dirs["single"] / "model.safetensors")
    del state["language_model.model.norm.weight"]
    state["vision_model.bogus.weight"] = torch.ones(3, 2)
    state["multi_modal_projector.bias"] = torch.ones(5)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        MllamaForConditionalGeneration.from_pretrained(tmp_path)
    error = info.value
    assert isinstance(error, ValueError)
    assert set(error.missing) == {"model.language_model.norm.weight"}
    assert set(error.unexpected) == {"vision_model.bogus.weight"}
    assert error.mismatched == {"model.multi_modal_projector.bias": ((5,), (32,))}
    for name in ("model.language_model.norm.weight", "vision_model.bogus.weight", "model.multi_modal_projector.bias"):
        assert name in str(error)


def test_duplicate_layouts_are_reported(hf_model, hf_dirs, tmp_path):
    shutil.copy(hf_dirs["single"] / "config.json", tmp_path)
    state = load_file(hf_dirs["single"] / "model.safetensors")
    state["model.multi_modal_projector.bias"] = state["multi_modal_projector.bias"].clone()
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="duplicated: model.multi_modal_projector.bias"):
        MllamaForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_shard(hf_dirs, tmp_path):
    directory = shutil.copytree(hf_dirs["sharded"], tmp_path / "ckpt")
    victim = sorted(directory.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MissingShardError, match=victim.name) as info:
        MllamaForConditionalGeneration.from_pretrained(directory)
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("cut", [4, 200, 1000])
def test_truncated_file(hf_dirs, tmp_path, cut):
    directory = shutil.copytree(hf_dirs["single"], tmp_path / "ckpt")
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[:cut] if cut < 8 else data[:-cut])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        MllamaForConditionalGeneration.from_pretrained(directory)


def test_wrong_model_type(hf_dirs, tmp_path):
    directory = shutil.copytree(hf_dirs["single"], tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "llama"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(WrongModelTypeError, match="'llama'"):
        MllamaForConditionalGeneration.from_pretrained(directory)


def test_missing_files(hf_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory"):
        MllamaForConditionalGeneration.from_pretrained(str(tmp_path / "nope" / "deeper" / "path"))
    shutil.copy(hf_dirs["single"] / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MllamaForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["my models/llama", "models/llama 11b", "-x/y", "a/b/c"])
def test_no_repo_id_is_looked_up(name, monkeypatch, tmp_path):
    """A missing path that no repo id could be is named as such by every hub entry point (the
    checkpoint snapshot, config.json, the tokenizer's files), without asking the hub."""
    import huggingface_hub

    from mllama.hub import resolve_file

    def asked(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", asked)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", asked)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub repo id"):
        MllamaForConditionalGeneration.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub repo id"):
        MllamaConfig.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub repo id"):
        resolve_file(name, "tokenizer.json")


def test_name_table():
    full = [("language_model.model.layers.3.cross_attn.q_proj.weight", "model.language_model.layers.3.cross_attn.q_proj.weight"),
            ("language_model.lm_head.weight", "lm_head.weight"),
            ("vision_model.patch_embedding.weight", "model.vision_model.patch_embedding.weight"),
            ("multi_modal_projector.weight", "model.multi_modal_projector.weight")]
    for disk, memory in full:
        assert map_checkpoint_key(disk) == (memory, True)
        assert map_checkpoint_key(memory) == (memory, True)  # transformers >= 4.52 layout
        assert to_checkpoint_key(memory) == disk
    assert map_checkpoint_key("model.layers.0.mlp.up_proj.weight") == ("model.language_model.layers.0.mlp.up_proj.weight", True)
    assert map_checkpoint_key("language_model.model.norm.weight", text_only=True) == ("model.norm.weight", True)
    assert map_checkpoint_key("vision_model.class_embedding", text_only=True) == (None, True)
    assert map_checkpoint_key("transformer.h.0.weight") == (None, False)


def test_parse_size():
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size(" 1.5kb ") == 1500
    assert parse_size(1234) == 1234
    for bad in ("lots", "5 parsecs", "-1GB", 0):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(TypeError):
        parse_size(1.5)  # type: ignore[arg-type]


REFERENCE = Path("/work/shared/reference")


@pytest.mark.parametrize("size", ["11b", "90b"])
def test_published_key_lists_fit(size, tmp_path):
    """The name table against every tensor of the published checkpoints, on meta-device models."""
    keys, config = REFERENCE / f"keys-{size}.txt", REFERENCE / f"config-{size}.json"
    if not keys.is_file() or not config.is_file():
        pytest.skip(f"{keys} not available")
    hub, memory = {}, {}
    for line in keys.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape, dtype, in_memory = line.split("\t")
        info = safetensors_io.TensorInfo(tmp_path, 0, 0, safetensors_io._DTYPES[dtype], tuple(json.loads(shape)))
        hub[name], memory[in_memory] = info, info
    shutil.copy(config, tmp_path / "config.json")
    raw, full_config = weights._read_config(tmp_path, text_only=False)
    assert weights.resolve_dtype(None, raw, hub) == torch.bfloat16
    with torch.device("meta"):
        full = MllamaForConditionalGeneration(full_config)
        text = MllamaForCausalLM(full_config)
    for tensors in (hub, memory):
        plan = weights._plan(full, tensors, text_only=False, source=tmp_path)
        assert len(plan) == len(tensors)
        text_plan = weights._plan(text, tensors, text_only=True, source=tmp_path)
        assert set(text_plan) == set(text.state_dict())
    assert {to_checkpoint_key(name) for name in full.state_dict()} == set(hub)


def test_progress_bar_and_bad_class(hf_dirs, capsys):
    weights.load_pretrained(MllamaForCausalLM, hf_dirs["single"], progress=True)
    assert "Loading weights" in capsys.readouterr().err
    weights.load_pretrained(MllamaForCausalLM, hf_dirs["single"])  # tiny: no bar by default
    assert "Loading weights" not in capsys.readouterr().err
    with pytest.raises(TypeError, match="MllamaForCausalLM"):
        weights.load_pretrained(torch.nn.Linear, hf_dirs["single"])


def test_weights_are_mapped_copy_on_write_and_saving_back_is_safe(hf_dirs, inputs, reference, tmp_path):
    """Tensors kept as stored are views of their files (mmap=True, the default): equal to a read load,
    written copy-on-write (the file keeps its bytes), and saving the model back into the directory it
    is mapped from replaces the files by rename, leaving the loaded model intact."""
    directory = tmp_path / "ckpt"
    shutil.copytree(hf_dirs["single"], directory)
    mapped = MllamaForConditionalGeneration.from_pretrained(directory)
    read = MllamaForConditionalGeneration.from_pretrained(directory, mmap=False)
    maps = Path("/proc/self/maps")
    if maps.is_file():
        text = maps.read_text()
        assert str((directory / "model.safetensors").resolve()) in text
    for (name, a), b in zip(mapped.state_dict().items(), read.state_dict().values()):
        assert torch.equal(a, b), name
    assert (our_logits(mapped, inputs) - reference).abs().max() <= TOL
    on_disk = load_file(directory / "model.safetensors")
    norm = mapped.model.language_model.norm.weight
    with torch.no_grad():
        norm.mul_(2)  # copy-on-write: the file is not written
    assert torch.equal(load_file(directory / "model.safetensors")["language_model.model.norm.weight"],
                       on_disk["language_model.model.norm.weight"])
    logits = our_logits(mapped, inputs)
    mapped.save_pretrained(directory)
    assert torch.equal(our_logits(mapped, inputs), logits)  # still mapped from the replaced file
    again = MllamaForConditionalGeneration.from_pretrained(directory)
    assert torch.equal(again.model.language_model.norm.weight, norm)


def test_unmappable_tensors_are_read(tmp_path):
    """An offset that is not a multiple of the element size cannot be viewed as the dtype: read it
    instead; a tensor past the end of its file is named as a truncated checkpoint."""
    from mllama.safetensors_io import TensorInfo

    file = tmp_path / "raw.bin"
    file.write_bytes(bytes(range(64)))
    maps = {}
    odd = TensorInfo(file=file, offset=3, nbytes=8, dtype=torch.float32, shape=(2,))
    assert weights._mapped(maps, odd) is None
    good = TensorInfo(file=file, offset=8, nbytes=16, dtype=torch.int16, shape=(2, 4))
    expected = torch.frombuffer(bytearray(range(8, 24)), dtype=torch.int16).view(2, 4)
    assert torch.equal(weights._mapped(maps, good), expected)
    past = TensorInfo(file=file, offset=56, nbytes=16, dtype=torch.int16, shape=(8,))
    with pytest.raises(CorruptCheckpointError, match="ended early"):
        weights._mapped(maps, past)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")  # cannot be mapped: read instead (where _read_into names the short file)
    assert weights._mapped(maps, TensorInfo(file=empty, offset=0, nbytes=4, dtype=torch.int16, shape=(2,))) is None


def test_a_file_that_cannot_be_mapped_is_read(hf_dirs, inputs, reference, monkeypatch):
    """Where the system refuses the mapping (e.g. strict overcommit accounting), the load reads."""
    class Refused:
        def __init__(self, *args, **kwargs):
            raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(weights._mmap, "mmap", Refused)
    model = MllamaForConditionalGeneration.from_pretrained(hf_dirs["single"])
    assert (our_logits(model, inputs) - reference).abs().max() <= TOL
