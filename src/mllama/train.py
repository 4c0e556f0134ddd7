"""Train or fine-tune Mllama on your own (image, question, answer) triples.

`VQACollator` turns examples into model inputs with the chat template (user turn: image +
question; assistant turn: the answer) and labels that train on the answer and its `<|eot_id|>`
only. `train` runs a seeded float32 AdamW loop with linear warmup + cosine decay and gradient
clipping, evaluates periodically and saves complete checkpoints (model, generation config,
tokenizer and image-processor files) that `from_pretrained` and transformers both read.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
from torch import nn

from mllama.model import IGNORE_INDEX, MllamaForConditionalGeneration

Batch = dict[str, torch.Tensor]
_CACHE_LIMIT = 1 << 16


class Processor(Protocol):
    """What training needs from a processor: `mllama.processor.MllamaProcessor` (exactly one BOS per row)."""

    tokenizer: Any

    def __call__(self, *, images: Any = None, text: Any = None, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def save_pretrained(self, save_directory: str | os.PathLike) -> Any: ...


@dataclass(frozen=True)
class VQAExample:
    """One training example. `image` is a PIL image (anything the processor accepts)."""

    image: Any
    question: str
    answer: str


def user_turn(question: str) -> list[dict[str, Any]]:
    """The user message of a one-image question, in the chat-template content format."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _as_example(item: Any) -> VQAExample:
    if isinstance(item, VQAExample):
        return item
    if isinstance(item, (tuple, list)) and len(item) == 3:
        return VQAExample(*item)
    if all(hasattr(item, key) for key in ("image", "question", "answer")):
        return VQAExample(item.image, item.question, item.answer)
    raise TypeError(f"expected a VQAExample, an (image, question, answer) tuple or an object with .image, "
                    f".question and .answer, got {type(item).__name__}")


class VQACollator:
    """Examples -> one padded batch with labels.

    labels equal input_ids on the answer tokens and the closing `<|eot_id|>`; the prompt (everything
    up to and including the assistant header and its blank line) and padding are -100.
    """

    def __init__(self, processor: Processor, *, max_length: int | None = None) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        # Rendering the template dominates text cost; datasets repeat their question/answer phrasings.
        self._text_cache: dict[tuple[str, str], str] = {}
        self._answer_cache: dict[tuple[str, str], list[int]] = {}

    def _render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool) -> str:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
        if not isinstance(text, str):
            raise TypeError("apply_chat_template(tokenize=False) must return a str")
        return text

    def _conversation(self, question: str, answer: str) -> str:
        key = (question, answer)
        if key not in self._text_cache:
            if len(self._text_cache) > _CACHE_LIMIT:
                self._text_cache.clear()
            self._text_cache[key] = self._render(user_turn(question) + [
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}], add_generation_prompt=False)
        return self._text_cache[key]

    def _answer_ids(self, question: str, answer: str) -> list[int]:
        """Ids of the assistant part: the rendered conversation minus the rendered prompt."""
        key = (question, answer)
        if key not in self._answer_cache:
            if len(self._answer_cache) > _CACHE_LIMIT:
                self._answer_cache.clear()
            prompt = self._render(user_turn(question), add_generation_prompt=True)
            full = self._conversation(question, answer)
            if not full.startswith(prompt):
                raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            full_ids = self.tokenizer.encode(full, add_special_tokens=False)
            if full_ids[:len(prompt_ids)] != prompt_ids:
                raise ValueError(f"the answer {answer!r} merges with the assistant header when tokenized")
            self._answer_cache[key] = full_ids[len(prompt_ids):]
        return self._answer_cache[key]

    def __call__(self, items: Sequence[Any]) -> Batch:
        examples = [_as_example(item) for item in items]
        if not examples:
            raise ValueError("cannot collate an empty batch")
        for ex in examples:
            if ex.image is None:
                raise ValueError("every example needs an image")
            if not isinstance(ex.question, str) or not isinstance(ex.answer, str) or not ex.answer:
                raise TypeError("question must be a str and answer a non-empty str")
        texts = [self._conversation(ex.question, ex.answer) for ex in examples]
        batch = self.processor(images=[[ex.image] for ex in examples], text=texts, padding=True,
                               return_tensors="pt")
        batch = {k: v for k, v in dict(batch).items() if isinstance(v, torch.Tensor)}
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        bos = self.tokenizer.bos_token_id
        for row, ex in enumerate(examples):
            real = mask[row].nonzero().flatten()  # works for left and right padding
            if bos is not None and int((ids[row, real] == bos).sum()) != 1:
                raise ValueError(f"the processor produced {int((ids[row, real] == bos).sum())} BOS tokens in row "
                                 f"{row}; expected exactly one")
            answer = self._answer_ids(ex.question, ex.answer)
            tail = real[len(real) - len(answer):]
            if ids[row, tail].tolist() != answer:
                raise ValueError(f"row {row}: the processor's ids do not end with the answer tokens")
            labels[row, tail] = ids[row, tail]
        batch["labels"] = labels
        if self.max_length is not None and ids.shape[1] > self.max_length:
            raise ValueError(f"batch is {ids.shape[1]} tokens long, more than max_length={self.max_length}")
        return batch


