"""Collective save of a ShardedEMA: per-rank safetensors files, manifest last, atomic swap.

[Note: commit protocol]
Which ranks run each step of ``save_ema(ema, root, tag)``:

1. Rank 0: take the writer lock of every model path's directory (see ``_lock``); a
   second writer fails here. All ranks: one all-gather spreads rank 0's ``save_id``
   (or its lock error) and every rank's claimed pieces; a piece several ranks hold is
   written by the lowest of them only.
2. Rank 0: clean up what crashed saves left under the EMA's model paths (staging
   directories, a stranded ``cp=<tag>.old``; see :func:`cleanup_leftovers`). The lock
   guarantees no other writer's staging directory is live.
3. All ranks: write this rank's pieces of every (model path, factor) into
   ``<root>/<label>/cp=<tag>.tmp-<save_id>/ema=<factor>/rank-R-of-W.safetensors``:
   temporary name, fsync, rename, fsync the directory. Ranks holding only replicas
   or empty pieces write nothing.
4. All ranks: gather every rank's outcome and file list (the agreement). If any rank
   failed, every rank raises and nothing is committed.
5. Rank 0: check that every file the ranks reported is visible to it with the reported
   size (ranks given different, node-local roots fail here, naming the files), then
   write ``manifest.json`` into each staging directory (temporary name, fsync, rename,
   fsync): the staging directory is now committed but not yet visible.
6. Rank 0: for each model path, rename ``cp=<tag>`` to ``cp=<tag>.old`` and the
   staging directory to ``cp=<tag>``; after all model paths, delete the ``.old``
   directories. Readers accept a complete ``cp=<tag>`` or ``cp=<tag>.old`` (see
   ``_manifest``), so the old or the new save is findable at every instant.
7. All ranks: rank 0 broadcasts whether the commit succeeded; all raise if not.
   Rank 0 releases the locks.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import torch

from .. import _dist
from .._log import logger
from .._shards import path_label
from ..config import check_model_paths
from ._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    STAGING_MARK,
    cp_dirname,
    dtype_name,
    ema_dirname,
    factor_name,
    old_dirname,
    parse_cp_dirname,
    rank_filename,
    staging_dirname,
    validate_tag,
)
from ._io import fsync_dir, make_dirs, write_bytes_atomic, write_safetensors_atomic
from ._lock import WriterLock
from ._manifest import find_candidates, validate_manifest
from ._table import local_table, mesh_shape, stored_dtype, union_tables


def group_root(group) -> int:
    """Global rank of rank 0 of ``group`` (the source of broadcasts)."""
    if group is None or not _dist.is_distributed():
        return 0
    import torch.distributed as dist

    return dist.get_global_rank(group, 0)


def _remove_dir(path: Path) -> None:
    """Delete a directory so that readers never see it half deleted: rename it away first."""
    if not path.exists():
        return
    parsed = parse_cp_dirname(path.name)
    tag = parsed[0] if parsed else "x"
    trash = path.with_name(staging_dirname(tag, f"deleting-{uuid.uuid4().hex}"))
    os.rename(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def delete_checkpoint(root, tag: str, model_paths=None) -> list[Path]:
    """Delete ``cp=<tag>`` (and a stranded ``cp=<tag>.old``) of each model path under ``root``.

    Not collective: call it on one rank. It holds the writer lock of every model path's
    directory meanwhile (so it never runs during a save into the same root; a held lock
    raises :class:`CheckpointLockedError`), and deletes each directory by renaming it to
    ``cp=<tag>.tmp-deleting-<id>`` first, so readers never see a half-deleted checkpoint
    (one that is being deleted is, at worst, incomplete, and skipped); a crash part-way
    leaves a staging directory that the next save removes. Returns the removed directories
    (none when the tag does not exist). ``model_paths``: as given to the EMA (``None``: the
    whole model).
    """
    validate_tag(tag)
    root = Path(root)
    removed: list[Path] = []
    with ExitStack() as locks:
        for mp in check_model_paths(model_paths):
            label_dir = root / path_label(mp)
            if not label_dir.is_dir():
                continue
            locks.enter_context(WriterLock(label_dir, purpose=f"deleting {cp_dirname(tag)}"))
            for name in (cp_dirname(tag), old_dirname(tag)):
                if (label_dir / name).is_dir():
                    _remove_dir(label_dir / name)
                    removed.append(label_dir / name)
    if removed:
        logger.info("deleted EMA checkpoint %s under %s", cp_dirname(tag), root)
    return removed


def cleanup_leftovers(root: Path, model_paths, keep_save_id: str | None = None) -> list[Path]:
    """Remove what crashed saves left under the given model paths; return what was removed.

    - staging directories ``cp=<tag>.tmp-<id>`` (never committed, or committed but not
      swapped in) other than ``keep_save_id``'s;
    - for every tag with a ``cp=<tag>.old``: keep the best complete version at
      ``cp=<tag>`` and remove the other one. When no version of the tag is complete,
      nothing of that tag is removed.

    Only names of the form ``cp=...`` under the model paths' directories are touched.
    """
    removed: list[Path] = []
    stranded_tags: set[str] = set()
    for mp in model_paths:
        label_dir = Path(root) / path_label(mp)
        if not label_dir.is_dir():
            continue
        for child in sorted(label_dir.iterdir()):
            parsed = parse_cp_dirname(child.name)
            if parsed is None or not child.is_dir():
                continue
            tag, state = parsed
            if state == "staging" and not (keep_save_id and child.name.endswith(STAGING_MARK + keep_save_id)):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
            elif state == "old":
                stranded_tags.add(tag)
    for tag in sorted(stranded_tags):
        candidates = find_candidates(root, model_paths, tag)
        if not candidates:
            logger.warning("cannot tell which version of tag %r under %s is complete; leaving it as is", tag, root)
            continue
        for version in candidates[0].versions.values():
            label_dir = version.directory.parent
            current, old = label_dir / cp_dirname(tag), label_dir / old_dirname(tag)
            if version.directory == old:
                _remove_dir(current)
                os.rename(old, current)
                fsync_dir(label_dir)
                removed.append(current)
            elif old.exists():
                _remove_dir(old)
                removed.append(old)
    if removed:
        logger.info("removed leftovers of interrupted saves: %s", ", ".join(str(p) for p in removed))
    return removed


def _write_file(ema, staging: Path, mp, factor: float, plan: dict, rank: int, world: int) -> dict | None:
    """Write this rank's pieces of one (model path, factor); return its manifest entry."""
    writers = [t for t in ema.tracked([mp]) if (t.model_path, t.fqn, t.global_offset) in plan["writes"]]
    if not writers:
        return None
    save_dtype = plan["dtype"]
    shadows = {}
    for t in writers:
        shadow = ema.shadow(factor, t.key)
        shadows[t.fqn] = shadow.to(stored_dtype(t, shadow.dtype, save_dtype))
    pieces = {}
    for t in writers:
        pieces[t.fqn] = {
            "offset": list(t.global_offset), "shape": list(t.local_shape),
            "global_shape": list(t.global_shape), "dtype": dtype_name(shadows[t.fqn].dtype),
            "blended": t.blended, "is_buffer": t.is_buffer, "mesh_shape": mesh_shape(t),
            "placements": None if t.placements is None else str(tuple(t.placements)),
        }
    mesh_shapes = []
    for t in writers:
        if t.mesh is not None and mesh_shape(t) not in mesh_shapes:
            mesh_shapes.append(mesh_shape(t))
    # Format 2: the checksums live in the manifest only (computed while the bytes are
    # written); the manifest's header checksum covers this metadata.
    metadata = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "save_id": plan["save_id"],
        "tag": plan["tag"], "model_path": json.dumps(mp), "factor": factor_name(factor), "step": str(ema.step),
        "schedule": ema.schedule.model_dump_json(), "world_size": str(world), "rank": str(rank),
        "mesh_shapes": json.dumps(mesh_shapes), "tensors": json.dumps(pieces, separators=(",", ":")),
    }
    directory = staging / ema_dirname(factor)
    make_dirs(directory)
    final = directory / rank_filename(rank, world)
    written = write_safetensors_atomic(final, [(t.fqn, shadows[t.fqn].dtype, t.local_shape) for t in writers],
                                       metadata, shadows.__getitem__)
    return {"model_path": mp, "path": f"{ema_dirname(factor)}/{final.name}", "factor": float(factor),
            "rank": rank, "size": written.size, "header_crc32c": written.header_crc32c,
            "pieces": {fqn: {"offset": p["offset"], "shape": p["shape"], "crc32c": written.checksums[fqn]}
                       for fqn, p in pieces.items()}}


