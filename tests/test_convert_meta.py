"""`mllama convert-meta`: Meta's original layout -> HF layout, model-parallel merging, published
configs, position-table resizing, and every bad input named. Parity of converted weights with
Meta's own model is in test_meta_oracle.py; here the checkpoints are small fakes with Meta's key
names and fairscale's splits, so the whole module runs in seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mllama.meta_layout as meta_layout
from mllama import MllamaForConditionalGeneration, MllamaProcessor
from mllama.cli import main
from mllama.convert_meta import convert_meta_checkpoint, convert_meta_state_dict
from mllama.meta_layout import MetaCheckpointError, fusion_schedule, hf_key, meta_config
from tiny import random_images, tap_layer_inputs

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
PARAMS_11B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True, "vision_chunk_size": 560, "vision_max_num_chunks": 4,
              "vision_num_cross_attention_layers": 8}
# fairscale's row-parallel layers (split on dim 1); their biases, norms, gates and the vision
# position tables are replicated; everything else is column- or vocabulary-parallel (dim 0).
ROW = re.compile(r"attention\.wo\.weight|feed_forward\.w2\.weight|attn\.wo\.weight|mlp\.c_proj\.weight")
REPLICATED = re.compile(r"norm|gate|ln_|c_proj\.bias|class_embedding|positional_embedding|tile_pos_embed\.embedding")


def fake_meta_state(*, dim=32, n_layers=4, n_heads=4, n_kv=2, vocab=128256, ffn=48, n_cross=2, width=16,
                    local=32, glob=2, vinter=32, patch=14, tiles=4, chunk=28, seed=0):
    """A random state dict with the names and shapes of Meta's CrossAttentionTransformer (model-parallel 1),
    at a tiny width; every gate non-zero."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    def gate():
        return 0.5 + torch.rand(1, generator=gen)

    hd, positions = dim // n_heads, (chunk // patch) ** 2 + 1
    sd = {"text_model.tok_embeddings.weight": r(vocab, dim), "text_model.learnable_embedding.weight": r(8, dim),
          "text_model.norm.weight": 1 + r(dim, scale=0.1), "text_model.output.weight": r(vocab, dim, scale=0.2)}
    for prefix, cross in [(f"text_model.layers.{i}.", False) for i in range(n_layers)] + \
                         [(f"text_model.cross_attention_layers.{c}.", True) for c in range(n_cross)]:
        for name, shape in (("attention.wq", (n_heads * hd, dim)), ("attention.wk", (n_kv * hd, dim)),
                            ("attention.wv", (n_kv * hd, dim)), ("attention.wo", (dim, n_heads * hd)),
                            ("feed_forward.w1", (ffn, dim)), ("feed_forward.w2", (dim, ffn)),
                            ("feed_forward.w3", (ffn, dim))):
            sd[prefix + name + ".weight"] = r(*shape, scale=shape[1] ** -0.5)
        sd[prefix + "attention_norm.weight"] = 1 + r(dim, scale=0.1)
        sd[prefix + "ffn_norm.weight"] = 1 + r(dim, scale=0.1)
        if cross:
            sd[prefix + "attention.q_norm.weight"] = 1 + r(hd, scale=0.1)
            sd[prefix + "attention.k_norm.weight"] = 1 + r(hd, scale=0.1)
            sd[prefix + "gate_attn"], sd[prefix + "gate_ffwd"] = gate(), gate()
    ve = "vision_model.vision_encoder."
    sd[ve + "conv1._linear.weight"] = r(width, 3 * patch * patch, scale=0.1)
    sd[ve + "class_embedding"] = r(width)
    sd[ve + "positional_embedding"] = r(positions, width)
    sd[ve + "gated_positional_embedding"] = r(tiles, tiles, positions, width)
    sd[ve + "gated_positional_embedding_gate"] = gate()
    for which in ("pre", "post"):
        sd[ve + f"{which}_tile_pos_embed.embedding"] = r(tiles, tiles, 1, width)
        sd[ve + f"{which}_tile_pos_embed.gate"] = gate()
        sd[ve + f"ln_{which}.weight"], sd[ve + f"ln_{which}.bias"] = 1 + r(width, scale=0.1), r(width, scale=0.1)
    for encoder, count in (("transformer", local), ("global_transformer", glob)):
        for i in range(count):
            prefix = f"{ve}{encoder}.resblocks.{i}."
            for p in "qkvo":
                sd[prefix + f"attn.w{p}.weight"] = r(width, width, scale=width ** -0.5)
            for norm in ("ln_1", "ln_2"):
                sd[prefix + norm + ".weight"], sd[prefix + norm + ".bias"] = 1 + r(width, scale=0.1), r(width, scale=0.1)
            sd[prefix + "mlp.c_fc.weight"], sd[prefix + "mlp.c_fc.bias"] = r(vinter, width, scale=width ** -0.5), r(vinter)
            sd[prefix + "mlp.c_proj.weight"] = r(width, vinter, scale=vinter ** -0.5)
            sd[prefix + "mlp.c_proj.bias"] = r(width, scale=0.1)
            if encoder == "global_transformer":
                sd[prefix + "gate_attn"], sd[prefix + "gate_ffn"] = gate(), gate()
    sd["vision_model.vision_projection.weight"] = r(dim, width * 6, scale=(width * 6) ** -0.5)
    sd["vision_model.vision_projection.bias"] = r(dim, scale=0.1)
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "vocab_size": vocab,
              "ffn_dim_multiplier": 1.3, "multiple_of": 16, "norm_eps": 1e-5, "rope_theta": 500000.0,
              "use_scaled_rope": True, "vision_chunk_size": chunk, "vision_max_num_chunks": tiles,
              "vision_num_cross_attention_layers": n_cross}
    return sd, params


