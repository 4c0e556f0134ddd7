"""An image through the vision tower and the projector, by tile count: mllama (an image's equal
padded tiles run once, exact), mllama running every tile slot (what it did before), mllama with its
biased products through F.linear's addmm (what it did before mllama.linear.onednn_linear),
transformers, and `fast_vision` (real tiles only, not exact), interleaved in one process; median
seconds and the features' agreement.

    python benchmarks/bench_vision.py [--rounds 3] [--tiles 1 2 3 4]

On the random bf16 "bench" checkpoint (full-width vision layers, 8 + 2 of the real 32 + 8; the tile
tables' empty slots zero as published, bench_checkpoints.py). Images of a size the processor
tiles as 1 (400 x 300), 2 (800 x 400), 3 (1500 x 500) and 4 (1000 x 1000) tiles, random pixels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_checkpoints import ensure_checkpoint  # noqa: E402
from bench_phases import load_model  # noqa: E402
from tiny import tap_layer_inputs  # noqa: E402

SIZES = {1: (400, 300), 2: (800, 400), 3: (1500, 500), 4: (1000, 1000)}


def image_inputs(checkpoint: str, tiles: int) -> dict[str, torch.Tensor]:
    from mllama.image_processing import MllamaImageProcessor

    processor = MllamaImageProcessor.from_pretrained(checkpoint)
    rng = np.random.default_rng(tiles)
    w, h = SIZES[tiles]
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = processor([[image]], return_tensors="pt")
    assert int(out["aspect_ratio_mask"].sum()) == tiles, (tiles, out["aspect_ratio_mask"])
    return {k: out[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}


@contextmanager
def addmm_bias():
    """mllama with its biased bf16 products (vision MLP, projector) through F.linear's addmm."""
    import mllama.linear as linear

    saved = linear.use_onednn_bias
    linear.use_onednn_bias = lambda *args: False
    try:
        yield
    finally:
        linear.use_onednn_bias = saved


@contextmanager
def every_tile_slot():
    """mllama as before the shared padded tile: no two padded tiles count as equal."""
    import mllama.vision as vision

    saved = vision._equal_tiles
    vision._equal_tiles = lambda x: False
    try:
        yield
    finally:
        vision._equal_tiles = saved


def encode(model, inputs: dict[str, torch.Tensor], **options) -> torch.Tensor:
    """Vision tower + projector of one image: (tiles * patches, text hidden) for its real tiles."""
    mm = model.model
    dtype = mm.vision_model.patch_embedding.weight.dtype
    pixels = inputs["pixel_values"].to(dtype)
    out = mm.vision_model(pixel_values=pixels, aspect_ratio_ids=inputs["aspect_ratio_ids"],
                          aspect_ratio_mask=inputs["aspect_ratio_mask"], **options)
    features = out[0] if isinstance(out, tuple) else out.last_hidden_state
    real = inputs["aspect_ratio_mask"][0, 0].bool()
    return mm.multi_modal_projector(features[0, 0][real].flatten(0, 1))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max())


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 3, 4])
    args = parser.parse_args()
    checkpoint = str(ensure_checkpoint("bench"))
    ours, theirs = load_model("ours", checkpoint), load_model("hf", checkpoint)
    tap_layer_inputs(theirs)  # Meta's taps (layer inputs), so that the features compare
    inputs = {n: image_inputs(checkpoint, n) for n in args.tiles}
    variants = {"mllama": lambda x: encode(ours, x), "transformers": lambda x: encode(theirs, x)}

    def all_slots(x):
        with every_tile_slot():
            return encode(ours, x)

    def with_addmm(x):
        with addmm_bias():
            return encode(ours, x)

    variants["mllama, every slot"] = all_slots
    variants["mllama, addmm bias"] = with_addmm
    variants["fast_vision"] = lambda x: encode(ours, x, skip_padded_tiles=True)  # real tiles only, not exact
    times: dict[tuple[str, int], list[float]] = {}
    results: dict[tuple[str, int], torch.Tensor] = {}
    for n in args.tiles:  # warm-up (kernel builds, first allocations)
        encode(ours, inputs[n])
        break
    for _ in range(args.rounds):
        for n in args.tiles:
            for name, fn in variants.items():
                if name in ("mllama, every slot", "fast_vision") and n >= 3:  # little or nothing padded
                    continue
                start = time.perf_counter()
                results[name, n] = fn(inputs[n])
                times.setdefault((name, n), []).append(time.perf_counter() - start)
    print(f"vision tower + projector, bench checkpoint (bf16), {args.rounds} interleaved rounds, median seconds")
    print("| tiles | mllama | mllama, every slot | mllama, addmm bias | transformers | fast_vision "
          "| mllama vs every slot | mllama vs addmm bias | mllama vs transformers | features vs transformers "
          "| vs every slot | vs addmm bias |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.tiles:
        med = {name: statistics.median(times[name, n]) for name in variants if (name, n) in times}
        slot = med.get("mllama, every slot")
        fast = med.get("fast_vision")
        addmm = med["mllama, addmm bias"]
        row = [str(n), f"{med['mllama']:.2f}", f"{slot:.2f}" if slot else "-", f"{addmm:.2f}",
               f"{med['transformers']:.2f}", f"{fast:.2f}" if fast else "-",
               f"{slot / med['mllama']:.2f}x" if slot else "-", f"{addmm / med['mllama']:.3f}x",
               f"{med['transformers'] / med['mllama']:.2f}x",
               f"{agreement(results['mllama', n], results['transformers', n]):.4f}",
               f"{agreement(results['mllama', n], results['mllama, every slot', n]):.4f}"
               if ("mllama, every slot", n) in results else "-",
               f"{agreement(results['mllama', n], results['mllama, addmm bias', n]):.4f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