def _build_manifest(ema, mp, plan: dict, world: int, files: list[dict]) -> dict:
    tensors = plan["table"][mp]  # the union over ranks (see _table)
    mesh_shapes: list[list[int]] = []
    for info in tensors.values():
        if info["mesh_shape"] is not None and info["mesh_shape"] not in mesh_shapes:
            mesh_shapes.append(info["mesh_shape"])
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "save_id": plan["save_id"],
        "created_unix": plan["created"], "tag": plan["tag"], "model_path": mp,
        "model_paths": list(ema.model_paths), "step": int(ema.step), **ema.counters(),
        "schedule": json.loads(ema.schedule.model_dump_json()),
        "factors": [float(f) for f in ema.target_factors], "world_size": world, "mesh_shapes": mesh_shapes,
        "shadow_dtype": None if ema.shadow_dtype is None else dtype_name(ema.shadow_dtype),
        "buffers": ema.buffers, "tensors": tensors,
        "files": sorted(({k: v for k, v in f.items() if k != "model_path"} for f in files),
                        key=lambda f: f["path"]),
    }


def _check_visible(root: Path, plan: dict, entries: list[dict]) -> None:
    """Rank 0: every file the ranks wrote must be here, at its size (one shared file system)."""
    missing = []
    for entry in entries:
        path = root / path_label(entry["model_path"]) / staging_dirname(plan["tag"], plan["save_id"]) / entry["path"]
        size = path.stat().st_size if path.is_file() else None
        if size != entry["size"]:
            found = "missing" if size is None else f"{size} bytes"
            missing.append(f"{entry['path']} of rank {entry['rank']} ({found})")
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise FileNotFoundError(
            f"rank 0 cannot see files the other ranks wrote under {root}: {shown}. The checkpoint root must be "
            "one shared file system that every rank sees at its path (not a node-local directory)")