def split_like_fairscale(state: dict[str, torch.Tensor], ranks: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks)]
    for key, tensor in state.items():
        if REPLICATED.search(key):
            parts = [tensor.clone() for _ in range(ranks)]
        else:
            parts = tensor.chunk(ranks, dim=1 if ROW.search(key) else 0)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def write_meta_dir(directory: Path, shards: list[dict[str, torch.Tensor]], params: dict, *,
                   tokenizer: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params))
    if tokenizer:
        import llama_models

        (directory / "tokenizer.model").write_bytes(
            (Path(llama_models.__file__).parent / "llama3" / "tokenizer.model").read_bytes())
    return directory


@pytest.fixture(scope="module")
def fake():
    return fake_meta_state()


@pytest.fixture(scope="module")
def converted(fake, tmp_path_factory) -> Path:
    sd, params = fake
    root = tmp_path_factory.mktemp("meta")
    source = write_meta_dir(root / "Llama3.2-Tiny-Vision-Instruct", [sd], params, tokenizer=True)
    return convert_meta_checkpoint(source, root / "hf", max_shard_size="2MB", log=lambda line: None)


def _image_inputs(config, seq_len: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 1000, (2, seq_len), generator=gen)
    ids[:, 0] = config.image_token_index
    images = random_images(config, [[4], [2]], seed=4)
    cross = torch.zeros(2, seq_len, 1, config.vision_config.max_num_tiles, dtype=torch.long)
    cross[0, :, 0, :4], cross[1, :, 0, :2] = 1, 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "cross_attention_mask": cross, **images}


