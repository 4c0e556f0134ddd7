"""Meta's own Llama 3.2-Vision code (the `llama-models` package) as a test oracle.

`MetaReference` builds Meta's `CrossAttentionTransformer` for a tiny text config with the real
vocabulary (so Meta's real tokenizer and chat format work) and Meta's hard-coded vision encoder
(1280 wide, 32 local + 8 global layers, taps at the inputs of local layers 3, 7, 15, 23, 30; about
0.8B parameters in float32), fills every parameter deterministically with non-zero values (gates
included, so no branch is hidden), and runs Meta's own code paths: the image transform, the chat
format's vision masks, `compute_vision_tokens_masks` + `forward` for logits, and `Llama3.generate`
for greedy decoding. Its state dict and params.json content feed `mllama.convert_meta`.

Test-only code: nothing under src/ imports llama_models, fairscale or torchvision.

torchvision: Meta's image transform (`llama_models/llama3/multimodal/image_transform.py`) imports
`torchvision.transforms`, which is not installed here (PyPI's torchvision binaries are built against
one exact torch and break against others). `torchvision_transforms_root` downloads the torchvision
wheel matching the installed torch with `pip download --no-deps` into a cache folder (once), and
extracts only the pure-Python files that `torchvision.transforms` (v1) needs: `torchvision/utils.py`
and `torchvision/transforms/*.py`. `_torchvision_stub` then puts a bare package module named
`torchvision` (its `__path__` pointing at the extracted folder) into `sys.modules` just while Meta's
multimodal modules are imported, so torchvision's own `__init__.py` and its C extensions are never
loaded, and removes it again afterwards so nothing else in the test session sees a fake torchvision.
When the wheel cannot be had, `Unavailable` is raised and the tests skip with the reason.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.machinery
import importlib.util
import io
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

CACHE_DIR = Path(os.environ.get("MLLAMA_TEST_CACHE", "~/.cache/mllama-tests")).expanduser()

# params.json of the tiny reference model: what convert_meta reads. The vision side is not
# configurable in Meta's code: only the tile size and the number of cross-attention layers are.
PARAMS: dict[str, Any] = {
    "dim": 64,
    "n_layers": 5,
    "n_heads": 4,
    "n_kv_heads": 2,  # GQA 2:1, in self- and cross-attention
    "vocab_size": 128256,
    "multiple_of": 16,
    "ffn_dim_multiplier": 1.3,  # hidden 224, not 4 * 64 * 2 / 3
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vision_chunk_size": 28,  # 2x2 patches of 14 px + class token = 5 positions per tile
    "vision_max_num_chunks": 4,
    "vision_num_cross_attention_layers": 2,  # Meta's fusion schedule puts them before layers 1 and 4
}
MAX_SEQ_LEN = 64
MAX_BATCH_SIZE = 4

VISION_TOKEN = 128011  # <|image|> in Meta's tokenizer
IMAGE_TOKEN = 128256  # what ChatFormat rewrites it to before the model; also the HF input id

_TORCH_TO_TORCHVISION_MINOR = 15  # torch 2.N pairs with torchvision 0.(N + 15)


class Unavailable(RuntimeError):
    """The reference cannot be built here (missing package, no torchvision wheel): skip, don't fail."""


# ---------------------------------------------------------------------------------------------------
# torchvision's pure-Python transforms, without torchvision's C extensions
# ---------------------------------------------------------------------------------------------------


def _wanted_torchvision() -> str | None:
    match = re.match(r"2\.(\d+)", torch.__version__)
    return f"0.{int(match[1]) + _TORCH_TO_TORCHVISION_MINOR}.*" if match else None


