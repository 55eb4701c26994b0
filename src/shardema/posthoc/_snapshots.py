"""Post-hoc snapshots: ordinary shardema checkpoints tagged ``snapshot-<step>``, and finding them again."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .._log import logger
from .._shards import path_label
from ..checkpoint._format import parse_cp_dirname
from ..checkpoint._manifest import Version, find_candidates
from ..config import DecaySchedule

SNAPSHOT_PREFIX = "snapshot-"
_SNAPSHOT_TAG = re.compile(r"snapshot-(\d{1,18})")


def snapshot_tag(step: int) -> str:
    """The tag of the snapshot taken at EMA step ``step``: ``snapshot-000001000`` (sorts as text too)."""
    return f"{SNAPSHOT_PREFIX}{int(step):09d}"


def save_snapshot(ema, root, *, dtype: torch.dtype | None = None, blocking: bool = True):
    """Collective: save a post-hoc snapshot of ``ema`` (every profile) as ``cp=snapshot-<step>``.

    A snapshot is an ordinary checkpoint (per-rank safetensors, atomic commit).
    ``dtype``: store the profiles in a lower precision (``torch.bfloat16`` or
    ``torch.float16`` halve the size; docs/posthoc.md gives the error this adds).
    Returns the tag; with ``blocking=False`` an asynchronous save's
    :class:`~shardema.SaveHandle` (see ``ShardedEMA.save``).
    """
    if ema.config.sigma_rels is None:
        raise ValueError("post-hoc snapshots need power-function profiles: build the EMA with "
                         "sigma_rels=[0.05, 0.10] (it tracks target factors "
                         f"{list(ema.target_factors)} with schedule {ema.schedule.kind!r})")
    if ema.step == 0:
        raise ValueError("no update has run yet: a snapshot at step 0 holds no average; save snapshots after "
                         "ema.update()")
    return ema.save(root, snapshot_tag(ema.step), dtype=dtype, blocking=blocking)


@dataclass(frozen=True)
class Snapshot:
    """One committed snapshot of one model path."""

    tag: str
    step: int
    """``ema.step`` when it was saved (update calls so far)."""
    sigma_rels: tuple[float, ...]
    """The profiles it holds."""
    schedule: DecaySchedule
    version: Version

    @property
    def time(self) -> int:
        """Firings (averaging updates) so far: the profiles' ``t``."""
        return self.schedule.firings_before(self.step)

    @property
    def directory(self) -> Path:
        """The committed directory read."""
        return self.version.directory


def _snapshot_tags(label_dir: Path) -> list[str]:
    tags = set()
    if label_dir.is_dir():
        for child in label_dir.iterdir():
            parsed = parse_cp_dirname(child.name)
            if parsed and parsed[1] in ("committed", "old") and _SNAPSHOT_TAG.fullmatch(parsed[0]):
                tags.add(parsed[0])
    return sorted(tags, key=lambda tag: int(tag[len(SNAPSHOT_PREFIX):]))


def _structure(manifest: dict) -> dict[str, tuple[list[int], bool]]:
    return {fqn: (info["global_shape"], info.get("blended", True)) for fqn, info in manifest["tensors"].items()}


def list_snapshots(root, model_path: str | None = None) -> list[Snapshot]:
    """Every committed snapshot of ``model_path`` under ``root``, oldest first, checked for consistency.

    Raises ``ValueError`` naming the snapshot when one is unreadable, was not saved by a
    power-function EMA, holds other profiles than the others, or describes other tensors.
    """
    root = Path(root)
    label_dir = root / path_label(model_path)
    snapshots: list[Snapshot] = []
    for tag in _snapshot_tags(label_dir):
        problems: list[str] = []
        candidates = find_candidates(root, [model_path], tag, problems)
        if not candidates:
            detail = "; ".join(problems) or "missing"
            raise ValueError(f"snapshot {label_dir / ('cp=' + tag)} is not intact ({detail}); "
                             "move it away or delete it with shardema.checkpoint.delete_checkpoint to use the others")
        version = candidates[0].versions[model_path]
        manifest = version.manifest
        schedule = DecaySchedule.model_validate(manifest["schedule"])
        if schedule.kind != "power_function":
            raise ValueError(f"snapshot {version.directory} was saved by an EMA with schedule {schedule.kind!r} and "
                             f"factors {manifest['factors']}, not by power-function profiles (sigma_rels); keep "
                             "post-hoc snapshots in a root of their own")
        snapshots.append(Snapshot(tag, int(manifest["step"]), tuple(float(f) for f in manifest["factors"]),
                                  schedule, version))
    if snapshots:
        first = snapshots[0]
        for snap in snapshots[1:]:
            if snap.sigma_rels != first.sigma_rels:
                raise ValueError(f"snapshot {snap.directory} holds profiles (sigma_rels) {list(snap.sigma_rels)}, "
                                 f"but {first.directory} holds {list(first.sigma_rels)}: snapshots of different runs "
                                 "are mixed in one root")
            if (snap.schedule.start_step, snap.schedule.update_every) != (first.schedule.start_step,
                                                                          first.schedule.update_every):
                raise ValueError(f"snapshot {snap.directory} has start_step/update_every "
                                 f"{snap.schedule.start_step}/{snap.schedule.update_every}, {first.directory} "
                                 f"{first.schedule.start_step}/{first.schedule.update_every}: their times differ")
            mine, theirs = _structure(snap.version.manifest), _structure(first.version.manifest)
            if mine != theirs:
                diff = sorted(set(mine) ^ set(theirs)) or sorted(k for k in mine if mine[k] != theirs[k])
                raise ValueError(f"snapshot {snap.directory} describes other tensors than {first.directory} "
                                 f"(first difference: {diff[0]!r}); snapshots of different models are mixed")
    logger.debug("found %d post-hoc snapshot(s) under %s", len(snapshots), label_dir)
    return snapshots
