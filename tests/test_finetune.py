"""LoRA fine-tuning (mllama.lora, mllama.finetune, `mllama finetune`) against transformers+peft."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image
from tiny import cross_mask, hf_pair, random_images, tap_layer_inputs, tiny_config

from mllama.cli import default_model_dir
from mllama.cli import main as cli_main
from mllama.finetune import merge_adapter, plot_losses
from mllama.finetune_data import ConversationCollator, DataError, read_jsonl
from mllama.lora import (
    LoraLinear,
    apply_lora,
    load_lora,
    lora_layers,
    merge_and_unload,
    save_adapter,
)
from mllama.model import IGNORE_INDEX, MllamaForConditionalGeneration
from mllama.processor import MllamaProcessor
from mllama.quantize import Int4Linear, Int8Linear, quantize_model
from mllama.train import TrainConfig, train

TOL = 1e-5


def _inputs(name: str = "a", seed: int = 0, labels: bool = False):
    """Two rows, images at position 0 so every text row sees one (transformers and Meta agree there)."""
    config = tiny_config(name)
    tiles, positions, seq_len = [[2], [1]], [[0], [0]], 7
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.text_config.vocab_size, (2, seq_len), generator=gen)
    ids[:, 0] = config.image_token_index
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **random_images(config, tiles, seed=seed),
           "cross_attention_mask": cross_mask(tiles, positions, seq_len, config.vision_config.max_num_tiles)}
    if labels:
        out["labels"] = torch.where(ids == config.image_token_index, IGNORE_INDEX, ids)
    return out


def _randomize_lora(model, seed: int) -> None:
    """Non-zero B (a fresh adapter's B is zero and would hide a wrong key or scale)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.2)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def test_lora_starts_at_the_base_and_targets_all_linear_but_lm_head():
    _, ours = hf_pair("a", seed=1)
    inputs = _inputs()
    before = _logits(ours, inputs)
    names = apply_lora(ours, r=4, alpha=8)
    assert torch.equal(_logits(ours, inputs), before)  # B = 0
    assert "lm_head" not in names
    assert any(".cross_attn.q_proj" in n for n in names) and any(".cross_attn.k_proj" in n for n in names)
    assert any(n.startswith("model.vision_model.") for n in names)
    assert "model.multi_modal_projector" in names
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.lora_[AB]\.weight$", n) for n in trainable)
    assert len(trainable) == 2 * len(names)
    with pytest.raises(ValueError, match="already"):
        apply_lora(ours)
    _, other = hf_pair("a", seed=1)
    only = apply_lora(other, target_modules=["q_proj", "v_proj"])
    assert only and all(n.endswith(("q_proj", "v_proj")) for n in only)
    _, third = hf_pair("a", seed=1)
    assert apply_lora(third, target_modules=["all-linear", "lm_head"]) == sorted(names + ["lm_head"])


def test_adapter_loads_in_transformers_peft_with_equal_logits(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    hf, ours = hf_pair("a", seed=2)
    apply_lora(ours, r=4, alpha=12)
    _randomize_lora(ours, 3)
    inputs = _inputs(seed=1)
    expected = _logits(ours, inputs)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny-a")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12
    assert config["base_model_name_or_path"] == "tiny-a"
    assert sorted(config["target_modules"]) == ["down_proj", "fc1", "fc2", "gate_proj", "k_proj", "multi_modal_projector",
                                                "o_proj", "q_proj", "up_proj", "v_proj"]  # as peft writes all-linear
    base_logits = _logits(hf, inputs)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    got = _logits(peft_model, inputs)
    assert (got - base_logits).abs().max() > 1e-2  # the adapter changes the output ...
    assert (got - expected).abs().max() <= TOL  # ... exactly as ours does
    # And mllama reads it back: as LoRA layers, or merged (model.load_adapter).
    _, again = hf_pair("a", seed=2)
    assert len(load_lora(again, tmp_path / "adapter")) == len(lora_layers(ours))
    assert (_logits(again, inputs) - expected).abs().max() <= TOL
    _, merged = hf_pair("a", seed=2)
    merged.load_adapter(tmp_path / "adapter")
    assert (_logits(merged, inputs) - expected).abs().max() <= TOL


def test_rslora_adapter_loads_as_layers_equal_to_peft(tmp_path):
    """use_rslora scales by alpha / sqrt(r): load_lora (kept apart) equals transformers+peft and the merged load."""
    from peft import PeftModel

    hf, ours = hf_pair("a", seed=4)
    apply_lora(ours, r=4, alpha=6)
    _randomize_lora(ours, 5)
    save_adapter(ours, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"use_rslora": True}))
    inputs = _inputs(seed=2)
    expected = _logits(PeftModel.from_pretrained(hf, tmp_path / "adapter").eval(), inputs)
    _, layered = hf_pair("a", seed=4)
    load_lora(layered, tmp_path / "adapter")
    assert (_logits(layered, inputs) - expected).abs().max() <= TOL
    assert (_logits(ours, inputs) - expected).abs().max() > 1e-3  # the plain alpha / r scale differs
    _, merged = hf_pair("a", seed=4)
    merged.load_adapter(tmp_path / "adapter")
    assert (_logits(merged, inputs) - expected).abs().max() <= TOL


