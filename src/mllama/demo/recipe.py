"""How the shipped demo model is built: tokenizer, processor, tiny config, data, training, checkpoint.

The model is the real Llama 3.2-Vision architecture at a tiny size: 70-px tiles of 5 x 5 patches,
up to 4 tiles per image with every supported aspect ratio, local + gated global vision layers with
intermediate-layer taps, and a text decoder with tanh-gated cross-attention layers. Everything is
seeded, so `scripts/train_demo.py` reproduces the shipped files on the same torch build.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mllama.config import MllamaConfig
from mllama.demo.shapes import (COLORS, QUESTIONS, SHAPES, ShapeSample, blank_image, iter_samples, make_samples,
                                parse_answer)
from mllama.demo.vocab import train_demo_tokenizer
from mllama.image_processing import MllamaImageProcessor
from mllama.model import CausalLMOutput, MllamaForConditionalGeneration
from mllama.processor import MllamaProcessor
from mllama.tokenizer import MllamaTokenizer
from mllama.train import (Batch, TrainConfig, TrainResult, VQACollator, generation_config_for, greedy_decode,
                          init_for_training, prompt_batch, save_checkpoint, train)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_MODEL_DIR = ASSETS / "demo-model"
EXAMPLE_IMAGE = ASSETS / "example.png"

TILE_SIZE = 70
MAX_TILES = 4
# CLIP normalisation, as the real checkpoints use.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Seeds: training images, the held-out images evaluated during training, and the model's init.
# tests/test_demo.py draws its images from yet another seed.
TRAIN_SEED, EVAL_SEED, INIT_SEED = 1, 2, 3
DESCRIBE = "Describe the image."


def demo_config(tokenizer: MllamaTokenizer, *, tile_size: int = TILE_SIZE) -> MllamaConfig:
    """The tiny architecture; every token id comes from the tokenizer."""
    vocab = tokenizer.image_token_id  # <|image|> is the row just past the lm_head
    if vocab != len(tokenizer) - 1:
        raise ValueError("the demo tokenizer must have <|image|> as its last id")
    eos = generation_config_for(tokenizer)["eos_token_id"]
    return MllamaConfig.from_dict({
        "vision_config": {
            "hidden_size": 64, "attention_heads": 4, "intermediate_size": 256,
            "num_hidden_layers": 3, "num_global_layers": 1, "intermediate_layers_indices": [0, 2],
            "vision_output_dim": 64 * 3, "image_size": tile_size, "patch_size": 14,
            "max_num_tiles": MAX_TILES, "initializer_range": 0.02,
        },
        "text_config": {
            "vocab_size": vocab, "hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 256, "cross_attention_layers": [1, 3],
            "rope_theta": 500000.0, "max_position_embeddings": 2048, "initializer_range": 0.02,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id,
        },
        "image_token_index": vocab,
        "torch_dtype": "float32",
    })


def build_processor(directory: str | Path, *, tile_size: int = TILE_SIZE) -> MllamaProcessor:
    """Train the tokenizer into `directory` and pair it with an image processor for the demo's tiles."""
    tokenizer = train_demo_tokenizer(directory)
    image_processor = MllamaImageProcessor(size={"height": tile_size, "width": tile_size},
                                           max_image_tiles=MAX_TILES, image_mean=IMAGE_MEAN, image_std=IMAGE_STD,
                                           resample=2)
    return MllamaProcessor(image_processor, tokenizer)


def batch_pool(samples: Iterator[ShapeSample], collator: VQACollator, *, batches: int, batch_size: int
               ) -> tuple[list[Batch], list[torch.Tensor]]:
    """Collate `batches` batches once (image preprocessing costs about as much as a training step of
    this model), keeping no images; also returns each batch's (shape, colour) class labels."""
    colors = sorted(COLORS)
    pool, labels = [], []
    for _ in range(batches):
        rows = [next(samples) for _ in range(batch_size)]
        pool.append(collator(rows))
        labels.append(torch.tensor([[SHAPES.index(s.shape), colors.index(s.color)] for s in rows]))
    return pool, labels


def cycle(pool: Sequence[Batch], *, seed: int) -> Iterator[Batch]:
    """The pool's batches in a fresh seeded order every epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(pool)))
        rng.shuffle(order)
        for i in order:
            yield pool[i]


@dataclass
class Scores:
    both: float
    shape: float
    color: float
    n: int


def score(answers: Sequence[str], samples: Sequence[ShapeSample]) -> Scores:
    """Fraction of answers naming the right shape, the right colour, and both."""
    parsed = [parse_answer(a) for a in answers]
    shape = [p[0] == s.shape for p, s in zip(parsed, samples)]
    color = [p[1] == s.color for p, s in zip(parsed, samples)]
    n = max(1, len(samples))
    return Scores(both=sum(a and b for a, b in zip(shape, color)) / n, shape=sum(shape) / n,
                  color=sum(color) / n, n=len(samples))


def evaluate(model: MllamaForConditionalGeneration, processor: MllamaProcessor, samples: Sequence[ShapeSample], *,
             question: str = DESCRIBE, blank: bool = False, batch_size: int = 100,
             batches: list[Batch] | None = None) -> Scores:
    """Ask `question` about every sample's image (or its blank version) greedily and score the answers."""
    stops = generation_config_for(processor.tokenizer)["eos_token_id"]
    if batches is None:
        batches = eval_batches(processor, samples, question=question, blank=blank, batch_size=batch_size)
    answers = []
    for batch in batches:
        for row in greedy_decode(model, batch, stop_ids=stops, max_new_tokens=12):
            answers.append(processor.tokenizer.decode(row, skip_special_tokens=True))
    return score(answers, samples)


