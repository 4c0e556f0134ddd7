"""Checkpoint loading: Llama 3.2-Vision weights in the safetensors layouts met in the wild (writing:
mllama.saving; the tensor names: mllama.checkpoint_keys).

Loading builds the model on the meta device and fills every parameter straight from the files, so
the weights are held in memory once; a weight quantized on load is read a chunk of rows at a time,
so its float form is never held whole. A tensor kept as stored (CPU, same dtype) is mapped from its
file, copy-on-write (`mmap=True`, the default): its pages are the page cache's, so loading costs no
copy (and, on a VM, none of the first-touch faults of fresh memory), and writing to it copies only
the pages written. mllama's own saves put files in place by rename, so saving the model back into
the directory it came from is safe; a program that rewrites the checkpoint files in place while a
model is mapped from them changes its weights or crashes it (SIGBUS), as with transformers' mapped
loads. `mmap=False` reads into memory the process owns instead.
"""

from __future__ import annotations

import mmap as _mmap
import os
from dataclasses import dataclass
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mllama.checkpoint_keys import map_checkpoint_key
from mllama.config import CONFIG_NAME, GENERATION_CONFIG_NAME, MllamaConfig, MllamaTextConfig
from mllama.hf_surface import override_config
from mllama.host_memory import fresh_zeros, trim_heap
from mllama.hub import resolve_checkpoint_dir
from mllama.int4_rows import pack_loaded
from mllama.layers import rope_inv_freq
from mllama.linear import apply_cpu_kernels
from mllama.quantize import QuantizationConfig, prepare_for_loading
# The error classes are re-exported: callers catch them as mllama.weights.CheckpointError etc.
from mllama.safetensors_io import (CheckpointError, CheckpointMismatchError, CorruptCheckpointError,  # noqa: F401
                                   MissingShardError, TensorInfo, WrongModelTypeError, _load_json, _read_into,
                                   checkpoint_tensors)

PROGRESS_MIN_BYTES = 1 << 30


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.bfloat16, 'bfloat16', 'torch.bfloat16', 'bf16', 'fp32', ... -> a floating torch dtype."""
    if isinstance(dtype, torch.dtype):
        result = dtype
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}.get(name, name)
        result = getattr(torch, name, None)
        if not isinstance(result, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16', 'float32' or 'auto'")
    else:
        raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")
    if not result.is_floating_point:
        raise ValueError(f"dtype must be a floating type, got {result}")
    return result


def resolve_dtype(dtype: torch.dtype | str | None, config: Mapping[str, Any],
                  tensors: Mapping[str, TensorInfo]) -> torch.dtype:
    """None or 'auto' (transformers 5.x's default): the config's dtype, else the checkpoint's own."""
    if dtype is not None and dtype != "auto":
        return parse_dtype(dtype)
    for source in (config, config.get("text_config") or {}):
        name = source.get("dtype") or source.get("torch_dtype")
        if name:
            return parse_dtype(name)
    for info in tensors.values():
        if info.dtype.is_floating_point:
            return info.dtype
    return torch.get_default_dtype()


def _read_config(directory: Path, *, text_only: bool) -> tuple[dict[str, Any], MllamaConfig | MllamaTextConfig]:
    file = directory / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}")
    raw = _load_json(file)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    model_type = raw.get("model_type", "mllama")
    try:
        if model_type == "mllama":
            return raw, MllamaConfig.from_dict(raw)
        if model_type == MllamaTextConfig.model_type and text_only:
            return raw, MllamaTextConfig.from_dict(raw)
    except ValueError as err:
        raise CheckpointError(f"{file}: {err}") from err
    if model_type == MllamaTextConfig.model_type:
        raise WrongModelTypeError(f"{file} is a text-only Mllama checkpoint ({model_type!r}); "
                                  "load it with MllamaForCausalLM")
    raise WrongModelTypeError(f"{file} has model_type {model_type!r}; expected 'mllama' (Llama 3.2-Vision)")