def _commit(ema, root: Path, plan: dict, world: int, entries: list[dict]) -> None:
    """Rank 0: check the files, write the manifests, then swap the staging directories in (steps 5 and 6)."""
    _check_visible(root, plan, entries)
    tag = plan["tag"]
    staged = []
    for mp in ema.model_paths:
        label_dir = root / path_label(mp)
        staging = label_dir / staging_dirname(tag, plan["save_id"])
        make_dirs(staging)
        manifest = _build_manifest(ema, mp, plan, world, [e for e in entries if e["model_path"] == mp])
        validate_manifest(manifest, f"manifest of {staging}")  # a gap here is a bug: never commit it
        write_bytes_atomic(staging / MANIFEST_NAME, json.dumps(manifest, indent=1).encode("utf-8"))
        staged.append((label_dir, staging))
    for label_dir, staging in staged:
        current, old = label_dir / cp_dirname(tag), label_dir / old_dirname(tag)
        if current.exists():
            _remove_dir(old)
            os.rename(current, old)
        os.rename(staging, current)
        fsync_dir(label_dir)
    for label_dir, _ in staged:
        _remove_dir(label_dir / old_dirname(tag))


@torch.no_grad()
def save_ema(ema, root, tag: str = "latest", *, dtype: torch.dtype | None = None) -> str:
    """Collective: save every model path and factor of ``ema`` under ``root`` as ``cp=<tag>``.

    See the commit protocol note of this module and docs/checkpoint-format.md. Returns
    the tag. Raises on every rank when any rank fails; the previous committed
    version of the tag stays readable and the next save removes the leftovers.
    ``dtype``: store the averaged floating shadows in this floating dtype (e.g.
    ``torch.bfloat16`` for post-hoc snapshots; copied tensors keep theirs); ``None``:
    as they are. A resume casts back to the shadows' dtype.
    """
    return _save(ema, root, tag, dtype)


