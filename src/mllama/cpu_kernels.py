"""CPU decode kernels, built from csrc/ on first use: bf16 (csrc/gemv_bf16.c) and small-row
products against bf16, int8 and int4 weights (csrc/gemm_small.c, used by mllama.quantize).

Decoding one token reads every weight once, so tokens/s is set by how fast the weights stream from
memory. On the project's AMD EPYC (AVX-512 BF16) torch 2.13's bf16 `F.linear` with one row streams
them at 16-17 GB/s, csrc/gemv_bf16.c at 30-38 GB/s (the machine reads 33-51 GB/s; see
benchmarks/RESULTS.md). The C file is compiled with the system C compiler into a private per-user
cache (mllama.kernel_cache: 0700, owner and SHA-256 checked before loading) the first time it is
needed (about a second) and called through ctypes. Without a compiler, on a CPU with neither
AVX-512 BF16 nor AVX2, with an unsafe cache, or with MLLAMA_NO_KERNELS=1, everything falls back to
`F.linear`.

`gemv_bf16` (and mllama.quant_ops' `linear_int8` / `linear_int4`) are torch custom ops under
torch.compile, so a compiled decode step keeps each as one opaque call (eager calls skip the op
dispatcher). Up to MAX_ROWS rows (a batched decode step of the engine) each weight is read from
memory once per call; beyond that the library GEMM reuses weights from cache as well. On CPUs with
AMX-BF16 (Intel Sapphire Rapids and later) csrc/gemm_amx.c's tiles take 2 to MAX_AMX_ROWS rows
of bf16 x against bf16 weights in place and against int4 weights dequantized a block at a time
(`amx_product`): a tile product costs the same for 1 or 16 rows. With AMX-INT8, int8
weights go through the int8 tiles as they are, from AMX_INT8_MIN_ROWS rows up (`amx_int8_tiles`), and
int4 weights too, one group's integer sums at a time (`amx_int4_tiles`).
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

import torch

from mllama.kernel_cache import load_kernel

SOURCE = Path(__file__).parent / "csrc" / "gemv_bf16.c"
SMALL_SOURCE = Path(__file__).parent / "csrc" / "gemm_small.c"
AMX_SOURCE = Path(__file__).parent / "csrc" / "gemm_amx.c"
MAX_ROWS = 16  # rows of a decode step (one per engine slot) that go through the bf16 kernel
MAX_AVX512_ROWS = 32  # with AVX-512 BF16, up to this many (its chunked passes beat torch's GEMM up to 32)
MAX_AMX_ROWS = 64  # with AMX tiles, up to this many (gemm_amx.c's AMX_MAX_M; 1.3-1.8x torch's GEMM at 32-64)
MAX_QUANT_ROWS = 32  # gemm_small.c's limit; more rows dequantize and call the library GEMM

_lib: ctypes.CDLL | None = None
_small: ctypes.CDLL | None = None
_amx_lib: ctypes.CDLL | None = None  # csrc/gemm_amx.c, where its AMX-BF16 tiles run here
_level = 0
_small_level = 0  # csrc/gemm_small.c's instruction set: 1 AVX2, 2 AVX512-VNNI, 3 AVX-VNNI
_amx_int8 = False  # and its AMX-INT8 tiles (int8 and int4 weights without dequantizing to bf16)
AMX_INT8_MAX_K = 65536  # gemm_amx.c's: the tiles' int32 sums stay exact up to this many values
# From this many rows of bf16 x, int8 and int4 weights take the AMX-INT8 tiles; one row streams as
# fast or faster through gemm_small.c's one-row loops (benchmarks/RESULTS.md), int8's with a finer x grid.
AMX_INT8_MIN_ROWS = 2
# On a CPU with AVX-512 BF16 but no AMX tiles, bf16 x of this many rows (up to MAX_AVX512_ROWS) against
# int8 or int4 weights takes quant_gemv (weights dequantized a chunk at a time into L1 for the bf16
# passes); fewer rows stream faster through gemm_small.c's integer loops (benchmarks/RESULTS.md):
# int4 rows that its 512-bit VNNI tiles take (int4_tile512) up to FUSED_MIN_ROWS_INT4_TILE512.
FUSED_MIN_ROWS = {"int8": 2, "int4": 6}
FUSED_MIN_ROWS_INT4_TILE512 = 24
_tried = False
FORMAT_CODES = {"bf16": 0, "int8": 1, "int4": 2}  # the C kernels' `fmt` (csrc/dequant.h)


def _load() -> None:
    global _lib, _small, _amx_lib, _level, _small_level, _tried, _amx_int8
    _tried = True
    if os.environ.get("MLLAMA_NO_KERNELS") or platform.machine() not in ("x86_64", "AMD64"):
        return
    fallback = "decode kernels unavailable, using F.linear"
    lib = load_kernel(SOURCE, fallback=fallback, stacklevel=3)
    small = load_kernel(SMALL_SOURCE, fallback=fallback, stacklevel=3) if lib is not None else None
    if small is None:
        return
    lib.mllama_gemv_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int] * 2
    lib.mllama_gemv_bf16.restype = None
    lib.mllama_gemv_quant.argtypes = ([ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3
                                      + [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])
    lib.mllama_gemv_quant.restype = ctypes.c_int
    small.mllama_gemm_small.argtypes = ([ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 3
                                        + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p,
                                                                   ctypes.c_int, ctypes.c_int])
    small.mllama_gemm_small.restype = ctypes.c_int
    small.mllama_gemm_small_row_bf16.argtypes = ([ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 3
                                                 + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int64,
                                                                            ctypes.c_void_p, ctypes.c_int, ctypes.c_int])
    small.mllama_gemm_small_row_bf16.restype = ctypes.c_int
    small.mllama_gemm_small_silu_bf16.argtypes = ([ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 3
                                                  + [ctypes.c_void_p] * 6 + [ctypes.c_int, ctypes.c_int64,
                                                                             ctypes.c_void_p, ctypes.c_int, ctypes.c_int])
    small.mllama_gemm_small_silu_bf16.restype = ctypes.c_int
    small.mllama_dequant_int4.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_int64] * 4
                                          + [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int])
    small.mllama_dequant_int4.restype = ctypes.c_int
    small.mllama_dequant_int8.argtypes = ([ctypes.c_void_p] * 2 + [ctypes.c_int] + [ctypes.c_int64] * 2
                                          + [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int])
    small.mllama_dequant_int8.restype = ctypes.c_int
    _level = lib.mllama_gemv_level()
    _lib = lib if _level > 0 else None
    _small_level = small.mllama_gemm_small_level()
    _small = small if _lib is not None and _small_level else None
    amx = _load_amx() if _small is not None and _level == 2 else None
    _amx_lib = amx if amx is not None and amx.mllama_amx_usable() else None
    _amx_int8 = _amx_lib is not None and bool(_amx_lib.mllama_amx_int8_usable())


def _load_amx() -> ctypes.CDLL | None:
    """csrc/gemm_amx.c, on its own: a compiler without the AMX intrinsics (gcc < 11) costs the tiles
    only, not the other kernels."""
    amx = load_kernel(AMX_SOURCE, fallback="AMX tile kernels unavailable", stacklevel=4)
    if amx is None:
        return None
    amx.mllama_gemm_amx.argtypes = ([ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3
                                    + [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int])
    amx.mllama_gemm_amx.restype = ctypes.c_int
    amx.mllama_amx_usable.restype = ctypes.c_int
    amx.mllama_amx_int8_usable.restype = ctypes.c_int
    return amx


def gemv_available() -> bool:
    if not _tried:
        _load()
    return _lib is not None


def gemv_level() -> int:
    """The bf16 decode kernel's instruction set here: 0 not available, 1 AVX2, 2 AVX-512 BF16 (both
    csrc/gemv_bf16.c), 3 also AMX-BF16 (csrc/gemm_amx.c's tiles for 2 to MAX_AMX_ROWS rows of x:
    up to 16 stream the weights once at memory speed)."""
    if not gemv_available():
        return 0
    return 3 if _amx_lib is not None else _level


def amx_available() -> bool:
    return gemv_level() == 3


def amx_int8_tiles(k: int) -> bool:
    """Whether int8 weights of rows of k values take the AMX-INT8 tiles here (any number of rows of
    bf16 x, each rounded to int16 on its own grid; see gemm_amx.c)."""
    return amx_available() and _amx_int8 and k % 64 == 0 and 0 < k <= AMX_INT8_MAX_K


def amx_int4_tiles(n: int, group_size: int) -> bool:
    """Whether int4 weights of n rows take the AMX-INT8 tiles here (any number of rows of bf16 x,
    rounded to int8 per group as the small-row int4 kernels do; see gemm_amx.c)."""
    return amx_available() and _amx_int8 and group_size % 64 == 0 and n % 32 == 0


def amx_product(x: torch.Tensor, fmt: str, weight: torch.Tensor, scale: torch.Tensor | None = None,
                offset: torch.Tensor | None = None, *, group_size: int = 0) -> torch.Tensor | None:
    """(M, K) bf16 x weights in `fmt` (as small_gemm) -> (M, N) float32 through the AMX tiles: bf16
    weights in place, int8 and int4 through the int8 tiles where `amx_int8_tiles(K)` /
    `amx_int4_tiles(N, group_size)` (any M), else dequantized to bf16 a block of rows at a time (the
    values dequantize_* give). None where they do not run: no AMX, M outside 2..MAX_AMX_ROWS (but for
    the int8 tiles), K not a multiple of 32, x not bf16."""
    m, k = x.shape
    tiles = (fmt == "int8" and amx_int8_tiles(k)) or (fmt == "int4" and amx_int4_tiles(weight.shape[0], group_size))
    rows_ok = m >= 1 if tiles else 2 <= m <= MAX_AMX_ROWS
    if not amx_available() or not rows_ok or k % 32 or x.dtype != torch.bfloat16:
        return None
    k_row = row_length(fmt, weight)
    scale_bf16 = scales_bf16(scale, offset)
    if scale_bf16 is None:
        return None
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(m, weight.shape[0], dtype=torch.float32)
    rc = _amx_lib.mllama_gemm_amx(FORMAT_CODES[fmt], x.data_ptr(), m, weight.shape[0], k_row, k,
                                *weight_pointers(weight, scale, offset), int(scale_bf16), group_size, out.data_ptr(),
                                torch.get_num_threads())
    return out if rc == 0 else None


def gemv_max_rows() -> int:
    """The most rows of x that use_gemv sends to the kernel here: where it beats torch's GEMM, up to
    MAX_ROWS with AVX2, MAX_AVX512_ROWS with AVX-512 BF16 (three rows of x a weight load) and
    MAX_AMX_ROWS on AMX tiles (benchmarks/RESULTS.md)."""
    level = gemv_level()
    return MAX_AMX_ROWS if level >= 3 else MAX_AVX512_ROWS if level == 2 else MAX_ROWS


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ weight.T` should go through the kernel: few rows, bf16, CPU, no autograd."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.shape[:-1].numel() <= gemv_max_rows()
            and not torch.is_grad_enabled() and gemv_available())


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., K) bf16 x (N, K) bf16 -> (..., N) bf16, accumulated in float32 and rounded once.

    Under torch.compile this is the custom op mllama::gemv_bf16 (opaque to the graph); eager calls
    skip the op dispatcher, which cost more than the kernel itself for the weights of small models
    (benchmarks/RESULTS.md). linear_int8 and linear_int4 do the same."""
    if torch.compiler.is_compiling():
        return _gemv_bf16_op(x, weight)
    return _gemv_bf16(x, weight)