def _plan(model: nn.Module, tensors: Mapping[str, TensorInfo], *, text_only: bool,
          source: Path) -> dict[str, TensorInfo]:
    """{in-memory name: where to read it}, or one CheckpointMismatchError naming every problem."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    transient = {name for name, _ in model.named_buffers()} - set(expected)
    plan: dict[str, TensorInfo] = {}
    origin: dict[str, list[str]] = {}
    unexpected, mismatched = {}, {}
    for key, info in tensors.items():
        name, known = map_checkpoint_key(key, text_only=text_only)
        if known and name is None or name in transient:
            continue  # the vision side for a text-only model; recomputed buffers such as inv_freq
        if name not in expected:
            unexpected[key] = info.shape
            continue
        origin.setdefault(name, []).append(key)
        if info.shape != expected[name]:
            mismatched[name] = (info.shape, expected[name])
        plan[name] = info
    duplicated = {name: keys for name, keys in origin.items() if len(keys) > 1}
    missing = {name: shape for name, shape in expected.items() if name not in origin}
    if missing or unexpected or mismatched or duplicated:
        lines = [f"  missing: {n} {list(s)}" for n, s in missing.items()]
        lines += [f"  unexpected: {k} {list(s)}" for k, s in unexpected.items()]
        lines += [f"  wrong shape: {n}: checkpoint {list(c)}, model {list(m)}" for n, (c, m) in mismatched.items()]
        lines += [f"  duplicated: {n} from {keys}" for n, keys in duplicated.items()]
        shown = lines[:60] + ([f"  ... and {len(lines) - 60} more"] if len(lines) > 60 else [])
        raise CheckpointMismatchError(
            f"checkpoint {source} does not fit {type(model).__name__}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} with the wrong shape, "
            f"{len(duplicated)} duplicated\n" + "\n".join(shown),
            missing=missing, unexpected=unexpected, mismatched=mismatched, duplicated=duplicated)
    floating = {name for name, t in model.state_dict().items() if t.is_floating_point()}
    integral = [f"{name} ({info.dtype})" for name, info in plan.items()
                if name in floating and not info.dtype.is_floating_point]
    if integral:
        raise CorruptCheckpointError(f"checkpoint {source} stores floating-point weights with an integer dtype: "
                                     f"{', '.join(integral[:8])}{' ...' if len(integral) > 8 else ''}")
    return plan


ConvertHook = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


class _FileRows:
    """A 2-D checkpoint tensor read a slice of rows at a time (for a convert hook that `takes_rows`,
    see quantize.quantize_weight): one reused buffer, so a quantized load never holds the float
    weight whole (an lm_head is 1 GB in bf16). A slice is valid until the next one is read."""

    def __init__(self, handle: Any, info: TensorInfo, dtype: torch.dtype) -> None:
        self.handle, self.info, self.dtype = handle, info, dtype
        self.shape, self.device = torch.Size(info.shape), torch.device("cpu")
        self._buffer = torch.empty(0, dtype=torch.uint8)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("rows of a checkpoint tensor are read in order, step 1")
        part = self.info.rows(start, max(start, stop))
        if self._buffer.numel() < part.nbytes:
            self._buffer = torch.empty(part.nbytes, dtype=torch.uint8)
        raw = _read_into(self.handle, part, self._buffer[:part.nbytes]).view(self.info.dtype).view(part.shape)
        return raw if raw.dtype == self.dtype else raw.to(self.dtype)


TRIM_EVERY_BYTES = 32 * 2**20  # of converted tensors, between two trims of the C heap


def _mapped(maps: dict[Path, _mmap.mmap | None], info: TensorInfo) -> torch.Tensor | None:
    """The tensor as a copy-on-write view of its file, or None where its bytes cannot be viewed as
    its dtype (empty, or an offset that is not a multiple of the element size) or the file cannot be
    mapped (e.g. a strict overcommit policy refusing a private mapping of the whole shard)."""
    if info.nbytes == 0 or info.offset % info.dtype.itemsize:
        return None
    if info.file not in maps:
        try:
            with open(info.file, "rb") as file:  # the mapping outlives the descriptor
                maps[info.file] = _mmap.mmap(file.fileno(), 0, access=_mmap.ACCESS_COPY)
        except (OSError, ValueError):  # ValueError: an empty file
            maps[info.file] = None
    mapping = maps[info.file]
    if mapping is None:
        return None
    if info.offset + info.nbytes > len(mapping):
        raise CorruptCheckpointError(f"{info.file} ended early (was it modified while loading?)")
    numel = info.nbytes // info.dtype.itemsize
    return torch.frombuffer(mapping, dtype=info.dtype, count=numel, offset=info.offset).view(info.shape)


def _materialise(plan: Mapping[str, TensorInfo], *, dtype: torch.dtype, device: torch.device,
                 progress: bool | None, convert: ConvertHook | None = None,
                 map_files: bool = True) -> dict[str, torch.Tensor]:
    """Read every planned tensor. `convert` (the load-time transform's per-tensor hook) turns each
    tensor just read into the tensors the model holds instead, e.g. a float weight into its int4
    form, so the unconverted tensors never accumulate. map_files: tensors kept as stored are views
    of their files (see the module docstring)."""
    from tqdm.auto import tqdm

    def target_dtype(info: TensorInfo) -> torch.dtype:
        return dtype if info.dtype.is_floating_point else info.dtype

    total = sum(info.nbytes for info in plan.values())
    show = total >= PROGRESS_MIN_BYTES if progress is None else progress
    order = sorted(plan.items(), key=lambda item: (str(item[1].file), item[1].offset))  # sequential reads
    takes_rows = getattr(convert, "takes_rows", None)

    def by_rows(name: str, info: TensorInfo) -> bool:  # read a chunk of rows at a time (_FileRows)
        return device.type == "cpu" and len(info.shape) == 2 and info.shape[0] > 0 and bool(takes_rows) \
            and takes_rows(name)

    # Other tensors that must be converted (dtype or device) pass through one reused staging buffer,
    # so the transient copies neither add up nor fragment the heap; the rest is read in place.
    staged = [info.nbytes for name, info in plan.items()
              if not by_rows(name, info) and (device.type != "cpu" or target_dtype(info) != info.dtype)]
    staging = torch.empty(max(staged, default=0), dtype=torch.uint8,
                          pin_memory=device.type == "cuda" and torch.cuda.is_available())
    state: dict[str, torch.Tensor] = {}
    maps: dict[Path, _mmap.mmap | None] = {}  # kept alive by the tensors viewing them, not by this dict
    handle, current = None, None
    converted = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights", disable=not show) as bar:
        try:
            for name, info in order:
                if info.file != current:
                    if handle is not None:
                        handle.close()
                    handle, current = open(info.file, "rb", buffering=0), info.file
                if by_rows(name, info):
                    tensor = _FileRows(handle, info, target_dtype(info))
                elif device.type == "cpu" and target_dtype(info) == info.dtype:
                    tensor = _mapped(maps, info) if map_files else None
                    if tensor is None:
                        tensor = _read_into(handle, info, fresh_zeros(info.shape, info.dtype))
                else:
                    raw = _read_into(handle, info, staging[:info.nbytes]).view(info.dtype).view(info.shape)
                    tensor = raw.to(device=device, dtype=target_dtype(info), copy=True)
                if convert is None:
                    state[name] = tensor
                else:
                    state.update((key, value.to(device)) for key, value in convert(name, tensor).items())
                    converted += info.nbytes
                    if converted >= TRIM_EVERY_BYTES:  # conversion temporaries would pile up (host_memory.trim_heap)
                        trim_heap()
                        converted = 0
                del tensor
                bar.update(info.nbytes)
        finally:
            if handle is not None:
                handle.close()
    return state


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are not in checkpoints: recompute them from the config."""
    for name, buffer in list(model.named_buffers()):
        if not buffer.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr == "inv_freq":
            text_config = getattr(model.config, "text_config", model.config)
            setattr(owner, attr, rope_inv_freq(text_config).to(device))
        else:
            raise RuntimeError(f"no rule to rebuild the non-persistent buffer {name} after loading")


def _read_generation_config(directory: Path) -> Any:
    file = directory / GENERATION_CONFIG_NAME
    if not file.is_file():
        return None
    from mllama.config import GenerationConfig

    data = _load_json(file)
    try:
        return GenerationConfig.from_dict(data)
    except (ValueError, TypeError) as err:  # a wrong field type, named by check_field_types
        raise ValueError(f"{file}: {err}") from None


def _checkpoint_quantization(raw_config: dict[str, Any], config: Any, source: Path) -> QuantizationConfig | None:
    """The format of an already quantized checkpoint (config.json's quantization_config), or None.
    The entry is taken off the config object: the model's `quantization_config` is the one record."""
    data = raw_config.get("quantization_config")
    config.extra.pop("quantization_config", None)
    if data is None:
        return None
    try:
        found = QuantizationConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source / CONFIG_NAME}: quantization_config: {err}") from err
    if data.get("quant_method", "mllama") != "mllama":
        raise CheckpointError(f"{source / CONFIG_NAME}: weights quantized by {data['quant_method']!r} cannot be "
                              "read; load the bf16 checkpoint with quantization=... instead")
    return found


