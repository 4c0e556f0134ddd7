"""Vision encoder: parity with transformers' MllamaVisionModel, the mask-free attention, input checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mllama.config import MllamaVisionConfig
from mllama.vision import MllamaVisionMLP, MllamaVisionModel, TileLayout, tile_attention
from tiny import publish_tile_tables_, tap_layer_inputs

hf_mllama = pytest.importorskip("transformers.models.mllama.modeling_mllama")
hf_config = pytest.importorskip("transformers.models.mllama.configuration_mllama")

KEYS_11B = Path("/work/shared/reference/keys-11b.txt")

# Tiny configs chosen so the per-tile padding differs: 5 -> 8 (3 rows), 10 -> 16 (6), 65 -> 72 (7).
CONFIGS = {
    "tiles2-pad3": dict(hidden_size=32, attention_heads=2, intermediate_size=64, image_size=28, patch_size=14,
                        num_hidden_layers=2, num_global_layers=1, intermediate_layers_indices=[0],
                        max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
    # norm_eps far from 1e-5 shows that only the encoder layers use it, not layernorm_pre/post.
    "tiles3-pad6": dict(hidden_size=48, attention_heads=4, intermediate_size=96, image_size=42, patch_size=14,
                        num_hidden_layers=3, num_global_layers=2, intermediate_layers_indices=[2, 0],
                        max_num_tiles=3, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [1, 3], [3, 1]],
                        norm_eps=0.1),
    "tiles4-pad7": dict(hidden_size=64, attention_heads=4, intermediate_size=128, image_size=56, patch_size=7,
                        num_hidden_layers=4, num_global_layers=2, intermediate_layers_indices=[1, 3, 1],
                        max_num_tiles=4),
}


def make_config(name: str) -> MllamaVisionConfig:
    fields = dict(CONFIGS[name])
    fields["vision_output_dim"] = fields["hidden_size"] * (len(fields["intermediate_layers_indices"]) + 1)
    return MllamaVisionConfig(**fields)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and every gate clearly non-zero (they initialise to 0 / pi/4)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate") or name.endswith("gate_attn") or name.endswith("gate_ffn"):
                sign = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
                p.fill_(sign * (0.3 + 0.9 * torch.rand(1, generator=gen).item()))
            elif "layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2 and "embedding" not in name:  # linear / conv weights
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def make_pair(name: str, seed: int = 0) -> tuple[MllamaVisionModel, torch.nn.Module, MllamaVisionConfig]:
    cfg = make_config(name)
    ref = hf_mllama.MllamaVisionModel(hf_config.MllamaVisionConfig(**cfg.to_dict())).eval()
    randomize_(ref, seed)
    tap_layer_inputs(ref)
    ours = MllamaVisionModel(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref, cfg


def make_inputs(cfg: MllamaVisionConfig, masks: list[list[list[int]]], seed: int = 1):
    """masks[b][i] = tile mask of image i of sample b (all-zero = padded image slot)."""
    gen = torch.Generator().manual_seed(seed)
    batch, images, tiles = len(masks), len(masks[0]), len(masks[0][0])
    pixels = torch.randn(batch, images, tiles, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)
    mask = torch.tensor(masks, dtype=torch.long)
    ids = torch.randint(1, cfg.max_aspect_ratio_id + 1, (batch, images), generator=gen)
    ids[mask.sum(-1) == 0] = 0
    return pixels, ids, mask


def reference(ref: torch.nn.Module, pixels, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return ref(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state


def check_parity(ours, ref, cfg, masks, seed=1) -> float:
    pixels, ids, mask = make_inputs(cfg, masks, seed)
    with torch.no_grad():
        got = ours(pixels, ids, mask).last_hidden_state  # the public forward, as transformers'
    want = reference(ref, pixels, ids, mask)
    assert got.shape == want.shape == (*mask.shape, cfg.num_patches, cfg.vision_output_dim)
    real = mask.sum(-1) > 0  # padded image slots are free to differ
    diff = (got[real] - want[real]).abs().max().item()
    assert diff <= 1e-4, f"max |diff| {diff}"
    assert want[real].abs().max() > 0.1  # the comparison is not between near-zero tensors
    return diff


CASES = {
    "tiles2-pad3": [
        [[[1, 1], [1, 0]], [[1, 0], [0, 0]]],  # batch of 2; the second sample has a padded image slot
        [[[1, 0]]],
        [[[1, 1]]],
    ],
    "tiles3-pad6": [
        [[[1, 1, 1], [1, 1, 0]], [[1, 0, 0], [0, 0, 0]]],
        [[[1, 0, 1]], [[0, 1, 1]]],  # real tiles not in front: not produced by the processor, still exact
        [[[1, 1, 0]]],
    ],
    "tiles4-pad7": [
        [[[1, 1, 1, 1]], [[1, 1, 0, 0]]],
        [[[1, 0, 0, 0], [1, 1, 1, 0]], [[1, 1, 1, 1], [0, 0, 0, 0]]],
        [[[1, 1, 1, 1], [1, 1, 1, 1]]],
    ],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name):
    ours, ref, cfg = make_pair(name)
    for seed, masks in enumerate(CASES[name]):
        check_parity(ours, ref, cfg, masks, seed=seed + 1)


def test_fewer_tiles_equal_zero_padded_tiles():
    ours, ref, cfg = make_pair("tiles4-pad7", seed=3)
    pixels, ids, mask = make_inputs(cfg, [[[1, 1, 0, 0]], [[1, 0, 0, 0]]], seed=5)
    pixels[:, :, 2:] = 0  # what the image processor puts in padded tiles
    want = reference(ref, pixels, ids, mask)[:, :, :2]
    with torch.no_grad():
        got = ours.features(pixels[:, :, :2].clone(), ids, mask[:, :, :2].clone())
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4


def test_image_independent_of_batch_mates():
    ours, _, cfg = make_pair("tiles3-pad6", seed=4)
    pixels, ids, mask = make_inputs(cfg, [[[1, 1, 0], [1, 1, 1]], [[1, 0, 0], [0, 0, 0]]], seed=6)
    with torch.no_grad():
        together = ours.features(pixels, ids, mask)
        for b, i in [(0, 0), (0, 1), (1, 0)]:
            alone = ours.features(pixels[b:b + 1, i:i + 1], ids[b:b + 1, i:i + 1], mask[b:b + 1, i:i + 1])
            assert (alone[0, 0] - together[b, i]).abs().max() <= 1e-5
        assert torch.isfinite(together).all()  # the padded slot included


def test_gradients_match_transformers():
    ours, ref, cfg = make_pair("tiles2-pad3", seed=7)
    pixels, ids, mask = make_inputs(cfg, [[[1, 1]], [[1, 0]]], seed=8)
    weights = torch.randn(*mask.shape, cfg.num_patches, cfg.vision_output_dim)
    (ours(pixels, ids, mask)[0] * weights).sum().backward()
    (ref(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state * weights).sum().backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        want = ref_params[name].grad
        assert (p.grad - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item()), name


def test_mlp_in_row_chunks_matches_transformers(monkeypatch):
    """Past ROWS_PER_CALL rows the MLP runs in equal row chunks (the real encoder's 4 tiles are 6432
    rows): outputs and gradients still those of one call."""
    monkeypatch.setattr(MllamaVisionMLP, "ROWS_PER_CALL", 7)  # 2 tiles x 8 rows per image: chunks of 5-6
    chunks = []
    monkeypatch.setattr(torch.Tensor, "tensor_split", lambda self, n: chunks.append(n) or torch.tensor_split(self, n))
    test_parity_with_transformers("tiles2-pad3")
    test_gradients_match_transformers()
    assert chunks and min(chunks) >= 2  # the chunked path ran


def dense_reference(q, k, v, real_tiles: list[int], tile_len: int, real_len: int) -> torch.Tensor:
    """The trained formulation: one mask over all positions, blocking only pad<->pad pairs."""
    m, _, length, _ = q.shape
    pos = torch.arange(length) % tile_len
    tile = torch.arange(length) // tile_len
    pad = (pos >= real_len)[None] | (tile[None] >= torch.tensor(real_tiles)[:, None])  # (m, L)
    allowed = ~(pad[:, :, None] & pad[:, None, :])  # (m, L, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])


@pytest.mark.parametrize("real_tiles", [[4], [1], [2, 2], [4, 1, 3], [3, 3, 4, 1, 1], [1, 4]])
def test_tile_attention_equals_dense_mask(real_tiles):
    gen = torch.Generator().manual_seed(len(real_tiles) * 10 + real_tiles[0])
    tiles, tile_len, real_len, heads, head_dim = 4, 8, 5, 3, 16
    m = len(real_tiles)
    # Built as (m, L, heads, d) and transposed, as the attention module passes them.
    q, k, v = (torch.randn(m, tiles * tile_len, heads, head_dim, generator=gen).transpose(1, 2) * 2 for _ in range(3))
    layout = TileLayout.from_counts(real_tiles, num_tiles=tiles, tile_len=tile_len, real_len=real_len)
    got = tile_attention(q, k, v, layout)
    want = dense_reference(q, k, v, real_tiles, tile_len, real_len)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5
    # Padding queries really are restricted: unmasked attention would differ there.
    assert (F.scaled_dot_product_attention(q, k, v) - want).abs().max() > 1e-2


@pytest.mark.parametrize("real,copies", [(1, 3), (2, 2), (1, 2)])
def test_one_padded_tile_with_copies_equals_the_copies(real, copies):
    """padded_copies: one padded tile standing for `copies` equal ones gives every real and padding row
    what the tiles repeated give (float64, both through tile_attention's plain SDPA route)."""
    gen = torch.Generator().manual_seed(real * 10 + copies)
    tile_len, real_len, heads, d = 8, 5, 3, 16
    q, k, v = (torch.randn(2, (real + 1) * tile_len, heads, d, generator=gen, dtype=torch.float64).transpose(1, 2) * 2
               for _ in range(3))

    def repeated(x):  # the last tile written out `copies` times
        return torch.cat([x] + [x[:, :, real * tile_len:]] * (copies - 1), dim=2)

    full = TileLayout.from_counts([real, real], num_tiles=real + copies, tile_len=tile_len, real_len=real_len)
    want = tile_attention(repeated(q), repeated(k), repeated(v), full)
    shared = TileLayout.from_counts([real, real], num_tiles=real + 1, tile_len=tile_len, real_len=real_len,
                                    padded_copies=copies)
    got = tile_attention(q, k, v, shared)
    assert (got - want[:, :, :(real + 1) * tile_len]).abs().max() <= 1e-12
    for c in range(1, copies):  # the copies' rows really are equal in the full result (to float64 rounding:
        # SDPA's float64 sums may round a row differently by where it falls in a query block)
        copy = want[:, :, (real + c) * tile_len:(real + c + 1) * tile_len]
        assert (copy - want[:, :, real * tile_len:(real + 1) * tile_len]).abs().max() <= 1e-12
    # Without the copies' weight the real rows differ: the test sees the log(copies).
    plain = TileLayout.from_counts([real, real], num_tiles=real + 1, tile_len=tile_len, real_len=real_len)
    assert (tile_attention(q, k, v, plain) - got).abs().max() > 1e-2


def test_layout_rejects_copies_without_one_padded_tile():
    with pytest.raises(ValueError, match="padded_copies"):
        TileLayout.from_counts([2, 1], num_tiles=3, tile_len=8, real_len=5, padded_copies=2)
    with pytest.raises(ValueError, match="padded_copies"):
        TileLayout.from_counts([3], num_tiles=3, tile_len=8, real_len=5, padded_copies=2)


def test_layout_rejects_images_without_real_tiles():
    with pytest.raises(ValueError, match="real tiles"):
        TileLayout.from_counts([2, 0], num_tiles=4, tile_len=8, real_len=5)


def test_all_padded_batch_gives_zeros():
    ours, _, cfg = make_pair("tiles2-pad3")
    pixels, ids, mask = make_inputs(cfg, [[[0, 0]]])
    with torch.no_grad():
        out = ours.features(pixels, ids, mask)
    assert out.shape == (1, 1, 2, cfg.num_patches, cfg.vision_output_dim)
    assert (out == 0).all()


def test_state_dict_names_match_checkpoint():
    if not KEYS_11B.is_file():
        pytest.skip(f"{KEYS_11B} not available")
    want = {}
    for line in KEYS_11B.read_text().splitlines():
        if line.startswith("#"):
            continue
        name, shape = line.split("\t")[:2]
        if name.startswith("vision_model."):
            want[name.removeprefix("vision_model.")] = [int(s) for s in shape.strip("[]").split(",")]
    with torch.device("meta"):
        model = MllamaVisionModel(MllamaVisionConfig(image_size=560))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == want


@pytest.mark.parametrize("change, message", [
    (lambda p, i, m: (p[0], i, m), "6 dims"),
    (lambda p, i, m: (p.to(torch.int32), i, m), "floating-point"),
    (lambda p, i, m: (torch.cat([p, p[:, :, :1]], 2), i, torch.cat([m, m[:, :, :1]], 2)), "max_num_tiles"),
    (lambda p, i, m: (p[..., :14, :], i, m), "image_size"),
    (lambda p, i, m: (p[:, :, :, :2], i, m), "num_channels"),
    (lambda p, i, m: (p, i + 9, m), "aspect_ratio_ids must be in 0..8"),
    (lambda p, i, m: (p, i - 9, m), "aspect_ratio_ids must be in"),
    (lambda p, i, m: (p, i.float(), m), "integer"),
    (lambda p, i, m: (p, i[:, None], m), "aspect_ratio_ids must have shape"),
    (lambda p, i, m: (p, i, m[:, :, :2]), "aspect_ratio_mask must have shape"),
    (lambda p, i, m: (p, i, m * 2), "only 0"),
])
def test_bad_inputs_raise(change, message):
    cfg = make_config("tiles4-pad7")
    model = MllamaVisionModel(cfg).eval()
    pixels, ids, mask = make_inputs(cfg, [[[1, 1, 0, 0]], [[1, 0, 0, 0]]])
    with pytest.raises(ValueError, match=message):
        model(*change(pixels, ids, mask))


def test_non_tensor_input_raises_type_error():
    model = MllamaVisionModel(make_config("tiles2-pad3"))
    with pytest.raises(TypeError, match="aspect_ratio_ids"):
        model(torch.zeros(1, 1, 1, 3, 28, 28), [[1]], torch.ones(1, 1, 1))


def _alone(model: MllamaVisionModel, name: str, n: int, ratios: list[list[int]]) -> MllamaVisionModel:
    """The same weights in a model whose tiles are only the first n: what encoding n real tiles alone means.
    `ratios` must list the aspect ratios in the same order as the full config does up to the ones used."""
    fields = {**CONFIGS[name], "max_num_tiles": n, "supported_aspect_ratios": ratios}
    fields["vision_output_dim"] = fields["hidden_size"] * (len(fields["intermediate_layers_indices"]) + 1)
    small = MllamaVisionModel(MllamaVisionConfig(**fields)).eval()
    full, rows = model.config, small.config.max_aspect_ratio_id + 1
    state = dict(model.state_dict())
    for key in ("pre_tile_positional_embedding.embedding.weight", "post_tile_positional_embedding.embedding.weight",
                "gated_positional_embedding.tile_embedding.weight"):
        state[key] = state[key][:rows].view(rows, full.max_num_tiles, -1)[:, :n].reshape(rows, -1)
    small.load_state_dict(state, strict=True)
    return small


@pytest.mark.parametrize("n,ratio_id,ratios", [(1, 1, [[1, 1]]), (2, 2, [[1, 1], [1, 2], [2, 1]])])
def test_skip_padded_tiles_encodes_the_real_tiles_alone(n, ratio_id, ratios):
    ours, _, cfg = make_pair("tiles3-pad6", seed=7)
    pixels, _, _ = make_inputs(cfg, [[[1, 1, 1]]], seed=8)
    ids = torch.tensor([[ratio_id]])
    mask = torch.tensor([[[1] * n + [0] * (3 - n)]])
    with torch.no_grad():
        fast = ours.features(pixels, ids, mask, skip_padded_tiles=True)
        exact = ours.features(pixels, ids, mask)
        alone = _alone(ours, "tiles3-pad6", n, ratios).features(pixels[:, :, :n], ids, torch.ones(1, 1, n, dtype=torch.long))
    assert (fast[:, :, :n] - alone).abs().max().item() <= 1e-5
    assert not fast[:, :, n:].any()  # padded tiles carry nothing
    # Not exact: as trained, real patches also attend to the padded tiles.
    assert (fast[:, :, :n] - exact[:, :, :n]).abs().max().item() > 1e-3


def test_skip_padded_tiles_changes_nothing_without_padded_tiles():
    ours, _, cfg = make_pair("tiles3-pad6", seed=9)
    pixels, ids, mask = make_inputs(cfg, [[[1, 1, 1], [1, 1, 0]], [[1, 1, 1], [0, 0, 0]]], seed=3)
    with torch.no_grad():
        fast, exact = ours.features(pixels, ids, mask, skip_padded_tiles=True), ours.features(pixels, ids, mask)
    assert torch.equal(fast[:, 0], exact[:, 0]) and torch.equal(fast[1, 1], exact[1, 1])
    assert not torch.equal(fast[0, 1], exact[0, 1])


def published_like(ours: MllamaVisionModel, ref: torch.nn.Module) -> None:
    """Both models with the published checkpoints' zero rows in the tile tables."""
    for model in (ours, ref):
        publish_tile_tables_(model, ours.config)


def encoded_tiles(model: MllamaVisionModel, pixels, ids, mask) -> tuple[torch.Tensor, list[int]]:
    """features, and the tile counts the first local layer ran (one entry per call)."""
    seen: list[int] = []
    handle = model.transformer.layers[0].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].shape[1] // model.tile_len))
    try:
        with torch.no_grad():
            return model.features(pixels, ids, mask), seen
    finally:
        handle.remove()