def test_adapter_on_a_subset_saves_a_regex_peft_selects_the_same(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    hf, ours = hf_pair("a", seed=4)
    names = apply_lora(ours, r=2, alpha=2, target_modules=r"model\.language_model\..*cross_attn\.(q|o)_proj")
    assert len(names) == 4  # two cross-attention layers, no vision q_proj
    _randomize_lora(ours, 5)
    save_adapter(ours, tmp_path / "adapter")
    assert isinstance(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"], str)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    wrapped = {n.split("base_model.model.", 1)[1] for n, m in peft_model.named_modules()
               if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B"))}
    assert wrapped == set(names)
    inputs = _inputs(seed=2)
    assert (_logits(peft_model, inputs) - _logits(ours, inputs)).abs().max() <= TOL


def test_merge_equals_unmerged_and_the_merged_checkpoint_loads_in_transformers(tmp_path):
    import transformers

    _, ours = hf_pair("a", seed=6)
    ours.save_pretrained(tmp_path / "base")
    apply_lora(ours, r=4, alpha=8)
    _randomize_lora(ours, 7)
    inputs = _inputs(seed=3)
    unmerged = _logits(ours, inputs)
    save_adapter(ours, tmp_path / "adapter")
    with pytest.raises(ValueError, match="still holds LoRA layers"):
        ours.save_pretrained(tmp_path / "unmerged")
    merge_and_unload(ours)
    assert not lora_layers(ours) and type(ours.model.language_model.layers[1].cross_attn.q_proj) is not LoraLinear
    assert (_logits(ours, inputs) - unmerged).abs().max() <= TOL
    out = merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(out).eval()
    tap_layer_inputs(hf)
    assert (_logits(hf, inputs) - unmerged).abs().max() <= TOL
    mine = MllamaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert (_logits(mine, inputs) - unmerged).abs().max() <= TOL


def _train(model, steps: int, *, lr: float = 1e-2, seed: int = 0) -> list[float]:
    batch = _inputs(seed=seed, labels=True)
    return train(model, iter([batch] * steps), config=TrainConfig(steps=steps, lr=lr, warmup_steps=0,
                                                                   weight_decay=0.0), log=None).losses


def test_training_moves_only_the_adapter_and_lowers_the_loss():
    _, ours = hf_pair("a", seed=8)
    frozen = {k: v.clone() for k, v in ours.state_dict().items()}
    apply_lora(ours, r=4, alpha=8)
    losses = _train(ours, 12)
    assert losses[-1] < 0.8 * losses[0], losses
    state = ours.state_dict()
    for key, value in frozen.items():
        name = key.removesuffix(".weight").removesuffix(".bias")
        lora_key = f"{name}.base_layer.{key.rsplit('.', 1)[1]}"
        assert torch.equal(state.get(key, state.get(lora_key)), value), key
    assert all(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(ours).values())


def test_gradient_checkpointing_gives_the_same_lora_gradients():
    _, ours = hf_pair("a", seed=9)
    apply_lora(ours, r=4, alpha=8)
    _randomize_lora(ours, 1)
    ours.train()
    batch = _inputs(seed=4, labels=True)
    ours(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    ours.zero_grad()
    ours.gradient_checkpointing_enable()
    ours(**batch).loss.backward()
    for name, grad in plain.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(dict(ours.named_parameters())[name].grad, grad, atol=1e-6), name


@pytest.mark.parametrize("mode,cls", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_qlora_trains_on_a_quantized_base_and_its_adapter_applies(mode, cls, tmp_path):
    _, ours = hf_pair("a", seed=10)
    quantize_model(ours, mode)
    names = apply_lora(ours, r=4, alpha=8)
    assert isinstance(ours.get_submodule(names[0]).base_layer, (cls, torch.nn.Linear))
    assert any(isinstance(layer.base_layer, cls) for layer in lora_layers(ours).values())
    losses = _train(ours, 12)
    assert losses[-1] < 0.8 * losses[0], losses
    inputs = _inputs(seed=5)
    expected = _logits(ours, inputs)
    save_adapter(ours, tmp_path / "adapter")
    _, again = hf_pair("a", seed=10)
    quantize_model(again, mode)
    load_lora(again, tmp_path / "adapter")
    assert (_logits(again, inputs) - expected).abs().max() <= TOL
    merge_and_unload(again)  # into dequantized float weights
    assert not any(isinstance(m, cls) for m in again.modules()) and again.quantization_config is None
    # Merged weights are plain floats; the int4 kernel rounds its inputs to int8 per group of 64 (a
    # step of max|x| / 127), which the merged model does not: int4 agrees to that rounding only.
    merged_tol = 1e-4 if mode == "int8" else 2e-2 * expected.abs().max().item()
    assert (_logits(again, inputs) - expected).abs().max() <= merged_tol


# ---- data --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_processor():
    return MllamaProcessor.from_pretrained(default_model_dir())


def _write(tmp_path, lines: list[str]) -> str:
    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "red.png")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _line(*messages) -> str:
    return json.dumps({"messages": list(messages)})


USER = {"role": "user", "content": [{"type": "image", "path": "red.png"}, {"type": "text", "text": "What color?"}]}
REPLY = {"role": "assistant", "content": "It is red."}


def test_collator_trains_on_every_assistant_turn_only(tmp_path, demo_processor):
    second = {"role": "user", "content": "And the shape?"}
    text_only = _line({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Hi."})
    path = _write(tmp_path, [_line(USER, REPLY), "", _line(USER, REPLY, second, {"role": "assistant", "content": [
        {"type": "text", "text": "A square."}]}), text_only])
    conversations = read_jsonl(path)
    assert [c.line for c in conversations] == [1, 3, 4] and conversations[0].images[0].name == "red.png"
    batch = ConversationCollator(demo_processor)(conversations)
    tok = demo_processor.tokenizer
    assert batch["pixel_values"].shape[:2] == (3, 1)
    for row, expected in enumerate([["It is red.<|eot_id|>"], ["It is red.<|eot_id|>", "A square.<|eot_id|>"],
                                    ["Hi.<|eot_id|>"]]):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        assert torch.equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
        trained = (labels != IGNORE_INDEX).int()
        starts = (trained.diff(prepend=torch.tensor([0])) == 1).nonzero().flatten().tolist()
        ends = (trained.diff(append=torch.tensor([0])) == -1).nonzero().flatten().tolist()
        assert [tok.decode(ids[s:e + 1]) for s, e in zip(starts, ends)] == expected


@pytest.mark.parametrize("line,message", [
    ("{not json", r"data\.jsonl:2: not valid JSON"),
    (_line(USER), r"data\.jsonl:2: no assistant turn"),
    (_line({**USER, "content": [{"type": "image", "path": "missing.png"}]}, REPLY),
     r"data\.jsonl:2: message 0: image not found: .*missing\.png"),
    (_line({"role": "robot", "content": "hi"}, REPLY), r"data\.jsonl:2: message 0 needs a role"),
    (_line(USER, {"role": "assistant", "content": " "}), r"data\.jsonl:2: message 1: the assistant turn is empty"),
    (json.dumps({"text": "hi"}), r"data\.jsonl:2: expected an object with a non-empty 'messages' list"),
])
def test_bad_lines_are_reported_with_their_number(tmp_path, capsys, line, message):
    path = _write(tmp_path, [_line(USER, REPLY), line])
    with pytest.raises(DataError, match=message):
        read_jsonl(path)
    assert cli_main(["finetune", "demo", path, str(tmp_path / "out")]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_loss_plot_is_a_png_with_the_curve(tmp_path):
    path = plot_losses([3.0, 2.0, 1.5, 1.0, 0.9], tmp_path / "loss.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (640, 400)
    blue = int((torch.tensor(list(image.tobytes())).view(-1, 3) == torch.tensor([30, 70, 200])).all(1).sum())
    assert blue > 100  # the smoothed curve is drawn


# ---- the command, end to end, on the demo model ---------------------------------------------------------------
def test_finetune_cli_end_to_end_on_the_demo_model(tmp_path, capsys):
    from mllama.demo.sides import write_sides_dataset

    data = write_sides_dataset(tmp_path / "data", n=4, seed=1)
    out = tmp_path / "out"
    assert cli_main(["finetune", "demo", str(data), str(out), "--steps", "3", "--batch-size", "2", "--lr", "1e-2",
                     "--merge", "--no-progress"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "loss.csv", "loss.png", "merged"} <= {
        p.name for p in out.iterdir()}
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and len(rows) == 4
    assert Image.open(out / "loss.png").format == "PNG"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(default_model_dir())
    # The merged checkpoint equals the base with the adapter applied.
    collated = ConversationCollator(MllamaProcessor.from_pretrained(default_model_dir()))(read_jsonl(data)[:2])
    inputs = {k: v for k, v in collated.items() if k != "labels"}
    base = MllamaForConditionalGeneration.from_pretrained(default_model_dir(), dtype=torch.float32)
    before = _logits(base, inputs)
    load_lora(base, out)
    expected = _logits(base, inputs)
    assert (expected - before).abs().max() > 1e-3
    merged = MllamaForConditionalGeneration.from_pretrained(out / "merged", dtype=torch.float32)
    assert (_logits(merged, inputs) - expected).abs().max() <= 1e-4
    assert (out / "merged" / "tokenizer.json").is_file()
    capsys.readouterr()
    image = str(data.parent / "images" / "00000.png")
    assert cli_main(["generate", "--adapter", str(out), "--image", image, "--max-new-tokens", "4",
                     "How many sides?"]) == 0
    assert cli_main(["generate", "--adapter", str(tmp_path), "--image", image, "hi"]) == 1
    assert "not a LoRA adapter directory" in capsys.readouterr().err


def test_finetune_cli_qlora_bf16_checkpointed(tmp_path, capsys):
    from mllama.demo.sides import write_sides_dataset

    data = write_sides_dataset(tmp_path / "data", n=2, seed=2)
    out = tmp_path / "out"
    assert cli_main(["finetune", "demo", str(data), str(out), "--steps", "2", "--batch-size", "2",
                     "--quantize", "int8", "--bf16", "--gradient-checkpointing", "--lora-r", "4",
                     "--target-modules", "q_proj,v_proj", "--no-progress"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    losses = [float(r.split(",")[1]) for r in (out / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    capsys.readouterr()
    image = str(data.parent / "images" / "00000.png")
    assert cli_main(["generate", "--quantize", "int8", "--adapter", str(out), "--image", image,
                     "--max-new-tokens", "3", "How many sides?"]) == 0


def test_sides_example_dataset_reads_back_with_old_questions_replayed(tmp_path):
    from mllama.demo.sides import SIDES, parse_sides, write_sides_dataset

    conversations = read_jsonl(write_sides_dataset(tmp_path, n=40, seed=3))
    answers = [c.messages[-1]["content"][0]["text"] for c in conversations]
    new = [a for a in answers if parse_sides(a) is not None]
    assert len(conversations) == 40 and 0 < len(answers) - len(new) < 20  # about a quarter replayed
    assert {parse_sides(a) for a in new} == set(SIDES.values())
    assert all(Image.open(c.images[0]).size[0] <= 70 for c in conversations)  # one tile each
    assert parse_sides("It has no sides.") == 0 and parse_sides("Four.") == 4 and parse_sides("3 or 4") is None
