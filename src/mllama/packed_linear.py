"""bf16 linears with their weights reordered once into oneDNN's blocked layout (a module swap).

torch's CPU linear hands a plain (out, in) bf16 weight to oneDNN, which reorders it into the layout
its GEMM kernels read on every call. Reordered once and kept so (`torch.ops.mkldnn._reorder_linear_weight`,
what inductor does to frozen weights), the same products run faster on a CPU with native bf16, and
with the bits of F.linear on the plain weight (benchmarks/RESULTS.md): the served decode steps (a
row per slot), prefill chunks and the vision tower alike. Not one row at a time: there mllama's own
decode kernel on the plain weight streams faster (1.5x on an AMD EPYC, Zen 4), so the CLI's
one-stream commands pack only the vision tower (`pack_linears(model, where=...)`).

`pack_linears(model)` swaps a model's bf16 CPU linears for `PackedLinear`, whose weight then exists
only in the blocked layout (no second copy); `unpack_linears` swaps them back. A PackedLinear keeps
the interface code relies on: `in_features`, `out_features`, `bias`, `weight` (a plain copy, made on
each read), its state-dict entries (plain, so checkpoints save and load unchanged), `.to()` within
bf16 on the CPU. It is for inference: it holds no weight parameter, so training, moving the model
to another device or dtype, quantizing and torch.compile need `unpack_linears` first (each says so).
"""

from __future__ import annotations

import copy
import functools
import platform
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mllama.linear import PackedWeights, cpu_has_native_bf16, swap_linears

PACK_ROWS = 16  # oneDNN's hint of the rows per call; any value from 1 to 1608 measured the same here
_UNPACK_FIRST = "call mllama.packed_linear.unpack_linears(model) first"


