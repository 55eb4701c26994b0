"""Post-hoc reconstruction: any sigma_rel at any snapshot time, as a linear combination of snapshots.

Offline and streaming, no process group: the coefficients come from the closed-form
least-squares fit of profiles (see [Note: power-function profiles] in ``shardema._profiles``);
the weights are combined one tensor (or one stored piece) at a time, in float64, reading
each snapshot's pieces through :class:`~shardema.checkpoint.ConsolidatedReader` (every
piece checked against its CRC-32). Memory: the tensor being combined plus one piece.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .._log import logger
from .._profiles import check_sigma_rel, fit_error, gamma_of_sigma_rel, solve_coefficients
from .._shards import path_label
from ..checkpoint._consolidate import ConsolidatedReader, _progress
from ..checkpoint._format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    cp_dirname,
    dtype_name,
    ema_dirname,
    factor_name,
    numel,
    old_dirname,
    rank_filename,
    staging_dirname,
    validate_tag,
)
from ..checkpoint._io import fsync_dir, make_dirs, write_bytes_atomic, write_safetensors_atomic
from ..checkpoint._lock import WriterLock
from ..checkpoint._manifest import saved_factor, tensor_dtype, validate_manifest
from ..checkpoint._writer import _remove_dir
from ..config import factors_match
from ._snapshots import Snapshot, list_snapshots


@dataclass(frozen=True)
class Term:
    """One snapshot profile and its coefficient in a reconstruction."""

    snapshot: Snapshot
    sigma_rel: float
    coefficient: float


@dataclass(frozen=True)
class ReconstructionPlan:
    """What :func:`plan_reconstruction` decided: the target, the terms and the fit's quality."""

    root: Path
    model_path: str | None
    sigma_rel: float
    step: int
    time: int
    """Firings at ``step``: the target profile's ``t``."""
    terms: tuple[Term, ...]
    fit_error: float
    """Relative L2 distance between the target profile and the combination (0: exact)."""
    exact: bool
    """True when the target is a tracked profile of a snapshot at ``step`` (returned as it is)."""

    @property
    def gamma(self) -> float:
        """The target profile's exponent."""
        return gamma_of_sigma_rel(self.sigma_rel)

    def explain(self) -> str:
        """The coefficients, one line per term, and the fit's error."""
        lines = [f"sigma_rel {self.sigma_rel:g} (gamma {self.gamma:.4f}) at step {self.step} (t = {self.time} "
                 f"firings) from {len(self.terms)} snapshot profile(s); profile fit error {self.fit_error:.3g}"
                 + (" (a tracked profile: exact)" if self.exact else "")]
        for term in self.terms:
            lines.append(f"  {term.snapshot.tag}  sigma_rel={term.sigma_rel:g}  t={term.snapshot.time:>8d}  "
                         f"x={term.coefficient:+.6e}")
        lines.append(f"  sum of coefficients {sum(t.coefficient for t in self.terms):.9f}")
        return "\n".join(lines)


