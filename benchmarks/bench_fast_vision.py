"""What `fast_vision` (skip padded tiles in the vision encoder; not exact) costs in accuracy and buys in speed.

    python benchmarks/bench_fast_vision.py [--samples 300]

1. The trained demo model (src/mllama/assets/demo-model): greedy answers to the describe question
   on synthetic shape images of 1-4 tiles, exact against fast: how many answers change, and the
   drift of the first-step logits (max |difference| over the logits' max |value|).
2. The random bf16 "bench" checkpoint (full width, see bench_checkpoints.py): time to first token
   for each skimage photo with fewer than 4 tiles, exact against fast, and the same logit drift.
   Random weights only bound the numbers: a trained model's drift is what case 1 measures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_checkpoints import ensure_checkpoint  # noqa: E402
from bench_phases import PHOTOS, load_model, prompt_inputs  # noqa: E402


def drift(exact: torch.Tensor, fast: torch.Tensor) -> float:
    """Per row max |exact - fast| / max |exact|, worst row."""
    exact, fast = exact.float(), fast.float()
    return float(((exact - fast).abs().amax(-1) / exact.abs().amax(-1)).max())


@torch.inference_mode()
def demo_model(samples: int) -> None:
    from mllama import AutoProcessor, MllamaForConditionalGeneration
    from mllama.demo.shapes import make_samples
    from mllama.train import prompt_batch

    model_dir = Path(__file__).resolve().parents[1] / "src" / "mllama" / "assets" / "demo-model"
    model = MllamaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    stops = model.generation_config.eos_token_ids
    items = make_samples(samples, seed=1234)
    changed = total = 0
    worst = 0.0
    by_tiles: dict[int, list[int]] = {}
    for start in range(0, len(items), 100):
        chunk = items[start:start + 100]
        batch = prompt_batch(processor, [s.image for s in chunk], ["What is in the image?"] * len(chunk))
        kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=stops[0],
                      return_dict_in_generate=True)
        exact = model.generate(**batch, **kwargs)
        fast = model.generate(**batch, **kwargs, fast_vision=True)
        worst = max(worst, drift(exact.logits[0], fast.logits[0]))
        tiles = batch["aspect_ratio_mask"].sum((1, 2)).tolist()
        for row in range(len(chunk)):
            same = torch.equal(exact.sequences[row], fast.sequences[row])
            changed += not same
            total += 1
            by_tiles.setdefault(int(tiles[row]), [0, 0])
            by_tiles[int(tiles[row])][0] += not same
            by_tiles[int(tiles[row])][1] += 1
    print(f"demo model: {changed}/{total} greedy answers differ; worst first-step logit drift {worst:.4f}")
    for n in sorted(by_tiles):
        print(f"  {n} tile(s): {by_tiles[n][0]}/{by_tiles[n][1]} answers differ")


@torch.inference_mode()
def bench_model() -> None:
    checkpoint = str(ensure_checkpoint("bench"))
    model = load_model("ours", checkpoint)
    for name in PHOTOS:
        inputs = prompt_inputs(checkpoint, text_tokens=64, photo_name=name)
        tiles = int(inputs["aspect_ratio_mask"].sum())
        if tiles == inputs["aspect_ratio_mask"].shape[-1]:
            continue
        results = {}
        for fast in (False, True):
            start = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                 fast_vision=fast)
            results[fast] = (time.perf_counter() - start, out.logits[0])
        (t_exact, exact), (t_fast, fast) = results[False], results[True]
        print(f"bench model, {name} ({tiles} tile(s)): time to first token exact {t_exact:.1f} s, fast {t_fast:.1f} s "
              f"({t_exact / t_fast:.2f}x); logit drift {drift(exact, fast):.4f}; "
              f"same top token: {bool(exact.argmax() == fast.argmax())}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--skip-bench-model", action="store_true")
    args = parser.parse_args()
    demo_model(args.samples)
    if not args.skip_bench_model:
        bench_model()


if __name__ == "__main__":
    main()
