"""``shardema launch``: torchrun with sensible defaults, nothing reimplemented.

Every flag is torchrun's own (``torch.distributed.run``). Two defaults are added when
the user gives none of the corresponding flags:

1. ``--standalone`` when no rendezvous is configured (no ``--nnodes``, ``--rdzv-*``,
   ``--master-addr`` / ``--master_addr``), i.e. a single-node job.
2. ``--nproc-per-node`` = the number of visible GPUs, or 2 on a machine without GPUs.

``OMP_NUM_THREADS`` is set to 1 when unset (torchrun's own default, without its banner),
and torchrun's agent logs are silenced unless ``LOGLEVEL`` is set: a failed or
interrupted job raises :class:`LaunchError`, which the CLI prints as one line.

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
import logging
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


class LaunchError(RuntimeError):
    """A job started by :func:`launch` failed or was interrupted; ``exit_code`` is what the
    launcher should exit with (the worker's exit code, or 128 + the signal number)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


_TORCHRUN_LOGGERS = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")


def _quiet_torchrun_logs() -> None:
    # torchrun's agent logs each worker's failure, the SIGTERMs it sends and a boxed summary;
    # LaunchError says the same in one line. LOGLEVEL (torchrun's own variable) brings them back.
    if "LOGLEVEL" in os.environ:
        return
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(_TORCHRUN_LOGGERS):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def launch(argv: Sequence[str]) -> None:
    """Run ``torch.distributed.run`` with :func:`torchrun_argv`.

    Raises :class:`LaunchError` when a worker fails or the launcher gets SIGINT / SIGTERM
    (the workers have been stopped by then).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    os.environ[LAUNCHER_PID_VAR] = str(os.getpid())  # inherited by the workers
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets anyway, minus its banner
    _quiet_torchrun_logs()
    try:
        torchrun_main(torchrun_argv(argv))
    except SignalException as exc:
        raise LaunchError(f"stopped by {exc.sigval.name}; the workers were stopped too",
                          128 + int(exc.sigval)) from None
    except KeyboardInterrupt:
        raise LaunchError("stopped by SIGINT; the workers were stopped too", 128 + int(signal.SIGINT)) from None
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            how = f"was killed by {failure.signal_name()}"
            code = 128 - failure.exitcode
        else:
            how = f"exited with code {failure.exitcode}"
            code = failure.exitcode or 1
        raise LaunchError(f"{exc.name} failed: rank {rank} {how} (its output, if any, is above)", code) from None


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
