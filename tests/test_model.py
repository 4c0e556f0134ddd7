"""Parity of the full model against transformers, and Meta's semantics for text before the first image."""

from __future__ import annotations

import pytest
import torch

from tiny import MetaSemantics, cross_mask, hf_pair, random_images, tiny_config

TOL = 1e-4

# (config, tiles per image per sample, <|image|> positions per sample, sequence length)
CASES = [
    ("a", [[2], [1]], [[0], [0]], 7),
    ("a", [[1, 2], [2]], [[0, 1], [0]], 9),  # two adjacent images vs one: padded image slot in row 1
    ("b", [[4], [3, 1]], [[0], [0, 5]], 10),  # 1-4 tiles, second image later in the row
    ("b", [[1, 2], [2, 4]], [[0, 1], [0, 1]], 8),
    ("c", [[3], [1, 2]], [[0], [0, 4]], 9),
]


def _inputs(name: str, tiles, positions, seq_len: int, seed: int = 0):
    config = tiny_config(name)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.text_config.vocab_size, (len(tiles), seq_len), generator=gen)
    for i, pos in enumerate(positions):
        ids[i, pos] = config.image_token_index
    images = random_images(config, tiles, seed=seed)
    cam = cross_mask(tiles, positions, seq_len, config.vision_config.max_num_tiles)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "cross_attention_mask": cam, **images}


@pytest.mark.parametrize("name,tiles,positions,seq_len", CASES)
def test_logits_match_transformers(name, tiles, positions, seq_len):
    hf, ours = hf_pair(name, seed=len(tiles[1]) + seq_len)
    inputs = _inputs(name, tiles, positions, seq_len)
    # Rows before the first image differ by design (see below); compare from the first image on.
    seen = inputs["cross_attention_mask"].flatten(2).any(-1)
    assert seen[:, 0].all()
    with torch.no_grad():
        ref = hf(**inputs).logits
        out = ours(**inputs).logits
    assert out.shape == (len(tiles), seq_len, tiny_config(name).text_config.vocab_size)
    assert (ref - out).abs().max().item() <= TOL


def test_text_before_first_image_matches_text_only_run():
    hf, ours = hf_pair("b", seed=3)
    tiles, positions, seq_len = [[2], [4]], [[4], [6]], 10
    inputs = _inputs("b", tiles, positions, seq_len)
    with torch.no_grad():
        full = ours(**inputs).logits
        text_only = ours(inputs["input_ids"]).logits
        hf_full = hf(**inputs).logits
    for row, first in enumerate([4, 6]):
        # Rows that see no image are exactly the text-only run: cross-attention layers are identities.
        assert torch.equal(full[row, :first], text_only[row, :first])
        assert (full[row, first:] - text_only[row, first:]).abs().max() > 1e-3
    # transformers lets those rows attend to every vision token; we must not.
    assert (hf_full[0, :4] - full[0, :4]).abs().max() > 1e-3


def test_rows_after_first_image_follow_meta_semantics():
    """Reference from the definition: transformers' layers, with the cross-attention output of rows
    that may see no image zeroed (Meta multiplies it by the full-text-row mask)."""
    hf, ours = hf_pair("a", seed=5)
    tiles, positions, seq_len = [[2], [1]], [[3], [5]], 9
    inputs = _inputs("a", tiles, positions, seq_len)
    with MetaSemantics(hf) as meta, torch.no_grad():
        meta.cross_attention_mask = inputs["cross_attention_mask"]
        ref = hf(**inputs).logits
        out = ours(**inputs).logits
    assert (ref - out).abs().max().item() <= TOL


def test_padded_batch_matches_transformers_on_real_rows():
    hf, ours = hf_pair("a", seed=7)
    inputs = _inputs("a", [[2], [1, 1]], [[2], [0, 1]], 9)
    inputs["attention_mask"][0, :2] = 0  # left padding in row 0, whose first real token is the image
    inputs["cross_attention_mask"][0, :2] = 0
    with torch.no_grad():
        ref = hf(**inputs).logits
        out = ours(**inputs).logits
    real = inputs["cross_attention_mask"].flatten(2).any(-1)
    assert (ref - out)[real].abs().max().item() <= TOL


def test_loss_matches_transformers_and_ignores_image_token():
    hf, ours = hf_pair("c", seed=9)
    inputs = _inputs("c", [[3], [1, 2]], [[0], [0, 4]], 9)
    labels = inputs["input_ids"].clone()
    labels[:, :2] = -100
    with torch.no_grad():
        out = ours(**inputs, labels=labels)
        hf_labels = labels.masked_fill(labels == tiny_config("c").image_token_index, -100)
        ref = hf(**inputs, labels=hf_labels)
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    assert torch.isfinite(out.loss)


def test_logits_never_cover_the_image_token():
    _, ours = hf_pair("a")
    config = tiny_config("a")
    out = ours(torch.tensor([[1, 5, 7]])).logits
    assert out.shape[-1] == config.text_config.vocab_size <= config.image_token_index


@pytest.mark.parametrize("bad,match", [
    ({"input_ids": torch.tensor([[1, 500]])}, "out of range"),
    ({"input_ids": torch.tensor([[1.0, 2.0]])}, "integer"),
    ({"input_ids": None}, "exactly one"),
])
def test_bad_text_inputs(bad, match):
    _, ours = hf_pair("a")
    with pytest.raises((ValueError, TypeError), match=match):
        ours(**bad)


def test_images_without_cross_attention_mask_are_rejected():
    _, ours = hf_pair("a")
    inputs = _inputs("a", [[1]] * 2, [[0]] * 2, 5)
    inputs.pop("cross_attention_mask")
    with pytest.raises(ValueError, match="cross_attention_mask"):
        ours(**inputs)


def test_bad_labels_are_rejected():
    _, ours = hf_pair("a")
    ids = torch.tensor([[1, 5, 7]])
    with pytest.raises(ValueError, match="labels"):
        ours(ids, labels=torch.tensor([[1, 5, 1000]]))


def test_projector_and_cross_kv_skip_tiles_no_row_sees():
    """Tiles no text row sees (padded tiles, a padded image slot) skip the projector and the cross
    layers' K/V; the logits equal those from every tile's projected tokens with the full mask."""
    _, ours = hf_pair("b", seed=5)
    tiles, positions, seq_len = [[1, 2], [3]], [[0, 1], [0]], 8
    inputs = _inputs("b", tiles, positions, seq_len)
    rows: list[int] = []
    hook = ours.model.multi_modal_projector.register_forward_pre_hook(
        lambda _m, args: rows.append(args[0].shape[:-1].numel()))
    with torch.no_grad():
        got = ours(**inputs).logits
        patches = ours.config.vision_config.num_patches
        assert rows == [2 * 3 * patches]  # 3 seen tiles per row at most (row 0: 1 + 2; row 1: 3), not 2 x 4
        hook.remove()
        every_tile = ours.model.encode_images(inputs["pixel_values"], inputs["aspect_ratio_ids"],
                                              inputs["aspect_ratio_mask"])
        assert every_tile.shape[1] == 2 * 4 * patches  # 2 image slots x 4 tiles
        rest = {k: v for k, v in inputs.items() if k not in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        want = ours(**rest, cross_attention_states=every_tile).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert want.abs().max() > 0.1
