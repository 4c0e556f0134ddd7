"""Tensor parallelism over torch.distributed, applied to a built model by swapping modules.

Every rank holds the same model code; `tensor_parallel(model)` replaces the linears of each block by
this rank's slice of them (the same module class, fewer rows or columns), Megatron style:

- attention (text self- and cross-attention, vision encoder): q/k/v column-parallel by heads, o_proj
  row-parallel. Key/value heads are split when the world size divides them; when it is a multiple
  of them, each rank keeps the one K/V head its query heads share (replicated over
  world / H_kv ranks). Cross-attention K/V are therefore computed per rank from its own heads.
- MLPs: gate/up (text) and fc1 (vision) column-parallel, down_proj / fc2 row-parallel.
- the multi-modal projector: row-parallel over its input features; its input (the vision tower's
  output) is replicated, so each rank takes its columns of it locally.
- lm_head: split by vocabulary (logits all-gathered) when the world size divides the vocabulary,
  replicated otherwise. Embeddings, norms, gates and the vision embeddings are replicated.

A row-parallel layer all-reduces its partial product (one all-reduce per attention block and per
MLP) and adds its bias once, afterwards. The modules' head counts (`num_heads`, `num_kv_heads`) are
updated, so the attention reshapes and the engine's KV cache size themselves per rank.

Sliced loading (each rank reads only its slices from the checkpoint) is in mllama.tp_load; it uses
`shard_plan` and `shard_modules` below on a model built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mllama.attention import _Projections
from mllama.int4_rows import unpack_int4_rows
from mllama.layers import TextMLP
from mllama.packed_linear import refuse_packed
from mllama.vision import MllamaVisionAttention, MllamaVisionMLP


class TensorSlice(NamedTuple):
    """The part of a full checkpoint tensor a rank holds: [start, stop) along `dim`."""

    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class Shard:
    """How one linear is split: 'col' keeps output rows [start, stop), 'row' input columns
    [start, stop) (all-reduced after), 'vocab' is a column split whose outputs are all-gathered.
    slice_input: a row-parallel layer whose input is replicated takes its columns itself."""

    kind: str
    start: int
    stop: int
    slice_input: bool = False


@dataclass(frozen=True)
class TPInfo:
    """What `model.tensor_parallel` records on a split model."""

    world_size: int
    rank: int
    vocab_parallel: bool


def _split(total: int, world: int, rank: int, what: str) -> tuple[int, int]:
    if total % world:
        raise ValueError(f"tensor parallelism over {world} ranks needs {what} divisible by {world}, got {total}")
    part = total // world
    return rank * part, (rank + 1) * part


def _kv_range(heads: int, kv_heads: int, world: int, rank: int, where: str) -> tuple[int, int]:
    """The key/value heads this rank needs: split when world divides them, else the single head its
    query heads share (needs kv_heads to divide world)."""
    if kv_heads % world == 0:
        return _split(kv_heads, world, rank, f"{where} key/value heads")
    if world % kv_heads == 0:
        first = rank * heads // world // (heads // kv_heads)
        return first, first + 1
    raise ValueError(f"{where}: {kv_heads} key/value heads can be neither split over nor replicated across "
                     f"{world} ranks (one must divide the other)")


def shard_plan(model: nn.Module, *, world_size: int, rank: int) -> tuple[dict[str, Shard], dict[str, dict[str, int]]]:
    """({linear's module path: Shard}, {attention module path: head counts to set}) for this rank.

    Raises ValueError naming the first layer whose heads or features do not divide by world_size.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    shards: dict[str, Shard] = {}
    heads: dict[str, dict[str, int]] = {}
    for path, module in model.named_modules():
        prefix = path + "." if path else ""
        if isinstance(module, _Projections):
            h, h_kv, d = module.num_heads, module.num_kv_heads, module.head_dim
            q0, q1 = _split(h, world_size, rank, f"{path}: attention heads")
            k0, k1 = _kv_range(h, h_kv, world_size, rank, path)
            shards[prefix + "q_proj"] = Shard("col", q0 * d, q1 * d)
            shards[prefix + "k_proj"] = Shard("col", k0 * d, k1 * d)
            shards[prefix + "v_proj"] = Shard("col", k0 * d, k1 * d)
            shards[prefix + "o_proj"] = Shard("row", q0 * d, q1 * d)
            heads[path] = {"num_heads": q1 - q0, "num_kv_heads": k1 - k0}
        elif isinstance(module, MllamaVisionAttention):
            d = module.head_dim
            q0, q1 = _split(module.num_heads, world_size, rank, f"{path}: vision attention heads")
            for name in ("q_proj", "k_proj", "v_proj"):
                shards[prefix + name] = Shard("col", q0 * d, q1 * d)
            shards[prefix + "o_proj"] = Shard("row", q0 * d, q1 * d)
            heads[path] = {"num_heads": q1 - q0}
        elif isinstance(module, TextMLP):
            a, b = _split(module.gate_proj.out_features, world_size, rank, f"{path}: intermediate_size")
            shards[prefix + "gate_proj"] = shards[prefix + "up_proj"] = Shard("col", a, b)
            shards[prefix + "down_proj"] = Shard("row", a, b)
        elif isinstance(module, MllamaVisionMLP):
            a, b = _split(module.fc1.out_features, world_size, rank, f"{path}: vision intermediate_size")
            shards[prefix + "fc1"] = Shard("col", a, b)
            shards[prefix + "fc2"] = Shard("row", a, b)
        elif path.endswith("multi_modal_projector"):
            a, b = _split(module.in_features, world_size, rank, f"{path}: vision_output_dim")
            shards[path] = Shard("row", a, b, slice_input=True)
        elif path == "lm_head" and module.out_features % world_size == 0:
            shards[path] = Shard("vocab", *_split(module.out_features, world_size, rank, "the vocabulary"))
    return shards, heads


def tensor_slice(shard: Shard, shape: tuple[int, ...], in_features: int, where: str) -> TensorSlice | None:
    """Which part of a full tensor of `shape` belonging to a linear split by `shard` a rank holds
    (None: all of it). Works for float weights and the quantized layouts of mllama.quantize:
    every tensor's dim 0 is the output; a 2-D tensor's dim 1 covers the input at a fixed ratio."""
    if shard.kind in ("col", "vocab"):
        return TensorSlice(0, shard.start, shard.stop) if len(shape) else None
    if len(shape) < 2:
        return None  # bias or per-row scale of a row-parallel layer: every rank holds it whole
    width = shape[1]
    if shard.start * width % in_features or shard.stop * width % in_features:
        raise ValueError(f"{where}: a tensor of shape {list(shape)} cannot be cut at input columns {shard.start}..{shard.stop} "
                         f"(int4 groups must not straddle ranks: in_features / world_size must be a multiple "
                         f"of the group size)")
    return TensorSlice(1, shard.start * width // in_features, shard.stop * width // in_features)


def _cut(tensor: torch.Tensor, piece: TensorSlice | None) -> torch.Tensor:
    if piece is None:
        return tensor
    out = tensor.narrow(piece.dim, piece.start, piece.stop - piece.start)
    return out if out.is_meta else out.contiguous().clone()  # drop the link to the full storage


class _RowParallel:
    """Mixed into a linear class: the local product is summed over ranks, then the bias added once."""

    tp_group: dist.ProcessGroup | None
    tp_input: tuple[int, int] | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_input is not None:
            x = x[..., self.tp_input[0]:self.tp_input[1]]
        out = self.product(x) if hasattr(self, "product") else F.linear(x, self.weight)
        dist.all_reduce(out, group=self.tp_group)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class _VocabParallel:
    """Mixed into a linear class split by output rows: the ranks' outputs are gathered along the last dim."""

    tp_group: dist.ProcessGroup | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = super().forward(x)  # type: ignore[misc]
        world = dist.get_world_size(self.tp_group)
        flat = local.reshape(-1, local.shape[-1]).contiguous()  # (rows, V / world)
        gathered = flat.new_empty(world * flat.shape[0], flat.shape[1])
        _all_gather(gathered, flat, group=self.tp_group)
        # (world, rows, V / world) -> (rows, world, V / world): rank r's columns follow rank r - 1's
        full = gathered.view(world, flat.shape[0], -1).transpose(0, 1).reshape(flat.shape[0], -1)
        return full.view(*local.shape[:-1], -1)


# all_gather_single replaces all_gather_into_tensor (deprecated) in newer torch releases.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_CLASSES: dict[tuple[type, type], type] = {}


def _parallel_class(mixin: type, base: type) -> type:
    """RowParallel<Base> / VocabParallel<Base>: one class per linear class (plain, bf16 kernel,
    int8, int4). It keeps the base's module name, so checks of which kernels a model uses still see it."""
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    if key not in _CLASSES:
        name = mixin.__name__.strip("_") + base.__name__
        _CLASSES[key] = type(name, (mixin, base), {"__module__": base.__module__})
    return _CLASSES[key]


def _shard_linear(module: nn.Module, shard: Shard, group: dist.ProcessGroup | None, where: str) -> nn.Module:
    """A copy of `module` holding only this rank's slice of every parameter and buffer."""
    in_full = module.in_features
    cls = type(module)
    if shard.kind == "row":
        cls = _parallel_class(_RowParallel, cls)
    elif shard.kind == "vocab":
        cls = _parallel_class(_VocabParallel, cls)
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    new._parameters, new._buffers, new._modules = {}, {}, dict(module._modules)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, param in module._parameters.items():
        if param is None:
            new._parameters[name] = None
            continue
        data = _cut(param.detach(), tensor_slice(shard, tuple(param.shape), in_full, f"{where}.{name}"))
        new._parameters[name] = nn.Parameter(data, requires_grad=param.requires_grad)
    for name, buf in module._buffers.items():
        new._buffers[name] = None if buf is None else _cut(
            buf, tensor_slice(shard, tuple(buf.shape), in_full, f"{where}.{name}"))
    size = shard.stop - shard.start
    if shard.kind == "row":
        new.in_features = size
        new.tp_input = (shard.start, shard.stop) if shard.slice_input else None
    else:
        new.out_features = size
    new.tp_group = group
    return new


def shard_modules(model: nn.Module, shards: dict[str, Shard], heads: dict[str, dict[str, int]], *,
                  group: dist.ProcessGroup | None) -> None:
    """Swap every linear named in `shards` for its slice, and set the head counts (in place). Works
    on a real model and on one built on the meta device."""
    for path, shard in shards.items():
        module = model.get_submodule(path)
        if not isinstance(module, nn.Module) or not hasattr(module, "in_features"):
            raise TypeError(f"{path} is a {type(module).__name__}, not a linear layer")
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, _shard_linear(module, shard, group, path))
    for path, counts in heads.items():
        module = model.get_submodule(path)
        for attr, value in counts.items():
            setattr(module, attr, value)


def world_of(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of `group` (None: the default group), or a clear error when torch.distributed
    is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tensor parallelism needs torch.distributed: launch with `torchrun --nproc-per-node N` "
                           "and call mllama.tp_load.init_distributed() (or torch.distributed.init_process_group)")
    return dist.get_world_size(group), dist.get_rank(group)


def tensor_parallel(model: nn.Module, *, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Split a built model across the ranks of `group` (default: the whole world), in place; returns it.

    Every rank must call this on the same model (same weights, e.g. loaded from the same checkpoint
    or seeded alike); each then keeps its slices (see the module docstring) and frees the rest once
    nothing else refers to the full tensors. Quantize first (mllama.quantize.quantize_model), then
    split: the int8 and int4 modules are sliced like plain linears (int4 needs in_features / world
    of every row-parallel layer to be a multiple of the group size). After this, every forward is a
    collective: all ranks must run the same forwards in the same order. Inference only: the
    collectives are not differentiated, so the parameters are frozen (requires_grad False).
    """
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError(f"the model is split already ({model.tensor_parallel})")
    unpack_int4_rows(model)  # the shards are cut from row-major weights
    refuse_packed(model, "tensor_parallel")
    world, rank = world_of(group)
    shards, heads = shard_plan(model, world_size=world, rank=rank)
    shard_modules(model, shards, heads, group=group)
    model.tensor_parallel = TPInfo(world, rank, vocab_parallel=shards.get("lm_head", Shard("", 0, 0)).kind == "vocab")
    return model.requires_grad_(False)
