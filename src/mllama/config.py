"""Configs for Llama 3.2-Vision, field-compatible with the published config.json files.

Field names and defaults are those of the HF `MllamaVisionConfig` / `MllamaTextConfig` /
`MllamaConfig`, so a published config.json loads unchanged. The many generic fields those files
carry (`bad_words_ids`, `chunk_size_feed_forward`, ...) are kept in `extra` for round trips and
otherwise ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mllama.hub import resolve_file

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"

DEFAULT_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
KNOWN_ROPE_TYPES = ("default", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def json_text(data: Any) -> str:
    """config.json's and generation_config.json's text: 2-space indent, sorted keys, a final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def write_json(path: Path, data: Any) -> None:
    """The one writer of config.json (the configs' and mllama.saving's) and generation_config.json."""
    path.write_text(json_text(data))


def _fail(cls_name: str, name: str, message: str) -> None:
    raise ValueError(f"{cls_name}.{name}: {message}")


# Sizes that must be >= 1, and a ceiling far above any real checkpoint, so that a mistyped config
# (num_hidden_layers: 100000) is refused before gigabytes are allocated for it.
_POSITIVE = ("hidden_size", "num_hidden_layers", "attention_heads", "num_channels", "intermediate_size",
             "vision_output_dim", "image_size", "patch_size", "max_num_tiles", "vocab_size", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings")
_CEILINGS = {"num_hidden_layers": 1024, "num_global_layers": 1024, "hidden_size": 1 << 17,
             "intermediate_size": 1 << 19, "vocab_size": 1 << 22, "max_num_tiles": 64, "image_size": 1 << 14,
             "max_position_embeddings": 1 << 24}


def _matches(value: Any, kind: str) -> bool:
    """Does a JSON value fit one alternative of a field annotation (as a string: 'int', 'list[int]', ...)?"""
    if kind == "None":
        return value is None
    if kind == "Any":
        return True
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if kind in ("str", "bool"):
        return isinstance(value, {"str": str, "bool": bool}[kind])
    if kind.startswith("list[") and kind.endswith("]"):
        return isinstance(value, (list, tuple)) and all(_matches(v, kind[5:-1]) for v in value)
    if kind.startswith("dict["):
        return isinstance(value, dict)
    return value is None or isinstance(value, dict) or type(value).__name__ == kind  # a nested config


def check_field_types(obj: Any) -> None:
    """Every dataclass field of `obj` of its annotated JSON type, sizes >= 1 and under their ceilings;
    a TypeError (wrong type) or ValueError (bad size) naming Class.field otherwise, before anything is built."""
    cls_name = type(obj).__name__
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        value = getattr(obj, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        if f.name in ("image_size", "patch_size"):
            kinds.append("list[int]")
        if not any(_matches(value, kind) for kind in kinds):
            raise TypeError(f"{cls_name}.{f.name}: expected {f.type}, got {type(value).__name__} {value!r}")
        sizes = value if isinstance(value, list) and f.name in ("image_size", "patch_size") else [value]
        for size in sizes:
            if f.name in _POSITIVE and isinstance(size, int) and size < 1:
                _fail(cls_name, f.name, f"must be >= 1, got {size}")
            if f.name in _CEILINGS and isinstance(size, int) and not 0 <= size <= _CEILINGS[f.name]:
                _fail(cls_name, f.name, f"{size} is outside [0, {_CEILINGS[f.name]}]; is the config corrupt?")


class _ConfigIO:
    """Dict/JSON round trip shared by the three configs."""

    model_type: ClassVar[str]
    # HF names that are aliases of one of our fields: {hf_name: field_name}.
    aliases: ClassVar[dict[str, str]] = {}

    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.name != "extra"}  # type: ignore[arg-type]

    @property
    def architectures(self) -> list[str] | None:
        """The model classes config.json names (transformers' attribute; None for a config built in code)."""
        return self.extra.get("architectures")  # type: ignore[attr-defined]

    def get_text_config(self, decoder: bool | None = None) -> Any:
        """The text decoder's config (transformers' accessor): text_config, or this config itself."""
        return getattr(self, "text_config", self)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Any:
        if not isinstance(config, dict):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict (a JSON object), got {type(config).__name__}")
        known, extra = {}, {}
        names = cls._field_names()
        for key, value in config.items():
            key = cls.aliases.get(key, key)
            if key in names:
                known[key] = copy.deepcopy(value)
            elif key != "model_type":
                extra[key] = copy.deepcopy(value)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = copy.deepcopy(self.extra)  # type: ignore[attr-defined]
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _ConfigIO) else copy.deepcopy(value)
        out["model_type"] = self.model_type
        return out

    def to_json_string(self) -> str:
        return json_text(self.to_dict())

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / CONFIG_NAME, self.to_dict())


