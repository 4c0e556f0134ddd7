"""Safetensors checkpoint files: header parsing and validation, shard indexes, raw tensor reads.

Headers are parsed by hand so that every problem (truncation, overlaps, unknown dtypes, missing
shards) is reported by name before any tensor data is read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model: every offending name is listed at once."""

    def __init__(self, message: str, *, missing: dict[str, tuple[int, ...]],
                 unexpected: dict[str, tuple[int, ...]],
                 mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
                 duplicated: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched, self.duplicated = missing, unexpected, mismatched, duplicated


class CorruptCheckpointError(CheckpointError):
    """A safetensors file or index that is not well formed (truncated, bad header, ...)."""


class MissingShardError(CheckpointError, FileNotFoundError):
    """The index names shard files that are not there."""


class WrongModelTypeError(CheckpointError):
    """config.json describes some other model than Llama 3.2-Vision (or the other Mllama class)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset of its data, dtype and shape."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        """Bytes per index of the first dimension (0 for an empty tensor)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0

    def rows(self, start: int, stop: int) -> TensorInfo:
        """Where rows start:stop (first dimension) lie: one contiguous byte range of the same file."""
        return TensorInfo(self.file, self.offset + start * self.row_bytes, (stop - start) * self.row_bytes,
                          self.dtype, (stop - start, *self.shape[1:]))


def _load_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpointError(f"{file} is not valid JSON: {err}") from None


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: ({name: TensorInfo}, metadata). Reads no tensor data."""
    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path} is not a valid safetensors file: {why}")

    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise bad(f"only {size} bytes, shorter than the 8-byte header length")
        header_len = int.from_bytes(head, "little")
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise bad(f"header length {header_len} does not fit in the {size}-byte file (truncated?)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed or unsupported entry {entry!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or end - begin != nbytes:
            raise bad(f"tensor {name!r}: offsets {begin}..{end} do not hold {shape} {entry['dtype']}")
        tensors[name] = TensorInfo(path, start + begin, nbytes, dtype, shape)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"tensor {name!r} starts at {begin}, expected {position} (overlap or gap)")
        position = end
    if start + position != size:
        raise bad(f"header describes {start + position} bytes but the file has {size} (truncated or padded)")
    return tensors, metadata


def checkpoint_tensors(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a single-file or sharded checkpoint; validates all headers, reads no data."""
    index_file = directory / SAFE_INDEX_NAME
    if index_file.is_file():
        weight_map = _load_json(index_file)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise CorruptCheckpointError(f"{index_file} is not a safetensors index (no weight_map object)")
        files = sorted(set(weight_map.values()))
        odd = [f for f in files if not isinstance(f, str) or Path(f).name != f]
        if odd:
            raise CorruptCheckpointError(f"{index_file} names shard files outside its directory: {odd}")
        absent = [f for f in files if not (directory / f).is_file()]
        if absent:
            raise MissingShardError(f"{index_file} refers to shard files missing from {directory}: {absent}")
        headers = {f: read_safetensors_header(directory / f)[0] for f in files}
        lost = [f"{k} ({f})" for k, f in weight_map.items() if k not in headers[f]]
        if lost:
            raise CorruptCheckpointError(f"{index_file} lists tensors that are not in their shard: {lost[:20]}")
        return {k: headers[f][k] for k, f in weight_map.items()}
    single = directory / SAFE_WEIGHTS_NAME
    if single.is_file():
        return read_safetensors_header(single)[0]
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pth", ".pt"))
    hint = f" (found {others}: only safetensors checkpoints are supported)" if others else ""
    raise FileNotFoundError(f"{directory} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}{hint}")


def _read_into(handle: Any, info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` (a contiguous CPU tensor of info.nbytes bytes) with the tensor's bytes; returns it."""
    if info.nbytes:
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        handle.seek(info.offset)
        done = 0
        while done < info.nbytes:
            got = handle.readinto(buffer[done:])
            if not got:
                raise CorruptCheckpointError(f"{info.file} ended early (was it modified while loading?)")
            done += got
    return out


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, written aside and renamed into place (a reader never sees half a file).
    Every safetensors file mllama writes goes through here (ShardWriter's shards, LoRA adapters)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}, tmp, metadata={"format": "pt"})
    tmp.replace(path)


class ShardWriter:
    """The one writer of safetensors checkpoints: tensors are added one at a time and written as
    they fill shards of at most `max_shard_size` bytes (greedy in the order given; a tensor larger
    than the limit sits alone), so a streaming caller holds one shard in memory at most.

    `close()` names the files as transformers does: model.safetensors when everything fit in one,
    else model-0000i-of-0000N.safetensors plus model.safetensors.index.json; weight files of an
    earlier save in the directory are removed. Shards are written aside and renamed into place,
    so a process that has an old file mapped keeps its old inode.
    """

    def __init__(self, directory: Path, *, max_shard_size: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.limit = max_shard_size
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.total_parameters = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in keys for _, keys in self._written):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.limit:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes
        self.total_parameters += tensor.numel()

    def _flush(self) -> None:
        tmp = self.directory / f".shard-{len(self._written) + 1:05d}.safetensors.tmp"
        write_safetensors(tmp, self._pending)
        self._written.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is pending, put the files in place; returns the weight file names."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        names = ([SAFE_WEIGHTS_NAME] if count == 1 else
                 [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        for (tmp, _), name in zip(self._written, names):
            tmp.replace(self.directory / name)
        keep = set(names)
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes, "total_parameters": self.total_parameters},
                     "weight_map": {k: name for (_, keys), name in zip(self._written, names) for k in keys}}
            (self.directory / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            keep.add(SAFE_INDEX_NAME)
        stale = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")
        for path in self.directory.iterdir():
            if stale.fullmatch(path.name) and path.name not in keep:
                path.unlink()
        return names
