"""Peak RSS of MllamaForConditionalGeneration.from_pretrained against the bytes of the weights.

    python benchmarks/load_memory.py [--mb 400]

Writes a random checkpoint of about --mb megabytes (bfloat16, sharded), then loads it in fresh
subprocesses (so each peak is its own) as bfloat16 (dtype "auto"), as float32, and as bfloat16
quantized on load to int8 and int4 (mllama.quantize; the float weights are never held whole).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch

from mllama.config import MllamaConfig
from mllama.model import MllamaForConditionalGeneration

CHILD = """
import json, sys, time, torch
from mllama.model import MllamaForConditionalGeneration
from mllama.weights import load_pretrained

def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

cold = status('VmHWM')
# The first meta-device ops import torch's Python meta kernels (torch._decomp, torch._dynamo): a
# fixed one-off cost per process, measured separately from the weights.
with torch.device("meta"):
    torch.nn.Embedding(4, 4).weight.mul(2)
base = status('VmHWM')
start = time.perf_counter()
from mllama.quantize import QuantizationConfig
quantization = None if sys.argv[3] == "none" else QuantizationConfig(sys.argv[3])
model = load_pretrained(MllamaForConditionalGeneration, sys.argv[1], dtype=sys.argv[2], progress=False,
                        quantization=quantization)
seconds = time.perf_counter() - start
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"dtype": sys.argv[2] + ("" if quantization is None else " " + sys.argv[3]), "weights": weights,
                  "peak_over_baseline": status('VmHWM') - base,
                  "meta_imports": base - cold,
                  "rss_after_over_baseline": status('VmRSS') - base, "seconds": seconds}))
"""


def build(mb: int, directory: str) -> None:
    hidden = 1024
    layers = max(2, int((mb * 1e6 / 2 - 2 * 32000 * hidden) / (12.5 * hidden * hidden)))
    config = MllamaConfig.from_dict({
        "vision_config": {"hidden_size": 256, "attention_heads": 4, "num_hidden_layers": 4, "num_global_layers": 2,
                          "intermediate_size": 1024, "image_size": 112, "patch_size": 14,
                          "intermediate_layers_indices": [1, 3], "vision_output_dim": 768},
        "text_config": {"vocab_size": 32000, "hidden_size": hidden, "num_attention_heads": 8,
                        "num_key_value_heads": 2, "num_hidden_layers": layers, "intermediate_size": 4 * hidden,
                        "cross_attention_layers": [1]},
        "image_token_index": 32000,
    })
    model = MllamaForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="100MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        build(args.mb, directory)
        for dtype, quantization in (("auto", "none"), ("float32", "none"), ("auto", "int8"), ("auto", "int4")):
            out = subprocess.run([sys.executable, "-c", CHILD, directory, dtype, quantization], check=True,
                                 capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            mib = {k: round(v / 2**20, 1) for k, v in result.items() if k not in ("dtype", "seconds")}
            print(f"dtype={result['dtype']:10s} weights {mib['weights']} MiB, peak RSS over baseline "
                  f"{mib['peak_over_baseline']} MiB (x{result['peak_over_baseline'] / result['weights']:.3f}), "
                  f"RSS after {mib['rss_after_over_baseline']} MiB, {result['seconds']:.2f} s "
                  f"(+{mib['meta_imports']} MiB one-off for torch's meta-kernel imports)")


if __name__ == "__main__":
    main()