@dataclass
class MllamaVisionConfig(_ConfigIO):
    hidden_size: int = 1280
    hidden_act: str = "gelu"
    num_hidden_layers: int = 32
    num_global_layers: int = 8
    attention_heads: int = 16
    num_channels: int = 3
    intermediate_size: int = 5120
    vision_output_dim: int = 7680
    image_size: int = 448
    patch_size: int = 14
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    intermediate_layers_indices: list[int] = field(default_factory=lambda: [3, 7, 15, 23, 30])
    supported_aspect_ratios: list[list[int]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_ASPECT_RATIOS))
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type: ClassVar[str] = "mllama_vision_model"
    aliases: ClassVar[dict[str, str]] = {"num_attention_heads": "attention_heads"}

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.intermediate_layers_indices is None:
            self.intermediate_layers_indices = [3, 7, 15, 23, 30]
        if self.supported_aspect_ratios is None:
            self.supported_aspect_ratios = copy.deepcopy(DEFAULT_ASPECT_RATIOS)
        check_field_types(self)
        for key in ("image_size", "patch_size"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    _fail(name, key, f"only square sizes are supported, got {value}")
                setattr(self, key, int(value[0]))
        if self.hidden_size % self.attention_heads:
            _fail(name, "attention_heads", f"{self.attention_heads} does not divide hidden_size {self.hidden_size}")
        if self.image_size % self.patch_size:
            _fail(name, "patch_size", f"{self.patch_size} does not divide image_size {self.image_size}")
        if self.hidden_act != "gelu":
            _fail(name, "hidden_act", f"only 'gelu' is used by Mllama, got {self.hidden_act!r}")
        for index in self.intermediate_layers_indices:
            if not 0 <= index < self.num_hidden_layers:
                _fail(name, "intermediate_layers_indices",
                      f"index {index} is outside the {self.num_hidden_layers} vision layers (num_hidden_layers)")
        expected = self.hidden_size * (len(self.intermediate_layers_indices) + 1)
        if self.vision_output_dim != expected:
            _fail(name, "vision_output_dim", f"{self.vision_output_dim} != hidden_size * "
                  f"(len(intermediate_layers_indices) + 1) = {expected}")
        for ratio in self.supported_aspect_ratios:
            if len(ratio) != 2 or min(ratio) < 1 or ratio[0] * ratio[1] > self.max_num_tiles:
                _fail(name, "supported_aspect_ratios",
                      f"{ratio} is not a (rows, cols) pair with at most max_num_tiles={self.max_num_tiles} tiles")

    @property
    def num_attention_heads(self) -> int:
        return self.attention_heads

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)

    @property
    def num_patches(self) -> int:
        """Positions per tile: the patch grid plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class MllamaTextConfig(_ConfigIO):
    vocab_size: int = 128256
    hidden_size: int = 4096
    hidden_act: str = "silu"
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    cross_attention_layers: list[int] = field(default_factory=lambda: [3, 8, 13, 18, 23, 28, 33, 38])
    dropout: float = 0.0
    bos_token_id: int = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = 128004
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type: ClassVar[str] = "mllama_text_model"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.cross_attention_layers is None:
            self.cross_attention_layers = [3, 8, 13, 18, 23, 28, 33, 38]
        check_field_types(self)
        self._merge_rope(name)
        if self.hidden_size % self.num_attention_heads:
            _fail(name, "num_attention_heads",
                  f"{self.num_attention_heads} does not divide hidden_size {self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail(name, "num_key_value_heads",
                  f"{self.num_key_value_heads} does not divide num_attention_heads {self.num_attention_heads}")
        if self.hidden_act != "silu":
            _fail(name, "hidden_act", f"only 'silu' is used by Mllama, got {self.hidden_act!r}")
        for index in self.cross_attention_layers:
            if not 0 <= index < self.num_hidden_layers:
                _fail(name, "cross_attention_layers",
                      f"index {index} is outside the {self.num_hidden_layers} layers (num_hidden_layers)")
        if len(set(self.cross_attention_layers)) != len(self.cross_attention_layers):
            _fail(name, "cross_attention_layers", f"duplicate indices in {self.cross_attention_layers}")

    def _merge_rope(self, name: str) -> None:
        """One source of truth: `rope_parameters` (5.x style) with `rope_theta`/`rope_scaling` mirrored."""
        if self.rope_parameters is not None:
            params = dict(self.rope_parameters)
            theta = params.get("rope_theta", self.rope_theta)
            if self.rope_scaling is not None:
                for key, value in self.rope_scaling.items():
                    if key in params and params[key] != value and key != "type":
                        _fail(name, "rope_scaling", f"{key}={value!r} disagrees with rope_parameters {params[key]!r}")
        else:
            params = dict(self.rope_scaling or {})
            theta = self.rope_theta
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params["type"]
        params.pop("type", None)
        params.setdefault("rope_type", "default")
        params["rope_theta"] = float(theta)
        rope_type = params["rope_type"]
        if rope_type not in KNOWN_ROPE_TYPES:
            _fail(name, "rope_parameters", f"unknown rope_type {rope_type!r}; supported: {KNOWN_ROPE_TYPES}")
        if rope_type == "llama3":
            missing = [k for k in _LLAMA3_ROPE_KEYS if k not in params]
            if missing:
                _fail(name, "rope_parameters", f"llama3 rope scaling needs {missing}")
        self.rope_parameters = params
        self.rope_theta = params["rope_theta"]
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        self.rope_scaling = scaling if rope_type != "default" else None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@dataclass
class MllamaConfig(_ConfigIO):
    vision_config: MllamaVisionConfig = field(default_factory=MllamaVisionConfig)
    text_config: MllamaTextConfig = field(default_factory=MllamaTextConfig)
    image_token_index: int = 128256
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    model_type: ClassVar[str] = "mllama"
    aliases: ClassVar[dict[str, str]] = {"image_token_id": "image_token_index", "dtype": "torch_dtype"}

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.vision_config is None:
            self.vision_config = MllamaVisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = MllamaVisionConfig.from_dict(self.vision_config)
        if self.text_config is None:
            self.text_config = MllamaTextConfig()
        elif isinstance(self.text_config, dict):
            self.text_config = MllamaTextConfig.from_dict(self.text_config)
        # image_token_index < vocab_size is allowed: after resize_token_embeddings (new tokens added)
        # the <|image|> id falls inside the enlarged lm_head, as in transformers.
        if self.image_token_index < 0:
            _fail("MllamaConfig", "image_token_index", f"{self.image_token_index} must be >= 0")
        if self.image_token_index >= self.text_config.vocab_size + 8:
            _fail("MllamaConfig", "image_token_index",
                  f"{self.image_token_index} is past the vocab_size + 8 embedding rows")

    @property
    def image_token_id(self) -> int:
        return self.image_token_index

    @property
    def dtype(self) -> str | None:
        return self.torch_dtype

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # transformers 5.x writes `dtype`; older readers look for `torch_dtype`. Keep both.
        if self.torch_dtype is not None:
            out["dtype"] = self.torch_dtype
        else:
            out.pop("torch_dtype")
        out.setdefault("architectures", ["MllamaForConditionalGeneration"])
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None) -> "MllamaConfig":
        """Read config.json from a directory, a file, or a hub id (downloaded via huggingface_hub)."""
        config_file = resolve_file(path, CONFIG_NAME, revision=revision)
        try:
            data = json.loads(Path(config_file).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{config_file}: expected a JSON object, got {type(data).__name__}")
        if data.get("model_type") not in (None, "mllama"):
            raise ValueError(f"{config_file}: model_type is {data.get('model_type')!r}, expected 'mllama'")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{config_file}: {err}") from None

    @classmethod
    def preset(cls, name: str) -> "MllamaConfig":
        """Shapes of the published checkpoints: '11b', '11b-base', '90b', '90b-base'."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict(copy.deepcopy(PRESETS[name]))


