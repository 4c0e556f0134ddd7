"""Training support: collate/label masking, gradient flow through every part, loss goes down, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mllama.config import MllamaConfig
from mllama.demo.shapes import make_samples
from mllama.demo.vocab import train_demo_tokenizer
from mllama.image_processing import MllamaImageProcessor
from mllama.model import IGNORE_INDEX, MllamaForConditionalGeneration
from mllama.processor import MllamaProcessor
from mllama.train import (TrainConfig, VQACollator, VQAExample, example_batches, generation_config_for,
                          greedy_answers, init_for_training, is_gate, lr_at, save_checkpoint, train, user_turn)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tokenizer = train_demo_tokenizer(tmp_path_factory.mktemp("tok"))
    image_processor = MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=4)
    return MllamaProcessor(image_processor, tokenizer)


def tiny_model(processor, *, seed: int = 0, gate_value: float = 0.1) -> MllamaForConditionalGeneration:
    tok = processor.tokenizer
    vocab = tok.image_token_id
    config = MllamaConfig.from_dict({
        "vision_config": dict(hidden_size=16, attention_heads=2, intermediate_size=32, num_hidden_layers=2,
                              num_global_layers=1, intermediate_layers_indices=[0, 1], vision_output_dim=48,
                              image_size=28, patch_size=14, max_num_tiles=4),
        "text_config": dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=64, cross_attention_layers=[1],
                            rope_theta=10000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id),
        "image_token_index": vocab})
    model = MllamaForConditionalGeneration(config)
    init_for_training(model, seed=seed, gate_value=gate_value)
    return model


def test_collate_masks_prompt_and_padding(processor):
    tok = processor.tokenizer
    samples = make_samples(4, seed=11)
    samples[0] = VQAExample(samples[0].image, "What shape is this?", "It is a square, clearly a square.")
    batch = VQACollator(processor)(samples)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert labels.shape == ids.shape and set(batch) >= {"pixel_values", "cross_attention_mask", "aspect_ratio_ids"}
    assert (mask == 0).any(), "the answers differ in length, so some rows must be padded"
    for row, sample in enumerate(samples):
        prompt = processor.apply_chat_template(user_turn(sample.question), add_generation_prompt=True)
        prompt_len = len(tok.encode(prompt, add_special_tokens=False))
        real = int(mask[row].sum())
        assert mask[row, :real].all(), "right padding"
        # Everything up to and including the assistant header's blank line is masked ...
        assert (labels[row, :prompt_len] == IGNORE_INDEX).all()
        assert tok.decode(ids[row, :prompt_len]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        # ... the answer and its <|eot_id|> are trained on, padding is not.
        assert labels[row, prompt_len:real].tolist() == ids[row, prompt_len:real].tolist()
        assert tok.decode(labels[row, prompt_len:real]) == sample.answer + "<|eot_id|>"
        assert (labels[row, real:] == IGNORE_INDEX).all()
        assert int((ids[row] == tok.bos_token_id).sum()) == 1
        assert int((ids[row] == tok.image_token_id).sum()) == 1
        assert (labels[row] != tok.image_token_id).all()


def test_collate_rejects_bad_examples(processor):
    collator = VQACollator(processor)
    image = make_samples(1, seed=0)[0].image
    with pytest.raises(ValueError, match="empty"):
        collator([])
    with pytest.raises(ValueError, match="image"):
        collator([VQAExample(None, "What?", "A.")])
    with pytest.raises(TypeError, match="answer"):
        collator([VQAExample(image, "What?", "")])
    with pytest.raises(TypeError, match="VQAExample"):
        collator([{"image": image}])


def test_gradients_reach_every_parameter(processor):
    model = tiny_model(processor, seed=1)
    batch = VQACollator(processor)(make_samples(6, seed=2))
    assert batch["aspect_ratio_mask"].sum() > 6, "the batch must use several tiles"
    model(**batch).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    gates = [n for n, _ in model.named_parameters() if is_gate(n)]
    assert any("cross_attn_attn_gate" in n for n in gates) and any("gated_positional" in n for n in gates)
    assert any("global_transformer" in n for n in gates)


def test_zero_gates_block_the_image_path(processor):
    """With the real model's zero init, only the gates themselves learn on the first step; hence gate_value."""
    model = tiny_model(processor, seed=1, gate_value=0.0)
    batch = VQACollator(processor)(make_samples(4, seed=2))
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["model.language_model.layers.1.cross_attn_attn_gate"].abs().item() > 0
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items()
               if n.startswith("model.vision_model.") or n.startswith("model.multi_modal_projector."))


def test_a_few_steps_reduce_the_loss(processor):
    torch.manual_seed(0)
    model = tiny_model(processor, seed=3)
    batches = example_batches(make_samples(16, seed=4), VQACollator(processor), batch_size=8, seed=0)
    result = train(model, batches, config=TrainConfig(steps=25, lr=1e-2, warmup_steps=5), log=None)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert all(math.isfinite(x) for x in result.losses)
    assert last < 0.5 * first, (first, last)
    assert not model.training


def test_training_is_seeded(processor):
    losses = []
    for _ in range(2):
        model = tiny_model(processor, seed=5)
        batches = example_batches(make_samples(8, seed=6), VQACollator(processor), batch_size=4, seed=1)
        losses.append(train(model, batches, config=TrainConfig(steps=3, warmup_steps=1), log=None).losses)
    assert losses[0] == losses[1]


def test_lr_schedule():
    config = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, config) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4)
    with pytest.raises(ValueError):
        TrainConfig(steps=0)


def test_checkpoint_is_complete_and_reloads(processor, tmp_path):
    model = tiny_model(processor, seed=7)
    save_checkpoint(model, processor, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "preprocessor_config.json"} <= names
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<|eot_id|>") in gen["eos_token_id"] and gen["do_sample"] is False
    assert gen == generation_config_for(tok)
    loaded = MllamaForConditionalGeneration.from_pretrained(tmp_path)
    reloaded = MllamaProcessor.from_pretrained(tmp_path)
    samples = make_samples(3, seed=8)
    batch = VQACollator(reloaded)(samples)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits)
    answers = greedy_answers(loaded, reloaded, [s.image for s in samples], [s.question for s in samples],
                             max_new_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_greedy_batch_matches_single(processor):
    """Left padding and batching must not change greedy answers."""
    model = tiny_model(processor, seed=9)
    with torch.no_grad():  # make the untrained model's outputs depend on the image
        for name, p in model.named_parameters():
            if is_gate(name):
                p.fill_(1.0)
    samples = make_samples(3, seed=10)
    questions = ["What shape is this?", "Describe what you see in this picture, please.", "Hi?"]
    images = [s.image for s in samples]
    together = greedy_answers(model, processor, images, questions, max_new_tokens=5)
    alone = [greedy_answers(model, processor, [im], [q], max_new_tokens=5)[0] for im, q in zip(images, questions)]
    assert together == alone
