"""Tiny random Mllama configs and model pairs (ours, transformers') shared by the tests."""

from __future__ import annotations

import torch

from mllama import MllamaConfig

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CONFIGS = {
    # 2 tiles, GQA 4:1, cross layers in the middle and at the end.
    "a": {"text_config": dict(vocab_size=96, hidden_size=64, num_hidden_layers=5, num_attention_heads=8,
                              num_key_value_heads=2, intermediate_size=96, cross_attention_layers=[1, 4],
                              rope_theta=10000.0, rope_scaling=ROPE_LLAMA3, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0),
          "vision_config": dict(hidden_size=32, num_hidden_layers=3, num_global_layers=1, attention_heads=2,
                                intermediate_size=48, vision_output_dim=96, image_size=28, patch_size=14,
                                intermediate_layers_indices=[0, 2], max_num_tiles=2,
                                supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
          "image_token_index": 96},
    # 4 tiles (default aspect ratios), no GQA, first layer is cross-attention, default rope.
    "b": {"text_config": dict(vocab_size=80, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=4, intermediate_size=64, cross_attention_layers=[0, 2],
                              rope_theta=500000.0, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0),
          "vision_config": dict(hidden_size=24, num_hidden_layers=4, num_global_layers=2, attention_heads=3,
                                intermediate_size=40, vision_output_dim=72, image_size=28, patch_size=7,
                                intermediate_layers_indices=[1, 3], max_num_tiles=4),
          "image_token_index": 80},
    # 3 tiles, GQA 3:1 (MQA-like), three cross layers, a single intermediate layer.
    "c": {"text_config": dict(vocab_size=64, hidden_size=48, num_hidden_layers=6, num_attention_heads=6,
                              num_key_value_heads=2, intermediate_size=72, cross_attention_layers=[2, 3, 5],
                              rope_theta=10000.0, rope_scaling=ROPE_LLAMA3, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0),
          "vision_config": dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                                intermediate_size=40, vision_output_dim=64, image_size=14, patch_size=7,
                                intermediate_layers_indices=[0], max_num_tiles=3,
                                supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [1, 3], [3, 1]]),
          "image_token_index": 65},
}


def tiny_config(name: str) -> MllamaConfig:
    return MllamaConfig.from_dict(CONFIGS[name])


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Every floating parameter random and non-zero: gates initialise to zero and would hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
            if "gate" in name:  # tanh(gate) well away from 0 and from saturation
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))


TILE_TABLES = ("pre_tile_positional_embedding.embedding.weight", "post_tile_positional_embedding.embedding.weight",
               "gated_positional_embedding.tile_embedding.weight")


def zero_empty_tile_slots(name: str, tensor: torch.Tensor, vision_config, *,
                          ratios: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """A tile table (one row per aspect-ratio id, a block per tile slot) with zeros where the published
    checkpoints hold them: the slots an aspect ratio leaves empty, and all of row 0 (the padding id).
    Meta's tables have no such slots and the conversion writes zeros. `ratios`: only those aspect
    ratios' rows (default: every one). Other tensors pass unchanged; the table is changed in place."""
    if not name.endswith(TILE_TABLES):
        return tensor
    with torch.no_grad():
        table = tensor.view(tensor.shape[0], vision_config.max_num_tiles, -1)
        table[0] = 0
        for i, (h, w) in enumerate(vision_config.supported_aspect_ratios, start=1):
            if ratios is None or (h, w) in ratios:
                table[i, h * w:] = 0
    return tensor


def publish_tile_tables_(model: torch.nn.Module, vision_config, *, ratios: list[tuple[int, int]] | None = None) -> None:
    """zero_empty_tile_slots on every tile table of `model`."""
    for name, p in model.named_parameters():
        zero_empty_tile_slots(name, p, vision_config, ratios=ratios)


def tap_layer_inputs(hf_model: torch.nn.Module) -> list:
    """Make transformers' vision encoders tap layer inputs, as Meta's reference does.

    transformers 5.x fills `hidden_states[i]` of the local encoder with the output of layer i, so
    `intermediate_layers_indices` picks states one layer late. Rewritten here to (input of layer 0,
    output of layer 0, ...), i.e. `hidden_states[i]` = what layer i receives. Idempotent: a model
    hooked already is left alone. Returns the new hook handles.
    """
    handles = []
    for module in hf_model.modules():
        if type(module).__name__ != "MllamaVisionModel" or getattr(module.transformer, "_taps_inputs", False):
            continue

        def inputs_as_states(encoder, args, kwargs, output):
            first = args[0] if args else kwargs["hidden_states"]
            output.hidden_states = (first,) + tuple(output.hidden_states[:-1])
            return output

        handle = module.transformer.register_forward_hook(inputs_as_states, with_kwargs=True)
        module.transformer._taps_inputs = True
        handles.append((module.transformer, handle))
    return handles


def untap(handles: list) -> None:
    for encoder, handle in handles:
        handle.remove()
        encoder._taps_inputs = False


def hf_pair(name: str, seed: int = 0):
    """(transformers model, our model) with identical random weights, float32, eval mode.

    The transformers model taps vision layer inputs (`tap_layer_inputs`), as Meta's reference does."""
    import transformers

    from mllama import MllamaForConditionalGeneration

    config = tiny_config(name)
    hf = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig.from_dict(config.to_dict()))
    randomize_(hf, seed)
    tap_layer_inputs(hf)
    ours = MllamaForConditionalGeneration(config)
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf.eval(), ours.eval()


