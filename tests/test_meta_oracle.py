"""Meta's reference implementation (llama-models) as a second oracle, through mllama.convert_meta.

One tiny Meta model (real vocabulary and tokenizer, 5 text layers, GQA, Meta's hard-coded 0.8B
vision encoder with 28 px tiles; see tests/meta_ref.py) is built with random non-zero weights, its
state dict is converted with `convert_meta_state_dict`, and mllama's logits, vision features,
image preprocessing and greedy generation must agree with Meta's own code paths:

    max |mllama - Meta| <= 1e-4 * max |Meta|   (logits; float32 on both sides)

Inputs on the mllama side come from mllama's own pieces: `MllamaImageProcessorPil` for the pixels
(it follows the reference's PIL pipeline and matches Meta's transform exactly here; the torch
`MllamaImageProcessor` resizes in one pass and is only within one uint8 level, up to 0.015 after
normalisation, so it is checked against Meta's transform on its own but not used for logits) and
`processor.dense_cross_attention_mask` for the cross-attention mask. Meta's side: ChatFormat
(vision masks, <|image|> -> 128256), `compute_vision_tokens_masks` + `forward`, `Llama3.generate`.

The converted model is loaded with assign=True and may share storage with Meta's (the converter
returns views where no change is needed): about 3.8 GB resident for the module. Run with -s to
see the measured differences (about 1e-6 of the logit scale).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import meta_ref
import pytest
import torch
from PIL import Image

TOL = 1e-4  # relative to the logit scale max |Meta logits|
BOS, PAD = 128000, 128004
VISION, IMAGE = meta_ref.VISION_TOKEN, meta_ref.IMAGE_TOKEN
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The published preprocessor_config.json, with 28 px tiles as the reference's vision_chunk_size.
PREPROCESSOR = {"do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
                "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "max_image_tiles": 4,
                "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 28, "width": 28}}


# ---------------------------------------------------------------------------------------------------
# Images: scikit-image's photos, and crops of them with odd sizes (tile grid in the name)
# ---------------------------------------------------------------------------------------------------


IMAGE_NAMES = ["astronaut_2x2", "chelsea_2x2", "coffee_2x2", "camera_gray_2x2", "single_1x1", "wide_1x2",
               "tall_2x1", "wide_1x3", "tall_3x1", "tall_4x1", "wide_1x4"]


def _photos() -> dict[str, Image.Image]:
    data = pytest.importorskip("skimage.data")
    astronaut, chelsea, coffee = data.astronaut(), data.chelsea(), data.coffee()
    images = {
        "astronaut_2x2": Image.fromarray(astronaut),  # 512 x 512
        "chelsea_2x2": Image.fromarray(chelsea),  # 300 x 451: padded inside the tiles
        "coffee_2x2": Image.fromarray(coffee),  # 400 x 600
        "camera_gray_2x2": Image.fromarray(data.camera()),  # grayscale, converted to RGB
        "single_1x1": Image.fromarray(astronaut[180:200, 200:224]),  # 20 x 24, upscaled to 23 x 28
        "wide_1x2": Image.fromarray(chelsea[100:114, 150:190]),  # 14 x 40: 2 padded tiles
        "tall_2x1": Image.fromarray(coffee[100:150, 300:320]),  # 50 x 20: 2 padded tiles
        "wide_1x3": Image.fromarray(astronaut[50:70, 100:160]),  # 20 x 60
        "tall_3x1": Image.fromarray(chelsea[20:90, 200:222]),  # 70 x 22
        "tall_4x1": Image.fromarray(coffee[0:100, 40:60]),  # 100 x 20
        "wide_1x4": Image.fromarray(astronaut[200:260, 0:500]),  # 60 x 500, downscaled
    }
    assert list(images) == IMAGE_NAMES
    return images


def _grid(name: str) -> tuple[int, int]:
    rows, cols = name.rsplit("_", 1)[1].split("x")
    return int(rows), int(cols)


# ---------------------------------------------------------------------------------------------------
# The fixture: Meta's model and ours, converted from it, both float32
# ---------------------------------------------------------------------------------------------------


@dataclass
class Oracle:
    ref: meta_ref.MetaReference
    ours: Any  # mllama.MllamaForConditionalGeneration
    processor: Any  # mllama.MllamaImageProcessorPil
    images: dict[str, Image.Image]

    def rgb(self, name: str) -> Image.Image:
        return self.images[name].convert("RGB")


@pytest.fixture(scope="module")
def oracle():
    try:
        ref = meta_ref.MetaReference(seed=0)
    except meta_ref.Unavailable as err:
        pytest.skip(str(err))
    try:
        if importlib.util.find_spec("mllama.convert_meta") is None:
            pytest.skip("mllama.convert_meta does not exist yet")
        from mllama import MllamaForConditionalGeneration, MllamaImageProcessorPil
        from mllama.convert_meta import convert_meta_state_dict
        from mllama.checkpoint_keys import map_checkpoint_key
        from mllama.weights import _rebuild_buffers

        config, state = convert_meta_state_dict([ref.state_dict()], dict(ref.params))
        renamed = {}
        for key in list(state):
            name, known = map_checkpoint_key(key)
            assert known and name is not None, f"converter wrote {key!r}, not a hub-layout key"
            renamed[name] = state.pop(key)
        del state
        with torch.device("meta"):
            ours = MllamaForConditionalGeneration(config)
        ours.load_state_dict(renamed, strict=True, assign=True)
        del renamed
        _rebuild_buffers(ours, torch.device("cpu"))
        ours.eval()
        processor = MllamaImageProcessorPil.from_dict(PREPROCESSOR)
        yield Oracle(ref=ref, ours=ours, processor=processor, images=_photos())
    finally:
        ref.close()


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def assert_close(ours: torch.Tensor, meta: torch.Tensor, what: str) -> float:
    """max |ours - meta| <= TOL * max |meta|, on a tensor that is not near zero. Returns the scale."""
    assert ours.shape == meta.shape, (what, ours.shape, meta.shape)
    assert torch.isfinite(meta).all() and torch.isfinite(ours).all(), what
    scale = meta.abs().max().item()
    assert scale > 0.5, f"{what}: reference values are near zero (max {scale:.3g}); the comparison proves nothing"
    err = (ours - meta).abs().max().item()
    print(f"{what}: max |diff| {err:.3g}, scale {scale:.3g}, ratio {err / scale:.2g}")  # shown with -s
    assert err <= TOL * scale, f"{what}: max |diff| {err:.3g} > {TOL} * {scale:.3g}"
    return scale


def mllama_inputs(o: Oracle, inputs: list[Any], *, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """mllama's model inputs for Meta LLMInputs: the same token ids (128256 is the image token in
    both), pixels from mllama's image processor, the processor's cross-attention mask rule."""
    from mllama.processor import dense_cross_attention_mask

    rows = [list(inp.tokens) for inp in inputs]
    length = max(len(r) for r in rows)
    ids = [[PAD] * (length - len(r)) + r if left_pad else r + [PAD] * (length - len(r)) for r in rows]
    valid = [[0] * (length - len(r)) + [1] * len(r) if left_pad else [1] * len(r) + [0] * (length - len(r))
             for r in rows]
    out = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(valid)}
    images = [list(inp.vision.images) if inp.vision is not None else [] for inp in inputs]
    if any(images):
        features = o.processor(images, return_tensors="pt")
        config = o.ours.config
        cam = dense_cross_attention_mask(ids, features["num_tiles"], image_token_id=config.image_token_index,
                                         max_num_tiles=config.vision_config.max_num_tiles)
        out.update(pixel_values=features["pixel_values"], aspect_ratio_ids=features["aspect_ratio_ids"],
                   aspect_ratio_mask=features["aspect_ratio_mask"], cross_attention_mask=torch.from_numpy(cam))
    return out


def ours_logits(o: Oracle, inputs: list[Any]) -> list[torch.Tensor]:
    """Per row, logits over the real tokens (right padding: real tokens never see it)."""
    with torch.no_grad():
        logits = o.ours(**mllama_inputs(o, inputs)).logits.float()
    return [logits[row, : len(inp.tokens)] for row, inp in enumerate(inputs)]


def text_only(inp: Any) -> Any:
    """The same tokens (image tokens included) without vision input: Meta's text-only path."""
    return type(inp)(tokens=list(inp.tokens), vision=None)