def _gemv_bf16(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not gemv_available():
        raise RuntimeError("the bf16 decode kernel is not available on this machine")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"gemv_bf16: x has {k} features but weight has shape {tuple(weight.shape)}")
    out = gemv_float32(x.reshape(-1, k), weight, level=gemv_level())
    return out.to(torch.bfloat16).reshape(*x.shape[:-1], weight.shape[0])


def gemv_float32(rows: torch.Tensor, weight: torch.Tensor, *, level: int) -> torch.Tensor:
    """(M, K) bf16 x (N, K) bf16 -> (M, N) float32 with the given instruction set (gemv_level's numbers;
    tests use each one the CPU has)."""
    if not gemv_available() or level > gemv_level() or level < 1:
        raise RuntimeError(f"kernel level {level} not available (this CPU: {gemv_level()})")
    if level == 3:
        out = amx_product(rows, "bf16", weight)
        if out is not None:
            return out
        level = 2  # one row (the AVX-512 loop streams it a little faster), or a shape the tiles do not take
    if level == 1 and rows.shape[0] > 1:  # AVX2: the tiled kernel reuses each widened weight for 4 rows
        return small_gemm(rows, "bf16", weight)
    rows, weight = rows.contiguous(), weight.contiguous()
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
    _lib.mllama_gemv_bf16(rows.data_ptr(), weight.data_ptr(), out.data_ptr(), rows.shape[0], weight.shape[0],
                          rows.shape[1], torch.get_num_threads(), level)
    return out


