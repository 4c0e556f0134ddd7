"""The README's fine-tuning example, timed and scored: teach the demo model "How many sides?".

    python benchmarks/bench_finetune.py --out /tmp/sides     # prints one JSON object

Writes the dataset (mllama.demo.sides), runs mllama.finetune.finetune on the demo model, then
scores greedy answers on fresh images (another seed): the new question before and after, and the
old "What shape is this?" skill after (does the adapter keep it?).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from mllama.cli import default_model_dir
from mllama.demo.shapes import parse_answer
from mllama.demo.sides import random_shape_image, sides_accuracy, write_sides_dataset
from mllama.finetune import finetune
from mllama.lora import load_lora
from mllama.model import MllamaForConditionalGeneration
from mllama.processor import MllamaProcessor
from mllama.train import greedy_answers


def shape_accuracy(model, processor, *, n: int, seed: int) -> float:
    rng = random.Random(seed)
    drawn = [random_shape_image(rng) for _ in range(n)]
    answers = greedy_answers(model, processor, [d[0] for d in drawn], ["What shape is this?"] * n)
    return sum(parse_answer(a)[0] == d[1] for a, d in zip(answers, drawn)) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/mllama-sides")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval", type=int, default=150)
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    data = write_sides_dataset(out / "data", n=args.n, seed=0)
    data_s = time.perf_counter() - start
    result = finetune("demo", data, out / "lora", steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                      target_modules=["all-linear", "lm_head"])
    processor = MllamaProcessor.from_pretrained(default_model_dir())
    model = MllamaForConditionalGeneration.from_pretrained(default_model_dir(), dtype=torch.float32)
    before = sides_accuracy(model, processor, n=args.eval)
    shapes_before = shape_accuracy(model, processor, n=args.eval, seed=777)
    load_lora(model, out / "lora")
    report = {
        "examples": args.n, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "threads": torch.get_num_threads(), "data_s": round(data_s, 1), "train_s": round(result.seconds, 1),
        "loss_first": round(result.losses[0], 3), "loss_last10": round(sum(result.losses[-10:]) / 10, 4),
        "sides_acc_before": before, "sides_acc_after": sides_accuracy(model, processor, n=args.eval),
        "shape_acc_before": shapes_before, "shape_acc_after": shape_accuracy(model, processor, n=args.eval, seed=777),
        "trainable": result.trainable, "total": result.total,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
