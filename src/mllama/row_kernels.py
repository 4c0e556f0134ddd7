"""RMSNorm and RoPE of bf16 rows on the CPU through csrc/scans.c, an MLP's gate and up with silu in
one call where its linears offer it (quantized ones: csrc/gemm_small.c), a decode step's attention
through mllama.decode_attention, and a decoder layer's one-token step (a decode step's whole stack of
layers) as one call of all of these (mllama.decode_layer), applied to a built model by swapping modules
(`apply_row_kernels`; linear.apply_cpu_kernels calls it).

The model's RMSNorm (layers.py) is eight torch ops and RoPE of a layer's q and k eighteen. In a decode
step each op comes right after a weight matrix has streamed through every cache, and then costs tens
of microseconds whatever its size; one C call does the same arithmetic (benchmarks/RESULTS.md). RoPE
gives torch's bits (elementwise, the same roundings). RMSNorm sums its squares in one fixed order for
every row count, so a batch's rows equal the same rows alone; torch's reduction may differ from it
in the last bit of a sum. The MLP's silu takes e^x of its own: a bf16 step from torch's where a silu
lies within a few float ulps of a bf16 rounding (none of 286,720 outputs measured, RESULTS.md).
"""

from __future__ import annotations

import torch
from torch import nn

from mllama import cpu_scans, decode_layer, decode_plan
from mllama.attention import TextCrossAttention, TextSelfAttention, grouped_attention
from mllama.cache import KVWindow
from mllama.decode_attention import decode_attention
from mllama.layers import RMSNorm, TextMLP
from mllama.text import CrossAttentionDecoderLayer, CrossInputs, MllamaTextModel, SelfAttentionDecoderLayer


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return cpu_scans.rms_norm_bf16(x, weight, eps)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu_scans.rope_bf16(q, k, cos, sin)


# the custom ops keep a compiled step's graph whole (the C calls run inside it)
_rms_norm_op = torch.library.custom_op("mllama::rms_norm_bf16", _rms_norm, mutates_args=())
_rope_op = torch.library.custom_op("mllama::rope_bf16", _rope, mutates_args=())


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@_rope_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k)


def _kernel_runs(*tensors: torch.Tensor) -> bool:
    """Whether bf16 CPU tensors, contiguous, outside autograd, and the kernels here."""
    grad = torch.is_grad_enabled()
    return (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
                and not (grad and t.requires_grad) for t in tensors)
            and cpu_scans.row_kernels_available())


class KernelRMSNorm(RMSNorm):
    """RMSNorm whose bf16 CPU rows (outside autograd) take cpu_scans.rms_norm_bf16 (the custom op
    mllama::rms_norm_bf16 under torch.compile); everything else RMSNorm.forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.shape[-1:] == weight.shape and x.numel() > 0 and _kernel_runs(x, weight):
            return (_rms_norm_op if torch.compiler.is_compiling() else _rms_norm)(x, weight, self.eps)
        return super().forward(x)


def _decode_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    out = decode_attention(q, k, v, mask)
    return out if out is not None else grouped_attention(q, k, v, mask)


# a compiled decode step's attention: the kernel inside the graph, torch's attention where it does not run
_decode_attend_op = torch.library.custom_op("mllama::decode_attention", _decode_attend, mutates_args=())


@_decode_attend_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return q.new_empty(q.shape)


class _KernelAttend:
    """A decode step's attention (one query token) through mllama.decode_attention where it applies
    (bf16 on an AVX-512 CPU; mllama::decode_attention under torch.compile, whose steps attend over the
    whole cache behind a mask). No hooks needed: it replaces no module call."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
               is_causal: bool = False) -> torch.Tensor:
        if q.shape[2] == 1:
            if not torch.compiler.is_compiling():
                out = decode_attention(q, k, v, mask)
                if out is not None:
                    return out
            elif q.dtype == torch.bfloat16 and q.device.type == "cpu":
                return _decode_attend_op(q, k, v, mask)  # which falls back where the kernel does not run
        return super().attend(q, k, v, mask, is_causal=is_causal)


class KernelTextSelfAttention(_KernelAttend, TextSelfAttention):
    """TextSelfAttention whose RoPE of bf16 CPU q and k (outside autograd) takes cpu_scans.rope_bf16
    (mllama::rope_bf16 under torch.compile): the same bits as apply_rotary; decode steps' attention
    through the decode attention kernel."""

    def rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q, k arrive as (B, H, S, D) views of the projections' (B, S, H, D) rows
        rows_q, rows_k = q.transpose(1, 2), k.transpose(1, 2)
        b, s, _, d = rows_q.shape
        if (cos.shape == sin.shape == (b, s, d) and rows_k.shape[:2] == (b, s) and rows_k.shape[3] == d
                and q.numel() > 0 and _kernel_runs(rows_q, rows_k, cos, sin)):
            rope = _rope_op if torch.compiler.is_compiling() else _rope
            q_out, k_out = rope(rows_q, rows_k, cos, sin)
            return q_out.transpose(1, 2), k_out.transpose(1, 2)
        return super().rotate(q, k, cos, sin)