_gemv_bf16_op = torch.library.custom_op("mllama::gemv_bf16", _gemv_bf16, mutates_args=())


@_gemv_bf16_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def quant_kernels_available() -> bool:
    """Whether csrc/gemm_small.c (int8 and int4 decode products) runs here (AVX2 + FMA)."""
    return gemv_available() and _small is not None


def small_library() -> ctypes.CDLL | None:
    """csrc/gemm_small.c as loaded here (None where it does not run): for mllama.quant_ops, which wraps
    its whole-weight dequantizers."""
    return _small if quant_kernels_available() else None


def small_kernel_level() -> int:
    """csrc/gemm_small.c's instruction set here: 0 not available, 1 AVX2, 2 AVX512-VNNI, 3 AVX-VNNI."""
    return _small_level if quant_kernels_available() else 0


def scales_bf16(*params: torch.Tensor | None) -> bool | None:
    """Whether the given scales and offsets are bf16 (else float32), as the C kernels' `scale_bf16`;
    None unless all are contiguous and of one of those dtypes."""
    given = [p for p in params if p is not None]
    bf16 = bool(given) and given[0].dtype == torch.bfloat16
    if any(p.dtype != (torch.bfloat16 if bf16 else torch.float32) or not p.is_contiguous() for p in given):
        return None
    return bf16


