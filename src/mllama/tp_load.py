"""Tensor-parallel set-up and loading: each rank reads only its slices of the checkpoint.

`init_distributed()` joins the process group torchrun describes (gloo on the CPU, NCCL on CUDA,
with a timeout on every collective). `load_tensor_parallel(cls, path)` builds the model on the meta
device, splits it there (mllama.tp), then reads from the safetensors files exactly the rows (a
contiguous byte range, mapped copy-on-write where the file can be mapped, as whole tensors are) or
the columns (rows streamed through a bounded buffer, only the columns kept) that this rank holds,
so no rank ever holds a full tensor of a split layer: peak memory per
rank is about its share of the weights plus the replicated parts (embeddings, norms, vision
embeddings) plus one bounded read buffer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mllama.host_memory import fresh_zeros
from mllama.hub import resolve_checkpoint_dir
from mllama.linear import apply_cpu_kernels
from mllama.quantize import QuantizationConfig
from mllama.safetensors_io import TensorInfo, _read_into
from mllama.tp import Shard, TensorSlice, TPInfo, shard_modules, shard_plan, tensor_slice, world_of
from mllama.weights import _mapped, finish_loading, prepare_model

DEFAULT_TIMEOUT_S = 300.0
_COLUMN_READ_BYTES = 16 << 20  # rows read at a time when a rank needs some columns of a tensor


def init_distributed(*, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Join the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) unless it is joined already; returns (world size, rank).

    backend: 'nccl' when CUDA is available, else 'gloo'. timeout_s bounds every collective, so a
    rank that died or took another path makes the others fail with an error instead of hanging.
    All ranks then share one random seed (drawn by rank 0), so sampling without an explicit seed
    picks the same tokens everywhere.
    """
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"cannot join a process group: {', '.join(missing)} not set; launch with "
                           "`torchrun --nproc-per-node N ...`")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    share_seed()
    return dist.get_world_size(), dist.get_rank()


