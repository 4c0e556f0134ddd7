"""The fine-tuning example: teach the demo model a new question, "How many sides?".

    python -m mllama.demo.sides sides-data --n 300      # writes sides-data/train.jsonl + PNGs
    mllama finetune demo sides-data/train.jsonl sides-lora --steps 150 --lr 3e-3 --batch-size 8 \
        --target-modules all-linear,lm_head
    mllama generate --adapter sides-lora --image x.png "How many sides does this shape have?"

The images are the demo's own synthetic shapes (mllama.demo.shapes); a triangle has 3 sides, a
square 4 and a circle none. The answers use tokens the demo model never produced, whose lm_head
rows were never trained, so the example adapts lm_head too. `sides_accuracy` scores a model on
fresh images.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any, Sequence

from mllama.demo.shapes import ANSWERS as OLD_ANSWERS
from mllama.demo.shapes import COLORS, SHAPES, draw_shape, random_background
from mllama.demo.shapes import QUESTIONS as OLD_QUESTIONS

SIDES = {"triangle": 3, "square": 4, "circle": 0}
QUESTIONS = ("How many sides does this shape have?", "How many sides?", "How many sides does it have?")
ANSWERS = {3: "It has 3 sides.", 4: "It has 4 sides.", 0: "It has no sides."}
_SIDE_WORDS = {"3": 3, "three": 3, "4": 4, "four": 4, "no": 0, "0": 0, "zero": 0, "none": 0}


def random_shape_image(rng: random.Random) -> tuple[Any, str, str]:
    """(PIL image, shape, colour): one shape in one colour, 64-70 px on either side, so the image
    processor makes a single tile (the demo model's training images ran up to 1200 px and 4 tiles;
    one tile keeps the example fast on a CPU)."""
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    width, height = rng.randint(64, 70), rng.randint(64, 70)
    image = draw_shape(shape, color, width=width, height=height, background=random_background(rng), rng=rng)
    return image, shape, color


def _old_question(rng: random.Random, shape: str, color: str) -> tuple[str, str]:
    """One of the demo's own questions, answered as the demo model was trained to answer it."""
    kind = rng.choice(("shape", "color"))
    answer = rng.choice(OLD_ANSWERS[kind]).format(shape=shape, color=color, Color=color.capitalize())
    return rng.choice(OLD_QUESTIONS[kind]), answer


def write_sides_dataset(out_dir: str | Path, *, n: int = 400, seed: int = 0, replay: float = 0.25) -> Path:
    """`n` images and out_dir/train.jsonl (one conversation per image); returns the JSONL path.

    A `replay` share of the lines asks the demo's old shape and colour questions instead, so the
    adapter learns the new question without unlearning the old ones."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        image, shape, color = random_shape_image(rng)
        name = f"images/{i:05d}.png"
        image.save(out / name)
        if rng.random() < replay:
            question, answer = _old_question(rng, shape, color)
        else:
            question, answer = rng.choice(QUESTIONS), ANSWERS[SIDES[shape]]
        lines.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": name}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]})
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
    answers = greedy_answers(model, processor, [d[0] for d in drawn], asked)
    return sum(parse_sides(a) == SIDES[d[1]] for a, d in zip(answers, drawn)) / n


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mllama.demo.sides", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=400, help="number of images / conversations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_sides_dataset(args.out_dir, n=args.n, seed=args.seed))


if __name__ == "__main__":
    main()