def test_equal_padded_tiles_run_once_and_match_transformers():
    """With the published checkpoints' zero rows and the processor's zero pixels, an image's padded
    tiles are equal: one of them runs for all (1 real tile: 2 tiles run, not 4; 2 real: 3) and every
    output, padded tiles' included, matches transformers running all four."""
    ours, ref, cfg = make_pair("tiles4-pad7", seed=11)
    published_like(ours, ref)
    ratio = {tuple(r): i for i, r in enumerate(cfg.supported_aspect_ratios, start=1)}
    # image 0: 1x1, image 1: 1x2, image 2: 1x3 (one padded tile: nothing to share), image 3: 2x2
    ids = torch.tensor([[ratio[1, 1], ratio[1, 2]], [ratio[1, 3], ratio[2, 2]]])
    mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0]], [[1, 1, 1, 0], [1, 1, 1, 1]]])
    pixels = torch.randn(2, 2, 4, cfg.num_channels, cfg.image_size, cfg.image_size,
                         generator=torch.Generator().manual_seed(4))
    pixels[mask == 0] = 0
    got, seen = encoded_tiles(ours, pixels, ids, mask)
    assert sorted(seen) == [2, 3, 4]  # the 1-tile image, the 2-tile one, the other two in one call
    want = reference(ref, pixels, ids, mask)
    assert (got - want).abs().max().item() <= 1e-4 and want.abs().max() > 0.1
    assert (got[0, 0, 1:] - want[0, 0, 1:]).abs().max().item() <= 1e-4  # the padded tiles' features too
    # A padded tile that differs (pixels in it) makes that image run all four tiles, still exact.
    pixels[0, 0, 3] = 1.0
    got, seen = encoded_tiles(ours, pixels, ids, mask)
    assert sorted(seen) == [3, 4]
    assert (got - reference(ref, pixels, ids, mask)).abs().max().item() <= 1e-4


