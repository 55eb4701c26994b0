"""Find the tracked tensors of each model path and describe this rank's piece of each.

[Note: live tensors are re-resolved]
FSDP2 swaps a module's registered parameters between the sharded DTensor and an
unsharded plain Parameter, and may replace a DTensor's local tensor. So a
:class:`TrackedTensor` describes a tensor by its owning module and attribute name
(plus shapes and placement) and does not keep a reference to it:
:meth:`TrackedTensor.local` fetches the current local piece on every call.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._compat import (
    DTensor,
    FSDPModule,
    compiled_inner_module,
    compute_local_shape_and_global_offset,
    local_tensor,
    module_buffers,
    module_children,
    module_parameters,
    non_persistent_buffer_names,
)
from .config import BufferPolicy, check_model_paths

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# Wrappers that insert a path component without changing what the user means.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})



Model = nn.Module | Sequence[nn.Module]
"""A model, or the parts of one model this rank holds (pipeline stages, interleaved schedules)."""


def model_parts(model: Model) -> tuple[nn.Module, ...]:
    """The modules of ``model``: itself, or the model parts given as a list (validated)."""
    if isinstance(model, nn.Module):
        return (model,)
    if isinstance(model, (list, tuple)) and model and all(isinstance(m, nn.Module) for m in model):
        return tuple(model)
    raise TypeError(f"model must be an nn.Module or a non-empty list of the model parts (nn.Module) this rank holds, "
                    f"got {type(model).__name__}")


def reshard_fsdp(model: Model) -> None:
    """Reshard every FSDP2 module under ``model`` so parameters are sharded DTensors again.

    After a forward with ``reshard_after_forward=False`` (or an eval forward of the root),
    FSDP2 leaves unsharded plain Parameters registered. ``reshard()`` is local (no
    communication) and a no-op for modules that are already sharded.
    """
    if FSDPModule is None:  # pragma: no cover - builds without distributed support
        return
    for part in model_parts(model):
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers, else ``model``."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        else:
            inner = compiled_inner_module(model)  # torch.compile's OptimizedModule
            if inner is None:
                return model
            model = inner


def clean_fqn(name: str) -> str:
    """Remove wrapper components (``_orig_mod``, ``_checkpoint_wrapped_module``) from an FQN."""
    return ".".join(part for part in name.split(".") if part and part not in _WRAPPER_PARTS)


def path_label(model_path: str | None) -> str:
    """The name a model path goes by in files and keys (``None`` -> ``"model"``)."""
    return "model" if model_path is None else model_path


@dataclass
class TrackedTensor:
    """One tracked parameter or buffer of a model path, as seen by this rank.

    It names the tensor (owner module + attribute) and describes this rank's piece;
    :meth:`local` fetches the tensor itself (see the re-resolution note).
    """

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
    mesh: DeviceMesh | None  # set for DTensors
    placements: tuple | None
    writes_checkpoint: bool  # claims its piece for checkpoints (the lowest claiming rank writes it)
    blended: bool  # averaged (floating parameters; float buffers under "average"); else copied
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
    def registry(self) -> dict:
        """The owner's registration table this tensor lives in (``_parameters`` or ``_buffers``).

        The dict object itself stays for the module's life (FSDP2 replaces its entries, not
        the dict), so hot paths look the tensor up with one ``registry.get(attr)``.
        """
        return module_buffers(self.owner) if self.is_buffer else module_parameters(self.owner)

    def current(self) -> torch.Tensor | None:
        """The tensor registered on the owner now (DTensor, Parameter or buffer), or None."""
        return self.registry.get(self.attr)

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
            return local_tensor(value)
        return value


def _blends(value: torch.Tensor, is_buffer: bool, buffers: BufferPolicy) -> bool:
    return value.dtype.is_floating_point and (not is_buffer or buffers == "average")


def describe(model_path: str | None, fqn: str, owner: nn.Module, attr: str, value: torch.Tensor, is_buffer: bool,
             buffers: BufferPolicy, group=None) -> TrackedTensor:
    """Build the :class:`TrackedTensor` of one registered tensor; refuse what cannot be averaged."""
    local = local_tensor(value) if isinstance(value, DTensor) else value
    if local.device.type == "meta":
        raise ValueError(f"{fqn!r} (model path {path_label(model_path)!r}) is on the meta device: the model has no "
                         "values yet; materialise it first (model.to_empty(device=...) and initialise the weights), "
                         "then create the ShardedEMA")
    if value.dtype.is_complex:
        raise NotImplementedError(f"{fqn!r} (model path {path_label(model_path)!r}) is complex ({value.dtype}); "
                                  "shardema averages real tensors only: register it as a real view "
                                  "(torch.view_as_real) or leave its module out of model_paths")
    blended = _blends(value, is_buffer, buffers)
    if isinstance(value, DTensor):
        placements = tuple(value.placements)
        for placement in placements:
            # Any sharding or replication torch produces is taken as torch describes it
            # (Shard, _StridedShard, Replicate, on any number of mesh dims); a pending
            # reduction has no value yet to average.
            if placement.is_partial():
                raise NotImplementedError(
                    f"{fqn!r} has placement {placement} (Partial: a pending reduction, not a value); "
                    "redistribute it to Shard or Replicate (e.g. dtensor.redistribute(placements=[Replicate()])) "
                    "before creating the EMA"
                )
        mesh = value.device_mesh
        global_shape = tuple(value.shape)
        local_shape, offset = compute_local_shape_and_global_offset(tuple(value.shape), mesh, placements)
        actual = tuple(local_tensor(value).shape)
        if actual != local_shape:
            raise AssertionError(f"{fqn!r}: local shape {actual} != expected {local_shape} for {placements}")
        coordinate = list(mesh.get_coordinate() or ())
        writes = all(coordinate[dim] == 0 for dim, p in enumerate(placements) if p.is_replicate())
        # A rank holding an empty piece has nothing to write.
        writes = writes and math.prod(local_shape) > 0
        return TrackedTensor(model_path, fqn, owner, attr, is_buffer, value.dtype, local_tensor(value).device,
                             global_shape, local_shape, offset, mesh, placements, writes, blended)
    shape = tuple(value.shape)
    return TrackedTensor(model_path, fqn, owner, attr, is_buffer, value.dtype, value.device, shape, shape,
                         (0,) * len(shape), None, None, math.prod(shape) > 0, blended)


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


ModuleEdge = tuple[nn.Module, str, nn.Module, str]
"""``(parent, attribute name, child, dotted path of the child)``."""


def module_edges(model: Model, owners: Sequence[nn.Module]) -> list[ModuleEdge]:
    """Every ``(parent, name, child, path)`` registration on the way from ``model`` down to each of ``owners``.

    ``parent._modules[name] is child`` for all of them as long as no submodule on the
    way was replaced; ``update()`` checks that cheaply (see ``_store``).
    """
    wanted = {id(m) for m in owners}
    edges: list[ModuleEdge] = []
    seen: set[tuple[int, str]] = set()

    def walk(module: nn.Module, trail: list[ModuleEdge]) -> None:
        if id(module) in wanted:
            for edge in trail:
                if (id(edge[0]), edge[1]) not in seen:
                    seen.add((id(edge[0]), edge[1]))
                    edges.append(edge)
        for name, child in module_children(module).items():
            if child is not None and all(child is not e[2] for e in trail):
                path = f"{trail[-1][3]}.{name}" if trail else name
                walk(child, [*trail, (module, name, child, clean_fqn(path) or path)])

    for part in model_parts(model):
        walk(unwrap_ddp(part), [])
    return edges


def frozen_parameters(model: Model, model_paths: Sequence[str | None]
                      ) -> list[tuple[str | None, str, nn.Parameter]]:
    """``(model path, fqn, parameter)`` of every parameter with ``requires_grad=False`` in the model paths."""
    found = []
    for model_path in model_paths:
        for root in _path_roots(model, model_path):
            for name, param in root.named_parameters():
                if not param.requires_grad:
                    found.append((model_path, clean_fqn(name), param))
    return found


def _path_roots(model: Model, model_path: str | None) -> list[nn.Module]:
    """The submodule at ``model_path`` in every model part that has it (at least one must)."""
    parts = model_parts(model)
    if len(parts) == 1:
        return [resolve_model_path(parts[0], model_path)]
    roots, first_error = [], None
    for part in parts:
        try:
            roots.append(resolve_model_path(part, model_path))
        except ValueError as exc:
            first_error = first_error or exc
    if not roots:
        raise ValueError(f"model path {model_path!r} is in none of the {len(parts)} model parts ({first_error})")
    return roots


def select_by_name(tracked: list[TrackedTensor], include: Sequence[str] | None,
                   exclude: Sequence[str]) -> list[TrackedTensor]:
    """The tracked tensors whose FQN matches ``include`` (if given) and no ``exclude`` pattern.

    Raises naming every pattern that matches no FQN (a typo would silently track
    everything, or nothing).
    """
    names = [t.fqn for t in tracked]
    unused = {option: [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
              for option, patterns in (("include", include or ()), ("exclude", exclude))}
    if any(unused.values()):
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        which = "; ".join(f"{option} pattern(s) {patterns}" for option, patterns in unused.items() if patterns)
        raise ValueError(f"{which} match no tracked tensor; FQNs are relative to the model path, e.g. {shown}")
    kept = [t for t in tracked if include is None or any(fnmatch.fnmatchcase(t.fqn, p) for p in include)]
    kept = [t for t in kept if not any(fnmatch.fnmatchcase(t.fqn, p) for p in exclude)]
    for model_path in dict.fromkeys(t.model_path for t in tracked):
        if not any(t.model_path == model_path and not t.is_buffer for t in kept):
            raise ValueError(f"include/exclude leave model path {path_label(model_path)!r} with no parameters to "
                             "average")
    return kept


def collect(model: Model, model_paths: Sequence[str | None], *, include_frozen: bool,
            buffers: BufferPolicy, group=None) -> list[TrackedTensor]:
    """Describe every tracked parameter (and buffer, unless ignored) of every model path.

    A tensor registered twice in one model path (tied weights) is tracked once, its
    other names kept as aliases. A tensor shared by two model paths is tracked in each
    (two shadows that receive the same updates), so each path is complete on its own:
    swapping or exporting one path includes it; the swap exchanges it once.
    """
    tracked: list[TrackedTensor] = []
    seen: dict[int, TrackedTensor | None] = {}  # id -> its TrackedTensor in this path (None: not tracked)

    def first_sight(value, model_path, fqn) -> bool:
        if id(value) not in seen:
            return True
        owner = seen[id(value)]
        if owner is not None and owner.model_path == model_path and fqn != owner.fqn:
            owner.aliases.append(fqn)  # tied weights: one shadow, every name kept for export
        return False

    for model_path in model_paths:
        count_before = len(tracked)
        seen.clear()
        modules = [(name, module) for root in _path_roots(model, model_path)
                   for name, module in root.named_modules(remove_duplicate=False)]
        for module_name, module in modules:
            for attr, param in module_parameters(module).items():
                fqn = clean_fqn(f"{module_name}.{attr}" if module_name else attr)
                if param is None or not first_sight(param, model_path, fqn):
                    continue
                seen[id(param)] = None
                if not include_frozen and not param.requires_grad:
                    continue
                tracked.append(describe(model_path, fqn, module, attr, param, False, buffers, group))
                seen[id(param)] = tracked[-1]
            if buffers == "ignore":
                continue
            non_persistent = non_persistent_buffer_names(module)
            for attr, value in module_buffers(module).items():
                fqn = clean_fqn(f"{module_name}.{attr}" if module_name else attr)
                if value is None or attr in non_persistent or not first_sight(value, model_path, fqn):
                    continue
                tracked.append(describe(model_path, fqn, module, attr, value, True, buffers, group))
                seen[id(value)] = tracked[-1]
        names: dict[str, TrackedTensor] = {}
        for t in tracked[count_before:]:
            if t.fqn in names:  # only possible across model parts
                raise ValueError(f"model parts hold two different tensors named {t.fqn!r} (model path "
                                 f"{path_label(model_path)!r}); give the parts of one model, each keeping the full "
                                 "model's FQNs for its own layers (as torchtitan's pipeline stages do)")
            names[t.fqn] = t
        if not any(not t.is_buffer for t in tracked[count_before:]):
            raise ValueError(
                f"model path {path_label(model_path)!r} has no parameters to average"
                + ("" if include_frozen else " (all are frozen; pass include_frozen=True to average them)")
            )
    return tracked


def registration_counts(module: nn.Module) -> tuple[int, int]:
    """(number of parameters, number of buffers) registered directly on ``module``."""
    return len(module_parameters(module)), len(module_buffers(module))