# ---- the name table and the published configs ----------------------------------------------------------------------
def test_fusion_schedule_as_published():
    assert fusion_schedule(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert [f + c for c, f in enumerate(fusion_schedule(32, 8))] == [3, 8, 13, 18, 23, 28, 33, 38]
    assert [f + c for c, f in enumerate(fusion_schedule(80, 20))] == list(range(3, 100, 5))


def _reference(name: str) -> Path:
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


def test_every_11b_key_maps_as_in_the_published_table():
    rows = [line.split("\t") for line in _reference("orig-to-hf-11b.tsv").read_text().splitlines()
            if line and not line.startswith("#")]
    assert len(rows) == 907
    for original, _, published, *_ in rows:
        assert hf_key(original, n_layers=32, n_cross=8) == published.split(" (")[0], original


def _meta_shapes(name: str) -> tuple[dict[str, list[int]], dict]:
    text = _reference(name).read_text()
    params = json.loads(re.search(r"args: (\{.*\})", text)[1].replace("'", '"').replace("True", "true"))
    shapes = {key: json.loads(shape) for key, shape in
              (line.split("\t")[:2] for line in text.splitlines() if line and not line.startswith("#"))}
    return shapes, params


@pytest.mark.parametrize("keys,published,instruct,chunk", [
    ("orig-keys-11b.txt", "config-11b.json", True, 560),
    ("orig-keys-11b.txt", "config-11b-base.json", False, 448),
    ("orig-keys-90b.txt", "config-90b.json", True, 560),
    ("orig-keys-90b.txt", "config-90b-base.json", False, 560),
])
def test_config_from_meta_shapes_equals_the_published_one(keys, published, instruct, chunk):
    shapes, params = _meta_shapes(keys)
    params["vision_chunk_size"] = chunk
    ours = meta_config(params, shapes, instruct=instruct).to_dict()
    want = json.loads(_reference(published).read_text())
    assert ours["image_token_index"] == want["image_token_index"] and ours["torch_dtype"] == want["torch_dtype"]
    for sub in ("text_config", "vision_config"):
        for key, value in want[sub].items():
            if key != "transformers_version":
                assert ours[sub].get(key, "<absent>") == value, f"{sub}.{key}"


# ---- conversion of a whole directory -------------------------------------------------------------------------------
def test_converted_directory_loads_in_mllama_and_transformers(converted):
    transformers = pytest.importorskip("transformers")
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.json", "model.safetensors.index.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 3  # streamed into several shards
    ours = MllamaForConditionalGeneration.from_pretrained(converted)
    theirs = transformers.MllamaForConditionalGeneration.from_pretrained(converted).eval()
    tap_layer_inputs(theirs)
    inputs = _image_inputs(ours.config)
    with torch.no_grad():
        want, got = theirs(**inputs).logits, ours(**inputs).logits
    assert (want - got).abs().max() <= 1e-5 * want.abs().max()
    assert ours.generation_config.eos_token_id == [128001, 128008, 128009]
    assert json.loads((converted / "config.json").read_text())["text_config"]["eos_token_id"] == [128001, 128008, 128009]


def test_converted_tokenizer_and_processor(converted):
    transformers = pytest.importorskip("transformers")
    processor = MllamaProcessor.from_pretrained(converted)
    assert processor.tokenizer.convert_tokens_to_ids("<|image|>") == 128256
    assert processor.tokenizer.convert_tokens_to_ids("<|eot_id|>") == 128009
    theirs = transformers.AutoTokenizer.from_pretrained(converted)
    text = "<|image|>If I had to write a haiku for this one"
    from PIL import Image

    image = Image.new("RGB", (40, 20), (200, 30, 30))
    assert processor(text=text, images=[image])["input_ids"][0] == \
        [128256, 128000, 2746, 358, 1047, 311, 3350, 264, 6520, 39342, 369, 420, 832]
    assert theirs.encode("Hello world! This is a test.") == [128000, 9906, 1917, 0, 1115, 374, 264, 1296, 13]
    assert processor.chat_template is not None


def test_model_parallel_shards_merge_to_the_single_shard_result(fake, converted, tmp_path):
    sd, params = fake
    source = write_meta_dir(tmp_path / "mp2", split_like_fairscale(sd, 2), params)
    assert torch.load(source / "consolidated.01.pth")["text_model.learnable_embedding.weight"].shape == (4, 32)
    out = convert_meta_checkpoint(source, tmp_path / "hf", instruct=True, max_shard_size="2MB", log=lambda line: None)
    single = MllamaForConditionalGeneration.from_pretrained(converted).state_dict()
    merged = MllamaForConditionalGeneration.from_pretrained(out).state_dict()
    assert single.keys() == merged.keys()
    for name, tensor in single.items():
        assert torch.equal(tensor, merged[name]), name


def test_in_memory_conversion_equals_the_files(fake, converted):
    sd, params = fake
    config, state = convert_meta_state_dict([sd], params)
    files = {}
    for shard in converted.glob("model-*.safetensors"):
        files.update(load_file(shard))
    assert state.keys() == files.keys()
    assert all(torch.equal(state[k], files[k]) for k in state)
    assert config.to_dict() == MllamaForConditionalGeneration.from_pretrained(converted).config.to_dict() | \
        {"torch_dtype": config.torch_dtype, "dtype": config.torch_dtype}


def test_self_attention_rows_permuted_for_rope_and_cross_attention_not(fake):
    sd, params = fake
    _, state = convert_meta_state_dict([sd], params)
    wq = sd["text_model.layers.0.attention.wq.weight"].view(4, 4, 2, 32)  # heads, pairs, (re, im), dim
    q = state["language_model.model.layers.0.self_attn.q_proj.weight"].view(4, 2, 4, 32)  # heads, halves, ...
    assert torch.equal(q[:, 0], wq[:, :, 0]) and torch.equal(q[:, 1], wq[:, :, 1])
    assert torch.equal(state["language_model.model.layers.1.cross_attn.q_proj.weight"],
                       sd["text_model.cross_attention_layers.0.attention.wq.weight"])
    embed = state["language_model.model.embed_tokens.weight"]
    assert torch.equal(embed[:128256], sd["text_model.tok_embeddings.weight"])
    assert torch.equal(embed[128256:], sd["text_model.learnable_embedding.weight"])


# ---- tables against Meta's own code ---------------------------------------------------------------------------------
def test_tile_tables_per_aspect_ratio_equal_metas_lookup(fake):
    import meta_ref

    try:
        multimodal = meta_ref.import_meta()["model"]
    except meta_ref.Unavailable as err:
        pytest.skip(str(err))
    sd, params = fake
    _, state = convert_meta_state_dict([sd], params)
    meta = multimodal.TilePositionEmbedding(num_tiles=4, width=16, gated=True)
    meta.load_state_dict({"embedding": sd["vision_model.vision_encoder.pre_tile_pos_embed.embedding"],
                          "gate": sd["vision_model.vision_encoder.pre_tile_pos_embed.gate"]})
    table = state["vision_model.pre_tile_positional_embedding.embedding.weight"]
    gate = sd["vision_model.vision_encoder.pre_tile_pos_embed.gate"].tanh()
    assert torch.equal(table[0], torch.zeros_like(table[0]))
    for ratio_id, (rows, cols) in enumerate([[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]], 1):
        with torch.no_grad():
            want = meta(torch.zeros(1, 4, 1, 16), torch.tensor([[rows, cols]]))[0]
        assert torch.allclose(table[ratio_id].view(4, 1, 16) * gate, want, atol=1e-6), (rows, cols)


def test_other_tile_size_resizes_position_tables_as_metas_load_hook(fake):
    encoder_utils = pytest.importorskip("llama_models.llama3.multimodal.encoder_utils")
    sd, params = fake
    config, state = convert_meta_state_dict([sd], params, image_size=56)
    assert config.vision_config.image_size == 56 and config.vision_config.num_patches == 17
    ve = "vision_model.vision_encoder."
    local = encoder_utils.resize_local_position_embedding(sd[ve + "positional_embedding"], (4, 4))
    assert torch.allclose(state["vision_model.gated_positional_embedding.embedding"], local, atol=1e-6)
    tiles = encoder_utils.resize_global_position_embedding(sd[ve + "gated_positional_embedding"], (4, 4), 4, 4)
    table = state["vision_model.gated_positional_embedding.tile_embedding.weight"].view(9, 4, 17, 16)
    assert torch.allclose(table[6, :4], tiles[:2, :2].reshape(4, 17, 16), atol=1e-6)  # aspect ratio 2x2
    assert torch.allclose(table[2, :2], tiles[:1, :2].reshape(2, 17, 16), atol=1e-6)  # 1x2
    model = MllamaForConditionalGeneration(config)
    model.load_state_dict({k.replace("vision_model.", "model.vision_model.", 1)
                           .replace("language_model.model.", "model.language_model.", 1)
                           .replace("language_model.lm_head.", "lm_head.", 1)
                           .replace("multi_modal_projector.", "model.multi_modal_projector.", 1): v
                           for k, v in state.items()})


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_missing_params_and_weights_are_named(fake, tmp_path):
    sd, params = fake
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="params.json"):
        convert_meta_checkpoint(empty, tmp_path / "out")
    (empty / "params.json").write_text(json.dumps(params))
    with pytest.raises(FileNotFoundError, match="consolidated"):
        convert_meta_checkpoint(empty, tmp_path / "out")
    (empty / "params.json").write_text("{not json")
    with pytest.raises(MetaCheckpointError, match="params.json"):
        convert_meta_checkpoint(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _with(state: dict, key: str, value: torch.Tensor) -> dict:
    return {**state, key: value}


def _shards_with(state: dict, rank: int, key: str, change) -> list[dict]:
    shards = split_like_fairscale(state, 2)
    shards[rank][key] = change(shards[rank][key])
    return shards


BAD_CHECKPOINTS = {
    "unknown key": (lambda sd: [_with(sd, "text_model.extra_head.weight", torch.zeros(2))],
                    r"unknown tensor 'text_model\.extra_head\.weight'"),
    "shards that do not fit": (
        lambda sd: _shards_with(sd, 1, "text_model.layers.2.feed_forward.w2.weight", lambda t: torch.zeros(31, 24)),
        r"consolidated\.01\.pth: 'text_model\.layers\.2\.feed_forward\.w2\.weight'"),
    "replicated tensor differs between ranks": (
        lambda sd: _shards_with(sd, 1, "text_model.norm.weight", lambda t: t + 1),
        r"consolidated\.01\.pth: 'text_model\.norm\.weight' should be the same"),
    "shard count that does not divide the heads": (lambda sd: [sd, sd, sd], "3 model-parallel shards do not divide"),
    "shape the model does not have": (lambda sd: [_with(sd, "text_model.layers.1.ffn_norm.weight", torch.ones(31))],
                                      r"text_model\.layers\.1\.ffn_norm\.weight.*shape \[31\]"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_named_and_nothing_is_written(case, fake, tmp_path):
    sd, params = fake
    make_shards, match = BAD_CHECKPOINTS[case]
    source = write_meta_dir(tmp_path / "src", make_shards(sd), params)
    with pytest.raises(MetaCheckpointError, match=match):
        convert_meta_checkpoint(source, tmp_path / "out", instruct=True, log=lambda line: None)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no output, no temporary directory left behind


def test_pickled_objects_are_refused_unread(tmp_path, fake):
    _, params = fake
    source = tmp_path / "src"
    source.mkdir()
    (source / "params.json").write_text(json.dumps(params))
    torch.save({"x": torch.zeros(1), "evil": Path("/")}, source / "consolidated.00.pth")
    with pytest.raises(MetaCheckpointError, match=r"consolidated\.00\.pth is not a readable PyTorch checkpoint"):
        convert_meta_checkpoint(source, tmp_path / "out")
    (source / "consolidated.00.pth").write_bytes(b"garbage" * 10)
    with pytest.raises(MetaCheckpointError, match=r"consolidated\.00\.pth"):
        convert_meta_checkpoint(source, tmp_path / "out")


def test_failure_while_writing_leaves_nothing(fake, tmp_path, monkeypatch):
    sd, params = fake

    def broken(table, shapes):
        raise RuntimeError("disk full")

    monkeypatch.setitem(meta_layout.TRANSFORMS, "tile_table", broken)
    source = write_meta_dir(tmp_path / "src", [sd], params)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_meta_checkpoint(source, tmp_path / "out", instruct=False, log=lambda line: None)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_existing_output_is_not_overwritten(fake, tmp_path):
    sd, params = fake
    source = write_meta_dir(tmp_path / "src", [sd], params)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_meta_checkpoint(source, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_converts_and_reports_errors_in_one_line(fake, tmp_path, capsys):
    sd, params = fake
    source = write_meta_dir(tmp_path / "Llama3.2-11B-Vision", [sd], params)
    assert main(["convert-meta", str(source), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "as a base model (guessed" in out and "converted the model alone" in out
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 128001
    assert main(["convert-meta", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere is not a directory" in err and "Traceback" not in err
