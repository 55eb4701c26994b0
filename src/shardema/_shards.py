"""Find the live tensors of each model path and describe this rank's piece of each.

[Note: live tensors are re-resolved]
FSDP2 swaps a module's registered parameters between the sharded DTensor and an
unsharded plain Parameter, and may replace a DTensor's local tensor. So a
:class:`LiveTensor` never holds the tensor itself: it holds the owning module and
attribute name, and :meth:`LiveTensor.local` fetches the current local piece.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

try:  # torch >= 2.4 public location
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._tensor import DTensor, Replicate, Shard  # type: ignore

from . import _dist

# Wrappers that insert a path component without changing what the user means.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})

BufferPolicy = Literal["copy", "average", "ignore"]


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers, else ``model``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def clean_fqn(name: str) -> str:
    """Remove wrapper components (``_orig_mod``, ``_checkpoint_wrapped_module``) from an FQN."""
    return ".".join(part for part in name.split(".") if part and part not in _WRAPPER_PARTS)


def path_label(model_path: str | None) -> str:
    """The name a model path goes by in files and keys (``None`` -> ``"model"``)."""
    return "model" if model_path is None else model_path


def _local_shape_and_offset(global_shape, mesh, placements):
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(global_shape, mesh, placements)
    return tuple(int(s) for s in shape), tuple(int(o) for o in offset)


@dataclass
class LiveTensor:
    """One tracked parameter or buffer of a model path, as seen by this rank."""

    model_path: str | None
    fqn: str  # relative to the model path, wrapper parts removed
    owner: nn.Module
    attr: str
    is_buffer: bool
    dtype: torch.dtype
    device: torch.device
    global_shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    mesh: object | None  # DeviceMesh for DTensors
    placements: tuple | None
    writes_checkpoint: bool  # False on ranks that hold a duplicate replica of this piece
    aliases: list[str] = field(default_factory=list)  # other FQNs of the same tensor (tied weights)

    @property
    def key(self) -> tuple[str | None, str]:
        """(model_path, fqn): unique across the EMA."""
        return (self.model_path, self.fqn)

    @property
    def local_numel(self) -> int:
        """Number of elements in this rank's piece."""
        return math.prod(self.local_shape)

    @property
    def is_floating(self) -> bool:
        """True for floating-point tensors (the only ones ever blended)."""
        return self.dtype.is_floating_point or self.dtype.is_complex

    def current(self) -> torch.Tensor | None:
        """The tensor registered on the owner now (DTensor, Parameter or buffer), or None."""
        table = self.owner._buffers if self.is_buffer else self.owner._parameters
        return table.get(self.attr)

    def local(self) -> torch.Tensor:
        """This rank's current local piece (see the re-resolution note); raises if gone."""
        value = self.current()
        if value is None:
            raise RuntimeError(
                f"the model's parameter set changed: {self.fqn!r} (model path "
                f"{path_label(self.model_path)!r}) is no longer registered; create a new ShardedEMA "
                "after changing the model's parameters"
            )
        if isinstance(value, DTensor):
            return value._local_tensor
        return value


def describe(model_path, fqn, owner, attr, value, is_buffer, group) -> LiveTensor:
    """Build the :class:`LiveTensor` of one registered tensor."""
    if isinstance(value, DTensor):
        placements = tuple(value.placements)
        for placement in placements:
            if not isinstance(placement, (Shard, Replicate)):
                raise NotImplementedError(
                    f"{fqn!r} has placement {placement}; shardema supports Shard and Replicate "
                    "placements only (redistribute Partial tensors before creating the EMA)"
                )
        mesh = value.device_mesh
        global_shape = tuple(value.shape)
        local_shape, offset = _local_shape_and_offset(value.shape, mesh, placements)
        actual = tuple(value._local_tensor.shape)
        if actual != local_shape:
            raise AssertionError(f"{fqn!r}: local shape {actual} != expected {local_shape} for {placements}")
        coordinate = mesh.get_coordinate() or []
        writes = all(
            coordinate[dim] == 0 for dim, p in enumerate(placements) if isinstance(p, Replicate)
        )
        # A rank holding an empty piece has nothing to write.
        writes = writes and math.prod(local_shape) > 0
        return LiveTensor(model_path, fqn, owner, attr, is_buffer, value.dtype, value._local_tensor.device,
                          global_shape, local_shape, offset, mesh, placements, writes)
    shape = tuple(value.shape)
    return LiveTensor(model_path, fqn, owner, attr, is_buffer, value.dtype, value.device, shape, shape,
                      (0,) * len(shape), None, None, _dist.rank(group) == 0)


