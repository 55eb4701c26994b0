"""``shardema launch``: torchrun with sensible defaults, nothing reimplemented.

Every flag is torchrun's own (``torch.distributed.run``). Two defaults are added when
the user gives none of the corresponding flags:

1. ``--standalone`` when no rendezvous is configured (no ``--nnodes``, ``--rdzv-*``,
   ``--master-addr`` / ``--master_addr``), i.e. a single-node job.
2. ``--nproc-per-node`` = the number of visible GPUs, or 2 on a machine without GPUs.

[Note: workers die with their launcher]
torchrun's agent runs inside ``shardema launch``; its workers are child processes. If
the launcher is killed outright (SIGKILL, an OOM kill), nothing stops the workers: they
go on training and writing the run folder. ``launch`` puts its pid in
``SHARDEMA_LAUNCHER_PID``; a worker that calls :func:`exit_with_launcher` asks the
kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) to send it SIGTERM when its parent dies,
and exits at once if the launcher is already gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Sequence

import torch

from ._log import logger

LAUNCHER_PID_VAR = "SHARDEMA_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1

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

    os.environ[LAUNCHER_PID_VAR] = str(os.getpid())  # inherited by the workers
    torchrun_main(torchrun_argv(argv))


def exit_with_launcher() -> bool:
    """In a worker of ``shardema launch``: be terminated when the launcher dies.

    Returns True when the request is in place; False when the process was not started
    by ``shardema launch`` or the platform has no parent-death signal (non-Linux). If
    the launcher already died, exits the process. See [Note: workers die with their
    launcher].
    """
    launcher = os.environ.get(LAUNCHER_PID_VAR)
    if launcher is None or not sys.platform.startswith("linux"):
        return False
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:  # pragma: no cover - every Linux has a libc
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:  # pragma: no cover
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): workers will outlive a killed launcher",
                       ctypes.get_errno())
        return False
    if os.getppid() != int(launcher):  # the launcher died before the request was in place
        logger.error("the launcher (pid %s) is gone; exiting", launcher)
        os._exit(1)
    return True
