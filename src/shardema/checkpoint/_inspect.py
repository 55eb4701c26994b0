"""List the checkpoints under a root, with their state (no process group)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._format import parse_cp_dirname
from ._manifest import ManifestError, find_candidates, read_manifest
from ._reader import verify_file


@dataclass
class CheckpointInfo:
    """One ``cp=...`` directory of one model path.

    ``state`` is ``committed`` (a complete save, what readers use), ``old`` (a
    complete previous version kept while a new one is swapped in), ``incomplete``
    (valid manifest, but another model path of the same save is missing),
    ``uncommitted`` (no valid manifest: a crashed or running save) or ``staging`` (a
    save in progress or the leftover of a crashed one).
    """

    model_path: str
    tag: str
    state: str
    directory: str
    step: int | None = None
    factors: list = field(default_factory=list)
    world_size: int | None = None
    mesh_shapes: list = field(default_factory=list)
    save_id: str | None = None
    created_unix: float | None = None
    files: int = 0
    bytes: int = 0
    placements: dict = field(default_factory=dict)
    """Placements (text) -> how many tensors have them (``"plain"`` for plain tensors)."""
    pieces_per_rank: dict = field(default_factory=dict)
    """Rank -> pieces it wrote for the first factor (pipeline stages write disjoint sets)."""
    problem: str | None = None

    def layout(self) -> str:
        """One line: meshes, placements and who wrote what."""
        placements = ", ".join(f"{p} x{n}" for p, n in sorted(self.placements.items()))
        ranks = "/".join(str(self.pieces_per_rank[r]) for r in sorted(self.pieces_per_rank))
        return f"meshes {self.mesh_shapes or '-'}; placements {placements or '-'}; pieces per rank {ranks or '-'}"

    def as_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)


def _natural_key(name: str) -> tuple:
    # Numbers compare as numbers: cp=E0_U100_S3200 before cp=E0_U1000_S32000.
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def list_checkpoints(root, verify: bool = False) -> list[CheckpointInfo]:
    """Every ``<model path>/cp=<tag>`` directory under ``root``, sorted by model path and tag
    (numbers in tags by value: ``E0_U100_S3200`` before ``E0_U1000_S32000``).

    ``verify=True`` also checks each file of committed versions (size, header, and the
    checksum of every piece); a failure is reported in ``problem`` and the state becomes ``corrupt``.
    """
    root = Path(root)
    if root.is_file():
        raise ValueError(f"{root} is a file, not a checkpoint root: give the directory passed to ema.save "
                         "(it holds one directory per model path, e.g. model/cp=latest)")
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint root {root} does not exist")
    infos: list[CheckpointInfo] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for cp_dir in sorted((p for p in label_dir.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name)):
            parsed = parse_cp_dirname(cp_dir.name)
            if parsed is None:
                continue
            tag, kind = parsed
            info = CheckpointInfo(label_dir.name, tag, "staging" if kind == "staging" else "uncommitted", str(cp_dir))
            infos.append(info)
            if kind == "staging":
                continue
            try:
                manifest = read_manifest(cp_dir)
            except ManifestError as exc:
                info.problem = str(exc)
                continue
            info.step, info.factors = manifest["step"], manifest["factors"]
            info.world_size, info.mesh_shapes = manifest["world_size"], manifest.get("mesh_shapes", [])
            info.save_id, info.created_unix = manifest["save_id"], manifest.get("created_unix")
            info.files = len(manifest["files"])
            info.bytes = sum(f["size"] for f in manifest["files"])
            for entry in manifest["tensors"].values():
                key = entry.get("placements") or "plain"
                info.placements[key] = info.placements.get(key, 0) + 1
            first = manifest["factors"][0]
            for entry in manifest["files"]:
                if entry["factor"] == first:
                    info.pieces_per_rank[entry["rank"]] = len(entry["pieces"])
            complete = any(c.save_id == manifest["save_id"]
                           for c in find_candidates(root, [manifest["model_path"]], tag))
            info.state = ("old" if kind == "old" else "committed") if complete else "incomplete"
            if complete and verify:
                for entry in manifest["files"]:
                    problem = verify_file(cp_dir / entry["path"], entry, manifest["save_id"], full=True)
                    if problem:
                        info.state, info.problem = "corrupt", problem
                        break
    return infos


def roots_below(directory, depth: int = 2) -> list[Path]:
    """Folders under ``directory`` (up to ``depth`` levels down) that hold EMA checkpoints, e.g. the
    ``ema`` folder of a run folder: what to suggest when ``directory`` itself holds none."""
    directory = Path(directory)
    found: list[Path] = []
    if depth <= 0 or not directory.is_dir():
        return found
    for child in sorted(p for p in directory.iterdir() if p.is_dir()):
        holds = any(parse_cp_dirname(cp.name) is not None for label in child.iterdir() if label.is_dir()
                    for cp in label.iterdir())
        found.extend([child] if holds else roots_below(child, depth - 1))
    return found
