"""`mllama convert-meta`: Meta's original checkpoints (consolidated.NN.pth + params.json +
tokenizer.model) -> a complete HF-layout directory that mllama and transformers load.

Model-parallel shards are merged tensor by tensor along the dimension their fairscale layer splits
(the table and transforms are in meta_layout.py) and streamed into safetensors shards, so memory
stays near one output shard.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mllama.checkpoint_keys import to_checkpoint_key
from mllama.config import MllamaConfig
from mllama.meta_layout import (CLIP_MEAN, CLIP_STD, CONVERSION_TABLE, PARAMS_NAME, TRANSFORMS, MetaCheckpointError,
                                Rule, TransformShapes, cross_layer_count, hf_key, match_rule, meta_config, read_param)
from mllama.safetensors_io import ShardWriter
from mllama.saving import parse_size, write_model_config
from mllama.weights import parse_dtype

TOKENIZER_MODEL_NAME = "tokenizer.model"


# ---- merging and streaming ------------------------------------------------------------------------------------------
def _merged_shape(key: str, shapes: Sequence[Sequence[int]], split: int | None, files: Sequence[str]) -> tuple[int, ...]:
    first = tuple(shapes[0])
    for shape, file in zip(shapes[1:], files[1:]):
        shape = tuple(shape)
        other = [d for d in range(len(first)) if d != split]
        if len(shape) != len(first) or any(shape[d] != first[d] for d in other):
            raise MetaCheckpointError(f"{file}: {key!r} has shape {list(shape)}, {files[0]} has {list(first)}; "
                                      "the shards do not fit together")
    if split is None:
        return first
    return first[:split] + (sum(s[split] for s in shapes),) + first[split + 1:]


def _merge(key: str, pieces: Sequence[torch.Tensor], split: int | None, files: Sequence[str]) -> torch.Tensor:
    if len(pieces) == 1:
        return pieces[0]
    if split is None:
        for piece, file in zip(pieces[1:], files[1:]):
            if not torch.equal(piece, pieces[0]):
                raise MetaCheckpointError(f"{file}: {key!r} should be the same on every model-parallel rank "
                                          f"but differs from {files[0]}")
        return pieces[0]
    return torch.cat(list(pieces), dim=split)


def plan_conversion(shards: Sequence[Mapping[str, torch.Tensor]], params: Mapping[str, Any], *,
                    files: Sequence[str] | None = None, instruct: bool = True, image_size: int | None = None,
                    dtype: torch.dtype | str | None = None) -> tuple[MllamaConfig, Iterator[tuple[str, torch.Tensor]]]:
    """Check a Meta checkpoint whole, then return (config, stream of (HF hub-layout key, tensor)).

    Everything that can be checked without tensor data (keys, shapes, shard fit, head counts) is
    checked before the first tensor is produced; the stream merges and converts one tensor at a time.
    """
    if not shards:
        raise MetaCheckpointError("no consolidated.*.pth shards")
    files = list(files) if files is not None else [f"shard {i}" for i in range(len(shards))]
    for file, shard in zip(files, shards):
        missing = sorted(set(shards[0]) - set(shard))
        extra = sorted(set(shard) - set(shards[0]))
        if missing or extra:
            raise MetaCheckpointError(f"{file} does not have the tensors of {files[0]}: missing {missing[:5]}, "
                                      f"extra {extra[:5]}")
    mp = len(shards)
    n_heads = read_param(params, "n_heads", int)
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if n_heads % mp or n_kv_heads % mp:
        raise MetaCheckpointError(f"{mp} model-parallel shards do not divide the {n_heads} heads / {n_kv_heads} "
                                  "key-value heads of params.json")
    rules: dict[str, Rule] = {}
    for key in shards[0]:
        found = match_rule(key)
        if found is None:
            raise MetaCheckpointError(f"{files[0]}: unknown tensor {key!r}, not a Llama 3.2-Vision key")
        rules[key] = found[0]
    shapes = {key: _merged_shape(key, [s[key].shape for s in shards], rule.split, files) for key, rule in rules.items()}
    source_dtype = next(t.dtype for t in shards[0].values() if t.is_floating_point())
    target_dtype = source_dtype if dtype is None or dtype == "auto" else parse_dtype(dtype)
    config = meta_config(params, shapes, instruct=instruct, image_size=image_size, dtype=target_dtype)
    tc, vc = config.text_config, config.vision_config

    groups: dict[str, list[str]] = {}
    for key in sorted(rules, key=lambda k: CONVERSION_TABLE.index(rules[k])):
        groups.setdefault(hf_key(key, n_layers=params["n_layers"], n_cross=cross_layer_count(params)), []).append(key)
    from mllama.model import MllamaForConditionalGeneration

    with torch.device("meta"):
        expected = {to_checkpoint_key(k): tuple(t.shape)
                    for k, t in MllamaForConditionalGeneration(config).state_dict().items()}
    missing = [k for k in expected if k not in groups]
    unexpected = [k for k in groups if k not in expected]
    if missing or unexpected:
        raise MetaCheckpointError(f"the checkpoint does not cover the model: HF tensors missing {missing[:8]}, "
                                  f"unexpected {unexpected[:8]}")
    transform_shapes = TransformShapes(n_heads=tc.num_attention_heads, n_kv_heads=tc.num_key_value_heads,
                               patch_size=vc.patch_size, grid=vc.image_size // vc.patch_size, max_num_tiles=vc.max_num_tiles)

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for target, want in expected.items():
            parts = []
            for key in groups[target]:
                rule = rules[key]
                tensor = _merge(key, [s[key] for s in shards], rule.split, files)
                if rule.transform is not None:
                    tensor = TRANSFORMS[rule.transform](tensor, transform_shapes)
                parts.append(tensor)
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
            if tuple(tensor.shape) != want:
                raise MetaCheckpointError(f"{groups[target]} -> {target}: shape {list(tensor.shape)}, "
                                          f"the model expects {list(want)}")
            yield target, tensor.to(target_dtype) if tensor.is_floating_point() else tensor

    return config, stream()


def convert_meta_state_dict(shards: Sequence[Mapping[str, torch.Tensor]], params: Mapping[str, Any], *,
                            instruct: bool = True, image_size: int | None = None,
                            dtype: torch.dtype | str | None = None) -> tuple[MllamaConfig, dict[str, torch.Tensor]]:
    """In memory: Meta state dicts (model-parallel shards in rank order) -> (config, HF hub-layout state dict)."""
    config, stream = plan_conversion(shards, params, instruct=instruct, image_size=image_size, dtype=dtype)
    return config, dict(stream)


# ---- directories ----------------------------------------------------------------------------------------------------
def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:  # weights_only: tensors and plain containers only, never arbitrary pickled objects
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file; name the file
        raise MetaCheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise MetaCheckpointError(f"{path} is not a state dict of named tensors")
    return state


def convert_meta_checkpoint(input_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                            instruct: bool | None = None, image_size: int | None = None,
                            dtype: torch.dtype | str | None = None, max_shard_size: int | str = "5GB",
                            log: Callable[[str], None] = print) -> Path:
    """Convert Meta's original checkpoint directory into a complete HF-layout directory.

    input_dir holds consolidated.NN.pth (one per model-parallel rank), params.json and, usually,
    tokenizer.model; without the latter only the model files are written. instruct: write the
    Instruct eos ids, generation defaults and chat template; None guesses from the directory name
    (Meta's Instruct directories end in "-Instruct"). image_size: tile size in pixels (default:
    params.json's vision_chunk_size); another size resizes the position tables. dtype: default keeps
    the checkpoint's. Shards are read memory-mapped and written as they fill, so memory stays near
    one output shard. Everything is written to a temporary directory beside output_dir and renamed
    at the end: a failure leaves nothing under output_dir.
    """
    source, target = Path(input_dir), Path(output_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a directory")
    params_file = source / PARAMS_NAME
    if not params_file.is_file():
        raise FileNotFoundError(f"{source} has no {PARAMS_NAME}; is it a Meta original checkpoint directory?")
    try:
        params = json.loads(params_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MetaCheckpointError(f"{params_file} is not valid JSON: {err}") from err
    if not isinstance(params, dict):
        raise MetaCheckpointError(f"{params_file} is not a JSON object")
    files = sorted(source.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{source} has no consolidated.*.pth weight files")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} already exists and is not empty; choose a new output directory")
    if instruct is None:
        instruct = "instruct" in source.resolve().name.lower()
        log(f"{source.name}: converting as {'an Instruct' if instruct else 'a base'} model "
            "(guessed from the directory name; pass instruct=True/False, or --instruct/--base, to choose)")
    limit = parse_size(max_shard_size)
    shards = [_load_shard(f) for f in files]
    config, stream = plan_conversion(shards, params, files=[str(f) for f in files], instruct=instruct,
                                     image_size=image_size, dtype=dtype)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        writer = ShardWriter(work, max_shard_size=limit)
        for name, tensor in stream:
            writer.add(name, tensor)
        written = writer.close()
        write_model_config(work, config, dtype=parse_dtype(config.torch_dtype),
                           architecture="MllamaForConditionalGeneration")
        _write_companions(work, config, source, instruct=instruct, log=log)
        if target.is_dir():
            target.rmdir()  # empty, checked above
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"wrote {target}: {len(written)} weight file(s), {writer.total_parameters:,} parameters, "
        f"{len(files)} model-parallel shard(s) merged")
    return target


def _write_companions(directory: Path, config: MllamaConfig, source: Path, *, instruct: bool,
                      log: Callable[[str], None]) -> None:
    """generation_config.json, preprocessor_config.json and (with tokenizer.model) the tokenizer files."""
    from mllama.config import GenerationConfig
    from mllama.image_processing import MllamaImageProcessor
    from mllama.tokenizer_convert import convert_tiktoken_tokenizer

    text, vision = config.text_config, config.vision_config
    generation = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
                  "pad_token_id": text.pad_token_id}
    if instruct:
        generation.update(do_sample=True, temperature=0.6, top_p=0.9)
    GenerationConfig.from_dict(generation).save_pretrained(directory)
    MllamaImageProcessor(size={"height": vision.image_size, "width": vision.image_size}, resample=2,
                         image_mean=CLIP_MEAN, image_std=CLIP_STD,
                         max_image_tiles=vision.max_num_tiles).save_pretrained(directory)
    model_file = source / TOKENIZER_MODEL_NAME
    if model_file.is_file():
        convert_tiktoken_tokenizer(model_file, directory, instruct=instruct)
    else:
        log(f"{source} has no {TOKENIZER_MODEL_NAME}: converted the model alone (no tokenizer files); "
            "copy them from another Llama 3.2-Vision directory")
