"""Collective resume of a ShardedEMA from any world size and mesh: verify, then read slices.

[Note: resharding rule]
Every stored piece says where it lies in the global tensor: ``offset`` and ``shape``
(its box ``[offset, offset + shape)``). This rank needs the box
``[t.global_offset, t.global_offset + t.local_shape)`` of each tracked tensor. Each
stored piece of the tensor (of the factor being loaded) that intersects it is read
(see [Note: one read per byte]) and the intersection copied into the matching part
of the shadow. The pieces of a committed save tile the tensor
(checked when the manifest is read), so the copies fill the shadow exactly once.

Which ranks run each step of ``resume_ema``:

1. Rank 0 lists the complete versions of ``cp=latest`` then ``cp=last`` and
   broadcasts them (manifests included), so all ranks decide on the same data.
2. For each candidate, all ranks: compare the saved structure with the EMA (same on
   every rank; a difference raises everywhere); verify the files, each rank a share
   of them (size, header checksum, header against the manifest; format 1: CRC-32 of
   the whole file); gather
   the problems (agreement) and skip the candidate everywhere if any rank found one.
3. All ranks read their pieces, checking each one's checksum; gather failures; skip
   the candidate if any.
4. All ranks restore the step and the schedule and return the tag.

:func:`load_ema` runs the same steps for one given tag, without fallback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import _dist
from .._bytes import writable_cpu_bytes
from .._log import logger
from .._shards import path_label
from .._store import CheckpointLoad
from ..config import DecaySchedule, check_model_paths
from ._checksum import CRC32C, LABELS, RunningHash, hex_digest, piece_checksum
from ._format import MANIFEST_NAME, RESUME_ORDER, box_overlap, cp_dirname, numel, validate_tag
from ._io import SafetensorsHeader, file_crc32, range_digest, read_exactly
from ._manifest import Candidate, find_candidates, saved_factor
from ._table import Table, local_table, union_tables
from ._writer import group_root


class CheckpointMismatchError(ValueError):
    """The saved structure differs from the EMA's (model paths, factors, FQNs or shapes)."""


def structure_differences(ema, candidate: Candidate, live_table: Table | None = None) -> list[str]:
    """Every difference between the EMA and a candidate, one line each (empty when they match).

    ``live_table`` is the union of every rank's tensor table (see ``_table``); without it,
    this rank's own tensors are compared (a single process).
    """
    if live_table is None:
        live_table = local_table(ema)
    where = cp_dirname(candidate.tag)
    differences = []
    tracked_paths = list(ema.model_paths)
    for mp in tracked_paths:
        if mp not in candidate.versions:
            differences.append(f"model path {path_label(mp)!r} is tracked but not in {where}")
    for mp in candidate.versions:
        if mp not in tracked_paths:
            differences.append(f"model path {path_label(mp)!r} is in {where} but not tracked by this EMA")
    manifest = candidate.manifest
    missing_factors = [f for f in ema.target_factors if saved_factor(manifest, f) is None]
    for f in missing_factors:
        differences.append(f"factor {f!r} is not in {where} (saved factors: {manifest['factors']})")
    for mp in tracked_paths:
        version = candidate.versions.get(mp)
        if version is None:
            continue
        saved = version.manifest["tensors"]
        label = path_label(mp)
        live = live_table.get(mp, {})
        for fqn, info in live.items():
            if fqn not in saved:
                differences.append(f"{label}: missing {fqn!r} (shape {info['global_shape']}) in {where}")
            elif info["global_shape"] != saved[fqn]["global_shape"]:
                differences.append(f"{label}: {fqn!r} has shape {info['global_shape']} in the model but "
                                   f"{saved[fqn]['global_shape']} in {where}")
        for fqn, info in saved.items():
            if fqn not in live:
                differences.append(f"{label}: unexpected {fqn!r} (shape {info['global_shape']}) in {where}")
    return differences


def _needed_files(ema, candidate: Candidate) -> list[tuple[Path, dict, str | None]]:
    """(path, manifest entry, model path) of every file of the factors this EMA tracks, in a fixed order."""
    needed = []
    for mp in ema.model_paths:
        version = candidate.versions[mp]
        for factor in ema.target_factors:
            for entry in version.files_of(saved_factor(version.manifest, factor)):
                needed.append((version.directory / entry["path"], entry, mp))
    return needed


