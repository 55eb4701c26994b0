"""The manifest (commit marker): building, validating, and finding committed versions.

[Note: versions and completeness]
A save of tag ``T`` covers a set ``S`` of model paths (``manifest["model_paths"]``)
and gets one ``save_id``. For each model path it ends up in ``<label>/cp=T``; while a
new save is being swapped in, the previous one may sit in ``<label>/cp=T.old``. A
*version* is one such directory with a valid manifest. A version is *complete* when
every model path of its ``S`` has a version with the same ``save_id`` (at ``cp=T``
or ``cp=T.old``). Readers only ever use complete versions, preferring ``cp=T``; the
commit protocol (see ``_writer``) keeps one complete version findable at every
instant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .._shards import path_label
from ..config import DecaySchedule, check_factors, check_model_paths, factors_match
from ._format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    box_overlap,
    cp_dirname,
    dtype_from_name,
    ema_dirname,
    numel,
    old_dirname,
    parse_rank_filename,
    validate_tag,
)


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or inconsistent (the directory is not committed)."""


@dataclass
class Version:
    """One committed directory of one model path: ``cp=<tag>`` or ``cp=<tag>.old``."""

    model_path: str | None
    tag: str
    directory: Path
    manifest: dict

    @property
    def save_id(self) -> str:
        return self.manifest["save_id"]

    def files_of(self, factor: float) -> list[dict]:
        """The manifest's file entries of one saved factor (exact float match)."""
        return [f for f in self.manifest["files"] if float(f["factor"]) == float(factor)]


@dataclass
class Candidate:
    """A complete version of a tag: one :class:`Version` per model path of the save."""

    tag: str
    save_id: str
    versions: dict = field(default_factory=dict)  # model path -> Version

    @property
    def manifest(self) -> dict:
        """The manifest of any member (they share step, schedule, factors and save id)."""
        return next(iter(self.versions.values())).manifest

    def describe(self) -> str:
        return ", ".join(str(v.directory) for v in self.versions.values())


def saved_factor(manifest: dict, factor: float) -> float | None:
    """The saved factor equal to ``factor`` (see ``config.FACTOR_MATCH_TOLERANCE``), or None."""
    for saved in manifest["factors"]:
        if factors_match(saved, factor):
            return float(saved)
    return None


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ManifestError(message)


# ---------------------------------------------------------------------- the schema
# [Note: manifests are untrusted]
# A manifest is read from disk and may be damaged or hostile. It is parsed with a
# typed schema (sizes and depth bounded) before anything uses it, so every malformed
# manifest is "corrupt" (the version is skipped with a warning naming the field), and
# no value read from it can name a path outside the checkpoint root: model paths are
# dotted submodule paths, file paths are ``ema=<factor>/rank-R-of-W.safetensors``.

MAX_MANIFEST_BYTES = 1 << 30
"""A manifest larger than this is corrupt (16,384 ranks x 1,000 tensors stay well below)."""
_MAX_DIMS = 64
_HEX = r"^[0-9a-f]{1,16}$"

