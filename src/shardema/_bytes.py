"""Raw bytes of CPU tensors as zero-copy buffers, without numpy.

[Note: no numpy at runtime]
numpy is not a dependency of shardema (nor of torch), and ``Tensor.numpy()`` raises
"Numpy is not available" without it. ``torch.UntypedStorage`` does not export the
buffer protocol, so :func:`cpu_bytes` wraps the tensor's memory in a ctypes array
(``from_address(data_ptr())``) that keeps a reference to the tensor, and returns a
read-only ``memoryview`` of it: the memory stays valid for as long as the view (or
anything sliced from it) is alive. The same trap is inside torch's object collectives
(``broadcast_object_list`` / ``all_gather_object`` decode with ``.numpy()``), hence
the numpy-free versions in ``_dist``.
"""

from __future__ import annotations

import ctypes

import torch


def cpu_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of ``tensor`` (C order, native byte order) as a read-only ``memoryview``.

    Zero-copy for a contiguous CPU tensor; other tensors are first copied to a contiguous
    CPU tensor. The view keeps that tensor alive. An empty tensor gives an empty view.
    """
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if not flat.is_contiguous():
        flat = flat.contiguous()
    nbytes = flat.numel() * flat.element_size()
    if nbytes == 0:
        return memoryview(b"")
    array = (ctypes.c_ubyte * nbytes).from_address(flat.data_ptr())
    array.owner = flat  # type: ignore[attr-defined]  # the view keeps the array, the array the memory
    return memoryview(array).cast("B").toreadonly()


def writable_cpu_bytes(tensor: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as a writable ``memoryview`` (e.g. for ``readinto``).

    Zero-copy: writing the view writes the tensor. Raises for other tensors, whose
    bytes could only be a copy.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"writable bytes need a contiguous CPU tensor, got {tensor.device} "
                         f"contiguous={tensor.is_contiguous()}")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    array.owner = tensor  # type: ignore[attr-defined]
    return memoryview(array).cast("B")
