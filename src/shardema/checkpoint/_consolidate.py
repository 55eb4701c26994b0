"""Full (unsharded) tensors of one factor from a checkpoint, one tensor at a time; no process group.

Memory: assembling a tensor holds the tensor itself plus one stored piece of it
(``safe_open(...).get_tensor`` copies the piece out of the memory-mapped file), so
the peak is about ``largest tensor + its largest piece`` (at most twice the largest
tensor). :func:`consolidate_to_file` writes each tensor as soon as it is assembled;
:func:`load_consolidated` returns them all, so it holds the whole model.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._log import logger
from .._shards import path_label
from ._checksum import LABELS, piece_checksum
from ._format import (
    FORMAT_VERSION,
    box_overlap,
    cp_dirname,
    factor_name,
    numel,
    tensor_checksum,
    validate_tag,
)
from ._io import write_safetensors_atomic
from ._manifest import Version, find_candidates, saved_factor, tensor_dtype, versions_of

_MAX_OPEN_FILES = 64
_PROGRESS_BYTES = 256 * 2**20


def _find_version(root: Path, model_path: str | None, tag: str) -> Version:
    problems: list[str] = []
    candidates = find_candidates(root, [model_path], tag, problems)
    if candidates:
        return candidates[0].versions[model_path]
    # A save whose other model paths are gone still holds this model path completely.
    versions = versions_of(root, model_path, tag)
    if versions:
        logger.warning("using %s although other model paths of its save are missing", versions[0].directory)
        return versions[0]
    where = Path(root) / path_label(model_path) / cp_dirname(tag)
    detail = ("; " + "; ".join(problems)) if problems else ""
    raise FileNotFoundError(f"no committed EMA checkpoint at {where}{detail}; list what exists with "
                            f"`shardema inspect {root}`")


class ConsolidatedReader:
    """Assemble full tensors of one (model path, tag, factor), verifying each stored piece's checksum.

    Use as a context manager; :attr:`entries` lists ``(fqn, dtype, global shape)`` in
    the saved order and :meth:`read` returns one full tensor.
    """

    def __init__(self, root, factor: float, model_path: str | None = None, tag: str = "latest"):
        validate_tag(tag)
        self.root = Path(root)
        self.version = _find_version(self.root, model_path, tag)
        manifest = self.version.manifest
        saved = saved_factor(manifest, factor)
        if saved is None:
            raise ValueError(f"factor {factor!r} is not in {self.version.directory}; saved factors: "
                             f"{manifest['factors']}")
        self.factor = saved
        self.manifest = manifest
        self._pieces: dict[str, list[tuple[Path, dict]]] = {}
        for entry in self.version.files_of(saved):
            path = self.version.directory / entry["path"]
            size = path.stat().st_size if path.is_file() else None
            if size != entry["size"]:
                raise ValueError(f"{path}: {'missing' if size is None else f'size {size} bytes'}, the manifest "
                                 f"says {entry['size']} (truncated or incomplete checkpoint)")
            for fqn, piece in entry["pieces"].items():
                self._pieces.setdefault(fqn, []).append((path, piece))
        # Tied weights are stored once; their other names (aliases) are exported too, so the
        # result loads into the unsharded module with strict=True.
        self.alias_of = {alias: fqn for fqn, info in manifest["tensors"].items() for alias in info.get("aliases", [])}
        self.entries = [(name, tensor_dtype(manifest, fqn), tuple(info["global_shape"]))
                        for fqn, info in manifest["tensors"].items()
                        for name in [fqn, *info.get("aliases", [])]]
        self._handles: OrderedDict = OrderedDict()

    @property
    def total_bytes(self) -> int:
        """Size of all full tensors together."""
        return sum(numel(shape) * dtype.itemsize for _, dtype, shape in self.entries)

    def _open(self, path: Path):
        from safetensors import safe_open

        if path in self._handles:
            self._handles.move_to_end(path)
            return self._handles[path]
        if len(self._handles) >= _MAX_OPEN_FILES:
            _, oldest = self._handles.popitem(last=False)
            oldest.__exit__(None, None, None)
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            handle.__enter__()
        except Exception as exc:  # safetensors' own error type names neither the file nor the fix
            raise ValueError(f"{path}: not a readable safetensors file ({exc}); the checkpoint is corrupt: "
                             f"run `shardema inspect --verify {self.root}` and export another tag") from None
        self._handles[path] = handle
        return handle

    def read(self, fqn: str) -> torch.Tensor:
        """The full tensor ``fqn``; raises ``ValueError`` naming the file of a corrupt piece."""
        fqn = self.alias_of.get(fqn, fqn)
        shape = self.manifest["tensors"][fqn]["global_shape"]
        return self.read_box(fqn, [0] * len(shape), shape)

    def read_box(self, fqn: str, offset, shape) -> torch.Tensor:
        """The box ``[offset, offset + shape)`` of tensor ``fqn``, from the pieces that overlap it.

        Each overlapping piece is read whole and checked against its checksum (so the memory
        is the box plus one piece); raises ``ValueError`` naming the file of a corrupt piece.
        """
        fqn = self.alias_of.get(fqn, fqn)
        box = torch.empty(list(shape), dtype=tensor_dtype(self.manifest, fqn))
        for path, piece in self._pieces.get(fqn, []):
            overlap = box_overlap(piece["offset"], piece["shape"], offset, shape)
            if overlap is None:
                continue
            data = self._open(path).get_tensor(fqn)
            algorithm, expected = piece_checksum(piece)
            if list(data.shape) != piece["shape"] or tensor_checksum(data, algorithm) != expected:
                raise ValueError(f"{path}: {fqn!r} fails its shape or {LABELS[algorithm]} check (corrupt checkpoint)")
            source, target = data, box
            for dim, (start, size) in enumerate(zip(*overlap)):
                source = source.narrow(dim, start - piece["offset"][dim], size)
                target = target.narrow(dim, start - offset[dim], size)
            target.copy_(source)
        return box

    def close(self) -> None:
        """Close the open files."""
        while self._handles:
            _, handle = self._handles.popitem()
            handle.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _progress(total: int, progress: bool | None, desc: str):
    disable = (total < _PROGRESS_BYTES) if progress is None else not progress
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=disable)


def load_consolidated(root, factor: float, model_path: str | None = None, tag: str = "latest", *,
                      progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Full EMA weights of one factor as ``{fqn: tensor}`` (CPU), with keys relative to ``model_path``.

    Needs no process group and works whatever the world size of the save. The result
    loads into the unsharded module with ``module.load_state_dict(sd, strict=True)``
    when the EMA tracked buffers (``buffers="copy"`` or ``"average"``); under
    ``"ignore"`` buffers are absent, so load with ``strict=False``. Every stored piece
    is checked against its checksum. ``progress``: show a progress bar (default: for
    checkpoints of 256 MiB or more).
    """
    out: dict[str, torch.Tensor] = {}
    with ConsolidatedReader(root, factor, model_path, tag) as reader:
        with _progress(reader.total_bytes, progress, f"ema={factor_name(reader.factor)}") as bar:
            for name, dtype, shape in reader.entries:
                source = reader.alias_of.get(name)
                out[name] = out[source] if source in out else reader.read(name)
                bar.update(numel(shape) * dtype.itemsize)
    return out


