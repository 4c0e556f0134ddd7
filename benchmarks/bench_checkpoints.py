"""The random checkpoints `bench.py` measures, written once under benchmarks/_work/.

"bench": full-width, reduced-depth Llama 3.2-Vision (about 2.2B parameters, 4.4 GB in bfloat16):
the per-layer cost of the 11B model with 10 vision and 4 text layers.
"tiny": a few-kB model whose generate is bound by per-step overhead, not by arithmetic.

Both are written by mllama (transformers loads them too); every parameter is random and non-zero,
gates included, except where the published checkpoints hold zeros by construction: the tile tables'
rows for the tile slots an aspect ratio leaves empty (`zero_empty_tile_slots`, tests/tiny.py). "bench" also gets the real Llama 3 tokenizer and the published image-processor
settings, so it can be served (bench_serve.py --model). No eos_token_id, so greedy decoding always runs for max_new_tokens.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from mllama import MllamaConfig, MllamaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import zero_empty_tile_slots  # noqa: E402  (re-exported for bench_11b)

WORK = Path(__file__).resolve().parent / "_work"

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

CONFIGS = {
    "bench": {
        "vision_config": {"hidden_size": 1280, "attention_heads": 16, "intermediate_size": 5120,
                          "num_hidden_layers": 8, "num_global_layers": 2,
                          "intermediate_layers_indices": [1, 3, 5, 6, 7], "image_size": 560, "patch_size": 14,
                          "max_num_tiles": 4, "vision_output_dim": 7680},
        "text_config": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                        "intermediate_size": 14336, "num_hidden_layers": 4, "cross_attention_layers": [1],
                        "vocab_size": 128256, "rope_theta": 500000.0, "rope_scaling": ROPE_LLAMA3,
                        "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": None,
                        "pad_token_id": 128004},
        "image_token_index": 128256,
        "dtype": "bfloat16",
    },
    "tiny": {
        "vision_config": {"hidden_size": 32, "attention_heads": 2, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_global_layers": 1, "intermediate_layers_indices": [0, 1],
                          "image_size": 28, "patch_size": 14, "max_num_tiles": 4, "vision_output_dim": 96},
        "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "intermediate_size": 128, "num_hidden_layers": 4, "cross_attention_layers": [1],
                        "vocab_size": 512, "rope_theta": 500000.0, "rope_scaling": ROPE_LLAMA3,
                        "bos_token_id": 1, "eos_token_id": None, "pad_token_id": 0},
        "image_token_index": 512,
        "dtype": "float32",
    },
}


# Written beside the config in the stamp: checkpoints written before the tile tables had their empty
# slots zeroed are rewritten.
LAYOUT_VERSION = 2
def checkpoint_dir(name: str) -> Path:
    return WORK / f"{name}-checkpoint"


def _randomize(model: torch.nn.Module, *, dtype: torch.dtype, seed: int, device: str = "cpu") -> None:
    """Weights ~ N(0, 0.02); norm scales ~ 1; every gate 0.3..0.8 (zero gates would hide paths).
    Drawn on `device` (other values than the CPU's, but much faster on a GPU), kept on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for key, p in list(module._parameters.items()):
            if p is None:
                continue
            name = f"{module_name}.{key}"
            data = torch.empty(p.shape, dtype=dtype, device=device)
            if "gate" in name and p.numel() == 1:
                data.fill_(0.3 + 0.5 * torch.rand(1, generator=gen, device=device).item())
            elif "norm" in name and name.endswith("weight"):
                data.copy_(1 + 0.05 * torch.randn(p.shape, generator=gen, device=device))
            else:
                data.normal_(0, 0.02, generator=gen)
            module._parameters[key] = torch.nn.Parameter(data.cpu(), requires_grad=False)


def _write_processor_files(directory: Path, *, tile: int) -> None:
    """The real Llama 3 tokenizer (Meta's tokenizer.model as llama-models ships it) with the Instruct
    chat template, and the published preprocessor settings, so prompts and images can be served."""
    import llama_models

    from mllama.image_processing import MllamaImageProcessor
    from mllama.meta_layout import CLIP_MEAN, CLIP_STD
    from mllama.tokenizer_convert import convert_tiktoken_tokenizer

    convert_tiktoken_tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", directory)
    MllamaImageProcessor(size={"height": tile, "width": tile}, resample=2, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                         max_image_tiles=4).save_pretrained(directory)


def ensure_checkpoint(name: str, *, processor_files: bool = True, init_device: str = "cpu") -> Path:
    """Write the checkpoint unless an identical one is already there; returns its directory.
    processor_files=False leaves out the tokenizer and image-processor files (they need llama-models,
    which a GPU machine may lack; the model's own benchmarks do not read them). init_device: where
    the random weights are drawn when the checkpoint has to be written."""
    directory = checkpoint_dir(name)
    spec = dict(CONFIGS[name])
    dtype = getattr(torch, spec.pop("dtype"))
    stamp = directory / "bench_spec.json"
    want = {**CONFIGS[name], "layout_version": LAYOUT_VERSION}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        if processor_files and name == "bench" and not (directory / "tokenizer.json").is_file():  # an older version
            _write_processor_files(directory, tile=spec["vision_config"]["image_size"])
        return directory
    start = time.perf_counter()
    config = MllamaConfig.from_dict(spec)
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    _randomize(model, dtype=dtype, seed=0, device=init_device)
    for key, p in model.named_parameters():
        zero_empty_tile_slots(key, p.data, config.vision_config)
    for module in model.modules():  # non-persistent buffers (RoPE inverse frequencies) off the meta device
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[key] = torch.empty(buf.shape, dtype=buf.dtype)
    model.save_pretrained(directory, max_shard_size="2GB")
    if name == "bench" and processor_files:
        _write_processor_files(directory, tile=spec["vision_config"]["image_size"])
    stamp.write_text(json.dumps(want))
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {name} checkpoint: {params / 1e9:.3f}B parameters in {time.perf_counter() - start:.0f} s "
          f"-> {directory}", flush=True)
    return directory
