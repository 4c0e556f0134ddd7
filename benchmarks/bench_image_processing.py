"""Images per second of the two Mllama image processors on scikit-image photos.

    python benchmarks/bench_image_processing.py [--threads N] [--repeats R]

Reports the best of R runs for one batch holding every photo (one image per sample), for the
560 px (instruct) and 448 px (11B base) configurations, as wall-clock and as CPU time of this
process (the steadier figure on a shared machine; with several threads it sums their time).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import skimage
import torch
from PIL import Image

from mllama.image_processing import MllamaImageProcessor, MllamaImageProcessorPil

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg"]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def best_times(fn, repeats: int) -> tuple[float, float]:
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(skimage.__file__).parent / "data"
    photos = [Image.open(data / name).convert("RGB") for name in PHOTOS]
    batch = [[photo] for photo in photos]
    print(f"{len(photos)} photos, torch threads {torch.get_num_threads()}")
    for config in ["preprocessor_config.json", "preprocessor_config-11b-base.json"]:
        source = REFERENCE / config if (REFERENCE / config).exists() else None
        pil = MllamaImageProcessorPil.from_pretrained(source) if source else MllamaImageProcessorPil(size=560)
        fast = MllamaImageProcessor.from_pretrained(source) if source else MllamaImageProcessor(size=560)
        fast(batch)  # warm-up
        n = len(photos)
        (wall_pil, cpu_pil), (wall_fast, cpu_fast) = (best_times(lambda: p(batch), args.repeats) for p in (pil, fast))
        print(f"{config} (tile {pil.size['height']}): wall PIL {n / wall_pil:6.1f} img/s, torch {n / wall_fast:6.1f} "
              f"img/s ({wall_pil / wall_fast:.2f}x); CPU time PIL {n / cpu_pil:6.1f} img/s, torch "
              f"{n / cpu_fast:6.1f} img/s ({cpu_pil / cpu_fast:.2f}x)")


if __name__ == "__main__":
    main()