def plan_reconstruction(root, sigma_rel: float, step: int | None = None,
                        model_path: str | None = None) -> ReconstructionPlan:
    """Choose the snapshots and coefficients that reconstruct ``sigma_rel`` at ``step`` (default: the last snapshot).

    Only snapshots at or before ``step`` are used. A target that one snapshot tracks at
    ``step`` is that snapshot with coefficient 1.
    """
    root = Path(root)
    sigma_rel = check_sigma_rel(sigma_rel)
    snapshots = list_snapshots(root, model_path)
    where = root / path_label(model_path)
    if not snapshots:
        raise FileNotFoundError(f"no post-hoc snapshots (cp=snapshot-*) under {where}; save them during training "
                                "with shardema.posthoc.save_snapshot(ema, root) or EmaCallback's "
                                "snapshot_every_n_updates")
    last = snapshots[-1]
    if step is None:
        step = last.step
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be a non-negative integer (an EMA step)")
    if step > last.step:
        raise ValueError(f"step {step} is after the last snapshot ({last.tag}, step {last.step}) under {where}; "
                         "a reconstruction can only use what was saved")
    target_time = last.schedule.firings_before(step)
    usable = [s for s in snapshots if s.step <= step and s.time >= 1]
    if target_time < 1 or not usable:
        raise ValueError(f"no snapshot with an average at or before step {step} under {where} (the first is "
                         f"{snapshots[0].tag}); choose a later step")
    for snap in usable:
        if snap.step == step:
            tracked = next((s for s in snap.sigma_rels if factors_match(s, sigma_rel)), None)
            if tracked is not None:
                return ReconstructionPlan(root, model_path, sigma_rel, step, target_time,
                                          (Term(snap, tracked, 1.0),), 0.0, True)
    pairs = [(snap, s) for snap in usable for s in snap.sigma_rels]
    points = [(float(snap.time), gamma_of_sigma_rel(s)) for snap, s in pairs]
    goal = (float(target_time), gamma_of_sigma_rel(sigma_rel))
    coefficients = solve_coefficients(points, goal)
    error = fit_error(points, goal, coefficients)
    terms = tuple(Term(snap, s, x) for (snap, s), x in zip(pairs, coefficients))
    return ReconstructionPlan(root, model_path, sigma_rel, step, target_time, terms, error, False)


def _output_dtype(plan: ReconstructionPlan, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype!r} must be a floating torch dtype such as torch.float32, or None")
        return dtype
    shadow = plan.terms[-1].snapshot.version.manifest.get("shadow_dtype")
    return torch.float64 if shadow == "float64" else torch.float32


class _Combiner:
    """Open readers of every term; combine one tensor or one box at a time."""

    def __init__(self, plan: ReconstructionPlan, dtype: torch.dtype, stack: ExitStack):
        self.plan = plan
        self.dtype = dtype
        self.readers = [stack.enter_context(ConsolidatedReader(plan.root, term.sigma_rel, plan.model_path,
                                                               term.snapshot.tag)) for term in plan.terms]
        newest = max(range(len(plan.terms)), key=lambda i: plan.terms[i].snapshot.step)
        self.newest = self.readers[newest]  # copied tensors (buffers) follow the live model: take the newest
        self.tensors = self.newest.manifest["tensors"]

    def blended(self, fqn: str) -> bool:
        fqn = self.newest.alias_of.get(fqn, fqn)
        info = self.tensors[fqn]
        return bool(info.get("blended", True)) and tensor_dtype(self.newest.manifest, fqn).is_floating_point

    def out_dtype(self, fqn: str) -> torch.dtype:
        stored = tensor_dtype(self.newest.manifest, self.newest.alias_of.get(fqn, fqn))
        return self.dtype if self.blended(fqn) else stored

    def box(self, fqn: str, offset, shape) -> torch.Tensor:
        if not self.blended(fqn):
            return self.newest.read_box(fqn, offset, shape)
        total = torch.zeros(list(shape), dtype=torch.float64)
        for term, reader in zip(self.plan.terms, self.readers):
            total.add_(reader.read_box(fqn, offset, shape).to(torch.float64), alpha=term.coefficient)
        return total.to(self.dtype)

    def tensor(self, fqn: str) -> torch.Tensor:
        shape = self.tensors[self.newest.alias_of.get(fqn, fqn)]["global_shape"]
        return self.box(fqn, [0] * len(shape), shape)


@contextmanager
def _combiner(plan: ReconstructionPlan, dtype: torch.dtype | None) -> Iterator[_Combiner]:
    with ExitStack() as stack:
        yield _Combiner(plan, _output_dtype(plan, dtype), stack)


def _bytes_of(combiner: _Combiner) -> int:
    return sum(numel(shape) * combiner.out_dtype(name).itemsize for name, _, shape in combiner.newest.entries)