def check_case(o: Oracle, inp: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ours == Meta on every position; Meta's rows from the first image on differ from a text-only
    run by far more than the tolerance (the images matter, so the comparison can fail)."""
    meta = o.ref.logits([inp])[0]
    ours = ours_logits(o, [inp])[0]
    scale = assert_close(ours, meta, what)
    if inp.vision is not None:
        first = min(start for start, _ in inp.vision.mask)
        blind = o.ref.logits([text_only(inp)])[0]
        effect = (meta[first:] - blind[first:]).abs().amax(dim=-1)
        print(f"{what}: image effect on logits, smallest row {effect.min().item():.3g}")
        assert effect.min().item() > 100 * TOL * scale, f"{what}: a row that sees an image hardly depends on it"
        # Rows before the first image see no image: Meta gives them the text-only logits.
        if first:
            assert_close(ours[:first], blind[:first], f"{what}: rows before the image vs text-only")
    return ours, meta


def llm(o: Oracle, tokens: list[int], *names: str) -> Any:
    return o.ref.llm_input(tokens, [o.images[n] for n in names])


# ---------------------------------------------------------------------------------------------------
# The reference itself: non-zero gates, converter output, image preprocessing
# ---------------------------------------------------------------------------------------------------


def test_every_gate_is_open(oracle):
    meta_gates = {n: p for n, p in oracle.ref.model.named_parameters() if meta_ref.is_gate(n.rpartition(".")[2])}
    # 8 global vision layers x 2, two tile embeddings, the positional gate, 2 cross layers x 2.
    assert len(meta_gates) == 16 + 2 + 1 + 4
    assert all(p.abs().min().item() >= 0.5 for p in meta_gates.values())
    ours_gates = {n: p for n, p in oracle.ours.named_parameters() if meta_ref.is_gate(n.rpartition(".")[2])}
    assert len(ours_gates) == len(meta_gates)
    assert all(p.abs().min().item() >= 0.5 for p in ours_gates.values())


def test_converted_config(oracle):
    config = oracle.ours.config
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
    assert text.vocab_size == 128256 and config.image_token_index == IMAGE
    assert text.num_hidden_layers == 5 + 2  # the cross-attention layers are layers of their own
    # Meta's fusion schedule puts cross-attention before its layers 1 and 4: HF layers 1 and 5.
    assert list(text.cross_attention_layers) == [1, 5]
    assert vision.image_size == 28 and vision.max_num_tiles == 4
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_global_layers) == (1280, 32, 8)
    assert list(vision.intermediate_layers_indices) == [3, 7, 15, 23, 30]
    meta_params = sum(p.numel() for p in oracle.ref.model.parameters())
    ours_params = sum(p.numel() for p in oracle.ours.parameters())
    # ours stores one embedding table per aspect ratio for the tile and gated positional embeddings
    # (Meta: one (4, 4, ...) table) and the 8 new-token rows in embed_tokens: never fewer parameters.
    assert ours_params >= meta_params


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_image_processor_matches_meta_transform(oracle, name):
    from mllama import MllamaImageProcessor

    image = oracle.images[name]
    tiles, (rows, cols) = oracle.ref.transform(image.convert("RGB"))
    assert (rows, cols) == _grid(name)
    n = rows * cols
    pil = oracle.processor(image, return_tensors="pt")
    assert pil["num_tiles"] == [[n]]
    ratios = [(r, c) for r in range(1, 5) for c in range(1, 5) if r * c <= 4]
    assert pil["aspect_ratio_ids"].tolist() == [[ratios.index((rows, cols)) + 1]]
    assert pil["aspect_ratio_mask"].tolist() == [[[1] * n + [0] * (4 - n)]]
    pixels = pil["pixel_values"][0, 0]
    assert torch.count_nonzero(pixels[n:]) == 0  # padded tiles
    # The PIL processor follows Meta's pipeline (PIL bilinear resize, zero pad, /255, normalise).
    assert (pixels[:n] - tiles).abs().max().item() <= 1e-5
    # The torch processor resizes in one pass where PIL rounds to uint8 between its two passes:
    # within one uint8 level after normalisation (1/255/std).
    fast = MllamaImageProcessor.from_dict(PREPROCESSOR)(image, return_tensors="pt")
    assert fast["aspect_ratio_ids"].tolist() == pil["aspect_ratio_ids"].tolist()
    assert (fast["pixel_values"][0, 0, :n] - tiles).abs().max().item() <= 1.001 / 255 / min(CLIP_STD)


GRID_IMAGES = ["chelsea_2x2", "single_1x1", "wide_1x2", "tall_2x1", "wide_1x3", "tall_3x1", "tall_4x1", "wide_1x4"]


def test_vision_features_match(oracle):
    """The vision tower + projector alone, for each of the 8 tile grids of 1-4 tiles: all images in
    one row (one pass over the 0.8B weights per side)."""
    images = [oracle.rgb(name) for name in GRID_IMAGES]
    _, meta = oracle.ref.vision_features(images)  # (1, n_img, 4, 5, 64), projected
    features = oracle.processor([images], return_tensors="pt")
    with torch.no_grad():
        ours = oracle.ours.model.encode_images(features["pixel_values"], features["aspect_ratio_ids"],
                                               features["aspect_ratio_mask"])
    ours = ours.view(meta.shape)
    assert sorted(_grid(name) for name in GRID_IMAGES) == sorted((r, c) for r in range(1, 5) for c in range(1, 5)
                                                                 if r * c <= 4)
    for j, name in enumerate(GRID_IMAGES):
        n = _grid(name)[0] * _grid(name)[1]
        # Padded tiles are masked out of cross-attention: only the real ones must agree.
        assert_close(ours[:, j, :n], meta[:, j, :n], f"vision tokens of {name}")


# ---------------------------------------------------------------------------------------------------
# Logits, case by case
# ---------------------------------------------------------------------------------------------------


def test_image_first_chat_format(oracle):
    """[BOS, <|image|>, text...] exactly as Meta's ChatFormat.encode_content builds it."""
    inp = oracle.ref.encode_content([oracle.rgb("chelsea_2x2"), "If I had to write a haiku for this one"])
    assert inp.tokens[:2] == [BOS, IMAGE] and inp.vision.mask == [[1, -1]]
    check_case(oracle, inp, "image first (ChatFormat)")


def test_image_first_hf_processor_order(oracle):
    """[<|image|>, BOS, text...] as the HF processor builds a prompt starting with the image."""
    tokens = [VISION, BOS] + oracle.ref.encode("Describe the image in one sentence.")
    check_case(oracle, llm(oracle, tokens, "astronaut_2x2"), "image first (HF order)")


def test_text_before_image(oracle):
    """Rows before the image get no cross-attention output (nor its MLP) and equal a text-only run."""
    ref = oracle.ref
    tokens = [BOS] + ref.encode("Here is a photo of a cup of coffee:") + [VISION] + ref.encode(" what is in it?")
    inp = llm(oracle, tokens, "coffee_2x2")
    first = inp.vision.mask[0][0]
    assert first > 5
    ours, _ = check_case(oracle, inp, "text before the image")
    blind_ours = ours_logits(oracle, [text_only(inp)])[0]
    assert_close(ours[:first], blind_ours[:first], "ours: rows before the image vs ours text-only")


def test_two_images(oracle):
    ref = oracle.ref
    tokens = ([BOS, VISION] + ref.encode(" A cat. And then") + [VISION] +
              ref.encode(" a cup of coffee. Which one is warmer?"))
    inp = llm(oracle, tokens, "chelsea_2x2", "coffee_2x2")
    assert len(inp.vision.mask) == 2 and inp.vision.mask[0][1] == inp.vision.mask[1][0]
    check_case(oracle, inp, "two images")


def test_adjacent_images(oracle):
    """<|image|><|image|>: both images are seen from the first image token on."""
    tokens = [BOS, VISION, VISION] + oracle.ref.encode("Which of these two is the astronaut?")
    inp = llm(oracle, tokens, "astronaut_2x2", "camera_gray_2x2")
    assert inp.vision.mask == [[1, len(tokens)], [2, len(tokens)]]
    check_case(oracle, inp, "adjacent images")


@pytest.mark.parametrize("name", ["wide_1x2", "tall_2x1"])
def test_padded_tiles(oracle, name):
    """A wide (1x2) or tall (2x1) image: 2 of the 4 tiles are padding, masked out of cross-attention."""
    tokens = [BOS, VISION] + oracle.ref.encode("What is shown in this picture?")
    check_case(oracle, llm(oracle, tokens, name), f"image {name}")


def test_other_tile_grids(oracle):
    """1x3 and 3x1 (one padded tile), 4x1 and 1x4 (whose positional tables differ from 2x2's),
    four images in one prompt, each followed by text."""
    ref = oracle.ref
    tokens = [BOS]
    for word in (" wide", " tall", " taller", " widest"):
        tokens += [VISION] + ref.encode(word)
    inp = llm(oracle, tokens, "wide_1x3", "tall_3x1", "tall_4x1", "wide_1x4")
    assert len(inp.vision.mask) == 4
    check_case(oracle, inp, "images of 1x3, 3x1, 4x1, 1x4 tiles")


def test_single_tile_image(oracle):
    tokens = [BOS, VISION] + oracle.ref.encode("A tiny picture; what colour is it?")
    check_case(oracle, llm(oracle, tokens, "single_1x1"), "single-tile image")


def test_text_only(oracle):
    inp = oracle.ref.llm_input([BOS] + oracle.ref.encode("The quick brown fox jumps over the lazy dog"))
    assert inp.vision is None
    check_case(oracle, inp, "text only")


def test_batch_of_mixed_rows(oracle):
    """One batch: rows of different lengths, with and without images, 1 or 2 images, 1-4 tiles.
    Meta pads on the right; logits are compared per row over the real tokens only."""
    ref = oracle.ref
    inputs = [
        ref.encode_content([oracle.rgb("chelsea_2x2"), "If I had to write a haiku for this one, it would be"]),
        ref.llm_input([BOS] + ref.encode("Plain text, no image at all.")),
        llm(oracle, [BOS, VISION] + ref.encode(" and") + [VISION] + ref.encode(" differ how?"),
            "wide_1x2", "tall_4x1"),
        llm(oracle, [BOS] + ref.encode("First a few words, and then") + [VISION] + ref.encode(" a picture."),
            "single_1x1"),
    ]
    assert len({len(inp.tokens) for inp in inputs}) == len(inputs)
    meta = ref.logits(inputs)
    ours = ours_logits(oracle, inputs)
    for row, inp in enumerate(inputs):
        assert_close(ours[row], meta[row], f"batch row {row}")


# ---------------------------------------------------------------------------------------------------
# The vision taps: the oracle detects a tap one layer off
# ---------------------------------------------------------------------------------------------------


def test_taps_are_layer_inputs(oracle):
    """Meta taps the INPUTS of local layers 3, 7, 15, 23, 30. Tapping their outputs instead (as
    transformers 5.x does) moves the logits far past the tolerance, and then agrees with Meta's
    encoder made to tap the inputs of layers 4, 8, 16, 24, 31, i.e. the same states."""
    tokens = [BOS, VISION] + oracle.ref.encode("What is shown in this picture?")
    inp = llm(oracle, tokens, "chelsea_2x2")
    meta = oracle.ref.logits([inp])[0]
    scale = meta.abs().max().item()
    vision = oracle.ours.model.vision_model
    encoder = oracle.ref.model.vision_model.vision_encoder
    taps, intermediate = vision._taps, encoder.return_intermediate
    try:
        vision._taps = {layer + 1: slots for layer, slots in taps.items()}  # outputs of the tapped layers
        shifted = ours_logits(oracle, [inp])[0]
        err = (shifted - meta).abs().max().item()
        print(f"taps one layer late: max |diff| {err:.3g}, scale {scale:.3g}")
        assert err > 100 * TOL * scale, f"taps one layer late change the logits by only {err:.3g}"
        encoder.return_intermediate = [layer + 1 for layer in intermediate]
        assert_close(shifted, oracle.ref.logits([inp])[0], "taps at layer outputs, both sides")
    finally:
        vision._taps = taps
        encoder.return_intermediate = intermediate


# ---------------------------------------------------------------------------------------------------
# Greedy generation: Meta's Llama3.generate vs mllama's generate
# ---------------------------------------------------------------------------------------------------

NEW_TOKENS = 8


def _ours_generate(o: Oracle, inputs: list[Any]) -> tuple[list[list[int]], list[list[float]]]:
    """mllama's greedy tokens per row (cut after a stop token, as Meta stops), and per row the
    top-1 minus top-2 logit margin of each step (to tell a real mismatch from a near tie)."""
    stops = o.ref.tokenizer.stop_tokens  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    batch = mllama_inputs(o, inputs, left_pad=True)
    with torch.no_grad():
        out = o.ours.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=list(stops),
                              pad_token_id=PAD, return_dict_in_generate=True)
    new = out.sequences[:, batch["input_ids"].shape[1]:].tolist()
    top2 = torch.stack([step.float().topk(2, dim=-1).values for step in out.logits], dim=1)  # (B, steps, 2)
    margins = (top2[..., 0] - top2[..., 1]).tolist()
    tokens = []
    for row in new:
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        tokens.append(row[:cut])
    return tokens, margins