def consolidate_to_file(root, factor: float, out, model_path: str | None = None, tag: str = "latest", *,
                        progress: bool | None = None) -> Path:
    """Write the full EMA weights of one factor to one safetensors file, one tensor at a time.

    The file is written under a temporary name, fsynced and renamed to ``out``. Its
    metadata records the source (model path, tag, factor, step, save id, schedule).
    Returns the path written.
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the file to write, e.g. {out / 'ema.safetensors'}")
    with ConsolidatedReader(root, factor, model_path, tag) as reader:
        m = reader.manifest
        metadata = {"format": "shardema-consolidated", "format_version": str(FORMAT_VERSION),
                    "model_path": json.dumps(model_path), "tag": tag, "factor": factor_name(reader.factor),
                    "step": str(m["step"]), "save_id": m["save_id"], "schedule": json.dumps(m["schedule"])}
        if out.parent and not out.parent.exists():
            out.parent.mkdir(parents=True)
        shapes = {fqn: (dtype, shape) for fqn, dtype, shape in reader.entries}
        with _progress(reader.total_bytes, progress, f"consolidate ema={factor_name(reader.factor)}") as bar:

            def tensor_of(fqn: str) -> torch.Tensor:
                dtype, shape = shapes[fqn]
                bar.update(numel(shape) * dtype.itemsize)
                return reader.read(fqn)

            write_safetensors_atomic(out, reader.entries, metadata, tensor_of)
    logger.info("wrote %d tensors (%d bytes) of ema=%s step %d to %s", len(reader.entries), reader.total_bytes,
                factor_name(reader.factor), m["step"], out)
    return out