def test_without_padded_tiles_the_real_tiles_are_the_same():
    """features(padded_tiles=False) skips writing the shared padded tiles' features (the engine reads
    the real tiles only): every real tile bit for bit as with them, for images encoded straight into
    the output (consecutive rows) and through a list of rows (a 1-tile image between two others)."""
    ours, ref, cfg = make_pair("tiles4-pad7", seed=13)
    published_like(ours, ref)
    ratio = {tuple(r): i for i, r in enumerate(cfg.supported_aspect_ratios, start=1)}
    for layout in ([[1, 1], [2, 2]], [[1, 1], [2, 2], [1, 1]], [[1, 2], [1, 3], [1, 2]]):
        ids = torch.tensor([[ratio[tuple(r)] for r in layout]])
        mask = torch.tensor([[[1] * (a * b) + [0] * (4 - a * b) for a, b in layout]])
        pixels = torch.randn(1, len(layout), 4, cfg.num_channels, cfg.image_size, cfg.image_size,
                             generator=torch.Generator().manual_seed(len(layout)))
        pixels[mask == 0] = 0
        with torch.no_grad():
            full = ours.features(pixels, ids, mask)
            real = ours.features(pixels, ids, mask, padded_tiles=False)
        shown = mask[0].bool()
        assert torch.equal(real[0][shown], full[0][shown]), layout
        assert (full[0][shown] - reference(ref, pixels, ids, mask)[0][shown]).abs().max() <= 1e-4


def test_equal_padded_tiles_run_in_full_under_autograd():
    """Training the tile tables: every padded slot's rows need their own gradient, so all tiles run."""
    ours, ref, cfg = make_pair("tiles4-pad7", seed=12)
    published_like(ours, ref)
    pixels = torch.zeros(1, 1, 4, cfg.num_channels, cfg.image_size, cfg.image_size)
    pixels[:, :, 0] = torch.randn(cfg.num_channels, cfg.image_size, cfg.image_size)
    ids, mask = torch.tensor([[1]]), torch.tensor([[[1, 0, 0, 0]]])
    seen: list[int] = []
    ours.transformer.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1] // ours.tile_len))
    ours.features(pixels, ids, mask).sum().backward()
    assert seen == [4]
    table = ours.pre_tile_positional_embedding.embedding.weight.grad.view(cfg.max_aspect_ratio_id + 1, 4, -1)
    ref(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state.sum().backward()
    want = ref.pre_tile_positional_embedding.embedding.weight.grad.view(cfg.max_aspect_ratio_id + 1, 4, -1)
    assert (table[1] - want[1]).abs().max() <= 1e-3 * want[1].abs().max() and want[1, 1:].abs().max() > 0