def share_seed(group: dist.ProcessGroup | None = None) -> int:
    """Seed torch's global generator on every rank with one value drawn on rank 0; returns it."""
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    seed = torch.randint(0, 2**62, (1,), device=device)
    dist.broadcast(seed, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    torch.manual_seed(int(seed))
    return int(seed)


def read_slice(handle: Any, info: TensorInfo, piece: TensorSlice) -> torch.Tensor:
    """The part `piece` of the tensor `info` describes, read from an open file into a new CPU tensor
    of the checkpoint's dtype. Rows are one contiguous read; columns stream the rows through a
    buffer of at most _COLUMN_READ_BYTES (more if one row is larger) and keep only their columns."""
    rows, row_bytes = info.shape[0], info.row_bytes
    if piece.dim == 0:
        part = info.rows(piece.start, piece.stop)
        return _read_into(handle, part, fresh_zeros(part.shape, info.dtype))
    if piece.dim != 1 or len(info.shape) != 2:
        raise ValueError(f"cannot read slice {piece} of a tensor of shape {list(info.shape)}")
    out = torch.empty(rows, piece.stop - piece.start, dtype=info.dtype)
    step = max(1, _COLUMN_READ_BYTES // max(row_bytes, 1))
    buffer = torch.empty(min(step, rows) * row_bytes, dtype=torch.uint8)
    for first in range(0, rows, step):
        count = min(step, rows - first)
        part = info.rows(first, first + count)
        block = _read_into(handle, part, buffer[:part.nbytes]).view(info.dtype).view(count, info.shape[1])
        out[first:first + count] = block[:, piece.start:piece.stop]
    return out


def _slices(model: nn.Module, plan: Mapping[str, TensorInfo], shards: Mapping[str, Shard]) -> dict[str, TensorSlice]:
    """{in-memory tensor name: the slice of the checkpoint tensor this rank reads}."""
    out = {}
    for name, info in plan.items():
        path, _, attr = name.rpartition(".")
        shard = shards.get(path)
        if shard is None:
            continue
        piece = tensor_slice(shard, info.shape, model.get_submodule(path).in_features, name)
        if piece is not None:
            out[name] = piece
    return out


def _read_state(plan: Mapping[str, TensorInfo], slices: Mapping[str, TensorSlice], *, dtype: torch.dtype,
                device: torch.device, convert: Any) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    order = sorted(plan.items(), key=lambda item: (str(item[1].file), item[1].offset))
    maps: dict[Any, Any] = {}  # file -> its mapping (kept alive by the tensors viewing it)
    handle, current = None, None
    try:
        for name, info in order:
            if info.file != current:
                if handle is not None:
                    handle.close()
                handle, current = open(info.file, "rb", buffering=0), info.file
            piece = slices.get(name)
            # Whole tensors and row slices are views of the mapped file where it can be mapped (the
            # ranks then share the page cache's copy of the replicated parts; see mllama.weights).
            if piece is None:
                tensor = _mapped(maps, info)
                if tensor is None:
                    tensor = _read_into(handle, info, fresh_zeros(info.shape, info.dtype))
            else:
                tensor = _mapped(maps, info.rows(piece.start, piece.stop)) if piece.dim == 0 else None
                if tensor is None:
                    tensor = read_slice(handle, info, piece)
            target = dtype if info.dtype.is_floating_point else info.dtype
            tensor = tensor.to(device=device, dtype=target)
            parts = {name: tensor} if convert is None else convert(name, tensor)
            state.update((key, value.to(device)) for key, value in parts.items())
            del tensor
    finally:
        if handle is not None:
            handle.close()
    return state


def load_tensor_parallel(cls: type, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                         device: torch.device | str = "cpu", quantization: QuantizationConfig | str | None = None,
                         world_size: int | None = None, group: dist.ProcessGroup | None = None) -> Any:
    """Load MllamaForConditionalGeneration or MllamaForCausalLM split over the ranks of `group` (default:
    the whole world; join it first with init_distributed()). Every rank calls this with the same
    arguments and gets its part of the model (mllama.tp), read as slices from the checkpoint.

    dtype as in from_pretrained. device 'cuda' means this rank's GPU (cuda:LOCAL_RANK). quantization
    'int8' / 'int4' (or a QuantizationConfig) quantizes each slice as it is read; a checkpoint saved
    quantized is sliced as it is, giving exactly the weights of the unsplit quantized model. (Slices
    quantized on load differ slightly from the unsplit model's quantization: int8 row-parallel
    scales cover each rank's columns only.) world_size: the number of ranks the caller expects; a
    ValueError when the group has another size (e.g. torchrun started with the wrong --nproc-per-node).
    """
    world, rank = world_of(group)
    if world_size is not None and world_size != world:
        raise ValueError(f"tensor parallelism over {world_size} ranks was asked for, but the process group has "
                         f"{world} (torchrun --nproc-per-node must match)")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
    if isinstance(quantization, str):
        quantization = QuantizationConfig(mode=quantization)
    directory = resolve_checkpoint_dir(path)
    setup = prepare_model(cls, directory, dtype=dtype, quantization=quantization, who="load_tensor_parallel")
    model = setup.model
    if device.type == "cpu":
        apply_cpu_kernels(model)  # before splitting: row-parallel layers keep the kernel class as base
    shards, heads = shard_plan(model, world_size=world, rank=rank)
    slices = _slices(model, setup.plan, shards)
    shard_modules(model, shards, heads, group=group)
    state = _read_state(setup.plan, slices, dtype=setup.dtype, device=device, convert=setup.convert)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.tensor_parallel = TPInfo(world, rank, vocab_parallel=shards.get("lm_head", Shard("", 0, 0)).kind == "vocab")
    finish_loading(model, directory, dtype=setup.dtype, device=device)
    return model.eval().requires_grad_(False)  # inference only (see mllama.tp.tensor_parallel)
