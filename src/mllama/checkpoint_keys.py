"""The checkpoint's tensor names: the one table that maps every Mllama checkpoint layout met in the wild
to the model's in-memory names and back. Loading (mllama.weights, which mllama.tp_load builds on), saving
(mllama.saving) and the Meta conversion (mllama.convert_meta) all name tensors through it."""

from __future__ import annotations

# The one name table. Each row: (checkpoint prefix, in-memory prefix in MllamaForConditionalGeneration,
# in-memory prefix in MllamaForCausalLM or None where the text-only model has no such part, so those
# tensors are skipped unread). Loading takes the first row whose checkpoint prefix matches; saving
# MllamaForConditionalGeneration takes the first row whose in-memory prefix matches, i.e. the hub
# layout. MllamaForCausalLM is saved under its in-memory names, as transformers does.
KEY_TABLE: list[tuple[str, str, str | None]] = [
    # As published on the hub (transformers 4.45-4.51) and as transformers 5.x saves again.
    ("language_model.lm_head.", "lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model.", "model."),
    ("vision_model.", "model.vision_model.", None),
    ("multi_modal_projector.", "model.multi_modal_projector.", None),
    # transformers >= 4.52 in-memory names, which some versions also wrote to disk.
    ("model.language_model.", "model.language_model.", "model."),
    ("model.vision_model.", "model.vision_model.", None),
    ("model.multi_modal_projector.", "model.multi_modal_projector.", None),
    ("lm_head.", "lm_head.", "lm_head."),
    # MllamaForCausalLM checkpoints: the text decoder alone.
    ("model.embed_tokens.", "model.language_model.embed_tokens.", "model.embed_tokens."),
    ("model.layers.", "model.language_model.layers.", "model.layers."),
    ("model.norm.", "model.language_model.norm.", "model.norm."),
]


def map_checkpoint_key(key: str, *, text_only: bool = False) -> tuple[str | None, bool]:
    """(in-memory name, known) for a checkpoint key.

    known is False when no row of KEY_TABLE has the key. For text_only (MllamaForCausalLM) the
    vision tower and projector are known but map to None: they are skipped, never read.
    """
    for disk, full, text in KEY_TABLE:
        if key.startswith(disk):
            prefix = text if text_only else full
            return (None if prefix is None else prefix + key[len(disk):]), True
    return None, False


def to_checkpoint_key(name: str, *, text_only: bool = False) -> str:
    """The on-disk name of an in-memory parameter name, in the layout transformers 5.x saves."""
    if text_only:
        return name
    for disk, full, _ in KEY_TABLE:
        if name.startswith(full):
            return disk + name[len(full):]
    raise ValueError(f"{name!r} is not a parameter name of MllamaForConditionalGeneration")