def verify_file(path: Path, entry: dict, save_id: str, full: bool = False) -> str | None:
    """Check one file's size and header against its manifest entry; return the problem, or None.

    Format 2: the header's CRC-32C; the data is checked piece by piece as a load reads it,
    or here with ``full=True`` (``shardema inspect --verify``). Format 1: zlib's CRC-32 of
    the whole file.
    """
    try:
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{path}: size {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
        if "header_crc32c" not in entry:
            _, crc = file_crc32(path)
            if crc != entry["crc32"]:
                return f"{path}: CRC-32 {crc}, the manifest says {entry['crc32']} (corrupt)"
        with open(path, "rb") as f:
            header = SafetensorsHeader.read(f, path)
        if "header_crc32c" in entry:
            got = hex_digest(CRC32C, header.raw)
            if got != entry["header_crc32c"]:
                return f"{path}: header CRC-32C {got}, the manifest says {entry['header_crc32c']} (corrupt)"
        metadata = header.metadata
        stored = json.loads(metadata.get("tensors", "{}"))
        if metadata.get("save_id") != save_id:
            return f"{path}: belongs to save {metadata.get('save_id')!r}, not {save_id!r}"
        for fqn, piece in entry["pieces"].items():
            got_piece = stored.get(fqn)
            if fqn not in header.entries or not isinstance(got_piece, dict) \
                    or [got_piece.get("offset"), got_piece.get("shape")] != [piece["offset"], piece["shape"]] \
                    or header.entries[fqn][1] != piece["shape"] \
                    or ("crc32" in piece and got_piece.get("crc32") != piece["crc32"]):
                return f"{path}: piece {fqn!r} differs from the manifest"
        if full and "header_crc32c" in entry:
            with open(path, "rb") as f:
                for fqn, piece in entry["pieces"].items():
                    algorithm, expected = piece_checksum(piece)
                    got = range_digest(f, header.entries[fqn][2], header.entries[fqn][3], algorithm)
                    if got != expected:
                        return f"{path}: piece {fqn!r} has {LABELS[algorithm]} {got}, the manifest says {expected} " \
                               "(corrupt)"
    except Exception as exc:  # unreadable file: report, never raise
        return f"{path}: unreadable ({type(exc).__name__}: {exc})"
    return None


def _verify_share(ema, candidate: Candidate, rank: int, world: int) -> list[str]:
    problems = []
    for i, (path, entry, _) in enumerate(_needed_files(ema, candidate)):
        if i % world == rank:
            problem = verify_file(path, entry, candidate.save_id)
            if problem:
                problems.append(problem)
    return problems


def _target_view(shadow: torch.Tensor, t, offset, shape) -> torch.Tensor:
    view = shadow
    for dim, (start, size) in enumerate(zip(offset, shape)):
        view = view.narrow(dim, start - t.global_offset[dim], size)
    return view


def plan_reads(ema, load: CheckpointLoad, candidate: Candidate) -> dict[Path, list]:
    """Which file holds which part of this rank's shadows: ``{file: [(tracked, shadow, piece, overlap)]}``.

    Cost: every tracked tensor against every file of its factor, O(tensors x world size of
    the save) per rank (measured in benchmarks/scale_model.py, docs/scaling.md).
    """
    reads: dict[Path, list] = {}
    for mp in ema.model_paths:
        version = candidate.versions[mp]
        for t in load.tracked([mp]):
            if t.local_numel == 0:
                continue
            # Copied tensors have one shadow shared by all factors: read it once.
            factors = ema.target_factors if t.blended else ema.target_factors[:1]
            for k, factor in enumerate(factors):
                shadow = load.shadow(k, t.key)
                covered = 0
                for entry in version.files_of(saved_factor(version.manifest, factor)):
                    piece = entry["pieces"].get(t.fqn)
                    if piece is None:
                        continue
                    overlap = box_overlap(piece["offset"], piece["shape"], t.global_offset, t.local_shape)
                    if overlap is None:
                        continue
                    covered += numel(overlap[1])
                    reads.setdefault(version.directory / entry["path"], []).append((t, shadow, piece, overlap))
                if covered != t.local_numel:
                    raise AssertionError(f"{t.fqn!r}: saved pieces cover {covered} of {t.local_numel} local elements")
    return reads


class _PieceCheck:
    """A piece's checksum being computed on the hashing thread as it is read, and what it must equal."""

    def __init__(self, path: Path, fqn: str, piece: dict):
        self.path, self.fqn = path, fqn
        self.algorithm, self.expected = piece_checksum(piece)
        self.hashed = RunningHash(self.algorithm)

    def check(self) -> None:
        got = self.hashed.hexdigest()
        if got != self.expected:
            raise ValueError(f"{self.path}: {self.fqn!r} fails its {LABELS[self.algorithm]} check "
                             f"({got}, the manifest says {self.expected}; corrupt)")


@torch.no_grad()
def _load(ema, load: CheckpointLoad, candidate: Candidate) -> None:
    """Read this rank's slices of every tracked tensor and factor into the shadows.

    [Note: one read per byte] A piece this rank needs whole, in the shadow's dtype, is
    read straight into the shadow (``readinto``); any other piece (a partial overlap
    after resharding, another stored dtype, an accelerator shadow) is read whole into a
    host buffer and the overlap copied. Either way every piece read is checked against
    its checksum: each 8 MiB chunk is hashed on a background thread as soon as it is read
    (while it is in cache and the next chunk is read); a piece's result is checked when
    the next piece has been read, so the extra memory is two pieces at most.
    """
    _read_pieces(ema, load, candidate)


def _read_pieces(ema, load: CheckpointLoad, candidate: Candidate) -> None:
    # Undecorated so that mutation testing reaches it (mutmut skips decorated functions);
    # _load's @torch.no_grad() covers it.
    reads = plan_reads(ema, load, candidate)
    for path in sorted(reads):
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: gone while it was read (a newer save replaced it)") from None
        with f:
            header = SafetensorsHeader.read(f, path)
            pending: _PieceCheck | None = None
            for t, shadow, piece, (offset, shape) in reads[path]:
                stored = header.entries.get(t.fqn)
                if stored is None or stored[1] != piece["shape"]:
                    raise ValueError(f"{path}: {t.fqn!r} is missing or has another shape than the manifest says")
                dtype, _, begin, _ = stored
                target = _target_view(shadow, t, offset, shape)
                direct = list(shape) == piece["shape"] and target.device.type == "cpu" and \
                    target.is_contiguous() and target.dtype == dtype
                buffer = target if direct else torch.empty(piece["shape"], dtype=dtype)
                check = _PieceCheck(path, t.fqn, piece)
                read_exactly(f, begin, writable_cpu_bytes(buffer), path, check.hashed)
                if pending is not None:
                    pending.check()
                pending = check
                if not direct:
                    source = buffer
                    for dim, (start, size) in enumerate(zip(offset, shape)):
                        source = source.narrow(dim, start - piece["offset"][dim], size)
                    target.copy_(source)
            if pending is not None:
                pending.check()


def _discover(root: Path, model_paths, tags) -> tuple[list[Candidate], list[str]]:
    """Complete candidates of ``tags``, newest step first (ties: the order of ``tags``, then
    ``cp=<tag>`` before ``cp=<tag>.old``), and the problems met on the way."""
    problems: list[str] = []
    candidates: list[tuple[int, Candidate]] = []
    for order, tag in enumerate(tags):
        candidates.extend((order, c) for c in find_candidates(root, model_paths, tag, problems))
    ranked = sorted(enumerate(candidates), key=lambda item: (-int(item[1][1].manifest["step"]), item[1][0], item[0]))
    return [c for _, (_, c) in ranked], problems


def _overlaps(a: str | None, b: str | None) -> bool:
    return a is None or b is None or a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _saved_under_other_paths(root: Path, model_paths, tags) -> list[tuple[str | None, Candidate]]:
    """Committed saves under ``root`` whose model paths overlap ``model_paths`` without matching them.

    A checkpoint saved with ``model_paths=None`` and resumed with ``["encoder"]`` (or the
    other way round) lives under another directory; finding nothing there must not pass
    for "no checkpoint".
    """
    if not root.is_dir():
        return []
    found = []
    seen: set[str] = set()  # a save of several model paths is found under each of them: list it once
    ours = set(model_paths)
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        other = None if label_dir.name == path_label(None) else label_dir.name
        if other in ours or not any(_overlaps(other, mp) for mp in ours):
            continue
        try:
            check_model_paths([other])
        except ValueError:
            continue
        for tag in tags:
            for candidate in find_candidates(root, [other], tag):
                if candidate.save_id not in seen:
                    seen.add(candidate.save_id)
                    found.append((other, candidate))
    return found


def _corruption_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, SafetensorError)