NonNegative = Annotated[int, Field(ge=0)]
Box = Annotated[list[NonNegative], Field(max_length=_MAX_DIMS)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


Checksum = Annotated[str, Field(pattern=_HEX)]


class PieceEntry(_Schema):
    """Where one stored piece lies in its global tensor, and its checksum (format 2: ``crc32c``; 1: ``crc32``)."""

    offset: Box
    shape: Box
    crc32c: Checksum | None = None
    crc32: Checksum | None = None


class FileEntry(_Schema):
    """One rank's file of one factor; format 2 checks its header (``header_crc32c``), format 1 the whole file."""

    path: Annotated[str, Field(max_length=256)]
    factor: float
    rank: NonNegative
    size: NonNegative
    header_crc32c: Checksum | None = None
    crc32: Checksum | None = None
    pieces: dict[str, PieceEntry]


class TensorEntry(_Schema):
    """One tensor of the tensor table."""

    global_shape: Box
    dtype: str
    blended: bool = True
    is_buffer: bool = False
    aliases: list[str] = []

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        dtype_from_name(value)
        return value


class ManifestSchema(_Schema):
    """The manifest of one committed ``cp=<tag>`` directory (see docs/checkpoint-format.md)."""

    format: Literal["shardema-ema"]
    format_version: int
    save_id: Annotated[str, Field(pattern=r"^[0-9A-Za-z_-]{1,64}$")]
    tag: str
    model_path: str | None
    model_paths: list[str | None]
    step: NonNegative
    schedule: DecaySchedule
    factors: list[float]
    world_size: Annotated[int, Field(ge=1)]
    tensors: dict[str, TensorEntry]
    files: list[FileEntry]
    created_unix: float | None = None
    mesh_shapes: list[list[NonNegative]] = []
    samples_seen: Annotated[float, Field(ge=0)] = 0.0
    samples_pending: Annotated[float, Field(ge=0)] = 0.0

    @field_validator("format_version")
    @classmethod
    def _supported(cls, value: int) -> int:
        return _supported_version(value)

    @field_validator("tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        return validate_tag(value)

    @field_validator("model_paths")
    @classmethod
    def _paths(cls, value: list[str | None]) -> list[str | None]:
        return list(check_model_paths(value))

    @field_validator("factors")
    @classmethod
    def _factors(cls, value: list[float]) -> list[float]:
        return list(check_factors(value))

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule_from_json(cls, value: Any) -> Any:
        # DecaySchedule is a pydantic model; JSON gives a mapping (strict mode would refuse it).
        return DecaySchedule.model_validate(value, strict=False) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent(self) -> ManifestSchema:
        _check_consistency(self)
        return self


# The validators' logic lives in plain functions: mutation testing (mutmut) skips decorated ones.
def _supported_version(value: int) -> int:
    if not 1 <= value <= FORMAT_VERSION:
        raise ValueError(f"format_version {value!r} is not supported (this shardema reads 1..{FORMAT_VERSION})")
    return value


def _check_consistency(manifest: ManifestSchema) -> None:
    """Format 2 files carry ``header_crc32c`` and pieces ``crc32c`` (format 1: ``crc32`` for both);
    the manifest's own model path is one of its model paths."""
    version = manifest.format_version
    file_key, piece_key = ("header_crc32c", "crc32c") if version >= 2 else ("crc32", "crc32")
    for i, entry in enumerate(manifest.files):
        if getattr(entry, file_key) is None:
            raise ValueError(f"files.{i}.{file_key} is required by format_version {version}")
        for fqn, piece in entry.pieces.items():
            if getattr(piece, piece_key) is None:
                raise ValueError(f"files.{i}.pieces.{fqn}.{piece_key} is required by format_version {version}")
    if manifest.model_path not in manifest.model_paths:
        raise ValueError(f"model_path {manifest.model_path!r} is not in model_paths {manifest.model_paths}")


def _schema_error(where: str, exc: ValidationError) -> ManifestError:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    return ManifestError(f"{where}: field {field}: {first['msg']}{more}")


def _check_coverage(fqn: str, factor, global_shape: list[int], pieces: list[tuple[list, list, str]]) -> None:
    """Pieces must tile the global box exactly: inside it, no overlap, no gap.

    Memory proportional to the number of pieces: the pieces tile the box exactly when
    they lie inside it, are pairwise disjoint and their volumes add up to the box's.
    Disjointness is checked with a sweep along the dimension where the pieces' starts
    differ most (for sharded layouts each piece then meets only its neighbours).
    """
    rank = len(global_shape)
    for offset, shape, where in pieces:
        _require(len(offset) == rank and len(shape) == rank,
                 f"{where}: piece of {fqn!r} has offset {offset} and shape {shape}, but the tensor has {rank} dims")
        _require(all(o + s <= g for o, s, g in zip(offset, shape, global_shape)),
                 f"{where}: piece of {fqn!r} at offset {offset} with shape {shape} lies outside {global_shape}")
    if not global_shape:
        _require(len(pieces) == 1, f"factor {factor}: scalar {fqn!r} is stored {len(pieces)} times, expected once")
        return
    total = numel(global_shape)
    if total == 0:
        return
    boxes = [(offset, shape, where) for offset, shape, where in pieces if numel(shape)]
    covered = sum(numel(shape) for _, shape, _ in boxes)
    if boxes:
        sweep = max(range(rank), key=lambda d: len({offset[d] for offset, _, _ in boxes}))
        boxes.sort(key=lambda b: b[0][sweep])
        active: list[tuple[list, list, str]] = []
        for box in boxes:
            start = box[0][sweep]
            active = [a for a in active if a[0][sweep] + a[1][sweep] > start]
            for other in active:
                if box_overlap(box[0], box[1], other[0], other[1]) is not None:
                    raise ManifestError(
                        f"factor {factor}: the pieces of {fqn!r} overlap: {other[2]} at offset {other[0]} shape "
                        f"{other[1]} and {box[2]} at offset {box[0]} shape {box[1]}")
            active.append(box)
    _require(covered == total,
             f"factor {factor}: the pieces of {fqn!r} do not tile its global shape {global_shape}: they cover "
             f"{covered} of {total} elements (a gap)")


def validate_manifest(manifest, where: str = "manifest") -> None:
    """Raise :class:`ManifestError` unless ``manifest`` follows the schema and its pieces tile every tensor."""
    _require(isinstance(manifest, dict), f"{where} is not a JSON object")
    try:
        schema = ManifestSchema.model_validate(manifest)
    except ValidationError as exc:
        raise _schema_error(where, exc) from None
    factors = schema.factors
    pieces: dict[tuple[float, str], list] = {}
    seen_paths = set()
    for entry in schema.files:
        path = entry.path
        parts = PurePosixPath(path).parts
        well_formed = len(parts) == 2 and parts[0] == ema_dirname(entry.factor)
        _require(well_formed and parse_rank_filename(parts[-1]) is not None,
                 f"{where}: file path {path!r} is not 'ema=<factor>/rank-RRRRR-of-WWWWW.safetensors' "
                 "(with its own factor)")
        _require(path not in seen_paths, f"{where}: file {path!r} is listed twice")
        seen_paths.add(path)
        _require(entry.factor in factors, f"{where}: file {path!r} has factor {entry.factor} not in {factors}")
        for fqn, piece in entry.pieces.items():
            _require(fqn in schema.tensors, f"{where}: file {path!r} holds {fqn!r}, which is not in the tensor table")
            pieces.setdefault((entry.factor, fqn), []).append((piece.offset, piece.shape, path))
    for factor in factors:
        for fqn, info in schema.tensors.items():
            _check_coverage(fqn, factor, info.global_shape, pieces.get((factor, fqn), []))


def read_manifest(directory: Path) -> dict:
    """The validated manifest of a directory; raises :class:`ManifestError` naming the file."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (the save did not commit)")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: {size} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES})")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError: bad JSON, or an integer of more digits than Python converts;
        # RecursionError: nesting deeper than the parser goes.
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{path}: unreadable manifest ({type(exc).__name__}: {str(exc)[:200]})") from None
    validate_manifest(manifest, str(path))
    return manifest


def versions_of(root: Path, model_path: str | None, tag: str, problems: list[str] | None = None) -> list[Version]:
    """Committed versions of ``tag`` for one model path: ``cp=<tag>`` first, then ``cp=<tag>.old``.

    Directories that exist but hold no valid manifest are reported in ``problems``.
    """
    label_dir = Path(root) / path_label(model_path)
    # Look at cp=<tag>, cp=<tag>.old, then cp=<tag> again: a commit renames cp=<tag> away
    # before renaming the new version in, and deletes cp=<tag>.old only after that, so a
    # version missed under one name at one moment is under the other at the next.
    names = (cp_dirname(tag), old_dirname(tag), cp_dirname(tag))
    found: list[Version] = []
    reported: list[str] = []
    for i, name in enumerate(names):
        directory = label_dir / name
        if (i == 2 and found) or not directory.is_dir():
            continue
        try:
            found.append(Version(model_path, tag, directory, read_manifest(directory)))
        except ManifestError as exc:
            reported.append(str(exc))
    if problems is not None:
        problems.extend(p for p in dict.fromkeys(reported) if p not in problems)
    return found


def find_candidates(root: Path, model_paths, tag: str, problems: list[str] | None = None) -> list[Candidate]:
    """Complete versions of ``tag`` reachable from ``model_paths``, best first (see the note above).

    Other model paths a save covered are looked up too (so a candidate can list model
    paths the caller does not track; the caller decides whether that is an error).
    """
    cache: dict = {}

    def versions(mp):
        if mp not in cache:
            cache[mp] = versions_of(root, mp, tag, problems)
        return cache[mp]

    candidates: list[Candidate] = []
    incomplete: list[str] = []
    seen: set[str] = set()
    for mp in model_paths:
        for version in versions(mp):
            if version.save_id in seen:
                continue
            seen.add(version.save_id)
            saved_paths = version.manifest["model_paths"]
            members = {}
            for other in saved_paths:
                match = next((v for v in versions(other) if v.save_id == version.save_id), None)
                if match is None:
                    break
                members[other] = match
            else:
                candidates.append(Candidate(tag, version.save_id, members))
                continue
            incomplete.append(f"{version.directory}: incomplete save {version.save_id} (model path "
                              f"{path_label(other)!r} of the same save was not committed)")
    # An incomplete version next to a complete one is the normal trace of an interrupted swap.
    if problems is not None and not candidates:
        problems.extend(incomplete)
    return candidates


def tensor_dtype(manifest: dict, fqn: str) -> torch.dtype:
    """Stored dtype of a tensor of the manifest."""
    return dtype_from_name(manifest["tensors"][fqn]["dtype"])
