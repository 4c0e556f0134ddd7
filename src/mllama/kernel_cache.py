"""The per-user cache of compiled decode kernels, safe to load from.

A shared library is code: whoever can write the cache can run code in every mllama process. So the
cache directory is created 0700 and must be owned by this user and writable by nobody else, every
library must be a regular file owned by this user and not group/other writable, and its SHA-256
must equal the one recorded next to it when it was built. A file that fails the hash check (a
truncated or corrupt build, or one from an older mllama without a record) is rebuilt; a directory
or file with unsafe ownership or permissions is refused with a KernelCacheError (the caller falls
back to F.linear). Builds hold an exclusive lock, compile under a temporary name and are renamed
into place, so concurrent first uses neither race nor load a partial file.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

__all__ = ["KernelCacheError", "build_kernel", "default_cache_dir"]


class KernelCacheError(RuntimeError):
    """The kernel cache cannot be used safely (ownership, permissions) or the build failed."""


def default_cache_dir() -> Path:
    root = os.environ.get("MLLAMA_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mllama" / "kernels"


def _check_private(path: Path, *, directory: bool) -> None:
    """`path` (not followed if a symlink) is ours and writable by no one else."""
    info = os.lstat(path)
    kind_ok = stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)
    if not kind_ok:
        raise KernelCacheError(f"refusing kernel cache entry {path}: not a plain {'directory' if directory else 'file'}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise KernelCacheError(f"refusing kernel cache entry {path}: owned by uid {info.st_uid}, not {os.getuid()}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelCacheError(f"refusing kernel cache entry {path}: writable by group or others "
                               f"(mode {stat.S_IMODE(info.st_mode):o}); chmod go-w it or remove it")


def _private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(directory)
    if hasattr(os, "getuid") and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(directory, 0o700)  # ours but too open (created by an older mllama): tighten it
    _check_private(directory, directory=True)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename below still keeps partial files out of sight
        yield
        return
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: Path, record: Path) -> bool:
    """The library is present, private, and matches the hash recorded when it was built."""
    if not os.path.lexists(target):
        return False
    _check_private(target, directory=False)
    if not record.is_file():
        return False
    _check_private(record, directory=False)
    return record.read_text().strip() == _sha256(target)


_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _source_digest(source: Path) -> str:
    """The hash of `source` and of every local header it includes (`#include "x.h"`, found next to the
    file that names it, recursively): a header edit makes a new build, not a stale one."""
    digest = hashlib.sha256()
    seen: set[Path] = set()
    pending = [source.resolve()]
    while pending:
        path = pending.pop(0)
        if path in seen:
            continue
        seen.add(path)
        text = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + text + b"\0")
        for name in _LOCAL_INCLUDE.findall(text):
            header = (path.parent / name.decode()).resolve()
            if header.is_file():  # else the compiler finds it elsewhere (or fails and says so)
                pending.append(header)
    return digest.hexdigest()[:16]


def build_kernel(source: Path, *, cache_dir: Path | None = None, flags: tuple[str, ...] = ("-O3", "-fopenmp")) -> Path:
    """Compile `source` into the cache (keyed by the hash of it and its local headers) unless a verified
    build is there; the .so path."""
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    digest = _source_digest(source)
    target = directory / f"{source.stem}-{digest}-{platform.machine()}.so"
    record = target.with_suffix(".so.sha256")
    _private_dir(directory)
    if _verified(target, record):
        return target
    with _locked(directory):
        if _verified(target, record):  # another process built it while we waited
            return target
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if compiler is None:
            raise KernelCacheError("no C compiler (gcc or cc) on PATH")
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            partial = Path(tmp) / target.name
            cmd = [compiler, *flags, "-shared", "-fPIC", str(source), "-o", str(partial)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelCacheError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
            os.chmod(partial, 0o700)
            hashed = Path(tmp) / record.name
            hashed.write_text(_sha256(partial) + "\n")
            os.chmod(hashed, 0o600)
            os.replace(partial, target)  # a planted or corrupt file is replaced, never loaded
            os.replace(hashed, record)
    if not _verified(target, record):
        raise KernelCacheError(f"{target} changed while it was being built")
    return target


def load_kernel(source: Path, *, fallback: str, stacklevel: int = 2) -> ctypes.CDLL | None:
    """`source` built (build_kernel) and loaded; where it cannot be (no compiler, a failed build, an
    unsafe cache, a library that does not load), None and a RuntimeWarning "mllama: {fallback} (why)"
    attributed `stacklevel` frames above the caller."""
    try:
        return ctypes.CDLL(str(build_kernel(source)))
    except (OSError, RuntimeError) as err:
        warnings.warn(f"mllama: {fallback} ({err})", RuntimeWarning, stacklevel=stacklevel + 1)
        return None


def load_x86_kernel(source: Path, *, fallback: str, stacklevel: int = 2) -> ctypes.CDLL | None:
    """load_kernel for the x86-64 kernels; None, without a warning, where kernels are switched off
    (MLLAMA_NO_KERNELS=1) or the machine is not x86-64."""
    if os.environ.get("MLLAMA_NO_KERNELS") or platform.machine() not in ("x86_64", "AMD64"):
        return None
    return load_kernel(source, fallback=fallback, stacklevel=stacklevel + 1)