def _text_preset(layers: int, hidden: int, heads: int, inter: int, eos: int | list[int]) -> dict[str, Any]:
    return {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": 8, "intermediate_size": inter,
        "cross_attention_layers": list(range(3, layers, 5)), "eos_token_id": eos,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }


_INSTRUCT_EOS = [128001, 128008, 128009]
PRESETS: dict[str, dict[str, Any]] = {
    "11b": {"vision_config": {"image_size": 560}, "text_config": _text_preset(40, 4096, 32, 14336, _INSTRUCT_EOS)},
    "11b-base": {"vision_config": {"image_size": 448}, "text_config": _text_preset(40, 4096, 32, 14336, 128001)},
    "90b": {"vision_config": {"image_size": 560}, "text_config": _text_preset(100, 8192, 64, 28672, _INSTRUCT_EOS)},
    "90b-base": {"vision_config": {"image_size": 560}, "text_config": _text_preset(100, 8192, 64, 28672, 128001)},
}


@dataclass
class GenerationConfig:
    """Decoding defaults, read from a checkpoint's generation_config.json (transformers' field names)."""

    max_new_tokens: int | None = None
    max_length: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_field_types(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationConfig":
        if not isinstance(data, dict):
            raise TypeError(f"a generation config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "GenerationConfig":
        file = Path(path) / GENERATION_CONFIG_NAME
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{file}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        return {k: v for k, v in out.items() if v is not None}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        write_json(Path(directory, GENERATION_CONFIG_NAME), self.to_dict())

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
