"""Names, constants and checksums of the checkpoint format (see docs/checkpoint-format.md).

Everything that decides how a checkpoint looks on disk lives here, so the writer,
the reader and the tools agree by construction.
"""

from __future__ import annotations

import math
import re

import torch

from .._bytes import cpu_bytes
from ._checksum import CRC32C, hex_digest

FORMAT_NAME = "shardema-ema"
FORMAT_VERSION = 2
"""Format 2: CRC-32C checksums of every piece and of each file's header (format 1: zlib CRC-32 of
every piece and of each whole file); both are read."""
MANIFEST_NAME = "manifest.json"
FILE_SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
STAGING_MARK = ".tmp-"
RESUME_ORDER = ("latest", "last")

_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,127}")  # used with fullmatch: no trailing newline
_RANK_FILE_RE = re.compile(r"rank-(\d{5,})-of-(\d{5,})\.safetensors")

# torch dtype <-> safetensors dtype code (only the dtypes safetensors defines).
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code
_TORCH_DTYPES = {code: dtype for dtype, code in _ST_DTYPES.items()}


def validate_tag(tag) -> str:
    """Check a checkpoint tag: 1-128 letters, digits, ``_`` or ``-``, starting with a letter or digit."""
    if not isinstance(tag, str) or not _TAG_RE.fullmatch(tag):
        raise ValueError(
            f"checkpoint tag {tag!r} is not valid: use 1-128 letters, digits, '_' or '-', starting with a "
            "letter or digit, e.g. 'latest', 'last' or 'E3_U300_S9600' ('.', '/' and '=' are reserved)"
        )
    return tag


def factor_name(factor: float) -> str:
    """The text of a factor in directory names and keys: Python's shortest round-trip ``repr``."""
    return repr(float(factor))


def cp_dirname(tag: str) -> str:
    """Directory of a committed checkpoint: ``cp=<tag>``."""
    return f"cp={tag}"


def old_dirname(tag: str) -> str:
    """Where the previous committed version waits while a new one is swapped in: ``cp=<tag>.old``."""
    return f"cp={tag}{OLD_SUFFIX}"


def staging_dirname(tag: str, save_id: str) -> str:
    """Directory a save writes into before it commits: ``cp=<tag>.tmp-<save id>``."""
    return f"cp={tag}{STAGING_MARK}{save_id}"


def ema_dirname(factor: float) -> str:
    """Sub-directory of one factor: ``ema=<factor>``."""
    return f"ema={factor_name(factor)}"


def rank_filename(rank: int, world_size: int) -> str:
    """File of one rank: ``rank-00003-of-00008.safetensors``."""
    return f"rank-{rank:05d}-of-{world_size:05d}{FILE_SUFFIX}"


def parse_cp_dirname(name: str) -> tuple[str, str] | None:
    """``(tag, state)`` of a ``cp=...`` directory name, state in committed/old/staging; None otherwise."""
    if not name.startswith("cp="):
        return None
    body = name[3:]
    if STAGING_MARK in body:
        tag, _, save_id = body.partition(STAGING_MARK)
        return (tag, "staging") if _TAG_RE.fullmatch(tag) and save_id else None
    if body.endswith(OLD_SUFFIX):
        tag = body[: -len(OLD_SUFFIX)]
        return (tag, "old") if _TAG_RE.fullmatch(tag) else None
    return (body, "committed") if _TAG_RE.fullmatch(body) else None


def parse_rank_filename(name: str) -> tuple[int, int] | None:
    """``(rank, world_size)`` of a rank file name, else None."""
    match = _RANK_FILE_RE.fullmatch(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype; raises for dtypes safetensors cannot store."""
    try:
        return _ST_DTYPES[dtype]
    except KeyError:
        raise NotImplementedError(f"dtype {dtype} cannot be stored in safetensors files") from None


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code."""
    try:
        return _TORCH_DTYPES[code]
    except KeyError:
        raise ValueError(f"unknown safetensors dtype {code!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the spelling used in metadata)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises for unknown names."""
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r} in checkpoint metadata")
    return value


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` (C order, native little-endian) as a zero-copy buffer on the CPU.

    No numpy: see [Note: no numpy at runtime] in ``shardema._bytes``.
    """
    return cpu_bytes(tensor)


def tensor_checksum(tensor: torch.Tensor, algorithm: str = CRC32C) -> str:
    """Checksum of the tensor's raw bytes as 8 hex digits: CRC-32C (format 2) or zlib's CRC-32 (format 1)."""
    return hex_digest(algorithm, tensor_bytes(tensor))


def box_overlap(offset_a, shape_a, offset_b, shape_b) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Intersection of two boxes ``[offset, offset + shape)`` as ``(offset, shape)``, or None if empty."""
    starts, sizes = [], []
    for oa, sa, ob, sb in zip(offset_a, shape_a, offset_b, shape_b):
        lo, hi = max(oa, ob), min(oa + sa, ob + sb)
        if hi <= lo:
            return None
        starts.append(lo)
        sizes.append(hi - lo)
    return tuple(starts), tuple(sizes)


def numel(shape) -> int:
    """Number of elements of a shape (1 for a 0-dim shape)."""
    return math.prod(shape)