@functools.cache
def packing_available() -> bool:
    """Whether bf16 weights can be packed here: oneDNN in torch, an x86 CPU with native bf16 (AVX512_BF16
    or AMX; elsewhere oneDNN's bf16 path is emulated and slower than F.linear), and a probe product
    equal to F.linear's."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    if not cpu_has_native_bf16():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 64, generator=gen).bfloat16()
        x = torch.randn(3, 64, generator=gen).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return out.shape == (3, 48) and torch.equal(out, F.linear(x, weight))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)


def can_pack(weight: torch.Tensor) -> bool:
    """A real (not meta) bf16 CPU matrix, on a machine where packing_available()."""
    return (weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and not weight.is_meta and packing_available())


class PackedLinear(PackedWeights, nn.Module):
    """y = x @ W.T + b with W held in oneDNN's blocked layout (see the module docstring).

    bf16 CPU inputs outside autograd go through oneDNN's linear on the packed weight; a single row is
    computed as the first of two equal rows, so that every row of a batch gets the bits it gets
    alone (oneDNN takes another kernel for one row). Anything else (float32 inputs, gradients)
    falls back to F.linear on a plain copy of the weight."""

    unpack_hint = _UNPACK_FIRST

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None) -> None:
        super().__init__()
        if not can_pack(weight):
            raise ValueError(f"PackedLinear: needs a bf16 CPU weight matrix on a CPU with native bf16 and oneDNN; "
                             f"got {weight.dtype} {tuple(weight.shape)} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.packed = _pack(weight)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        """The linear's weight packed (a new tensor), its bias shared."""
        return cls(linear.weight, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """A plain (out, in) copy of the weight, made on each read; changing it changes nothing."""
        return self.packed.to_dense()

    def _fast(self, x: torch.Tensor) -> bool:
        return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() >= 1
                and x.shape[-1] == self.in_features and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad
                                                      or (self.bias is not None and self.bias.requires_grad))))

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (rows, in)
        rows = flat.shape[0]
        if rows == 1:
            flat = flat.expand(2, self.in_features)  # see the class docstring
        out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), self.packed, bias, "none", [], "")
        return out[:rows].view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast(x):
            return self._product(x, self.bias)
        if torch.compiler.is_compiling():
            raise RuntimeError(f"PackedLinear cannot be compiled; {_UNPACK_FIRST}")
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T without the bias."""
        return self._product(x, None) if self._fast(x) else F.linear(x, self.weight.to(x.dtype))

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[no-untyped-def]
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        else:
            weight = state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                                  f"the shape in current model is {(self.out_features, self.in_features)}.")
            else:
                self.packed = _pack(weight.to("cpu", torch.bfloat16))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in unexpected_keys:  # the weight is not a parameter here, but it was taken above
            unexpected_keys.remove(key)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        probe = fn(torch.empty(0, dtype=torch.bfloat16))
        if probe.dtype == torch.bfloat16 and probe.device.type == "cpu":  # .to() that changes nothing here
            return super()._apply(fn, recurse)
        weight = fn(self.weight)
        if not can_pack(weight):
            raise RuntimeError(f"a model with packed bf16 weights stays bf16 on the CPU ({weight.dtype} on "
                               f"{weight.device} asked); {_UNPACK_FIRST}")
        self.packed = _pack(weight)
        return super()._apply(fn, recurse)

    def __deepcopy__(self, memo: dict) -> "PackedLinear":
        new = PackedLinear(self.weight, copy.deepcopy(self.bias, memo))
        new.train(self.training)
        return new

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def refuse_packed(model: nn.Module, what: str) -> None:
    """Raise, naming `what` and the way out, where `model` holds weights in a kernel's own layout
    (linear.PackedWeights: bf16 packed for oneDNN, int4 in blocks of rows): transforms that rebuild
    linears from their weight parameters (quantization, LoRA, tensor parallelism) would skip them
    silently or read the wrong layout."""
    packed = [(name, module) for name, module in model.named_modules() if isinstance(module, PackedWeights)]
    if packed:
        name, module = packed[0]
        raise ValueError(f"{what} needs plain linears, but {len(packed)} hold packed weights (e.g. {name}, "
                         f"{type(module).__name__}); {module.unpack_hint}")


MEMORY_MARGIN = 2**30  # bytes left free beside the packed weights (see memory_for_packing)


def _kib_field(path: str, field: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            line = next((line for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None
    return int(line.split()[1]) * 1024 if line is not None else None


def memory_for_packing() -> int | None:
    """Bytes the packed weights may take: the machine's memory less this process's anonymous memory
    and MEMORY_MARGIN (None where /proc cannot tell). Packed weights are anonymous memory; the plain
    weights they replace are often pages of mapped checkpoint files, which the kernel may drop under
    pressure, so a model that only fits mapped must not be packed whole."""
    total, anon = _kib_field("/proc/meminfo", "MemTotal"), _kib_field("/proc/self/status", "RssAnon")
    return None if total is None or anon is None else total - anon - MEMORY_MARGIN


def pack_linears(model: nn.Module, *, where: Callable[[str], bool] | None = None) -> list[str]:
    """Swap every linear of `model` whose weight can be packed (bf16, on the CPU) for a PackedLinear,
    in place, one at a time (so the plain and the packed copy of only one weight exist together);
    with `where`, only those whose module name it accepts. Linears with other weights (quantized
    modules, float32) stay. Returns the names of the swapped linears; none where packing_available()
    is false. Raises MemoryError, before packing anything, where the packed weights would not fit
    beside this process's memory (memory_for_packing)."""
    if not packing_available():
        return []

    def chosen(name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and can_pack(module.weight) and (where is None or where(name))

    weights = {id(m.weight): m.weight for name, m in model.named_modules() if chosen(name, m)}
    need, room = sum(w.numel() * w.element_size() for w in weights.values()), memory_for_packing()
    if room is not None and need > room:
        raise MemoryError(f"packing {need / 2**30:.1f} GiB of bf16 weights needs that much memory of its own; "
                          f"about {max(room, 0) / 2**30:.1f} GiB are left beside this process")

    def replace(name: str, linear: nn.Module) -> nn.Module | None:
        return PackedLinear.from_linear(linear) if chosen(name, linear) else None

    return swap_linears(model, replace)


def unpack_linears(model: nn.Module) -> list[str]:
    """Swap every PackedLinear of `model` back for a plain linear (mllama.linear.DecodeLinear, the
    class from_pretrained gives) holding its weight as a parameter; returns their names."""
    from mllama.linear import DecodeLinear

    def replace(_: str, module: nn.Module) -> nn.Module:
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.weight)
        linear.bias = module.bias
        return DecodeLinear.from_linear(linear)

    return swap_linears(model, replace, kind=PackedLinear)