def _download_torchvision_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob("torchvision-*.whl"))
    if wheels:
        return wheels[-1]
    errors = []
    wanted = _wanted_torchvision()
    for spec in ([f"torchvision=={wanted}"] if wanted else []) + ["torchvision"]:
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", tmp, spec]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            except (OSError, subprocess.TimeoutExpired) as err:
                errors.append(f"{spec}: {err}")
                continue
            got = sorted(Path(tmp).glob("torchvision-*.whl"))
            if done.returncode == 0 and got:
                target = dest / got[-1].name
                os.replace(got[-1], target)
                return target
            errors.append(f"{spec}: pip exited {done.returncode}: {done.stderr.strip()[-400:]}")
    raise Unavailable("cannot download a torchvision wheel for Meta's image transform: " + "; ".join(errors))


def torchvision_transforms_root() -> Path:
    """A folder holding `torchvision/utils.py` and `torchvision/transforms/*.py` from a torchvision
    wheel (no __init__.py, no binaries); downloaded and extracted once into CACHE_DIR."""
    wheel = _download_torchvision_wheel(CACHE_DIR / "wheels")
    root = CACHE_DIR / (wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + "-transforms")
    if (root / "torchvision" / "transforms" / "functional.py").is_file():
        return root
    pattern = re.compile(r"torchvision/(utils\.py|transforms/[A-Za-z_]+\.py)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR, prefix=".extract-"))
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if pattern.fullmatch(n)]
            if "torchvision/transforms/functional.py" not in names:
                raise Unavailable(f"{wheel.name} has no torchvision/transforms/functional.py")
            for name in names:
                archive.extract(name, tmp)
        if not root.exists():
            os.replace(tmp, root)
    except zipfile.BadZipFile as err:
        wheel.unlink(missing_ok=True)
        raise Unavailable(f"{wheel} is not a valid wheel: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@contextlib.contextmanager
def _torchvision_stub() -> Iterator[None]:
    """`import torchvision.transforms` works inside; sys.modules is restored on exit.

    A real, importable torchvision is used as is."""
    try:
        importlib.import_module("torchvision.transforms")
        yield
        return
    except Exception:  # noqa: BLE001 - not installed, or installed but broken against this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    root = torchvision_transforms_root()
    before = {n: m for n, m in sys.modules.items() if n == "torchvision" or n.startswith("torchvision.")}
    spec = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    spec.submodule_search_locations = [str(root / "torchvision")]
    stub = importlib.util.module_from_spec(spec)
    stub.__version__ = root.name.split("-")[1]
    sys.modules["torchvision"] = stub
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules.update(before)


def import_meta() -> dict[str, Any]:
    """Meta's modules, imported once (the multimodal ones under the torchvision stub)."""
    global _META_MODULES
    if _META_MODULES is not None:
        return _META_MODULES
    for package in ("llama_models", "fairscale", "tiktoken"):
        if importlib.util.find_spec(package) is None:
            raise Unavailable(f"{package} is not installed (needed for Meta's reference)")
    with _torchvision_stub():
        mm = importlib.import_module("llama_models.llama3.multimodal.model")
        image_transform = importlib.import_module("llama_models.llama3.multimodal.image_transform")
        generation = importlib.import_module("llama_models.llama3.generation")
    _META_MODULES = {
        "model": mm,
        "image_transform": image_transform,
        "generation": generation,
        "args": importlib.import_module("llama_models.llama3.args"),
        "chat_format": importlib.import_module("llama_models.llama3.chat_format"),
        "tokenizer": importlib.import_module("llama_models.llama3.tokenizer"),
        "datatypes": importlib.import_module("llama_models.datatypes"),
        "fs_init": importlib.import_module("fairscale.nn.model_parallel.initialize"),
    }
    return _META_MODULES


_META_MODULES: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------------
# torch.distributed + fairscale model parallelism, world size 1
# ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_model_parallel() -> bool:
    """gloo process group of one (rank 0) and fairscale model parallel size 1, unless present.
    Returns True when this call initialised the process group (and so should tear it down)."""
    import torch.distributed as dist

    fs_init = import_meta()["fs_init"]
    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        created = True
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)
    if fs_init.get_model_parallel_world_size() != 1:
        raise Unavailable("fairscale model parallelism is already set up with more than one rank")
    return created


