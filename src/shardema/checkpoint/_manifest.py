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

import torch

from .._shards import path_label
from ..config import factors_match
from ._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    cp_dirname,
    dtype_from_name,
    numel,
    old_dirname,
    parse_rank_filename,
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


def _check_box(values, rank: int, what: str) -> None:
    _require(isinstance(values, list) and len(values) == rank and all(isinstance(v, int) and v >= 0 for v in values),
             f"{what} must be a list of {rank} non-negative ints, got {values!r}")


def _check_coverage(fqn: str, factor, global_shape: list[int], pieces: list[tuple[list, list, str]]) -> None:
    """Pieces must tile the global box exactly: inside it, no overlap, no gap."""
    for offset, shape, where in pieces:
        _check_box(offset, len(global_shape), f"{where}: {fqn!r} offset")
        _check_box(shape, len(global_shape), f"{where}: {fqn!r} shape")
        _require(all(o + s <= g for o, s, g in zip(offset, shape, global_shape)),
                 f"{where}: piece of {fqn!r} at offset {offset} with shape {shape} lies outside {global_shape}")
    if not global_shape:
        _require(len(pieces) == 1, f"factor {factor}: scalar {fqn!r} is stored {len(pieces)} times, expected once")
        return
    if numel(global_shape) == 0:
        return
    # Count coverage on the grid the pieces' boundaries induce (exact, and small for sharded layouts).
    cuts = []
    for d, size in enumerate(global_shape):
        points = {0, size}
        for offset, shape, _ in pieces:
            if numel(shape):
                points.update((offset[d], offset[d] + shape[d]))
        cuts.append(sorted(points))
    index = [{p: i for i, p in enumerate(c)} for c in cuts]
    counts = torch.zeros([len(c) - 1 for c in cuts], dtype=torch.int32)
    for offset, shape, _ in pieces:
        if numel(shape):
            box = tuple(slice(index[d][offset[d]], index[d][offset[d] + shape[d]]) for d in range(len(shape)))
            counts[box] += 1
    _require(bool((counts == 1).all()),
             f"factor {factor}: the pieces of {fqn!r} do not tile its global shape {global_shape} "
             f"({int((counts == 0).sum())} gap cell(s), {int((counts > 1).sum())} overlapping cell(s))")


def validate_manifest(manifest, where: str = "manifest") -> None:
    """Raise :class:`ManifestError` unless ``manifest`` follows the schema and its pieces tile every tensor."""
    _require(isinstance(manifest, dict), f"{where} is not a JSON object")
    _require(manifest.get("format") == FORMAT_NAME,
             f"{where}: format is {manifest.get('format')!r}, not {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    _require(isinstance(version, int) and 1 <= version <= FORMAT_VERSION,
             f"{where}: format_version {version!r} is not supported (this shardema reads 1..{FORMAT_VERSION})")
    for key, kind in (("save_id", str), ("tag", str), ("step", int), ("schedule", dict), ("factors", list),
                      ("world_size", int), ("tensors", dict), ("files", list), ("model_paths", list)):
        _require(isinstance(manifest.get(key), kind), f"{where}: key {key!r} is missing or not a {kind.__name__}")
    _require("model_path" in manifest, f"{where}: key 'model_path' is missing")
    factors = manifest["factors"]
    _require(factors and all(isinstance(f, float) for f in factors), f"{where}: factors {factors!r} are not floats")
    tensors = manifest["tensors"]
    for fqn, info in tensors.items():
        _require(isinstance(info, dict) and isinstance(info.get("global_shape"), list)
                 and isinstance(info.get("dtype"), str), f"{where}: tensor entry of {fqn!r} is malformed")
        dtype_from_name(info["dtype"])
        _check_box(info["global_shape"], len(info["global_shape"]), f"{where}: {fqn!r} global_shape")
    pieces: dict[tuple[float, str], list] = {}
    seen_paths = set()
    for entry in manifest["files"]:
        _require(isinstance(entry, dict), f"{where}: a file entry is not an object")
        path = entry.get("path")
        _require(isinstance(path, str), f"{where}: file entry without a path")
        parts = PurePosixPath(path).parts
        _require(len(parts) == 2 and parts[0].startswith("ema=") and parse_rank_filename(parts[1]) is not None,
                 f"{where}: file path {path!r} is not 'ema=<factor>/rank-RRRRR-of-WWWWW.safetensors'")
        _require(path not in seen_paths, f"{where}: file {path!r} is listed twice")
        seen_paths.add(path)
        _require(isinstance(entry.get("size"), int) and isinstance(entry.get("crc32"), str)
                 and isinstance(entry.get("pieces"), dict) and isinstance(entry.get("factor"), float),
                 f"{where}: file entry {path!r} lacks size, crc32, factor or pieces")
        _require(entry["factor"] in factors, f"{where}: file {path!r} has factor {entry['factor']} not in {factors}")
        for fqn, piece in entry["pieces"].items():
            _require(fqn in tensors, f"{where}: file {path!r} holds {fqn!r}, which is not in the tensor table")
            _require(isinstance(piece, dict), f"{where}: piece {fqn!r} of {path!r} is malformed")
            pieces.setdefault((entry["factor"], fqn), []).append((piece.get("offset"), piece.get("shape"), path))
    for factor in factors:
        for fqn, info in tensors.items():
            _check_coverage(fqn, factor, info["global_shape"], pieces.get((factor, fqn), []))


def read_manifest(directory: Path) -> dict:
    """The validated manifest of a directory; raises :class:`ManifestError` naming the file."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (the save did not commit)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from None
    validate_manifest(manifest, str(path))
    return manifest


def versions_of(root: Path, model_path: str | None, tag: str, problems: list[str] | None = None) -> list[Version]:
    """Committed versions of ``tag`` for one model path: ``cp=<tag>`` first, then ``cp=<tag>.old``.

    Directories that exist but hold no valid manifest are reported in ``problems``.
    """
    label_dir = Path(root) / path_label(model_path)
    found = []
    for name in (cp_dirname(tag), old_dirname(tag)):
        directory = label_dir / name
        if not directory.is_dir():
            continue
        try:
            found.append(Version(model_path, tag, directory, read_manifest(directory)))
        except ManifestError as exc:
            if problems is not None:
                problems.append(str(exc))
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