def _named_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Submodules of ``root`` by clean FQN (the first occurrence wins for shared modules)."""
    found: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        found.setdefault(clean_fqn(name), module)
    return found


def resolve_model_path(model: nn.Module, model_path: str | None) -> nn.Module:
    """The submodule at dotted ``model_path`` (wrapper parts optional); raises with valid names."""
    root = unwrap_ddp(model)
    if model_path is None:
        return root
    check_model_paths([model_path])
    modules = _named_modules(root)
    wanted = clean_fqn(model_path)
    if wanted in modules:
        return modules[wanted]
    parts = wanted.split(".")
    prefix = ""
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i - 1]) in modules:
            prefix = ".".join(parts[:i - 1])
            break
    parent = modules[prefix]
    children = sorted(clean_fqn(n) for n, _ in parent.named_children()) or ["(none)"]
    where = f"module {prefix!r}" if prefix else "the model"
    raise ValueError(
        f"unknown model path {model_path!r}: {where} has no child {parts[len(prefix.split('.')) if prefix else 0]!r}; "
        f"valid children of {where}: {', '.join(children)}"
    )


def check_model_paths(model_paths: Sequence[str | None] | None) -> list[str | None]:
    """Validate the list of model paths: no duplicates, no path inside another."""
    if model_paths is None:
        return [None]
    if isinstance(model_paths, str):
        model_paths = [model_paths]
    paths = list(model_paths)
    if not paths:
        raise ValueError("model_paths is empty; pass None to average the whole model")
    for path in paths:
        if path is not None and (not isinstance(path, str) or not path or path != path.strip(".")
                                 or ".." in path or " " in path):
            raise ValueError(f"model path {path!r} is not a dotted submodule path such as 'encoder' or 'blocks.0'")
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            if a is None or b is None or a == b or clean_fqn(b).startswith(clean_fqn(a) + ".") \
                    or clean_fqn(a).startswith(clean_fqn(b) + "."):
                shown_a = "None (the whole model)" if a is None else repr(a)
                shown_b = "None (the whole model)" if b is None else repr(b)
                raise ValueError(
                    f"model paths {shown_a} and {shown_b} overlap; give disjoint submodules "
                    "(e.g. 'encoder' and 'decoder'), each parameter may belong to one path only"
                )
    return paths


def collect(model: nn.Module, model_paths: list[str | None], *, include_frozen: bool,
            buffers: BufferPolicy, group=None) -> list[LiveTensor]:
    """Describe every tracked parameter (and buffer, unless ignored) of every model path."""
    tracked: list[LiveTensor] = []
    seen: dict[int, LiveTensor | None] = {}  # id -> its LiveTensor (None: seen, not tracked)

    def first_sight(value, model_path, fqn) -> bool:
        if id(value) not in seen:
            return True
        owner = seen[id(value)]
        if owner is not None and owner.model_path == model_path and fqn != owner.fqn:
            owner.aliases.append(fqn)  # tied weights: one shadow, every name kept for export
        return False

    for model_path in model_paths:
        root = resolve_model_path(model, model_path)
        count_before = len(tracked)
        for module_name, module in root.named_modules(remove_duplicate=False):
            for attr, value in module._parameters.items():
                fqn = clean_fqn(f"{module_name}.{attr}" if module_name else attr)
                if value is None or not first_sight(value, model_path, fqn):
                    continue
                seen[id(value)] = None
                if not include_frozen and not value.requires_grad:
                    continue
                tracked.append(describe(model_path, fqn, module, attr, value, False, group))
                seen[id(value)] = tracked[-1]
            if buffers == "ignore":
                continue
            for attr, value in module._buffers.items():
                fqn = clean_fqn(f"{module_name}.{attr}" if module_name else attr)
                if value is None or attr in module._non_persistent_buffers_set or \
                        not first_sight(value, model_path, fqn):
                    continue
                tracked.append(describe(model_path, fqn, module, attr, value, True, group))
                seen[id(value)] = tracked[-1]
        if not any(not t.is_buffer for t in tracked[count_before:]):
            raise ValueError(
                f"model path {path_label(model_path)!r} has no parameters to average"
                + ("" if include_frozen else " (all are frozen; pass include_frozen=True to average them)")
            )
    return tracked
