"""Synthetic visual question answering: one filled shape in one colour on a light background.

Every sample is drawn from a `random.Random`, so a seed fixes the whole data set. Image sizes run
from 64 to 1200 px on either side with aspect ratios between 1:4 and 4:1, so the image processor's
tiling (1 to 4 tiles, every supported aspect ratio) is exercised.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Iterator

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 25),
    "purple": (130, 45, 165),
    "orange": (245, 130, 25),
}
KINDS: tuple[str, ...] = ("shape", "color", "describe")
MIN_SIDE, MAX_SIDE = 64, 1200
MAX_ASPECT = 4.0

QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("What shape is this?", "What shape is in the image?", "Which shape do you see?",
              "What is the shape in this picture?"),
    "color": ("What color is the shape?", "What colour is the shape?", "Which color is it?",
              "What is the color of the shape?"),
    "describe": ("Describe the image.", "What is in this image?", "What do you see?",
                 "Describe what you see."),
}
ANSWERS: dict[str, tuple[str, ...]] = {
    "shape": ("It is a {shape}.", "A {shape}.", "The shape is a {shape}."),
    "color": ("The shape is {color}.", "It is {color}.", "{Color}."),
    "describe": ("{A} {color} {shape}.", "{A} {color} {shape} on a light background.", "I see {a} {color} {shape}."),
}


@dataclass(frozen=True)
class ShapeSample:
    """One drawn scene with a question about it. `shape`/`color` are None for a blank image."""

    image: Image.Image
    shape: str | None
    color: str | None
    background: tuple[int, int, int]
    kind: str
    question: str
    answer: str


def _random_size(rng: random.Random) -> tuple[int, int]:
    """(width, height), both in [64, 1200], aspect ratio log-uniform in [1/4, 4]."""
    lo, hi = math.log(MIN_SIDE), math.log(MAX_SIDE)
    while True:
        width = round(math.exp(rng.uniform(lo, hi)))
        height = round(width / math.exp(rng.uniform(-math.log(MAX_ASPECT), math.log(MAX_ASPECT))))
        if MIN_SIDE <= height <= MAX_SIDE:
            return width, height


def random_background(rng: random.Random) -> tuple[int, int, int]:
    """A light tint: every channel in [215, 255]."""
    return tuple(rng.randint(215, 255) for _ in range(3))  # type: ignore[return-value]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def draw_shape(shape: str, color: str, *, width: int, height: int, background: tuple[int, int, int],
               rng: random.Random) -> Image.Image:
    """A `width` x `height` RGB image with one filled `shape` of random size and position.

    The shape spans 30% to 85% of the shorter image side and lies fully inside the image.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; choose one of {tuple(COLORS)}")
    image = Image.new("RGB", (width, height), background)
    size = max(4, round(min(width, height) * rng.uniform(0.30, 0.85)))
    left = rng.randint(0, width - size)
    top = rng.randint(0, height - size)
    box = (left, top, left + size - 1, top + size - 1)
    fill = _jitter(COLORS[color], rng)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(left + (size - 1) / 2, top), (left, top + size - 1), (left + size - 1, top + size - 1)],
                     fill=fill)
    return image


def blank_image(sample: ShapeSample) -> Image.Image:
    """The same canvas without the shape: background only, same size. For chance-level tests."""
    return Image.new("RGB", sample.image.size, sample.background)


def _fill(template: str, shape: str, color: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return template.format(shape=shape, color=color, Color=color.capitalize(), a=article, A=article.capitalize())


def _answer(kind: str, shape: str, color: str, rng: random.Random) -> str:
    return _fill(rng.choice(ANSWERS[kind]), shape, color)


def random_sample(rng: random.Random, *, kind: str | None = None, shape: str | None = None,
                  color: str | None = None) -> ShapeSample:
    """Draw one scene and pick a question (of `kind`, or any kind) and a matching answer."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {KINDS}")
    kind = kind or rng.choice(KINDS)
    shape = shape or rng.choice(SHAPES)
    color = color or rng.choice(sorted(COLORS))
    width, height = _random_size(rng)
    background = random_background(rng)
    image = draw_shape(shape, color, width=width, height=height, background=background, rng=rng)
    return ShapeSample(image=image, shape=shape, color=color, background=background, kind=kind,
                       question=rng.choice(QUESTIONS[kind]), answer=_answer(kind, shape, color, rng))


def make_samples(n: int, *, seed: int, kind: str | None = None,
                 kind_weights: dict[str, float] | None = None) -> list[ShapeSample]:
    """`n` samples, fully determined by `seed`; question kinds uniform, or drawn with `kind_weights`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    stream = iter_samples(seed=seed, kind=kind, kind_weights=kind_weights)
    return [next(stream) for _ in range(n)]


def iter_samples(*, seed: int, kind: str | None = None,
                 kind_weights: dict[str, float] | None = None) -> Iterator[ShapeSample]:
    """An endless seeded stream of samples; its first n items are `make_samples(n, ...)`."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {KINDS}")
    if kind_weights is not None and (set(kind_weights) - set(KINDS) or min(kind_weights.values()) < 0):
        raise ValueError(f"kind_weights must map kinds among {KINDS} to non-negative weights")
    rng = random.Random(seed)
    names = sorted(kind_weights or {})
    weights = [kind_weights[k] for k in names] if kind_weights else []
    while True:
        if kind is not None or not kind_weights:
            yield random_sample(rng, kind=kind)
        else:
            yield random_sample(rng, kind=rng.choices(names, weights)[0])


def requestion(sample: ShapeSample, rng: random.Random, *, kind: str | None = None) -> ShapeSample:
    """The same image with a freshly drawn question and answer (cheap data augmentation)."""
    if sample.shape is None or sample.color is None:
        raise ValueError("a blank sample has no shape or colour to ask about")
    kind = kind or rng.choice(KINDS)
    return ShapeSample(image=sample.image, shape=sample.shape, color=sample.color, background=sample.background,
                       kind=kind, question=rng.choice(QUESTIONS[kind]),
                       answer=_answer(kind, sample.shape, sample.color, rng))


_WORD = re.compile(r"[a-z]+")


def parse_answer(text: str) -> tuple[str | None, str | None]:
    """(shape, colour) named in a free-text answer; None where none or more than one is named."""
    words = set(_WORD.findall(text.lower()))
    shapes = [s for s in SHAPES if s in words]
    colors = [c for c in COLORS if c in words]
    return (shapes[0] if len(shapes) == 1 else None, colors[0] if len(colors) == 1 else None)


def corpus() -> list[str]:
    """Every question and every answer the task can produce (tokenizer training text)."""
    lines = [q for qs in QUESTIONS.values() for q in qs]
    for kind, templates in ANSWERS.items():
        for template in templates:
            for shape in SHAPES:
                for color in COLORS:
                    lines.append(_fill(template, shape, color))
    return sorted(set(lines))