def load_pretrained(cls: type, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str = "cpu", revision: str | None = None,
                    progress: bool | None = None, quantization: QuantizationConfig | None = None,
                    config: Any = None, hub: Mapping[str, Any] | None = None, mmap: bool = True) -> Any:
    """Load MllamaForConditionalGeneration or MllamaForCausalLM from a directory or hub repo id.

    dtype: None or 'auto' as in transformers 5.x: the config's dtype (bfloat16 for the published
    models), else the checkpoint's; or an explicit torch dtype / name. MllamaForCausalLM reads only
    the text tensors of a full checkpoint. Everything is checked before any tensor data is read.
    progress: None shows a bar for checkpoints of 1 GiB and more.
    quantization: quantize the linears while reading (mllama.quantize; each weight is quantized as
    it is read, so the float model is never held whole). A checkpoint saved quantized loads as such.
    Plain linears get the CPU decode kernel (linear.apply_cpu_kernels); on the CPU, int4 linears of a bf16
    model move into blocks of 32 rows for their kernel (int4_rows.pack_loaded).
    config: a config (MllamaConfig, or anything with to_dict()) used instead of the checkpoint's
    config.json, as transformers' `config=`. hub: see resolve_checkpoint_dir. mmap: tensors kept
    as stored are mapped from their files, copy-on-write (see the module docstring); False reads them.
    """
    from mllama.checks import check_finite_parameters
    from mllama.devices import check_device

    device = check_device(device)  # before anything is read or allocated
    directory = resolve_checkpoint_dir(path, revision=revision, hub=hub)
    setup = prepare_model(cls, directory, dtype=dtype, quantization=quantization, config=config, who="load_pretrained")
    state = _materialise(setup.plan, dtype=setup.dtype, device=device, progress=progress, convert=setup.convert,
                         map_files=mmap)
    model = setup.model
    model.load_state_dict(state, strict=True, assign=True)
    check_finite_parameters(model, source=directory)
    apply_cpu_kernels(model)
    del state
    model = finish_loading(model, directory, dtype=setup.dtype, device=device)
    if device.type == "cpu":
        pack_loaded(model)
    return model


