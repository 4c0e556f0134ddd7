"""LoRA fine-tuning end to end: `mllama finetune BASE DATA.jsonl OUT`, or `finetune(...)` in Python.

    from mllama.finetune import finetune
    result = finetune("demo", "sides/train.jsonl", "sides-lora", steps=150, lr=3e-3, batch_size=8,
                      target_modules=["all-linear", "lm_head"])

Loads the base (optionally quantized to int8/int4: QLoRA), wraps its linears in LoRA layers
(mllama.lora), trains them with mllama.train's seeded AdamW loop on the JSONL conversations
(mllama.finetune_data), and writes to OUT: the peft adapter (adapter_config.json +
adapter_model.safetensors), loss.csv (one row per step), loss.png, and with `merge` a complete
merged checkpoint in OUT/merged (float weights: a quantized base is reloaded unquantized for it).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image, ImageDraw

from mllama.finetune_data import Conversation, ConversationCollator, read_jsonl
from mllama.lora import ALL_LINEAR, apply_lora, save_adapter, trainable_parameters
from mllama.train import Batch, TrainConfig, example_batches, train

LOSS_CSV, LOSS_PNG, MERGED_DIR = "loss.csv", "loss.png", "merged"


@dataclass
class FinetuneResult:
    out_dir: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable: int = 0
    total: int = 0
    adapted: list[str] = field(default_factory=list)
    merged_dir: Path | None = None


def resolve_base(base: str | os.PathLike) -> str:
    """"demo" is the shipped demo model; anything else a checkpoint directory or hub id."""
    if str(base) == "demo":
        from mllama.cli import default_model_dir

        return str(default_model_dir())
    return str(base)


def _on_device(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    for batch in batches:
        yield {k: v.to(device) for k, v in batch.items()}


def write_loss_csv(losses: Sequence[float], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_text("step,loss\n" + "".join(f"{i},{loss:.6f}\n" for i, loss in enumerate(losses, start=1)))
    return path


def plot_losses(losses: Sequence[float], path: str | os.PathLike, *, size: tuple[int, int] = (640, 400),
                title: str = "training loss") -> Path:
    """A line plot of the per-step loss (faint) and its running mean (bold), drawn with PIL."""
    if not losses:
        raise ValueError("no losses to plot")
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    lo, hi = min(losses), max(losses)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    steps = len(losses)

    def point(i: int, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * (i / max(1, steps - 1))
        y = top + (height - top - bottom) * (hi - value) / (hi - lo)
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline=(120, 120, 120))
    for k in range(5):  # horizontal grid with loss labels
        value = lo + (hi - lo) * k / 4
        y = point(0, value)[1]
        draw.line((left, y, width - right, y), fill=(230, 230, 230))
        draw.text((4, y - 6), f"{value:.3g}", fill=(60, 60, 60))
    for k in range(5):
        i = round((steps - 1) * k / 4)
        x = point(i, lo)[0]
        draw.text((x - 8, height - bottom + 6), str(i + 1), fill=(60, 60, 60))
    draw.text((left, 8), f"{title} ({steps} steps, last {losses[-1]:.4f})", fill=(0, 0, 0))
    draw.text((width - right - 30, height - 18), "step", fill=(60, 60, 60))
    if steps > 1:
        draw.line([point(i, v) for i, v in enumerate(losses)], fill=(170, 190, 235), width=1)
        window = max(1, steps // 25)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(steps)]
        draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(30, 70, 200), width=3)
    else:
        x, y = point(0, losses[0])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(30, 70, 200))
    path = Path(path)
    image.save(path)
    return path


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="finetune", unit="step", disable=not enabled, dynamic_ncols=True)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def finetune(base: str | os.PathLike, data: str | os.PathLike | Sequence[Conversation], out_dir: str | os.PathLike,
             *, r: int = 8, alpha: float = 16, dropout: float = 0.0,
             target_modules: str | Sequence[str] = ALL_LINEAR, steps: int | None = None, epochs: float = 1.0,
             lr: float = 2e-4, batch_size: int = 4, warmup_steps: int | None = None, bf16: bool = False,
             gradient_checkpointing: bool = False, quantize: str | None = None, merge: bool = False,
             seed: int = 0, device: str | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Train a LoRA adapter of `base` on `data` (a JSONL path or parsed conversations); see the module
    docstring for what lands in `out_dir`. `steps` overrides `epochs` (passes over the data)."""
    from mllama.model import MllamaForConditionalGeneration
    from mllama.processor import MllamaProcessor

    base_path = resolve_base(base)
    conversations = read_jsonl(data) if isinstance(data, (str, os.PathLike)) else list(data)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if steps is None:
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        steps = max(1, math.ceil(epochs * len(conversations) / batch_size))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device_obj = torch.device(device or _default_device())
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = MllamaForConditionalGeneration.from_pretrained(base_path, dtype=dtype, device=device_obj,
                                                           quantization=quantize)
    processor = MllamaProcessor.from_pretrained(base_path)
    adapted = apply_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, seed=seed)
    trainable, total = trainable_parameters(model)
    if log is not None:
        log(f"LoRA r={r} alpha={alpha} on {len(adapted)} linears: {trainable:,} trainable of {total:,} parameters; "
            f"{len(conversations)} conversations, {steps} steps of {batch_size}")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    config = TrainConfig(steps=steps, lr=lr, weight_decay=0.0, seed=seed, log_every=0,
                         warmup_steps=min(steps // 10, 100) if warmup_steps is None else warmup_steps)
    batches = _on_device(example_batches(conversations, ConversationCollator(processor), batch_size=batch_size,
                                         seed=seed), device_obj)
    bar = _progress(steps, progress)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    try:
        result = train(model, batches, config=config, log=None, on_step=on_step)
    finally:
        bar.close()
    model.gradient_checkpointing_disable()
    save_adapter(model, out, base_model_name_or_path=base_path)
    write_loss_csv(result.losses, out / LOSS_CSV)
    plot_losses(result.losses, out / LOSS_PNG)
    finished = FinetuneResult(out_dir=out, losses=result.losses, seconds=result.seconds, trainable=trainable,
                              total=total, adapted=adapted)
    if merge:
        del model
        finished.merged_dir = merge_adapter(base_path, out, out / MERGED_DIR, dtype=dtype)
    if log is not None:
        log(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} in {result.seconds:.1f}s; adapter in {out}"
            + (f", merged model in {finished.merged_dir}" if merge else ""))
    return finished


def merge_adapter(base: str | os.PathLike, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  dtype: torch.dtype | None = None) -> Path:
    """A complete checkpoint of `base` with the adapter merged into its (float) weights, plus the
    base's tokenizer, processor and generation files: loads in mllama and in transformers."""
    from mllama.model import MllamaForConditionalGeneration

    base_path = Path(resolve_base(base))
    out = Path(out_dir)
    model = MllamaForConditionalGeneration.from_pretrained(base_path, dtype=dtype)
    model.load_adapter(adapter_dir)  # mllama.adapters: W += scale * B @ A in float32
    model.save_pretrained(out)
    if base_path.is_dir():
        for file in sorted(base_path.iterdir()):
            weights = file.suffix == ".safetensors" or file.name.endswith(".index.json") or file.name == "config.json"
            if file.is_file() and not weights and not (out / file.name).exists():
                shutil.copy2(file, out / file.name)
    else:  # a hub id: the processor files come from the processor
        from mllama.processor import MllamaProcessor

        MllamaProcessor.from_pretrained(str(base)).save_pretrained(out)
    return out