def _save(ema, root, tag: str, dtype: torch.dtype | None) -> str:
    # Undecorated so that mutation testing reaches it (mutmut skips decorated functions);
    # save_ema's @torch.no_grad() covers it.
    validate_tag(tag)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} must be a floating torch dtype such as torch.bfloat16, or None")
    root = Path(root)
    group = ema.process_group
    rank, world = _dist.rank(group), _dist.world_size(group)
    started = time.perf_counter()
    # One gather gives every rank rank 0's plan and every rank's claimed pieces. A piece
    # held by several ranks (replicas outside the DTensor's mesh, e.g. DDP around tensor
    # parallelism) is written by the lowest of them only.
    claims = {(t.model_path, t.fqn, t.global_offset) for t in ema.tracked() if t.writes_checkpoint}
    table = local_table(ema, dtype)
    with ExitStack() as locks:
        proposal = None
        if rank == 0:
            proposal = {"save_id": uuid.uuid4().hex, "tag": tag, "created": time.time(), "lock_error": None}
            try:
                for mp in ema.model_paths:
                    locks.enter_context(WriterLock(root / path_label(mp)))
            except Exception as exc:  # another writer, or an unwritable root: every rank raises
                proposal["lock_error"] = f"{type(exc).__name__}: {exc}"
        gathered = _dist.all_gather_objects((proposal, claims, table), group=group)
        lock_error = gathered[0][0]["lock_error"]
        if lock_error:
            raise RuntimeError(f"saving the EMA checkpoint {cp_dirname(tag)} under {root} failed on rank 0: "
                               f"{lock_error}; nothing was written")
        return _save_locked(ema, root, tag, gathered, claims, rank, world, started, dtype)


def _save_locked(ema, root: Path, tag: str, gathered: list, claims: set, rank: int, world: int,
                 started: float, dtype: torch.dtype | None) -> str:
    """Steps 2-7 of the commit protocol, while rank 0 holds the writer locks."""
    group = ema.process_group
    plan = dict(gathered[0][0])
    plan["dtype"] = dtype
    earlier = set().union(*(c for _, c, _ in gathered[:rank])) if rank else set()
    plan["writes"] = claims - earlier
    plan["table"], conflicts = union_tables([t for _, _, t in gathered])
    if conflicts:  # the same on every rank: all raise, nothing written
        raise ValueError(f"ranks describe tensors differently, nothing was saved: {'; '.join(conflicts[:5])}")
    error: BaseException | None = None
    entries: list[dict] = []
    try:
        if plan["tag"] != tag:
            raise ValueError(f"rank {rank} saves tag {tag!r} but rank 0 saves {plan['tag']!r}; "
                             "call ema.save with the same root and tag on every rank")
        if rank == 0:
            cleanup_leftovers(root, ema.model_paths, keep_save_id=plan["save_id"])
        for mp in ema.model_paths:
            staging = root / path_label(mp) / staging_dirname(tag, plan["save_id"])
            for factor in ema.target_factors:
                entry = _write_file(ema, staging, mp, factor, plan, rank, world)
                if entry is not None:
                    entries.append(entry)
    except Exception as exc:  # reported to every rank below
        error = exc
        logger.error("writing EMA checkpoint %s failed: %s", tag, exc)
    outcomes = _dist.all_gather_objects((None if error is None else f"{type(error).__name__}: {error}", entries),
                                        group=group)
    failures = {r: message for r, (message, _) in enumerate(outcomes) if message}
    if failures:
        listing = "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items()))
        raise RuntimeError(f"saving the EMA checkpoint {cp_dirname(tag)} under {root} failed ({listing}); "
                           "nothing was committed and the previous version is untouched") from error
    commit_error = None
    if rank == 0:
        try:
            _commit(ema, root, plan, world, [e for _, files in outcomes for e in files])
        except Exception as exc:
            error = exc
            commit_error = f"{type(exc).__name__}: {exc}"
    commit_error = _dist.broadcast_object(commit_error, src=group_root(group), group=group)
    if commit_error:
        raise RuntimeError(f"committing the EMA checkpoint {cp_dirname(tag)} under {root} failed on rank 0: "
                           f"{commit_error}") from error
    logger.info("saved EMA step %d to %s (%s) in %.2fs", ema.step, root, cp_dirname(tag),
                time.perf_counter() - started)
    return tag