def assert_same_tokens(ours: tuple[list[list[int]], list[list[float]]], meta: list[list[int]]) -> None:
    tokens, margins = ours
    for row, (a, b) in enumerate(zip(tokens, meta)):
        if a != b:
            step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            margin = margins[row][step] if step < len(margins[row]) else float("nan")
            raise AssertionError(f"row {row}: mllama {a} != Meta {b}, first at step {step}, where mllama's "
                                 f"top-2 logit margin is {margin:.3g}")
    assert len(tokens) == len(meta)


def test_greedy_generation_single_image(oracle):
    inp = oracle.ref.encode_content([oracle.rgb("chelsea_2x2"), "If I had to write a haiku for this one"])
    meta = oracle.ref.generate([inp], NEW_TOKENS)
    print("Meta generated", meta)
    assert len(meta[0]) == NEW_TOKENS and len(set(meta[0])) > 1
    assert_same_tokens(_ours_generate(oracle, [inp]), meta)


def test_greedy_generation_batch(oracle):
    """Rows of different lengths: Meta right-pads and decodes from the shortest prompt on (teacher-
    forcing the longer prompts), mllama left-pads. Two limits of Meta's generate shape the prompts:
    it decodes every teacher-forced prompt token to text and so crashes on an image token (128256)
    past the shortest prompt's length; and with several images, ChatFormat's mask of the last one
    ends at the prompt's end, so Meta's generated tokens would see no image, where mllama (like
    transformers) lets them see what the last prompt token sees. Hence at most one image per row,
    early in the row."""
    ref = oracle.ref
    inputs = [
        ref.encode_content([oracle.rgb("astronaut_2x2"), "The person in this photo is"]),
        ref.llm_input([BOS] + ref.encode("Once upon a time")),
        llm(oracle, [VISION, BOS] + ref.encode("A long prompt about a tall picture that comes before it, and"),
            "tall_2x1"),
    ]
    meta = ref.generate(inputs, NEW_TOKENS)
    print("Meta generated", meta)
    assert all(len(row) for row in meta) and any(len(set(row)) > 1 for row in meta)
    assert_same_tokens(_ours_generate(oracle, inputs), meta)