@torch.no_grad()
def reconstruct(root, sigma_rel: float, step: int | None = None, model_path: str | None = None, *,
                dtype: torch.dtype | None = None, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """The consolidated EMA weights of profile ``sigma_rel`` at ``step``, reconstructed from the snapshots.

    Returns ``{fqn: tensor}`` (CPU; keys relative to ``model_path``) that loads into the
    unsharded module like :func:`shardema.load_consolidated`'s. ``step``: an EMA step at
    or before the last snapshot (default: the last snapshot's). ``dtype``: of the averaged
    tensors (default float32, float64 when the shadows were float64). Combined in float64.
    """
    plan = plan_reconstruction(root, sigma_rel, step, model_path)
    out: dict[str, torch.Tensor] = {}
    with _combiner(plan, dtype) as combiner:
        with _progress(_bytes_of(combiner), progress, f"posthoc sigma_rel={sigma_rel:g}") as bar:
            for name, _, shape in combiner.newest.entries:
                source = combiner.newest.alias_of.get(name)
                out[name] = out[source] if source in out else combiner.tensor(name)
                bar.update(numel(shape) * out[name].dtype.itemsize)
    logger.info("reconstructed sigma_rel %g at step %d from %d snapshot profile(s) (fit error %.3g)", plan.sigma_rel,
                plan.step, len(plan.terms), plan.fit_error)
    return out


def _metadata(plan: ReconstructionPlan) -> dict[str, str]:
    return {"format": "shardema-posthoc", "format_version": str(FORMAT_VERSION),
            "model_path": json.dumps(plan.model_path), "sigma_rel": factor_name(plan.sigma_rel),
            "step": str(plan.step), "fit_error": repr(plan.fit_error),
            "terms": json.dumps([[t.snapshot.tag, t.sigma_rel, t.coefficient] for t in plan.terms])}


def _refuse_existing(path: Path, overwrite: bool, what: str) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another {what} or pass overwrite=True (--overwrite) to "
                              "replace it")