def small_gemm(rows: torch.Tensor, fmt: str, weight: torch.Tensor, scale: torch.Tensor | None = None,
               offset: torch.Tensor | None = None, *, group_size: int = 0, level: int | None = None) -> torch.Tensor:
    """(M, K) rows of any float dtype x weights in `fmt` (see csrc/gemm_small.c) -> (M, N) float32.

    bf16: weight (N, K) bf16. int8: weight (N, K) int8, scale (N,). int4: weight (N, Kp / 2) uint8
    with Kp = K rounded up to group_size, scale and offset (N, Kp / group_size). Scales are float32
    or bf16. M is at most MAX_QUANT_ROWS. level: the instruction set (default the best here; 1 forces
    AVX2, as tests do; VNNI changes only the int4 path for groups of a multiple of 64, bit for bit).
    """
    if not quant_kernels_available():  # loads the kernels on first use
        raise RuntimeError("the small-row decode kernels are not available on this machine")
    level = _small_level if level is None else level
    if level not in (1, _small_level):
        raise RuntimeError(f"kernel level {level} not available (this CPU: {_small_level})")
    m, k = rows.shape
    n = weight.shape[0]
    k_row = row_length(fmt, weight)
    if not 1 <= m <= MAX_QUANT_ROWS or k > k_row or (fmt != "int4" and k != k_row):
        raise ValueError(f"small_gemm: {m} rows of {k} features against a {fmt} weight of shape {tuple(weight.shape)}")
    m_pad = m if m == 1 else m + m % 2  # the kernel tiles rows in pairs and fours
    if m_pad == m and k == k_row:
        x = rows.to(torch.float32).contiguous()  # one conversion, no copy where it is float32 already
    else:
        x = rows.new_zeros((m_pad, k_row), dtype=torch.float32)
        x[:m, :k] = rows
    scale_bf16 = scales_bf16(scale, offset)
    if scale_bf16 is None:
        raise ValueError("small_gemm: scales and offsets must be contiguous, all float32 or all bf16")
    out = torch.empty(m_pad, n, dtype=torch.float32)
    weight = weight.contiguous()
    rc = _small.mllama_gemm_small(FORMAT_CODES[fmt], x.data_ptr(), m_pad, n, k_row,
                                  *weight_pointers(weight, scale, offset), int(scale_bf16), group_size, out.data_ptr(),
                                  torch.get_num_threads(), level)
    if rc != 0:
        raise ValueError(f"small_gemm: the kernel refused {fmt} with group size {group_size} for shape {tuple(weight.shape)}")
    return out[:m]