def shutdown_model_parallel() -> None:
    import torch.distributed as dist

    fs_init = import_meta()["fs_init"]
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# The reference model
# ---------------------------------------------------------------------------------------------------


def is_gate(leaf: str) -> bool:
    """gate, gate_attn, gate_ffn, gate_ffwd, gated_positional_embedding_gate, cross_attn_attn_gate
    (mllama's names too), but not gated_positional_embedding."""
    return leaf == "gate" or leaf.startswith("gate_") or leaf.endswith("_gate")


def randomize_meta_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter deterministic and non-zero (fairscale leaves them uninitialised).

    Linear weights ~ U(+-sqrt(3 / fan_in)) (variance 1/fan_in; uniform because drawing 0.8B normals
    takes twice as long); norm weights ~ 1 + 0.1 N, their biases and all other biases ~ 0.1 N;
    embeddings (token, class, positional, tile) ~ 0.5 N; every gate (vision gate_attn /
    gate_ffn, tile-embedding gate, gated_positional_embedding_gate, text gate_attn / gate_ffwd)
    ~ +-U(0.5, 1.5), so tanh(gate) is far from 0 and from saturation and no branch is hidden.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = {name for name, module in model.named_modules()
             if isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "RMSNorm"}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            if is_gate(leaf):
                sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
                p.copy_(sign * (0.5 + torch.rand(p.shape, generator=gen)))
            elif owner in norms:
                p.normal_(generator=gen).mul_(0.1)
                if leaf == "weight":
                    p.add_(1.0)
            elif leaf == "bias":
                p.normal_(generator=gen).mul_(0.1)
            elif "embedding" in name or "tok_embeddings" in name:
                p.normal_(generator=gen).mul_(0.5)
            elif p.dim() == 2:
                bound = math.sqrt(3.0 / p.shape[1])
                p.uniform_(-bound, bound, generator=gen)
            else:
                raise AssertionError(f"no init rule for {name} {tuple(p.shape)}")