def example_batches(examples: Sequence[Any], collator: Callable[[Sequence[Any]], Batch], *, batch_size: int,
                    seed: int) -> Iterator[Batch]:
    """Endless batches: the examples reshuffled every epoch by a seeded RNG."""
    if not examples:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        picked, order = order[:batch_size], order[batch_size:]
        yield collator([examples[i] for i in picked])


# ---- initialisation -------------------------------------------------------------------------------------------------
def is_gate(name: str) -> bool:
    """tanh gates: `cross_attn_attn_gate`, `gate_attn`, `...positional_embedding.gate`, ... (not `gate_proj`)."""
    leaf = name.rsplit(".", 1)[-1]
    return "gate" in leaf


@torch.no_grad()
def init_for_training(model: nn.Module, *, seed: int, gate_value: float = 0.1) -> None:
    """Seeded fresh weights for training from scratch.

    Linear, conv and embedding layers get PyTorch's default init (fan-in scaled), norms are ones/zeros,
    free-standing embeddings (class token, patch positions) normal with std hidden**-0.5. (The 0.02
    normal of the published configs' initializer_range trains tiny models far more slowly.) The
    global vision layers' gates start at pi/4 (Meta's init); the other gates (cross-attention,
    positional embeddings) at `gate_value` rather than the real model's zero, so that the very first
    backward already reaches the vision tower and the cross-attention layers through them.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        owners = {}
        for module_name, module in model.named_modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                for param_name, _ in module.named_parameters(recurse=False):
                    owners[f"{module_name}.{param_name}" if module_name else param_name] = module
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gate_attn", "gate_ffn"):
                param.fill_(math.pi / 4)
            elif is_gate(name):
                param.fill_(gate_value)
            elif name in owners:
                continue
            elif leaf == "weight" and param.dim() == 1:  # RMSNorm
                param.fill_(1.0)
            elif leaf == "bias":
                param.zero_()
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)


# ---- the loop ---------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    eval_every: int = 0
    log_every: int = 20
    save_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError("need lr > 0, 0 <= min_lr_ratio <= 1 and warmup_steps >= 0")


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay matrices only: norms, biases, gates and embeddings' single vectors stay undecayed.
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 and not is_gate(name) else keep).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def train(model: nn.Module, batches: Iterable[Batch], *, config: TrainConfig,
          evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
          save: Callable[[nn.Module, int], None] | None = None,
          log: Callable[[str], None] | None = print,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Run `config.steps` optimizer steps over `batches` (dicts of model inputs with `labels`).
    `on_step(step, loss)` is called after every optimizer step (progress bars, loss files)."""
    torch.manual_seed(config.seed)
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
    result = TrainResult()
    start = time.perf_counter()
    iterator = iter(batches)
    running = 0.0
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"batches ran out after {step} of {config.steps} steps") from None
        if "labels" not in batch:
            raise ValueError("every batch needs labels (see VQACollator)")
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        result.losses.append(loss.item())
        running += loss.item()
        done = step + 1
        if on_step is not None:
            on_step(done, result.losses[-1])
        if log is not None and config.log_every and done % config.log_every == 0:
            log(f"step {done}/{config.steps}  loss {running / config.log_every:.4f}  "
                f"lr {lr_at(step, config):.2e}  {time.perf_counter() - start:.0f}s")
            running = 0.0
        if evaluate is not None and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
            model.eval()
            with torch.no_grad():
                metrics = {"step": done, **evaluate(model)}
            model.train()
            result.evals.append(metrics)
            if log is not None:
                log(f"eval step {done}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in metrics.items() if k != "step"))
        if save is not None and config.save_every and done % config.save_every == 0 and done != config.steps:
            save(model, done)
    model.eval()
    if save is not None:
        save(model, config.steps)
    result.seconds = time.perf_counter() - start
    return result


# ---- checkpoints --------------------------------------------------------------------------------------------------
def generation_config_for(tokenizer: Any, *, do_sample: bool = False, max_new_tokens: int | None = None
                          ) -> dict[str, Any]:
    """A generation_config.json dict whose ids all come from the tokenizer: stop on end-of-text, eom and eot."""
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    eos = [i for i in eos if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    out: dict[str, Any] = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos,
                           "pad_token_id": tokenizer.pad_token_id, "do_sample": do_sample}
    if max_new_tokens is not None:
        out["max_new_tokens"] = max_new_tokens
    return out


def save_checkpoint(model: MllamaForConditionalGeneration, processor: Processor, save_directory: str | os.PathLike,
                    *, generation_config: dict[str, Any] | None = None) -> Path:
    """A complete checkpoint directory: config, weights, generation config, tokenizer and processor files."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    gen = generation_config if generation_config is not None else generation_config_for(processor.tokenizer)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return out


# ---- evaluation -----------------------------------------------------------------------------------------------------
def prompt_batch(processor: Processor, images: Sequence[Any], questions: Sequence[str]) -> Batch:
    """Left-padded generation prompts (user turn + assistant header), one image and question per row."""
    if len(images) != len(questions) or not images:
        raise ValueError(f"need as many questions as images (at least one): got {len(images)} images and "
                         f"{len(questions)} questions")
    prompts = [processor.apply_chat_template(user_turn(q), add_generation_prompt=True, tokenize=False)
               for q in questions]
    batch = processor(images=[[im] for im in images], text=prompts, padding=True, padding_side="left",
                      return_tensors="pt")
    return {k: v for k, v in dict(batch).items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def greedy_decode(model: MllamaForConditionalGeneration, batch: Batch, *, stop_ids: Sequence[int],
                  max_new_tokens: int = 16) -> list[list[int]]:
    """Greedy continuation of a left-padded prompt batch (the generation engine), each row cut
    before its first stop id."""
    if not stop_ids:
        raise ValueError("stop_ids must name at least one token")
    stops = sorted(set(stop_ids))
    keys = ("attention_mask", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")
    out = model.generate(batch["input_ids"], **{k: batch[k] for k in keys if k in batch},
                         max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0,
                         eos_token_id=stops, pad_token_id=stops[0])
    rows = out[:, batch["input_ids"].shape[1]:].tolist()
    return [row[:next((i for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


def greedy_answers(model: MllamaForConditionalGeneration, processor: Processor, images: Sequence[Any],
                   questions: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 64) -> list[str]:
    """Greedy answers (text) to one question per image, in batches of `batch_size`."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    stops = generation_config_for(processor.tokenizer)["eos_token_id"]
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for lo in range(0, len(images), batch_size):
        batch = prompt_batch(processor, images[lo:lo + batch_size], questions[lo:lo + batch_size])
        for row in greedy_decode(model, batch, stop_ids=stops, max_new_tokens=max_new_tokens):
            answers.append(processor.tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