def small_gemm_row(row: torch.Tensor, fmt: str, weight: torch.Tensor, scale: torch.Tensor,
                   offset: torch.Tensor | None = None, *, group_size: int = 0, level: int | None = None) -> torch.Tensor:
    """One contiguous bf16 row (..., K) holding K values x int8 / int4 weights (small_gemm's formats,
    all contiguous) -> (..., N) bf16: small_gemm's product rounded to bf16, the same bits as
    small_gemm(row, level=level).to(bfloat16), with the conversions in the kernel (a decode step's call).
    The caller checks what small_gemm checks (quant_kernels_available, dtypes, layout)."""
    level = _row_level(level)
    k, n = row.shape[-1], weight.shape[0]
    out = torch.empty(*row.shape[:-1], n, dtype=torch.bfloat16)
    rc = _small.mllama_gemm_small_row_bf16(FORMAT_CODES[fmt], row.data_ptr(), k, n, row_length(fmt, weight),
                                           *weight_pointers(weight, scale, offset), scale.dtype == torch.bfloat16,
                                           group_size, out.data_ptr(), torch.get_num_threads(), level)
    if rc != 0:
        raise ValueError(f"small_gemm_row: the kernel refused a row of {k} features against a {fmt} weight of "
                         f"shape {tuple(weight.shape)} (group size {group_size})")
    return out


def small_gemm_silu_row(row: torch.Tensor, fmt: str, gate: tuple[torch.Tensor, ...], up: tuple[torch.Tensor, ...], *,
                        group_size: int = 0, level: int | None = None) -> torch.Tensor:
    """An MLP's silu(gate(row)) * up(row) in one C call: `gate` and `up` each (weight, scale[, offset]) as
    small_gemm_row takes them, of one format, shape and scale dtype -> (..., N) bf16: the bits of
    F.silu(small_gemm_row(row, *gate)) * small_gemm_row(row, *up) but where csrc/gemm_small.c's e^x and
    torch's put a silu on two sides of a bf16 rounding (one bf16 step; rare, see row_kernels)."""
    level = _row_level(level)
    k, n = row.shape[-1], gate[0].shape[0]
    out = torch.empty(*row.shape[:-1], n, dtype=torch.bfloat16)
    rc = _small.mllama_gemm_small_silu_bf16(FORMAT_CODES[fmt], row.data_ptr(), k, n, row_length(fmt, gate[0]),
                                            *weight_pointers(*gate), *weight_pointers(*up), gate[1].dtype == torch.bfloat16,
                                            group_size, out.data_ptr(), torch.get_num_threads(), level)
    if rc != 0:
        raise ValueError(f"small_gemm_silu_row: the kernel refused a row of {k} features against {fmt} weights of "
                         f"shape {tuple(gate[0].shape)} (group size {group_size})")
    return out


def row_entry_points() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr, int] | None:
    """gemm_small.c's one-row product and fused silu (small_gemm_row's and small_gemm_silu_row's calls)
    and the instruction level they take, for a C caller (mllama.decode_layer); None where they do not run."""
    if not quant_kernels_available():
        return None
    return _small.mllama_gemm_small_row_bf16, _small.mllama_gemm_small_silu_bf16, _small_level