def eval_batches(processor: MllamaProcessor, samples: Sequence[ShapeSample], *, question: str = DESCRIBE,
                 blank: bool = False, batch_size: int = 100) -> list[Batch]:
    images = [blank_image(s) if blank else s.image for s in samples]
    return [prompt_batch(processor, images[i:i + batch_size], [question] * len(images[i:i + batch_size]))
            for i in range(0, len(images), batch_size)]


class VisionProbe(nn.Module):
    """Stage 1: the vision tower + a linear probe naming shape and colour from mean-pooled tile features.

    The real model's vision encoder was pretrained before the cross-attention layers were trained on
    top of it; this is the demo's small version of that step. The probe is thrown away afterwards.
    """

    def __init__(self, vision_model: nn.Module, *, output_dim: int) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.head = nn.Linear(output_dim, len(SHAPES) + len(COLORS))

    def forward(self, *, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor, labels: torch.Tensor) -> CausalLMOutput:
        features = self.vision_model.features(pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # (B, I, T, P, D)
        real = aspect_ratio_mask[:, :, :, None, None].to(features.dtype)
        pooled = (features * real).sum((1, 2, 3)) / (real.sum((1, 2, 3)) * features.shape[3])
        logits = self.head(pooled)
        shape_logits, color_logits = logits[:, :len(SHAPES)], logits[:, len(SHAPES):]
        loss = F.cross_entropy(shape_logits, labels[:, 0]) + F.cross_entropy(color_logits, labels[:, 1])
        return CausalLMOutput(logits=logits, loss=loss)


def probe_batches(pool: Sequence[Batch], labels: Sequence[torch.Tensor]) -> list[Batch]:
    """The pool's image inputs with their (shape, colour) class labels."""
    keys = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")
    return [{k: batch[k] for k in keys} | {"labels": y} for batch, y in zip(pool, labels)]


@dataclass
class Recipe:
    tile_size: int = TILE_SIZE
    vision_steps: int = 800
    vision_lr: float = 3e-3
    steps: int = 800
    batch_size: int = 32
    pool_batches: int = 250
    lr: float = 2e-3
    warmup_steps: int = 100
    eval_every: int = 200
    eval_samples: int = 100
    # Colour is learnt in a few hundred steps, shape takes far longer: ask about shape more often.
    kind_weights: tuple[tuple[str, float], ...] = (("shape", 0.35), ("describe", 0.45), ("color", 0.2))


def train_demo(out_dir: str | Path, *, recipe: Recipe | None = None, log: Callable[[str], None] = print
               ) -> tuple[MllamaForConditionalGeneration, MllamaProcessor, TrainResult]:
    """Build, train and save the demo model into `out_dir` (files of the same names are overwritten)."""
    recipe = recipe or Recipe()
    random.seed(TRAIN_SEED)
    torch.manual_seed(INIT_SEED)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        processor = build_processor(tmp, tile_size=recipe.tile_size)
    config = demo_config(processor.tokenizer, tile_size=recipe.tile_size)
    model = MllamaForConditionalGeneration(config)
    init_for_training(model, seed=INIT_SEED)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

    collator = VQACollator(processor)
    samples = iter_samples(seed=TRAIN_SEED, kind_weights=dict(recipe.kind_weights))
    pool, labels = batch_pool(samples, collator, batches=recipe.pool_batches, batch_size=recipe.batch_size)
    probe_pool = probe_batches(pool, labels)
    held_out = make_samples(recipe.eval_samples, seed=EVAL_SEED, kind="describe")
    held_batches = eval_batches(processor, held_out)
    log(f"data: {len(pool)} batches of {recipe.batch_size} in {time.perf_counter() - start:.0f}s")

    def metrics(m: MllamaForConditionalGeneration) -> dict[str, Any]:
        s = evaluate(m, processor, held_out, batches=held_batches)
        return {"both": s.both, "shape": s.shape, "color": s.color}

    if recipe.vision_steps:
        log("stage 1: vision tower + shape/colour probe")
        probe = VisionProbe(model.model.vision_model, output_dim=config.vision_config.vision_output_dim)
        torch.manual_seed(INIT_SEED)
        nn.init.normal_(probe.head.weight, std=0.02)
        nn.init.zeros_(probe.head.bias)
        train(probe, cycle(probe_pool, seed=TRAIN_SEED),
              config=TrainConfig(steps=recipe.vision_steps, lr=recipe.vision_lr, warmup_steps=50,
                                 seed=INIT_SEED), log=log)
    del probe_pool
    log("stage 2: the whole model on questions and answers")
    config_train = TrainConfig(steps=recipe.steps, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
                               eval_every=recipe.eval_every, seed=INIT_SEED)
    result = train(model, cycle(pool, seed=TRAIN_SEED), config=config_train, evaluate=metrics, log=log)
    out = Path(out_dir)
    gen = generation_config_for(processor.tokenizer, do_sample=False, max_new_tokens=32)
    save_checkpoint(model, processor, out, generation_config=gen)
    result.seconds = time.perf_counter() - start
    log(f"saved {out} after {result.seconds:.0f}s")
    return model, processor, result


def example_image(path: str | Path = EXAMPLE_IMAGE) -> Path:
    """The README's example: a red triangle on a light background, 320 x 240 px."""
    from mllama.demo.shapes import draw_shape

    image = draw_shape("triangle", "red", width=320, height=240, background=(240, 238, 228),
                       rng=random.Random(7))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


__all__ = ["COLORS", "SHAPES", "QUESTIONS", "demo_config", "build_processor", "train_demo", "evaluate", "score",
           "Recipe", "example_image"]