@torch.no_grad()
def reconstruct_to_file(root, sigma_rel: float, out, step: int | None = None, model_path: str | None = None, *,
                        dtype: torch.dtype | None = None, overwrite: bool = False,
                        progress: bool | None = None) -> Path:
    """Write the reconstruction to one safetensors file, one tensor at a time (temporary name, fsync, rename).

    Its metadata records the target, the step, the fit error and every term. An
    existing ``out`` is kept unless ``overwrite``. Returns the path written.
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the file to write, e.g. {out / 'posthoc.safetensors'}")
    _refuse_existing(out, overwrite, "--out file")
    plan = plan_reconstruction(root, sigma_rel, step, model_path)
    with _combiner(plan, dtype) as combiner:
        entries = [(name, combiner.out_dtype(name), shape) for name, _, shape in combiner.newest.entries]
        make_dirs(out.parent)
        with _progress(_bytes_of(combiner), progress, f"posthoc sigma_rel={sigma_rel:g}") as bar:

            def tensor_of(name: str) -> torch.Tensor:
                tensor = combiner.tensor(name)
                bar.update(tensor.numel() * tensor.element_size())
                return tensor

            write_safetensors_atomic(out, entries, _metadata(plan), tensor_of)
    logger.info("wrote the sigma_rel %g reconstruction (step %d) to %s", plan.sigma_rel, plan.step, out)
    return out


def _write_rank_file(combiner: _Combiner, staging: Path, source: dict, plan: ReconstructionPlan, save_id: str,
                     tag: str, world: int) -> dict:
    """One rank's file of the output: the same pieces as the source snapshot's file of that rank.

    One piece in memory at a time; each piece's checksum is computed as it is written.
    """
    directory = staging / ema_dirname(plan.sigma_rel)
    make_dirs(directory)
    final = directory / rank_filename(source["rank"], world)
    boxes = {fqn: (piece["offset"], piece["shape"]) for fqn, piece in source["pieces"].items()}
    entries = [(fqn, combiner.out_dtype(fqn), list(shape)) for fqn, (_, shape) in boxes.items()]
    listed = {fqn: {"offset": offset, "shape": shape} for fqn, (offset, shape) in boxes.items()}
    metadata = {"format": "shardema-ema", "format_version": str(FORMAT_VERSION), "save_id": save_id, "tag": tag,
                "model_path": json.dumps(plan.model_path), "factor": factor_name(plan.sigma_rel),
                "step": str(plan.step), "schedule": json.dumps(combiner.newest.manifest["schedule"]),
                "world_size": str(world), "rank": str(source["rank"]),
                "tensors": json.dumps(listed, separators=(",", ":"))}
    written = write_safetensors_atomic(final, entries, metadata, lambda fqn: combiner.box(fqn, *boxes[fqn]))
    return {"path": f"{ema_dirname(plan.sigma_rel)}/{final.name}", "factor": plan.sigma_rel,
            "rank": source["rank"], "size": written.size, "header_crc32c": written.header_crc32c,
            "pieces": {fqn: {**box, "crc32c": written.checksums[fqn]} for fqn, box in listed.items()}}


@torch.no_grad()
def reconstruct_to_checkpoint(root, sigma_rel: float, out_root, tag: str = "latest", step: int | None = None,
                              model_path: str | None = None, *, dtype: torch.dtype | None = None,
                              overwrite: bool = False, progress: bool | None = None) -> Path:
    """Write the reconstruction as a sharded shardema checkpoint ``<out_root>/<model path>/cp=<tag>``.

    The per-rank layout is that of the newest snapshot used, so ``ShardedEMA(model,
    sigma_rels=[sigma_rel], model_paths=model_path).resume(out_root)`` (or ``load_ema``
    with ``tag``) loads it at any world size, and ``swapped(sigma_rel)`` swaps it in.
    Committed like a save (staging directory, manifest last, rename) under the writer
    lock; an existing ``cp=<tag>`` is kept unless ``overwrite``. Memory: one piece at a
    time. Returns the directory.
    """
    validate_tag(tag)
    plan = plan_reconstruction(root, sigma_rel, step, model_path)
    label_dir = Path(out_root) / path_label(model_path)
    current = label_dir / cp_dirname(tag)
    _refuse_existing(current, overwrite, "tag or out_root")
    make_dirs(label_dir)
    save_id = uuid.uuid4().hex
    with WriterLock(label_dir, purpose="writing a post-hoc reconstruction"), _combiner(plan, dtype) as combiner:
        _refuse_existing(current, overwrite, "tag or out_root")
        source = combiner.newest
        files = source.version.files_of(saved_factor(source.manifest, source.factor))
        world = int(source.manifest["world_size"])
        staging = label_dir / staging_dirname(tag, save_id)
        try:
            with _progress(_bytes_of(combiner), progress, f"posthoc sigma_rel={sigma_rel:g}") as bar:
                entries = []
                for entry in files:
                    entries.append(_write_rank_file(combiner, staging, entry, plan, save_id, tag, world))
                    bar.update(sum(numel(p["shape"]) * combiner.out_dtype(fqn).itemsize
                                   for fqn, p in entry["pieces"].items()))
            tensors = {fqn: {**info, "dtype": dtype_name(combiner.out_dtype(fqn))}
                       for fqn, info in source.manifest["tensors"].items()}
            manifest = {**source.manifest, "save_id": save_id, "created_unix": time.time(), "tag": tag,
                        "model_path": model_path, "model_paths": [model_path], "step": plan.step,
                        "factors": [plan.sigma_rel], "tensors": tensors,
                        "files": sorted(entries, key=lambda f: f["path"]),
                        "posthoc": json.loads(_metadata(plan)["terms"])}
            validate_manifest(manifest, f"manifest of {staging}")
            write_bytes_atomic(staging / MANIFEST_NAME, json.dumps(manifest, indent=1).encode("utf-8"))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = label_dir / old_dirname(tag)
        if current.exists():
            _remove_dir(old)
            os.rename(current, old)
        os.rename(staging, current)
        fsync_dir(label_dir)
        _remove_dir(old)
    logger.info("wrote the sigma_rel %g reconstruction (step %d) as %s", plan.sigma_rel, plan.step, current)
    return current