@dataclass
class LoadSetup:
    """A model built on the meta device with its quantized modules in place, and what to read into it."""

    model: Any
    plan: Any  # [(parameter name, checkpoint tensor)], see _plan
    convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor]] | None  # quantize-on-read hook
    dtype: torch.dtype


def prepare_model(cls: type, directory: Path, *, dtype: torch.dtype | str | None,
                  quantization: QuantizationConfig | None, config: Any = None, who: str) -> LoadSetup:
    """The load steps before any tensor data is read, shared by load_pretrained and the tensor-parallel
    loader (mllama.tp_load): read and check config.json (or `config`), pick the dtype, build on the
    meta device, swap in quantized modules, and plan which checkpoint tensor fills each parameter."""
    from mllama.model import MllamaForCausalLM, MllamaForConditionalGeneration

    if not (isinstance(cls, type) and issubclass(cls, (MllamaForConditionalGeneration, MllamaForCausalLM))):
        raise TypeError(f"{who} builds MllamaForConditionalGeneration or MllamaForCausalLM, got {cls!r}")
    text_only = issubclass(cls, MllamaForCausalLM)
    raw_config, model_config = _read_config(directory, text_only=text_only)
    if config is not None:
        raw_config, model_config = override_config(config, raw_config, text_only=text_only)
    tensors = checkpoint_tensors(directory)
    target_dtype = resolve_dtype(dtype, raw_config, tensors)
    stored = _checkpoint_quantization(raw_config, model_config, directory)
    if stored is not None and quantization is not None and quantization != stored:
        raise ValueError(f"{directory} is already quantized as {stored}; it cannot be loaded as {quantization}")
    with torch.device("meta"):
        model = cls(model_config)
        _fit_resized_embedding(model, tensors, text_only=text_only)
    convert = None
    if stored is not None:  # the checkpoint holds the quantized tensors: plan against them
        prepare_for_loading(model, stored, dtype=target_dtype)
        plan = _plan(model, tensors, text_only=text_only, source=directory)
    else:  # plan against the float layout, then swap in the quantized modules the hook fills
        plan = _plan(model, tensors, text_only=text_only, source=directory)
        if quantization is not None:
            convert = prepare_for_loading(model, quantization, dtype=target_dtype)
    return LoadSetup(model, plan, convert, target_dtype)


def finish_loading(model: Any, directory: Path, *, dtype: torch.dtype, device: torch.device) -> Any:
    """After the weights are in: non-persistent buffers, the config's dtype, generation_config."""
    _rebuild_buffers(model, device)
    if isinstance(model.config, MllamaConfig):
        model.config.torch_dtype = str(dtype).removeprefix("torch.")
    model.generation_config = _read_generation_config(directory)
    return model.eval()


def _fit_resized_embedding(model: nn.Module, tensors: Mapping[str, TensorInfo], *, text_only: bool) -> None:
    """A checkpoint saved by transformers after resize_token_embeddings holds vocab_size embedding
    rows, not vocab_size + 8: build the (meta) embedding to its size instead of refusing it."""
    text_model = getattr(model.model, "language_model", model.model)
    embed = text_model.embed_tokens
    vocab = text_model.config.vocab_size
    for key, info in tensors.items():
        name, _ = map_checkpoint_key(key, text_only=text_only)
        if name is None or not name.endswith("embed_tokens.weight") or len(info.shape) != 2:
            continue
        rows = info.shape[0]
        if vocab <= rows < embed.num_embeddings and info.shape[1] == embed.embedding_dim:
            text_model.embed_tokens = nn.Embedding(rows, embed.embedding_dim)
        return
