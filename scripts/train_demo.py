#!/usr/bin/env python
"""Train the tiny demo model shipped in src/mllama/assets/demo-model (about 10 minutes on 2 CPU cores).

    python scripts/train_demo.py                 # rebuild the shipped model and example image
    python scripts/train_demo.py --out /tmp/demo # somewhere else

Seeded end to end: the same torch build and thread count reproduce the same weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mllama.demo.recipe import DEMO_MODEL_DIR, EXAMPLE_IMAGE, Recipe, evaluate, example_image, train_demo
from mllama.demo.shapes import make_samples
from mllama.train import greedy_answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR, help="checkpoint directory (replaced)")
    parser.add_argument("--example", type=Path, default=EXAMPLE_IMAGE, help="where to write the example image")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    parser.add_argument("--steps", type=int, default=None, help="stage-2 steps (default: the recipe's)")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    recipe = Recipe() if args.steps is None else Recipe(steps=args.steps)
    start = time.perf_counter()
    model, processor, _ = train_demo(args.out, recipe=recipe, log=lambda line: print(line, flush=True))
    trained = time.perf_counter() - start
    example = example_image(args.example)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    samples = make_samples(200, seed=99, kind="describe")
    right, blank = evaluate(model, processor, samples), evaluate(model, processor, samples, blank=True)
    print(f"trained in {trained:.0f}s; {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{size / 2**20:.1f} MiB on disk")
    from PIL import Image

    question = "What is in this image?"
    answer = greedy_answers(model, processor, [Image.open(example).convert("RGB")], [question])[0]
    print(f"{example.name}: {question} -> {answer}")
    print(f"200 fresh images: shape+colour {right.both:.1%} (shape {right.shape:.1%}, colour {right.color:.1%}); "
          f"blank images: shape {blank.shape:.1%}, colour {blank.color:.1%}")


if __name__ == "__main__":
    main()
