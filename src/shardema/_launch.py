"""``shardema launch``: torchrun with sensible defaults, nothing reimplemented.

Every flag is torchrun's own (``torch.distributed.run``). Two defaults are added when
the user gives none of the corresponding flags:

1. ``--standalone`` when no rendezvous is configured (no ``--nnodes``, ``--rdzv-*``,
   ``--master-addr`` / ``--master_addr``), i.e. a single-node job.
2. ``--nproc-per-node`` = the number of visible GPUs, or 2 on a machine without GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_RENDEZVOUS_FLAGS = ("--nnodes", "--rdzv", "--master-addr", "--master_addr", "--master-port", "--master_port",
                     "--node-rank", "--node_rank", "--standalone")
_NPROC_FLAGS = ("--nproc-per-node", "--nproc_per_node")


def default_nproc_per_node() -> int:
    """GPUs visible to this process, or 2 (a CPU/gloo job on two processes) without GPUs."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _launcher_part(argv: list[str]) -> list[str]:
    """The flags before the training script (the first argument not starting with '-')."""
    takes_value = False
    for i, arg in enumerate(argv):
        if takes_value:
            takes_value = False
            continue
        if not arg.startswith("-"):
            return argv[:i]
        # "--flag value" vs "--flag=value" / boolean flags: torchrun's booleans are few.
        takes_value = "=" not in arg and arg not in ("--standalone", "--no-python", "--no_python", "-m", "--module",
                                                     "--run-path", "--run_path")
    return argv


def torchrun_argv(argv: Sequence[str]) -> list[str]:
    """The torchrun argument list with shardema's defaults added where the user gave none."""
    argv = list(argv)
    launcher = _launcher_part(argv)
    added: list[str] = []
    if not any(a.startswith(_RENDEZVOUS_FLAGS) for a in launcher):
        added.append("--standalone")
    if not any(a.startswith(_NPROC_FLAGS) for a in launcher):
        added.append(f"--nproc-per-node={default_nproc_per_node()}")
    return added + argv


def launch(argv: Sequence[str]) -> None:
    """Run ``torch.distributed.run`` with :func:`torchrun_argv` (raises on a failed job)."""
    from torch.distributed.run import main as torchrun_main

    torchrun_main(torchrun_argv(argv))
