"""`mllama finetune BASE DATA.jsonl OUT`: LoRA fine-tuning from the command line (mllama.finetune)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_finetune_parser(sub: Any, error: type[Exception]) -> None:
    """Register the `finetune` subcommand; `error` is the CLI's one-line user error."""
    ft = sub.add_parser("finetune", help="train a LoRA adapter on a JSONL dataset of conversations with images",
                        description="Train a LoRA adapter (peft's file format) of BASE on DATA and write it, "
                                    "loss.csv and loss.png to OUT. DATA: one JSON object per line, "
                                    '{"messages": [{"role": "user", "content": [{"type": "image", "path": '
                                    '"a.png"}, {"type": "text", "text": "..."}]}, {"role": "assistant", '
                                    '"content": "..."}]}, image paths relative to the file.')
    ft.add_argument("base", help='base checkpoint directory, hub id, or "demo"')
    ft.add_argument("data", help="the JSONL dataset")
    ft.add_argument("out", help="output directory (adapter, loss.csv, loss.png; merged/ with --merge)")
    ft.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    ft.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha; the update is scaled by alpha / r")
    ft.add_argument("--lora-dropout", type=float, default=0.0)
    ft.add_argument("--target-modules", default="all-linear",
                    help='"all-linear" (every linear but lm_head, vision and cross-attention included), '
                         "a comma-separated list of module names (q_proj,v_proj) or a regex over full names")
    length = ft.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of --epochs)")
    ft.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (warmup, then cosine decay)")
    ft.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps, at most 100")
    ft.add_argument("--batch-size", type=int, default=4)
    ft.add_argument("--bf16", action="store_true", help="base weights and compute in bfloat16 (LoRA in float32)")
    ft.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute layer activations in the backward pass (less memory, slower)")
    ft.add_argument("--quantize", choices=["int8", "int4"], default=None,
                    help="QLoRA: train the adapter on an int8 / int4 base")
    ft.add_argument("--merge", action="store_true",
                    help="also write OUT/merged: the base with the adapter merged in (a complete checkpoint)")
    ft.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    ft.set_defaults(func=lambda args: cmd_finetune(args, error))


def apply_adapter(model: Any, adapter: str, error: type[Exception]) -> None:
    """`--adapter DIR` of generate/chat/serve: a peft LoRA directory, merged into float weights, or
    kept as LoRA layers on a quantized base (which cannot hold the update exactly)."""
    from mllama.lora import load_lora

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise error(f"{adapter} is not a LoRA adapter directory (no adapter_config.json found)")
    try:
        if getattr(model, "quantization_config", None) is not None:
            load_lora(model, adapter)
        else:
            model.load_adapter(adapter)
    except (OSError, ValueError, KeyError) as err:
        raise error(f"cannot apply the adapter {adapter}: {err}") from None


def _targets(spec: str) -> str | list[str]:
    if spec == "all-linear" or any(c in spec for c in "|()[]*+?\\^$"):
        return spec
    return [part.strip() for part in spec.split(",") if part.strip()]


def cmd_finetune(args: argparse.Namespace, error: type[Exception]) -> None:
    from mllama.finetune import finetune
    from mllama.finetune_data import DataError, read_jsonl

    base = args.base
    if base != "demo" and (Path(base).exists() or base.startswith((".", "/", "~"))) \
            and not (Path(base) / "config.json").is_file():
        raise error(f"{base} is not a model directory (no config.json found)")
    for name in ("lora_r", "batch_size"):
        if getattr(args, name) < 1:
            raise error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise error("--steps must be at least 1")
    try:
        conversations = read_jsonl(args.data)
    except DataError as err:
        raise error(str(err)) from None
    try:
        result = finetune(base, conversations, args.out, r=args.lora_r, alpha=args.lora_alpha,
                          dropout=args.lora_dropout, target_modules=_targets(args.target_modules), steps=args.steps,
                          epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                          warmup_steps=args.warmup_steps, bf16=args.bf16,
                          gradient_checkpointing=args.gradient_checkpointing, quantize=args.quantize,
                          merge=args.merge, seed=args.seed, device=args.device, progress=args.progress,
                          log=lambda line: print(line, file=sys.stderr))
    except DataError as err:
        raise error(str(err)) from None
    except (OSError, ValueError) as err:
        raise error(f"finetune failed: {err}") from None
    print(result.out_dir)