def _as_png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class MetaReference:
    """Meta's CrossAttentionTransformer, tiny text + real vision encoder, float32 on the CPU."""

    def __init__(self, seed: int = 0) -> None:
        if torch.get_default_dtype() != torch.float32:
            raise RuntimeError("the reference must be built with float32 as the default dtype")
        meta = import_meta()
        self._meta = meta
        self._own_process_group = init_model_parallel()
        self.params = dict(PARAMS)
        self.args = meta["args"].ModelArgs(max_seq_len=MAX_SEQ_LEN, max_batch_size=MAX_BATCH_SIZE, **self.params)
        with torch.random.fork_rng(devices=[]):  # construction draws from the global generator
            self.model = meta["model"].CrossAttentionTransformer(self.args)
        randomize_meta_(self.model, seed)
        self.model.eval()
        self.model.setup_cache(MAX_BATCH_SIZE, device=torch.device("cpu"), dtype=torch.float32)
        self._tokenizer = None
        self._formatter = None

    # -- pieces -------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._meta["tokenizer"].Tokenizer.get_instance()
        return self._tokenizer

    @property
    def formatter(self):
        if self._formatter is None:
            self._formatter = self._meta["chat_format"].ChatFormat(self.tokenizer)
        return self._formatter

    def state_dict(self) -> dict[str, torch.Tensor]:
        """consolidated.00.pth's content (the keys Meta's checkpoints have; no buffers)."""
        return {k: v for k, v in self.model.state_dict().items()}

    def transform(self, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Meta's VariableSizeImageTransform: (tiles (n, 3, S, S), (rows, cols))."""
        return self.model.image_transform(image)

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        return self.tokenizer.encode(text, bos=bos, eos=False)

    def llm_input(self, tokens: Sequence[int], images: Sequence[Any] = ()):
        """Meta's LLMInput for tokens holding <|image|> (128011) per image: ChatFormat builds the
        vision mask and rewrites the image token to 128256."""
        tokens = list(tokens)
        if tokens.count(VISION_TOKEN) != len(images):
            raise ValueError(f"{tokens.count(VISION_TOKEN)} <|image|> tokens for {len(images)} images")
        return self.formatter._model_input_from_tokens_images(tokens, [im.convert("RGB") for im in images])

    def encode_content(self, content: Sequence[Any]):
        """ChatFormat.encode_content for a list of str / PIL images (sent as PNG bytes, lossless)."""
        dt = self._meta["datatypes"]
        items = [dt.RawTextItem(text=c) if isinstance(c, str) else dt.RawMediaItem(data=_as_png_bytes(c))
                 for c in content]
        return self.formatter.encode_content(items)

    # -- forward ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        """Meta's logits for every prompt position: one (len(tokens), vocab) float tensor per LLMInput.

        As Llama3.generate's prefill: rows right-padded with pad_id to the longest, vision masks from
        compute_vision_tokens_masks, forward over position_ids = arange(0, S)."""
        inputs = list(inputs)
        if not 0 < len(inputs) <= MAX_BATCH_SIZE:
            raise ValueError(f"1..{MAX_BATCH_SIZE} rows, got {len(inputs)}")
        total_len = max(len(inp.tokens) for inp in inputs)
        if total_len > MAX_SEQ_LEN:
            raise ValueError(f"prompt of {total_len} tokens > max_seq_len {MAX_SEQ_LEN}")
        tokens = torch.full((len(inputs), total_len), self.tokenizer.pad_id, dtype=torch.long)
        for row, inp in enumerate(inputs):
            tokens[row, : len(inp.tokens)] = torch.tensor(inp.tokens, dtype=torch.long)
        images = [inp.vision.images if inp.vision is not None else [] for inp in inputs]
        # _pad_masks writes into the masks it is given: hand it copies.
        masks = [copy.deepcopy(inp.vision.mask) if inp.vision is not None else [] for inp in inputs]
        xattn_caches, cross_masks, row_mask = self.model.compute_vision_tokens_masks(
            batch_images=images, batch_masks=masks, total_len=total_len, device=tokens.device)
        text_only = all(inp.vision is None for inp in inputs)
        logits = self.model.forward(torch.arange(0, total_len, dtype=torch.long), tokens, cross_masks,
                                    row_mask, xattn_caches, text_only)
        return [logits[row, : len(inp.tokens)].float().clone() for row, inp in enumerate(inputs)]

    @torch.inference_mode()
    def vision_features(self, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tiles (1, n_img, 4, 3, S, S), vision_model output (1, n_img, 4, 5, dim)) for one row."""
        mm = self._meta["model"]
        transformed = [self.transform(im.convert("RGB")) for im in images]
        ar = torch.tensor([[list(x[1]) for x in transformed]], dtype=torch.int64)
        stacked, _ = mm._stack_images([[x[0] for x in transformed]], max_num_chunks=self.args.vision_max_num_chunks,
                                      image_res=self.args.vision_chunk_size, max_num_images=len(images))
        return stacked, self.model.vision_model(stacked, ar)

    def generate(self, inputs: Sequence[Any], max_new_tokens: int) -> list[list[int]]:
        """Greedy (temperature 0) tokens from Meta's Llama3.generate, max_new_tokens per row
        (fewer where a stop token came first; the stop token is included)."""
        llama = self._meta["generation"].Llama3(self.model, self.tokenizer, self.args)
        inputs = list(inputs)
        out: list[list[int]] = [[] for _ in inputs]
        done = [False] * len(inputs)
        for step in llama.generate(inputs, temperature=0.0, max_gen_len=max_new_tokens):
            for r in step:
                if r.ignore_token or done[r.batch_idx] or len(out[r.batch_idx]) >= max_new_tokens:
                    continue
                out[r.batch_idx].append(r.token)
                if r.finished:
                    done[r.batch_idx] = True
            if all(d or len(o) >= max_new_tokens for d, o in zip(done, out)):
                break
        return out

    def close(self) -> None:
        if self._own_process_group:
            shutdown_model_parallel()
            self._own_process_group = False
