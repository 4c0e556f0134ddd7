"""The hub side of loading: a local directory or file as it is, else a repo id's files downloaded through
huggingface_hub (a snapshot for checkpoints, single files for tokenizer and processor configs), with
HF_HUB_OFFLINE honoured and a failed lookup named as one."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# What from_pretrained downloads from the hub: configs, weights and tokenizer files, not the
# original/consolidated.pth copy that the published repos also carry.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model"]


def is_repo_id(text: str) -> bool:
    """owner/name as the hub spells repo ids."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None


def resolve_checkpoint_dir(path: str | os.PathLike, *, revision: str | None = None,
                           hub: Mapping[str, Any] | None = None) -> Path:
    """A local checkpoint directory, or the snapshot of a hub repo id downloaded via huggingface_hub.
    hub: extra snapshot_download keywords (token, cache_dir, local_files_only, force_download)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"{local} is a file; pass the checkpoint directory or a hub repo id")
    text = str(path)
    if not is_repo_id(text):
        raise FileNotFoundError(f"{text} is neither a local directory nor a hub repo id (owner/name)")
    from huggingface_hub import snapshot_download

    options = dict(hub or {})
    if hub_offline():
        options["local_files_only"] = True
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS, **options))
    except Exception as err:  # not found, gated, offline, no network: all mean "no such checkpoint here"
        raise FileNotFoundError(hub_lookup_failed(text, err)) from err


def resolve_file(path: str | os.PathLike, filename: str, *, revision: str | None = None,
                 required: bool = True) -> Path | None:
    """Find `filename` in a local directory, or download it from the hub when `path` is a repo id."""
    local = Path(path)
    if local.is_file():
        return local
    if local.is_dir():
        candidate = local / filename
        if candidate.is_file():
            return candidate
        if required:
            raise FileNotFoundError(f"{local} has no {filename}")
        return None
    text = str(path)
    if not is_repo_id(text):
        raise FileNotFoundError(f"{text} is neither a local directory nor a hub repo id (owner/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(text, filename, revision=revision, local_files_only=hub_offline()))
    except Exception as err:  # not found, gated, offline, no network
        if isinstance(err, EntryNotFoundError) and not isinstance(err, LocalEntryNotFoundError):
            if required:  # the repo is there, the file is not
                raise FileNotFoundError(f"hub repo {text} has no {filename}") from None
            return None
        if not required and hub_offline():
            return None
        raise FileNotFoundError(hub_lookup_failed(text, err)) from err


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_lookup_failed(text: str, err: BaseException) -> str:
    """The error for a name that is no local path and could not be had from the hub: a mistyped local
    path looks like a repo id, so say plainly that it was looked up remotely."""
    where = "in the local hub cache only (HF_HUB_OFFLINE is set)" if hub_offline() else "on the Hugging Face hub"
    return (f"{text!r} is not a local path (relative to {os.getcwd()}), so it was looked up as a repo id "
            f"{where}, and that failed: {type(err).__name__}: {str(err)[:300]} "
            "(gated repos need `hf auth login`)")
