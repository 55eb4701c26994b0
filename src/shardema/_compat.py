"""Every private torch API shardema uses, in one place, each with why and what would replace it.

shardema is tested with the torch versions that pyproject admits (see README). When
torch changes one of these, this module is the only one to adapt; each accessor fails
with an error that names the torch version instead of an AttributeError deep inside.

Not here, on purpose: ``torch._foreach_lerp_`` and ``torch._foreach_copy_`` (called in
``_kernels``, ``_store`` and ``_swap``). Their names start with an underscore, but they are
documented, public multi-tensor ops (``torch.optim``'s fused paths are built on them),
exposed as such in every torch release shardema admits; wrapping them would only add a
call per kernel launch on the hot path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

__all__ = [
    "DTensor",
    "FSDPModule",
    "Partial",
    "Replicate",
    "Shard",
    "compiled_inner_module",
    "compute_local_shape_and_global_offset",
    "local_tensor",
    "module_buffers",
    "module_children",
    "module_parameters",
    "non_persistent_buffer_names",
    "version_counter",
]

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - builds without distributed support
    FSDPModule = None  # type: ignore[assignment,misc]


def _unsupported(what: str, exc: BaseException) -> NotImplementedError:
    return NotImplementedError(f"shardema needs {what}, which torch {torch.__version__} does not provide ({exc}); "
                               "install a torch version in the range pyproject.toml admits")


def compute_local_shape_and_global_offset(global_shape: tuple[int, ...], mesh: Any, placements: tuple
                                          ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's local shape and global offset of a DTensor with these placements.

    Private: ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``,
    the function DTensor itself uses (uneven shards included). The public replacement
    would be a documented DTensor "local box" query, which torch does not have yet.
    """
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset as compute
    except ImportError as exc:  # pragma: no cover - depends on the torch version
        raise _unsupported("torch.distributed.tensor._utils.compute_local_shape_and_global_offset", exc) from None
    shape, offset = compute(global_shape, mesh, placements)
    return tuple(int(s) for s in shape), tuple(int(o) for o in offset)


def local_tensor(value: DTensor) -> torch.Tensor:
    """The local tensor object a DTensor wraps (the same object on every call).

    Private: ``DTensor._local_tensor``. ``DTensor.to_local()`` is the public way, but it
    returns a new autograd view on every call, and shardema caches its kernel plans by
    the identity of the local tensors (see ``_store``).
    """
    return value._local_tensor  # noqa: SLF001


def module_parameters(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """The parameters registered directly on ``module`` (``None`` entries included), by attribute name.

    ``Module._parameters``: the registration table itself. FSDP2 swaps its entries
    between sharded DTensors and unsharded Parameters, so shardema re-reads it rather
    than holding tensors. ``named_parameters(recurse=False)`` would hide ``None``
    entries and deduplicate tied weights, which the structure checks need to see.
    """
    return module._parameters  # noqa: SLF001


def module_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """The buffers registered directly on ``module``, by attribute name (see :func:`module_parameters`)."""
    return module._buffers  # noqa: SLF001


def module_children(module: nn.Module) -> dict[str, nn.Module | None]:
    """The submodules registered directly on ``module``, by attribute name (``Module._modules``).

    Read directly so that checking that no submodule was replaced costs one dict
    lookup per registration (``named_children()`` builds generators and deduplicates).
    """
    return module._modules  # noqa: SLF001


def version_counter(tensor: torch.Tensor) -> int:
    """How many times ``tensor`` was written in place (autograd's version counter, ``Tensor._version``).

    Host-side metadata, so reading it never syncs with the device. No public accessor
    exists; ``torch.autograd.graph`` hooks would see autograd writes only.
    """
    return tensor._version  # noqa: SLF001


def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """Names of the buffers of ``module`` that its ``state_dict`` leaves out.

    ``Module._non_persistent_buffers_set``: no public accessor exists.
    """
    return module._non_persistent_buffers_set  # noqa: SLF001


def compiled_inner_module(module: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps, else None.

    ``OptimizedModule._orig_mod``: torch documents no public accessor.
    """
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None