class KernelTextMLP(TextMLP):
    """TextMLP whose gate and up take one call where gate_proj offers `silu_product(up_proj, x)` (a
    quantized linear's, for one bf16 row: mllama.quantize) and no hooks watch them; else TextMLP's."""

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        fused = getattr(self.gate_proj, "silu_product", None)
        if fused is not None and not decode_plan.runs_hooks((self.gate_proj, self.up_proj)):
            out = fused(self.up_proj, x)
            if out is not None:
                return out
        return super().gated(x)


class KernelTextCrossAttention(_KernelAttend, TextCrossAttention):
    """TextCrossAttention whose decode steps' attention to the vision tokens takes the decode attention kernel."""


class KernelSelfAttentionDecoderLayer(SelfAttentionDecoderLayer):
    """SelfAttentionDecoderLayer whose one-token decode steps, where its norms, attention and MLP are the
    kernel modules here, run as one C call (mllama.decode_layer.one_token: the modules' kernels and bits;
    one bf16 row on the CPU, a KV cache window, outside autograd and torch.compile, no forward hooks
    below it, every linear with a one-row kernel); else SelfAttentionDecoderLayer's forward."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, *,
                cache: KVWindow | None, layer_idx: int) -> torch.Tensor:
        if cache is not None and x.shape[:2] == (1, 1) and not torch.compiler.is_compiling():
            out = decode_layer.one_token(self, x, cos, sin, mask, cache, layer_idx, kernel_types=_LAYER_KERNELS)
            if out is not None:
                return out
        return super().forward(x, cos, sin, mask, cache=cache, layer_idx=layer_idx)


class KernelCrossAttentionDecoderLayer(CrossAttentionDecoderLayer):
    """CrossAttentionDecoderLayer whose one-token steps, where its norms, attention and MLP are the kernel
    modules here, run as one C call (mllama.decode_layer.cross_one_token: the modules' kernels and bits);
    else CrossAttentionDecoderLayer's forward."""

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                text_row_mask: torch.Tensor) -> torch.Tensor:
        if x.shape[:2] == (1, 1) and not torch.compiler.is_compiling():
            out = decode_layer.cross_one_token(self, x, kv, mask, text_row_mask, kernel_types=_CROSS_KERNELS)
            if out is not None:
                return out
        return super().forward(x, kv, mask, text_row_mask)


# a layer's self_attn, mlp, input_layernorm and post_attention_layernorm for its one-call decode step;
# a cross-attention layer's cross_attn, mlp, input_layernorm, post_attention_layernorm and q_norm
_LAYER_KERNELS = (KernelTextSelfAttention, KernelTextMLP, KernelRMSNorm, KernelRMSNorm)
_CROSS_KERNELS = (KernelTextCrossAttention, KernelTextMLP, KernelRMSNorm, KernelRMSNorm, KernelRMSNorm)


class KernelTextModel(MllamaTextModel):
    """MllamaTextModel whose one-token decode steps run every layer in one C call
    (mllama.decode_layer.stack_one_token; the cross-attention layers too when the step sees an image)
    where each is a Kernel*DecoderLayer whose one-call step applies; else its layers one by one."""

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                   cross: CrossInputs | None, cache: KVWindow | None) -> torch.Tensor:
        if cache is not None and x.shape[:2] == (1, 1) and not torch.compiler.is_compiling():
            out = decode_layer.stack_one_token(self.layers, x, cos, sin, mask, cache, cross,
                                               layer_type=KernelSelfAttentionDecoderLayer,
                                               cross_type=KernelCrossAttentionDecoderLayer,
                                               kernel_types=_LAYER_KERNELS, cross_kernel_types=_CROSS_KERNELS)
            if out is not None:
                return out
        return super().run_layers(x, cos, sin, mask, cross, cache)


_SWAPS = {RMSNorm: KernelRMSNorm, TextSelfAttention: KernelTextSelfAttention, TextMLP: KernelTextMLP,
          TextCrossAttention: KernelTextCrossAttention, SelfAttentionDecoderLayer: KernelSelfAttentionDecoderLayer,
          CrossAttentionDecoderLayer: KernelCrossAttentionDecoderLayer, MllamaTextModel: KernelTextModel}


def apply_row_kernels(model: nn.Module) -> nn.Module:
    """Give every plain RMSNorm, TextSelfAttention, TextCrossAttention, TextMLP, SelfAttentionDecoderLayer,
    CrossAttentionDecoderLayer and MllamaTextModel of `model` its kernel class, in place (the same modules,
    parameters and hooks: only forward / rotate / attend / gated / run_layers differ); returns `model`.
    Harmless where the kernels do not run (float32, GPU, training): the base classes' code then."""
    for module in model.modules():
        swapped = _SWAPS.get(type(module))
        if swapped is not None:
            module.__class__ = swapped
    return model
