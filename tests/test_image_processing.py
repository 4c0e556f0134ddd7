"""Image processors vs transformers' MllamaImageProcessorPil (the oracle), and the torch one vs ours."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import skimage
import torch
from PIL import Image
from transformers.models.mllama import image_processing_pil_mllama as hf_module
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil as HFProcessor

from mllama.image_guard import ImageLimits
from mllama.image_processing import (
    BatchFeature,
    MllamaImageProcessor,
    MllamaImageProcessorPil,
    load_image,
    optimal_tile_grid,
    pil_nearest_indices,
    size_on_canvas,
    supported_aspect_ratios,
)

logging.getLogger("transformers").setLevel(logging.ERROR)

REFERENCE = Path("/work/shared/reference")
DATA = Path(skimage.__file__).parent / "data"
# One uint8 level after normalisation with the checkpoints' smallest std is 1/255/0.2613 = 0.0150.
TORCH_ATOL = 2e-2


def photo(name: str) -> Image.Image:
    with Image.open(DATA / name) as image:
        image.load()
        return image


def odd_images() -> dict[str, Image.Image]:
    base = photo("astronaut.png").resize((96, 80))
    rgba = base.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (80, 1))
    rgba.putalpha(Image.fromarray(alpha))
    palette = base.convert("P")
    palette.info["transparency"] = 3
    ramp = (np.arange(70 * 50, dtype=np.uint32).reshape(70, 50) * 37) % 1000
    return {
        "1x1": Image.new("RGB", (1, 1), (200, 30, 90)),
        "4000x100": photo("coffee.png").resize((4000, 100)),
        "100x4000": photo("chelsea.png").resize((100, 4000)),
        "RGBA": rgba, "L": base.convert("L"), "LA": rgba.convert("LA"), "P": palette, "CMYK": base.convert("CMYK"),
        "I;16": Image.fromarray(ramp.astype(np.uint16)), "I": Image.fromarray(ramp.astype(np.int32)),
    }


PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]


def config(tile: int, max_tiles: int) -> dict:
    name = "preprocessor_config.json" if tile == 560 else "preprocessor_config-11b-base.json"
    data = json.loads((REFERENCE / name).read_text())
    assert data["size"]["height"] == tile
    return {**data, "max_image_tiles": max_tiles}


def assert_same_layout(ours: BatchFeature, ref) -> None:
    np.testing.assert_array_equal(np.asarray(ours["aspect_ratio_ids"]), np.asarray(ref["aspect_ratio_ids"]))
    np.testing.assert_array_equal(np.asarray(ours["aspect_ratio_mask"]), np.asarray(ref["aspect_ratio_mask"]))
    assert ours["num_tiles"] == [list(n) for n in ref["num_tiles"]]


@pytest.fixture(autouse=True)
def one_torch_thread():
    # The test machine's cores are shared: two OpenMP threads mostly wait for each other there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def max_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


def check_all(images, settings: dict, **kwargs) -> tuple[float, float]:
    """Oracle vs our PIL processor (1e-5) and vs our torch processor (TORCH_ATOL); returns both max diffs."""
    ref = HFProcessor(**settings)(images, **kwargs)
    ours = MllamaImageProcessorPil.from_dict(settings)(images, **kwargs)
    fast = MllamaImageProcessor.from_dict(settings)(images, **kwargs)
    assert ours["pixel_values"].dtype == np.float32 and fast["pixel_values"].dtype == torch.float32
    assert_same_layout(ours, ref)
    assert_same_layout(fast, ref)
    pil_diff = max_diff(ours["pixel_values"], ref["pixel_values"])
    torch_diff = max_diff(fast["pixel_values"], ref["pixel_values"])
    assert pil_diff <= 1e-5, pil_diff
    assert torch_diff <= TORCH_ATOL, torch_diff
    return pil_diff, torch_diff


# ---------------------------------------------------------------------------------------------------
# Parity on photos and odd images, published settings
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile,max_tiles", [(560, 4), (448, 4), (560, 2), (448, 1)])
def test_photos_match_transformers(tile: int, max_tiles: int) -> None:
    photos = [photo(name) for name in PHOTOS]
    # Samples with different image counts, including one without images (padded slots).
    batch = [photos[:2], [], [photos[2]], [photos[3]]]
    settings = config(tile, max_tiles)
    ref = HFProcessor(**settings)(batch)
    ours = MllamaImageProcessorPil.from_dict(settings)(batch)
    fast = MllamaImageProcessor.from_dict(settings)(batch)
    assert ours["pixel_values"].shape == (4, 2, max_tiles, 3, tile, tile)
    assert_same_layout(ours, ref)
    assert_same_layout(fast, ref)
    assert max_diff(ours["pixel_values"], ref["pixel_values"]) <= 1e-5
    assert max_diff(fast["pixel_values"], ours["pixel_values"]) <= TORCH_ATOL
    # Padded image slots: zeros, id 0, and (as transformers does) tile 0 still marked in the mask.
    assert ours["aspect_ratio_ids"][1].tolist() == [0, 0] and ours["aspect_ratio_ids"][2, 1] == 0
    assert ours["aspect_ratio_mask"][1, :, 0].tolist() == [1, 1] and ours["aspect_ratio_mask"][2, 1, 0] == 1
    assert not ours["pixel_values"][1].any() and not fast["pixel_values"][1].any()


@pytest.mark.parametrize("tile,max_tiles", [(560, 4), (448, 2)])
@pytest.mark.parametrize("name", list(odd_images()))
def test_odd_images_match_transformers(name: str, tile: int, max_tiles: int) -> None:
    check_all(odd_images()[name], config(tile, max_tiles))


def test_torch_processor_groups_same_sized_images_correctly() -> None:
    a, b = photo("astronaut.png"), photo("chelsea.png")
    flipped = a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    fast = MllamaImageProcessor.from_dict(config(448, 4))
    samples = [[a, b], [flipped], [b, a, flipped]]
    batch = fast(samples)
    singles = [fast([images]) for images in samples]
    for sample, (images, single) in enumerate(zip(samples, singles)):
        torch.testing.assert_close(batch["pixel_values"][sample, :len(images)], single["pixel_values"][0],
                                   rtol=0, atol=0)
        assert not batch["pixel_values"][sample, len(images):].any()
        torch.testing.assert_close(batch["aspect_ratio_ids"][sample, :len(images)], single["aspect_ratio_ids"][0])
    assert batch["num_tiles"] == [single["num_tiles"][0] for single in singles]


# ---------------------------------------------------------------------------------------------------
# Input forms and per-call settings, on a small tile so the oracle stays quick
# ---------------------------------------------------------------------------------------------------

SMALL = {"size": {"height": 112, "width": 112}, "max_image_tiles": 4, "image_mean": [0.48145466, 0.4578275, 0.40821073],
         "image_std": [0.26862954, 0.26130258, 0.27577711]}


def small_array() -> np.ndarray:
    return np.asarray(photo("chelsea.png").resize((150, 100)))  # (100, 150, 3) uint8


@pytest.mark.parametrize("form", ["hwc", "chw", "float01", "float255", "tensor_chw", "tensor_float_hwc",
                                  "rgba_uint8", "rgba_float", "gray_hwc1", "gray_chw1", "int64"])
def test_array_inputs_match_transformers(form: str) -> None:
    rgb = small_array()
    alpha = np.tile(np.linspace(0, 255, 150).astype(np.uint8), (100, 1))[..., None]
    image = {
        "hwc": rgb, "chw": rgb.transpose(2, 0, 1).copy(),
        "float01": rgb.astype(np.float32) / 255, "float255": rgb.astype(np.float64),
        "tensor_chw": torch.from_numpy(rgb.transpose(2, 0, 1).copy()),
        "tensor_float_hwc": torch.from_numpy(rgb.astype(np.float32) / 255),
        "rgba_uint8": np.concatenate([rgb, alpha], -1), "rgba_float": np.concatenate([rgb, alpha], -1) / 255.0,
        "gray_hwc1": rgb[..., :1].copy(), "gray_chw1": rgb[None, ..., 0].copy(), "int64": rgb.astype(np.int64),
    }[form]
    check_all(image, SMALL)


def test_stacks_and_nesting_follow_the_transformers_rule() -> None:
    rgb = small_array()
    other = np.ascontiguousarray(rgb[::-1, ::2])
    stack = np.stack([rgb, rgb[:, ::-1]])  # (2, H, W, 3)
    fast = MllamaImageProcessor.from_dict(SMALL)
    # A flat list of images is ONE sample with several images.
    assert fast([rgb, other])["pixel_values"].shape[:2] == (1, 2)
    assert fast([[rgb], [other]])["pixel_values"].shape[:2] == (2, 1)
    # A 4-D stack is one sample; a list of stacks is one sample per stack.
    assert fast(stack)["pixel_values"].shape[:2] == (1, 2)
    assert fast([stack, stack[:1]])["num_tiles"] == [[2, 2], [2]]
    assert fast((rgb, other))["pixel_values"].shape[:2] == (1, 2)  # tuples work like lists
    for images in ([rgb, other], [[rgb], [other, rgb], []], stack, [stack, stack[:1]], torch.from_numpy(stack)):
        check_all(images, SMALL)
    # A 2-D array is a grayscale image (transformers needs a channel axis for it).
    np.testing.assert_array_equal(fast(rgb[..., 0])["pixel_values"], fast(rgb[..., :1])["pixel_values"])


@pytest.mark.parametrize("resample", [0, 1, 3, 4, 5])
def test_other_resampling_filters(resample: int) -> None:
    images = [[photo("astronaut.png").resize((150, 100)), photo("coffee.png").resize((333, 90))],
              [Image.new("RGB", (7, 300), (1, 2, 3))]]
    check_all(images, {**SMALL, "resample": resample})


def test_per_call_overrides_match_transformers() -> None:
    images = [photo("rocket.jpg").resize((200, 120))]
    check_all(images, SMALL, do_rescale=False)
    check_all(images, SMALL, do_normalize=False)
    check_all(images, SMALL, do_rescale=False, do_normalize=False)
    check_all(images, SMALL, image_mean=0.3, image_std=0.7, rescale_factor=1 / 127.5)
    check_all(images, SMALL, max_image_tiles=2, size={"height": 56, "width": 56})
    check_all(images, {**SMALL, "do_convert_rgb": False})
    ours = MllamaImageProcessorPil.from_dict(SMALL)
    assert ours(images, max_image_tiles=2)["aspect_ratio_mask"].shape == (1, 1, 2)
    assert ours.max_image_tiles == 4  # overrides do not stick


def test_strings_are_loaded_like_transformers(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    photo("chelsea.png").resize((90, 60)).save(path)
    check_all(str(path), SMALL)
    check_all([[str(path), str(path)], [str(path)]], SMALL)


# ---------------------------------------------------------------------------------------------------
# Geometry helpers against transformers' functions
# ---------------------------------------------------------------------------------------------------


def test_geometry_matches_transformers() -> None:
    rng = np.random.default_rng(0)
    for max_tiles in (1, 2, 4, 6):
        assert list(supported_aspect_ratios(max_tiles)) == hf_module.get_all_supported_aspect_ratios(max_tiles)
    sizes = [(1, 1), (1, 4000), (4000, 1), (560, 560), (1120, 560), (561, 1121), (448, 1344)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    for height, width in sizes:
        for tile, max_tiles in ((560, 4), (448, 4), (560, 2), (112, 6)):
            grid = optimal_tile_grid(height, width, max_tiles, tile)
            canvas = hf_module.get_optimal_tiled_canvas(height, width, max_tiles, tile)
            assert (grid[0] * tile, grid[1] * tile) == tuple(int(v) for v in canvas)
            expected = hf_module.get_image_size_fit_to_canvas(height, width, canvas[0], canvas[1], tile)
            ours = size_on_canvas(height, width, grid[0] * tile, grid[1] * tile, tile)
            assert ours == tuple(int(v) for v in expected)


def test_nearest_indices_match_pil() -> None:
    rng = np.random.default_rng(1)
    for in_size, out_size in [(250, 117), (200, 137), (7, 10), (3000, 1120), (1, 560)] + [
            tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(40)]:
        row = (np.arange(in_size) % 251).astype(np.uint8)[None]
        expected = np.asarray(Image.fromarray(row).resize((out_size, 1), Image.Resampling.NEAREST))[0]
        np.testing.assert_array_equal(row[0, pil_nearest_indices(in_size, out_size)], expected)


# ---------------------------------------------------------------------------------------------------
# Configuration I/O
# ---------------------------------------------------------------------------------------------------

FIELDS = ["do_convert_rgb", "do_normalize", "do_pad", "do_rescale", "do_resize", "image_mean", "image_std",
          "max_image_tiles", "resample", "rescale_factor", "size"]


def settings_of(processor) -> dict:
    """The processing fields of a to_dict(), tuples as lists (transformers keeps mean/std as tuples)."""
    data = processor.to_dict()
    return {key: list(data[key]) if isinstance(data[key], tuple) else data[key] for key in FIELDS}


@pytest.mark.parametrize("cls", [MllamaImageProcessorPil, MllamaImageProcessor])
def test_save_pretrained_loads_in_transformers_and_back(cls, tmp_path: Path) -> None:
    ours = cls.from_pretrained(REFERENCE / "preprocessor_config-11b-base.json")
    assert ours.size == {"height": 448, "width": 448} and ours.max_image_tiles == 4 and ours.resample == 2
    written = ours.save_pretrained(tmp_path / "ours")
    assert written.name == "preprocessor_config.json"
    theirs = HFProcessor.from_pretrained(tmp_path / "ours")
    assert settings_of(theirs) == settings_of(ours)

    custom = HFProcessor(size={"height": 224, "width": 224}, max_image_tiles=2, resample=3, image_mean=[0.1, 0.2, 0.3],
                         do_rescale=False)
    custom.save_pretrained(tmp_path / "theirs")
    loaded = cls.from_pretrained(tmp_path / "theirs")
    assert settings_of(loaded) == settings_of(custom)
    assert cls.from_pretrained(tmp_path / "theirs" / "preprocessor_config.json").to_dict() == loaded.to_dict()


def test_defaults_and_round_trip_match_transformers() -> None:
    ours, theirs = MllamaImageProcessorPil(), HFProcessor()
    assert settings_of(ours) == settings_of(theirs)
    data = {**config(560, 4), "processor_class": "MllamaProcessor"}
    loaded = MllamaImageProcessor.from_dict(data)
    assert loaded.to_dict() == data  # unknown keys survive a round trip
    assert "MllamaImageProcessor" in repr(loaded)


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        MllamaImageProcessorPil.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MllamaImageProcessorPil.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="image_processor_type"):
        MllamaImageProcessorPil.from_dict({"image_processor_type": "CLIPImageProcessor"})
    for bad, match in [({"size": {"height": 448, "width": 560}}, "square"),
                       ({"size": {"shortest_edge": 448}}, "height"),
                       ({"max_image_tiles": 0}, "max_image_tiles"), ({"do_pad": False}, "do_pad"),
                       ({"do_resize": False}, "do_resize"), ({"resample": 42}, "resample"),
                       ({"image_std": [0.5, 0.0, 0.5]}, "zeros"), ({"image_mean": [0.5, 0.5]}, "image_mean")]:
        with pytest.raises(ValueError, match=match):
            MllamaImageProcessor(**bad)


# ---------------------------------------------------------------------------------------------------
# Outputs and bad inputs
# ---------------------------------------------------------------------------------------------------


def test_return_types() -> None:
    image = small_array()
    ours, fast = MllamaImageProcessorPil.from_dict(SMALL), MllamaImageProcessor.from_dict(SMALL)
    assert isinstance(ours(image)["pixel_values"], np.ndarray)
    assert isinstance(fast(image)["pixel_values"], torch.Tensor)
    as_torch = ours(image, return_tensors="pt")
    assert isinstance(as_torch.pixel_values, torch.Tensor) and as_torch.aspect_ratio_ids.dtype == torch.int64
    as_numpy = fast.preprocess(image, return_tensors="np")
    assert isinstance(as_numpy.pixel_values, np.ndarray) and as_numpy.aspect_ratio_mask.dtype == np.int64
    assert as_numpy.num_tiles == [[2]]
    half = fast(image).to("cpu", dtype=torch.float16)
    assert half.pixel_values.dtype == torch.float16 and half.aspect_ratio_ids.dtype == torch.int64
    with pytest.raises(AttributeError):
        _ = half.missing
    with pytest.raises(ValueError, match="return_tensors"):
        fast(image, return_tensors="tf")


@pytest.mark.parametrize("cls", [MllamaImageProcessorPil, MllamaImageProcessor])
def test_bad_inputs(cls) -> None:
    proc = cls.from_dict(SMALL)
    rgb = small_array()
    cases = [
        (42, TypeError, "images must be"), ({"image": rgb}, TypeError, "images must be"),
        ([rgb, [rgb]], TypeError, "only images or only lists"), ([[rgb, 3]], TypeError, "sample 0, image 1"),
        ([], ValueError, "no images"), ([[], []], ValueError, "no images"),
        (np.zeros((10, 10, 2), np.uint8), ValueError, "channel axis"),
        (np.zeros((0, 10, 3), np.uint8), ValueError, "empty"),
        (np.zeros((1, 2, 10, 10, 3), np.uint8), ValueError, "dimensions"),
        ([np.zeros((2, 10, 10, 3), np.uint8), rgb], ValueError, "4-D"),
        (np.full((10, 10, 3), 1.5, np.float32), ValueError, r"\[0, 1\]"),
        (np.full((10, 10, 3), 300.0, np.float32), ValueError, r"\[0, 255\]"),
        (np.full((10, 10, 3), np.nan, np.float32), ValueError, "NaN"),
        (np.zeros((10, 10, 3), bool), TypeError, "dtype"),
        (Image.new("RGB", (0, 5)), ValueError, "empty"),
        ("/no/such/image.png", FileNotFoundError, "neither an existing file"),
    ]
    for images, error, match in cases:
        with pytest.raises(error, match=match):
            proc(images)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        proc(Image.new("L", (20, 20)), do_convert_rgb=False)
    with pytest.raises(ValueError, match="do_pad"):
        proc(rgb, do_pad=False)
    with pytest.raises(ValueError, match="input_data_format"):
        proc(rgb, input_data_format="nhwc")


# ---------------------------------------------------------------------------------------------------
# load_image
# ---------------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_image_sources(tmp_path: Path) -> None:
    image = photo("astronaut.png").resize((40, 30)).convert("RGBA")
    data = png_bytes(image)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    expected = np.asarray(image.convert("RGB"))
    encoded = base64.b64encode(data).decode()
    for source in (image, str(path), path, f"data:image/png;base64,{encoded}", encoded, data):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (40, 30)
        np.testing.assert_array_equal(np.asarray(loaded), expected)

    # EXIF orientation 6 (rotate 90 degrees clockwise) is applied, as transformers' load_image does.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = tmp_path / "rotated.jpg"
    image.convert("RGB").save(rotated, exif=exif)
    assert load_image(rotated).size == (30, 40)


def test_load_image_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(photo("astronaut.png"))[:500])
    with pytest.raises(ValueError, match="notes.txt is not a readable image"):
        load_image(text)
    with pytest.raises(ValueError, match="truncated.png is not a readable image"):
        load_image(str(truncated))
    with pytest.raises(ValueError, match="is not a file"):
        load_image(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="only base64 data URLs"):
        load_image("data:image/png,rawbytes")
    with pytest.raises(ValueError, match="data URL is not a readable image"):
        load_image("data:image/png;base64," + base64.b64encode(b"hello").decode())
    with pytest.raises(ValueError, match="non-public address 127.0.0.1"):
        load_image("http://127.0.0.1:9/image.png", timeout=2)
    with pytest.raises(ValueError, match="could not download"):
        load_image("http://127.0.0.1:9/image.png", limits=ImageLimits(allow_private=True, timeout=2))
    with pytest.raises(TypeError, match="expected a PIL image"):
        load_image(3.5)  # type: ignore[arg-type]


def test_torch_processor_is_within_one_level_on_resized_photos() -> None:
    """Large downscales and upscales of real photos: the torch resize stays within one uint8 level."""
    settings = config(560, 4)
    images = [[photo("retina.jpg")], [photo("astronaut.png").resize((2100, 1500))],
              [photo("rocket.jpg").resize((90, 61))]]
    ours = MllamaImageProcessorPil.from_dict(settings)(images)
    fast = MllamaImageProcessor.from_dict(settings)(images)
    one_level = 1 / 255 / min(settings["image_std"])
    assert max_diff(fast["pixel_values"], ours["pixel_values"]) <= one_level * 1.01
    assert math.isclose(one_level, 0.01500, abs_tol=1e-4)
