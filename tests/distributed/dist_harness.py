"""Run a function on several real gloo ranks (CPU processes) with a hard timeout.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` fresh processes (forked from a
forkserver that has imported torch once), initialises a
gloo process group in each, calls ``fn(*args)`` and returns the per-rank results.
A worker that raises fails the test with its traceback; a hang fails it after
``timeout`` seconds and every process is killed.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 180.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue, pg_timeout_s, backend):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout_s))
        result = fn(*args)
        # Serialise here: tensors sent through the queue would share memory with a
        # process that may exit before the parent reads them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report everything, including assertion failures
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def load_example(filename: str):
    """Import ``examples/<filename>`` as a module (the examples are scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / filename
    spec = importlib.util.spec_from_file_location(path.stem + "_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _context():
    """Workers fork from a server that has already imported torch: a fresh process per rank (as with
    spawn) without paying torch's import in every one (seconds of CPU per rank on a 2-core CI)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor"])
    return ctx


def run_ranks(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT, pg_timeout_s: float = 60.0,
              allow_errors: bool = False, backend: str = "gloo"):
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the list of results by rank.

    ``backend="nccl"``: NCCL ranks instead (CUDA tests; one GPU holds one rank).

    With ``allow_errors=True`` a rank's traceback is returned as ``("error", text)``
    instead of failing the test (for tests that expect a rank to die or raise).
    """
    ctx = _context()
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, pg_timeout_s, backend),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    import queue as queue_module
    import time

    results: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = queue.get(timeout=min(remaining, 1.0))
                results[rank] = (status, value)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead and all(not procs[r].is_alive() for r in dead):
                    # give the queue a moment to deliver a last message
                    time.sleep(0.5)
                    while not queue.empty():
                        rank, status, value = queue.get()
                        results[rank] = (status, value)
                    dead = [r for r in dead if r not in results]
                    for r in dead:
                        results[r] = ("error", f"rank {r} exited with code {procs[r].exitcode} without reporting")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        reported = "\n".join(f"--- rank {r}: {s}\n{v}" for r, (s, v) in sorted(results.items()))
        raise TimeoutError(f"ranks {missing} did not finish within {timeout}s (hang?)\n{reported}")
    errors = {r: v for r, (s, v) in results.items() if s == "error"}
    if errors and not allow_errors:
        raise AssertionError("\n".join(f"--- rank {r} failed:\n{v}" for r, v in sorted(errors.items())))
    import torch

    return [torch.load(io.BytesIO(results[r][1]), weights_only=False) if results[r][0] == "ok"
            else ("error", results[r][1]) for r in range(world_size)]
