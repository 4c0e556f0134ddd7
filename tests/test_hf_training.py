"""Training helpers, transformers' Trainer and peft on mllama models, against transformers."""

from __future__ import annotations

import pytest
import torch
from tiny import hf_pair

from mllama import MllamaForConditionalGeneration, MllamaModel

TOL = 1e-4


def _batch(seed: int = 0):
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_gradient_checkpointing_recomputes_and_keeps_gradients():
    _, ours = hf_pair("a", seed=1)
    batch = _batch()
    ours.train()
    ours(**batch).loss.backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()
    calls = []
    ours.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    assert not ours.is_gradient_checkpointing
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ours.is_gradient_checkpointing
    ours(**batch).loss.backward()
    assert len(calls) == 2  # forward, then again in backward
    for name, grad in plain.items():
        assert torch.allclose(grad, dict(ours.named_parameters())[name].grad, atol=1e-6), name
    ours.eval()
    calls.clear()
    with torch.no_grad():
        ours(**batch)
    assert len(calls) == 1
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing


def test_embeddings_counts_and_footprint_match_transformers():
    hf, ours = hf_pair("a", seed=2)
    assert torch.equal(ours.get_input_embeddings().weight, hf.get_input_embeddings().weight)
    assert torch.equal(ours.get_output_embeddings().weight, hf.get_output_embeddings().weight)
    for kwargs in ({}, {"exclude_embeddings": True}, {"only_trainable": True}):
        assert ours.num_parameters(**kwargs) == hf.num_parameters(**kwargs), kwargs
    assert ours.get_memory_footprint(return_buffers=False) == hf.get_memory_footprint(return_buffers=False)
    # Buffers (rotary tables) are laid out differently: a few bytes apart on this model.
    assert ours.get_memory_footprint() == pytest.approx(hf.get_memory_footprint(), rel=1e-3)
    assert ours.can_generate() and hf.can_generate()
    assert not MllamaModel.can_generate() and ours.model.get_output_embeddings() is None
    ours.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == 0


def test_resize_token_embeddings_like_transformers(tmp_path):
    import transformers

    hf, ours = hf_pair("a", seed=3)
    old_in, old_out = ours.get_input_embeddings().weight.clone(), ours.lm_head.weight.clone()
    for model in (hf, ours):
        model.resize_token_embeddings(110)
    assert ours.get_input_embeddings().weight.shape == hf.get_input_embeddings().weight.shape == (110, 64)
    assert ours.lm_head.weight.shape == hf.lm_head.weight.shape == (110, 64)
    assert ours.config.text_config.vocab_size == hf.config.text_config.vocab_size == 110
    assert torch.equal(ours.get_input_embeddings().weight[:104], old_in)
    assert torch.equal(ours.lm_head.weight[:96], old_out)
    # New rows start at the old mean (transformers samples around it with a tiny covariance).
    assert torch.allclose(ours.lm_head.weight[96:], hf.lm_head.weight[96:], atol=0.05)
    ids = torch.tensor([[1, 5, 109]])
    with torch.no_grad():
        assert ours(ids).logits.shape == (1, 3, 110)
    saved = tmp_path / "resized"
    ours.save_pretrained(saved)
    hf_saved = tmp_path / "hf-resized"
    hf.save_pretrained(hf_saved)
    ids = torch.tensor([[1, 5, 96, 109, 7]])  # a new id, and <|image|> now inside the vocabulary
    with torch.no_grad():
        want = ours(ids).logits
        # ours -> ours and ours -> transformers: config's vocab_size follows, logits equal
        back = MllamaForConditionalGeneration.from_pretrained(saved)
        assert back.config.text_config.vocab_size == 110 and back.lm_head.weight.shape == (110, 64)
        assert torch.equal(back(ids).logits, want)
        ref = transformers.MllamaForConditionalGeneration.from_pretrained(saved).eval()
        assert ref.config.text_config.vocab_size == 110
        assert (ref(input_ids=ids).logits - want).abs().max() <= TOL
        # transformers' own save of its resized model (vocab_size rows, which it cannot load itself)
        theirs = MllamaForConditionalGeneration.from_pretrained(hf_saved)
        assert torch.equal(theirs(ids).logits, hf(input_ids=ids).logits)
    ours.resize_token_embeddings(99, pad_to_multiple_of=8)
    assert ours.get_input_embeddings().num_embeddings == 104
    with pytest.raises(ValueError, match="image"):
        ours.resize_token_embeddings(90)


def test_enable_input_require_grads_reaches_a_frozen_base():
    _, ours = hf_pair("a", seed=4)
    ours.requires_grad_(False)
    ours.model.language_model.layers[2].self_attn.q_proj.weight.requires_grad_(True)
    ours.train()
    ours.gradient_checkpointing_enable()
    ours.enable_input_require_grads()
    ours(**_batch()).loss.backward()
    assert ours.model.language_model.layers[2].self_attn.q_proj.weight.grad.abs().sum() > 0
    ours.disable_input_require_grads()
    assert "_require_grads_hook" not in ours.__dict__


def test_trainer_trains_mllama_like_transformers(tmp_path):
    import transformers

    hf, ours = hf_pair("a", seed=5)
    data = [{k: v[0] for k, v in _batch(i).items()} for i in range(8)]
    losses = []
    for model in (hf, ours):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / type(model).__module__), max_steps=3,
                                              per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                                              logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                                              dataloader_num_workers=0, lr_scheduler_type="constant")
        trainer = transformers.Trainer(model=model.train(), args=args, train_dataset=data)
        trainer.train()
        losses.append([log["loss"] for log in trainer.state.log_history if "loss" in log])
    assert len(losses[1]) == 3 and losses[1][-1] < losses[1][0]
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)


def test_peft_causal_lm_task_and_all_linear(tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = hf_pair("a", seed=6)
    ours.save_pretrained(tmp_path / "base")
    ours = MllamaForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float32)

    def wrapped(model, **extra):
        config = peft.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4, init_lora_weights=False,
                                 **extra)
        torch.manual_seed(0)
        peft_model = peft.get_peft_model(model, config)
        names = {n.split("model.", 1)[1] for n, m in peft_model.named_modules()
                 if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B"))}
        return peft_model, names

    peft_ours, ours_names = wrapped(ours, exclude_modules=["lm_head"])
    _, hf_names = wrapped(hf)
    # peft drops the output layer from all-linear only for transformers' PreTrainedModel; with mllama
    # exclude_modules=["lm_head"] gives exactly transformers' set (README: Fine-tuning with peft).
    assert ours_names == hf_names and "lm_head" not in str(ours_names)
    assert peft_ours.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    batch = _batch(7)
    out = peft_ours(**batch)
    assert out.loss.requires_grad
    peft_ours.save_pretrained(tmp_path / "adapter")
    import transformers
    from peft import PeftModel

    base = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "base").eval()
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (loaded(**batch).logits - peft_ours.eval()(**batch).logits).abs().max() <= TOL
        generated = peft_ours.generate(input_ids=batch["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 9)
    # The adapter file loads into mllama without peft (merged), with transformers+peft's logits.
    merged = MllamaForConditionalGeneration.from_pretrained(tmp_path / "base", dtype=torch.float32)
    names = merged.load_adapter(tmp_path / "adapter")
    assert len(names) == len(hf_names)
    with torch.no_grad():
        assert (merged(**batch).logits - loaded(**batch).logits).abs().max() <= TOL
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merged.load_adapter(tmp_path / "base")
