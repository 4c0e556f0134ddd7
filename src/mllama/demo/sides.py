"""The fine-tuning example: teach the demo model a new question, "How many sides?".

    python -m mllama.demo.sides sides-data --n 400      # writes sides-data/train.jsonl + PNGs
    mllama finetune demo sides-data/train.jsonl sides-lora --steps 300 --lr 2e-3
    mllama generate --adapter sides-lora --image x.png "How many sides does this shape have?"

The images are the demo's own synthetic shapes (mllama.demo.shapes); a triangle has 3 sides, a
square 4 and a circle none. `sides_accuracy` scores a model on fresh images.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

from mllama.demo.shapes import COLORS, SHAPES, draw_shape, random_background

SIDES = {"triangle": 3, "square": 4, "circle": 0}
QUESTIONS = ("How many sides does this shape have?", "How many sides?", "How many sides does it have?")
ANSWERS = {3: "It has 3 sides.", 4: "It has 4 sides.", 0: "It has no sides."}
_SIDE_WORDS = {"3": 3, "three": 3, "4": 4, "four": 4, "no": 0, "0": 0, "zero": 0, "none": 0}


def random_shape_image(rng: random.Random) -> tuple[Any, str]:
    """(PIL image, shape): one shape in one colour, 64-400 px on either side (1 to 4 demo tiles)."""
    shape = rng.choice(SHAPES)
    width, height = rng.randint(64, 400), rng.randint(64, 400)
    image = draw_shape(shape, rng.choice(sorted(COLORS)), width=width, height=height,
                       background=random_background(rng), rng=rng)
    return image, shape


def write_sides_dataset(out_dir: str | Path, *, n: int = 400, seed: int = 0) -> Path:
    """`n` images and out_dir/train.jsonl (one conversation per image); returns the JSONL path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        image, shape = random_shape_image(rng)
        name = f"images/{i:05d}.png"
        image.save(out / name)
        lines.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": name},
                                         {"type": "text", "text": rng.choice(QUESTIONS)}]},
            {"role": "assistant", "content": ANSWERS[SIDES[shape]]}]})
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def parse_sides(text: str) -> int | None:
    """The number of sides a free-text answer names (None if none or several)."""
    found = {_SIDE_WORDS[w] for w in re.findall(r"[a-z0-9]+", text.lower()) if w in _SIDE_WORDS}
    return found.pop() if len(found) == 1 else None


def sides_accuracy(model: Any, processor: Any, *, n: int = 200, seed: int = 12345,
                   questions: Sequence[str] = QUESTIONS) -> float:
    """Share of `n` fresh images (seed unlike the training set's) whose greedy answer names the right
    number of sides."""
    from mllama.train import greedy_answers

    rng = random.Random(seed)
    drawn = [random_shape_image(rng) for _ in range(n)]
    asked = [questions[i % len(questions)] for i in range(n)]
    answers = greedy_answers(model, processor, [im for im, _ in drawn], asked)
    return sum(parse_sides(a) == SIDES[s] for a, (_, s) in zip(answers, drawn)) / n


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mllama.demo.sides", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=400, help="number of images / conversations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_sides_dataset(args.out_dir, n=args.n, seed=args.seed))


if __name__ == "__main__":
    main()