def random_images(config: MllamaConfig, tiles: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-like image tensors for per-sample lists of tile counts, e.g. [[2, 1], [1]]."""
    vc = config.vision_config
    gen = torch.Generator().manual_seed(seed)
    b, n_img, t = len(tiles), max(1, max(len(x) for x in tiles)), vc.max_num_tiles
    pixel_values = torch.zeros(b, n_img, t, 3, vc.image_size, vc.image_size)
    ids = torch.zeros(b, n_img, dtype=torch.long)
    mask = torch.zeros(b, n_img, t, dtype=torch.long)
    ratio_id = {r[0] * r[1]: i + 1 for i, r in reversed(list(enumerate(vc.supported_aspect_ratios)))}
    for i, sample in enumerate(tiles):
        for j, n in enumerate(sample):
            pixel_values[i, j, :n] = torch.randn(n, 3, vc.image_size, vc.image_size, generator=gen)
            ids[i, j] = ratio_id[n]
            mask[i, j, :n] = 1
    return {"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}


def cross_mask(tiles: list[list[int]], image_positions: list[list[int]], seq_len: int, max_tiles: int) -> torch.Tensor:
    """(B, S, N_images, max_tiles) as the processor builds it: image j is seen from its token on,
    until the next image token if that one is not adjacent, else to the end."""
    b, n_img = len(tiles), max(1, max(len(x) for x in tiles))
    mask = torch.zeros(b, seq_len, n_img, max_tiles, dtype=torch.long)
    for i, (sample, positions) in enumerate(zip(tiles, image_positions)):
        for j, (n, start) in enumerate(zip(sample, positions)):
            end = seq_len
            if j + 1 < len(positions) and positions[j + 1] != start + 1:
                end = positions[j + 1]
            mask[i, start:end, j, :n] = 1
    return mask


class MetaSemantics:
    """Make a transformers model follow Meta's reference where the two differ: the cross-attention
    output of text rows that may see no image is zero (transformers lets them attend to every vision
    token), and the vision taps are layer inputs (`tap_layer_inputs`).

    Set `.cross_attention_mask` (B, S, N_images, N_tiles) before each forward call."""

    def __init__(self, hf) -> None:
        self.cross_attention_mask: torch.Tensor | None = None
        self._hooks = [layer.cross_attn.register_forward_hook(self._zero_blind_rows)
                       for layer in hf.model.language_model.layers if hasattr(layer, "cross_attn")]
        self._taps = tap_layer_inputs(hf)

    def _zero_blind_rows(self, module, args, output):
        rows = self.cross_attention_mask.flatten(2).any(-1)[:, -output[0].shape[1]:]
        return (output[0] * rows[..., None].to(output[0].dtype),) + tuple(output[1:])

    def __enter__(self) -> "MetaSemantics":
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        untap(self._taps)