_CORRUPTION_ERRORS = _corruption_errors()


def _agreed_problems(mine: list[str], group) -> list[str]:
    return [p for share in _dist.all_gather_objects(mine, group=group) for p in share]


def _unchanged(candidate: Candidate) -> bool:
    """True while every directory of ``candidate`` still holds that save (no commit renamed it away)."""
    for version in candidate.versions.values():
        try:  # only the save id is compared with the validated candidate: no full validation
            saved = json.loads((version.directory / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return False
        if not isinstance(saved, dict) or saved.get("save_id") != candidate.save_id:
            return False
    return True


DISCOVERY_ATTEMPTS = 10
"""How often a resume looks again when a candidate moved away while it was read (a commit ran);
the waits between attempts grow from 10 ms to 0.5 s, so a writer committing in a tight loop
cannot starve a reader."""


def _load_first(ema, load: CheckpointLoad, root: Path, tags) -> str | None:
    """Collective: load the newest intact candidate of ``tags`` through ``load``; its tag, or None.

    [Note: reading during a commit] A writer's commit renames ``cp=T`` to ``cp=T.old``,
    the new version to ``cp=T``, then deletes ``cp=T.old``: at every instant one of the
    two names holds a complete version, but a reader may look at each name at the wrong
    moment, or have a version renamed away while it reads its files. Discovery looks
    again when it finds neither name (see ``_manifest.versions_of``), and when every
    candidate failed and one of them had moved, the whole discovery runs again (at most
    :data:`DISCOVERY_ATTEMPTS` times).
    """
    group = ema.process_group
    rank = _dist.rank(group)
    # The model as a whole: ranks of different pipeline stages hold different tensors.
    live_table, conflicts = union_tables(_dist.all_gather_objects(local_table(ema), group=group))
    if conflicts:
        raise ValueError(f"ranks describe tensors differently: {'; '.join(conflicts[:5])}")
    for attempt in range(DISCOVERY_ATTEMPTS):
        found: tuple[list[Candidate], list[str], list] | str | None = None
        if rank == 0:
            try:
                candidates, problems = _discover(root, ema.model_paths, tags)
                others = [] if candidates else _saved_under_other_paths(root, ema.model_paths, tags)
                found = (candidates, problems, others)
            except Exception as exc:  # e.g. permission denied: every rank raises below
                found = f"{type(exc).__name__}: {exc}"
        found = _dist.broadcast_object(found, src=group_root(group), group=group)
        if isinstance(found, str):
            raise RuntimeError(f"listing EMA checkpoints under {root} failed on rank 0: {found}")
        candidates, problems, others = found
        if others:
            listing = "; ".join(f"{c.describe()} (model paths {[path_label(p) for p in c.manifest['model_paths']]})"
                                for _, c in others)
            raise CheckpointMismatchError(
                f"no EMA checkpoint for model paths {[path_label(p) for p in ema.model_paths]} under {root}, but "
                f"there are checkpoints of overlapping model paths: {listing}; resume with the model paths used for "
                "saving, or save to a new root")
        if rank == 0:
            for problem in problems:
                logger.warning("ignoring %s", problem)
        tag = _try_candidates(ema, load, candidates, live_table)
        if tag is not None or not candidates:
            return tag
        moved = None
        if rank == 0:
            moved = not all(_unchanged(c) for c in candidates)
        if not _dist.broadcast_object(moved, src=group_root(group), group=group):
            return None
        logger.info("a candidate moved while it was read (a save committed); looking again (attempt %d)",
                    attempt + 2)
        time.sleep(min(0.01 * 2**attempt, 0.5))
    return None


def _try_candidates(ema, load: CheckpointLoad, candidates: list[Candidate], live_table: Table) -> str | None:
    """Collective: verify and load the candidates in order; the tag of the first that loads, or None."""
    group = ema.process_group
    rank, world = _dist.rank(group), _dist.world_size(group)
    for candidate in candidates:
        differences = structure_differences(ema, candidate, live_table)
        if differences:
            raise CheckpointMismatchError(
                f"the EMA checkpoint {candidate.describe()} does not match this EMA "
                f"({len(differences)} difference(s)):\n  " + "\n  ".join(differences)
                + "\nresume with the model and EMA options used for saving, or save to a new root")
        bad = _agreed_problems(_verify_share(ema, candidate, rank, world), group)
        if not bad:
            error, unexpected = None, None
            try:
                _load(ema, load, candidate)
                if not _unchanged(candidate):
                    raise FileNotFoundError(f"{candidate.describe()} was replaced by a newer save while it was read")
            except _CORRUPTION_ERRORS as exc:  # unreadable or failing a checksum: skip the candidate
                error = f"rank {rank}: {type(exc).__name__}: {exc}"
            except Exception as exc:  # a bug or out of memory: not a reason to fall back silently
                unexpected = exc
            reports = _dist.all_gather_objects((error, unexpected is not None), group=group)
            broken = [r for r, (_, is_unexpected) in enumerate(reports) if is_unexpected]
            if broken:
                if unexpected is not None:
                    raise unexpected
                raise RuntimeError(f"loading EMA checkpoint {candidate.describe()} failed on rank(s) {broken}; "
                                   "see their logs")
            bad = [e for e, _ in reports if e]
        if bad:
            if rank == 0:
                logger.warning("skipping EMA checkpoint %s: %s", candidate.describe(), "; ".join(bad))
            continue
        manifest = candidate.manifest
        load.adopt(int(manifest["step"]), DecaySchedule.model_validate(manifest["schedule"]),
                   {k: manifest[k] for k in ("samples_seen", "samples_pending") if k in manifest})
        logger.info("loaded EMA step %d from %s", int(manifest["step"]), candidate.describe())
        return candidate.tag
    return None


@torch.no_grad()
def resume_ema(ema, root, strict: bool = False) -> str | None:
    """Collective: restore ``ema`` from ``cp=latest``, else ``cp=last``; else keep the live init.

    Returns the tag used, or None after initialising the shadows from the live
    weights (with a warning; ``strict=True`` raises ``FileNotFoundError`` instead).
    Corrupt or incomplete candidates are skipped with a warning naming the file.
    Raises :class:`CheckpointMismatchError` listing every difference when the saved
    structure does not match the EMA. A load that fails part-way never leaves
    half-loaded shadows: they are reset to the live weights.
    """
    return _resume(ema, Path(root), strict)


def _resume(ema, root: Path, strict: bool) -> str | None:
    # Undecorated so that mutation testing reaches it; resume_ema's @torch.no_grad() covers it.
    with ema.loading("resume") as load:
        tag = _load_first(ema, load, root, RESUME_ORDER)
        if tag is not None:
            return tag
        tried = ", ".join(cp_dirname(t) for t in RESUME_ORDER)
        if strict:
            raise FileNotFoundError(f"no intact EMA checkpoint ({tried}) under {root} for model paths "
                                    f"{[path_label(m) for m in ema.model_paths]}; pass strict=False to start "
                                    "from the live weights")
        load.reset_to_live()
        if _dist.rank(ema.process_group) == 0:
            logger.warning("no intact EMA checkpoint (%s) under %s: the EMA starts from the live weights", tried,
                           root)
        return None


@torch.no_grad()
def load_ema(ema, root, tag: str) -> str:
    """Collective: load exactly ``cp=<tag>`` (e.g. an iteration tag such as ``E3_U300_S9600``).

    Same verification and resharding as :func:`resume_ema`, without fallback: raises
    ``FileNotFoundError`` when the tag has no intact committed version (the shadows are
    then reset to the live weights if a failed read touched them). Returns the tag.
    """
    return _load_tag(ema, Path(root), tag)


def _load_tag(ema, root: Path, tag: str) -> str:
    # Undecorated so that mutation testing reaches it; load_ema's @torch.no_grad() covers it.
    validate_tag(tag)
    with ema.loading("load_ema") as load:
        loaded = _load_first(ema, load, root, (tag,))
        if loaded is None:
            raise FileNotFoundError(f"no intact EMA checkpoint {cp_dirname(tag)} under {root} for model paths "
                                    f"{[path_label(m) for m in ema.model_paths]}; list what exists with "
                                    f"`shardema inspect {root}`")
        return loaded