def _row_level(level: int | None) -> int:
    level = _small_level if level is None else level
    if level not in (1, _small_level):
        raise RuntimeError(f"kernel level {level} not available (this CPU: {_small_level})")
    return level


def row_length(fmt: str, weight: torch.Tensor) -> int:
    """Values in a stored weight row (int4: two a byte, the row padded to whole groups)."""
    return weight.shape[1] * 2 if fmt == "int4" else weight.shape[1]


def weight_pointers(weight: torch.Tensor, scale: torch.Tensor | None = None,
                    offset: torch.Tensor | None = None) -> tuple[int, int | None, int | None]:
    """The C kernels' weight, scale and offset arguments (NULL for those a format does not have)."""
    return (weight.data_ptr(), scale.data_ptr() if scale is not None else None,
            offset.data_ptr() if offset is not None else None)


def int4_tile512(group_size: int, k_row: int) -> bool:
    """Whether gemm_small.c takes int4 weights of this group size and padded row length (k_row values)
    through its 512-bit VNNI tiles here (any rows up to MAX_QUANT_ROWS): groups of a multiple of 128,
    or of 64 in rows of a multiple of 128 (a pair of groups per run)."""
    return small_kernel_level() == 2 and (group_size % 128 == 0 or (group_size == 64 and k_row % 128 == 0))


def fused_quant_rows(fmt: str, rows: int, *, group_size: int = 0, k_row: int = 0) -> bool:
    """Whether `rows` rows of bf16 x against `fmt` ("int8" / "int4") weights take quant_gemv here
    (int4: of this group size and padded row length)."""
    least = FUSED_MIN_ROWS[fmt]
    if rows < least or rows > MAX_AVX512_ROWS or not quant_kernels_available() or _level != 2 or amx_available():
        return False
    return fmt != "int4" or rows >= FUSED_MIN_ROWS_INT4_TILE512 or not int4_tile512(group_size, k_row)


def quant_gemv(rows: torch.Tensor, fmt: str, weight: torch.Tensor, scale: torch.Tensor,
               offset: torch.Tensor | None = None, *, group_size: int = 0) -> torch.Tensor | None:
    """(M, K) bf16 rows x int8 or int4 weights (small_gemm's formats) -> (M, N) float32 by
    csrc/gemv_bf16.c's AVX-512 BF16 passes over the weights dequantized a chunk at a time: equal bit
    for bit to gemv_bf16 on the weight dequantized to bf16 (dequantize_int8 / dequantize_int4), in
    any batch. None where it does not run: no AVX-512 BF16, M outside 1..MAX_AVX512_ROWS, x not bf16,
    a group that does not divide the kernel's chunk of 1024 values."""
    m, k = rows.shape
    k_row = row_length(fmt, weight)
    if (not quant_kernels_available() or _level != 2 or rows.dtype != torch.bfloat16 or not 1 <= m <= MAX_AVX512_ROWS
            or (fmt == "int4" and (group_size < 32 or 1024 % group_size))):
        return None
    if k > k_row or (fmt != "int4" and k != k_row):
        raise ValueError(f"quant_gemv: {m} rows of {k} features against a {fmt} weight of shape {tuple(weight.shape)}")
    scale_bf16 = scales_bf16(scale, offset)
    if scale_bf16 is None:
        raise ValueError("quant_gemv: scales and offsets must be contiguous, all float32 or all bf16")
    if k == k_row:
        x = rows.contiguous()
    else:  # int4 rows padded to the group: the padding's weights meet zeros
        x = rows.new_zeros((m, k_row))
        x[:, :k] = rows
    weight = weight.contiguous()
    out = torch.empty(m, weight.shape[0], dtype=torch.float32)
    rc = _lib.mllama_gemv_quant(FORMAT_CODES[fmt], x.data_ptr(), m, weight.shape[0], k_row,
                                *weight_pointers(weight, scale, offset), int(scale_bf16), group_size, out.data_ptr(),
                                torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"quant_gemv: the kernel refused {fmt} with group size {group_size} for shape {tuple(weight.shape)}")
    return out
