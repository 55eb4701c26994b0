"""Example FSDP2 training job with EMA: a character-level GPT on the Python standard library.

    shardema launch launch/train.py --config launch/configs/charlm.yaml
    torchrun --standalone --nproc-per-node=2 launch/train.py --config launch/configs/charlm.yaml

CPU/gloo by default; CUDA/NCCL with bf16 mixed precision (fp32 EMA) when GPUs are present.
The model and optimizer are checkpointed with torch.distributed.checkpoint, the EMA with
shardema; a killed run restarted with the same command continues where it left off, with an
identical EMA, and a finished one says so. At the end rank 0 writes ``summary.md`` (what each
line is, the table) and ``val_loss.png`` to the run folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runfolder import exit_if_finished, finished_message

if __name__ == "__main__":
    exit_if_finished(sys.argv[1:])  # before torch is imported: a finished run says so within a second

import torch
import torch.distributed as dist

import charlm
import posthoc_sweep
from shardema import exit_with_launcher
from shardema.callbacks import CallbackRunner, OfflineLossCallback
from shardema.checkpoint import WriterLock
from trainlib import (
    CheckpointManager,
    RunFolderError,
    TrainConfig,
    build_model,
    ema_lines,
    log_line,
    posthoc_callback,
    run_worker,
    write_report,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see launch/configs/)")
    parser.add_argument("--run-dir", help="override run_dir of the config")
    parser.add_argument("--updates", type=int, help="override train.updates of the config")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dump-live", metavar="DIR",
                        help="testing aid: rank 0 saves the full live weights to DIR/live_<update>.pt when the run "
                             "starts and after every update, so a test can recompute the EMA independently "
                             "(see docs/testing.md)")
    return parser.parse_args(argv)


@torch.no_grad()
def dump_live(model: torch.nn.Module, directory: Path, update: int) -> None:
    """Collective: gather every parameter (FSDP2 shards included); rank 0 writes them to one file."""
    from torch.distributed.tensor import DTensor

    state = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone()
             for name, p in model.named_parameters()}
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(state, directory / f"live_{update:08d}.pt")


def main(argv=None) -> None:
    args = parse_args(argv)
    config = TrainConfig.from_yaml(args.config, run_dir=args.run_dir, updates=args.updates)
    finished = finished_message(Path(config.run_dir), config.train.updates)
    if finished is not None:  # say so at once, before the process group, corpus and model
        if int(os.environ.get("RANK", "0")) == 0:
            print(finished, flush=True)
        return
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    exit_with_launcher()  # a killed `shardema launch` takes its workers with it
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    run_lock = hold_run_folder(Path(config.run_dir), rank)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    torch.manual_seed(config.seed)
    # Reruns give the same figures: batches are a function of (seed, update, rank), gloo sums in
    # a fixed order, the launcher runs one thread per worker; CUDA kernels without a deterministic
    # version only warn (cuBLAS needs the workspace setting, read at its first use).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)

    train_data, val_data = charlm.load_corpus(config.data.corpus_bytes)
    corpus = charlm.describe_corpus(train_data, val_data)
    if rank == 0:
        logging.getLogger("shardema.train").info("%s", corpus)
    model = build_model(config.model, device, mixed_precision=use_cuda)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, betas=tuple(config.optim.betas),
                                  weight_decay=config.optim.weight_decay)
    val_batches = charlm.validation_batches(val_data, config.data, rank, world, device)
    runner = CallbackRunner(
        config.callbacks, model=model, datasets={"val": val_batches},
        loss_fn=lambda m, b: charlm.loss_fn(m, *b), run_dir=config.run_dir,
        effective_batch_size=config.data.batch_size * world,
    )
    checkpoints = CheckpointManager(Path(config.run_dir) / "checkpoints")
    start = checkpoints.resume(model, optimizer, runner)
    runner.before_training()
    dump_dir = Path(args.dump_live) if args.dump_live else None
    if dump_dir is not None:
        dump_live(model, dump_dir, start)

    step_seconds, ema_seconds = [], []
    for update in range(start + 1, config.train.updates + 1):
        tic = time.perf_counter()
        x, y = charlm.train_batch(train_data, config.data, config.seed, update, rank, device)
        loss = charlm.loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if use_cuda:
            torch.cuda.synchronize()
        toc = time.perf_counter()
        if dump_dir is not None:
            dump_live(model, dump_dir, update)
            toc = time.perf_counter()
        runner.after_update(values={"loss": loss.detach()})  # EMA update, periodic saves, evaluations
        if use_cuda:
            torch.cuda.synchronize()
        step_seconds.append(toc - tic)
        ema_seconds.append(time.perf_counter() - toc)
        if update % config.train.checkpoint_every == 0 or update == config.train.updates:
            checkpoints.save(update, model, optimizer, runner)
        if update % config.train.log_every == 0 and rank == 0:
            log_line(update, config.train.updates, loss.item(), step_seconds, ema_seconds)
            step_seconds, ema_seconds = [], []
    runner.after_training()
    if rank == 0:
        write_report(Path(config.run_dir), ema_lines(runner), notes=(corpus,))
    snapshots = posthoc_callback(runner)
    live_loss = next((cb for cb in runner if isinstance(cb, OfflineLossCallback)), None)  # top level: live
    if snapshots is not None and snapshots.root is not None and live_loss is not None:
        # Post-hoc EMA: validation loss against sigma_rel, reconstructed from the snapshots (collective).
        results = posthoc_sweep.sweep(model, snapshots.root, live_loss.evaluate)
        if rank == 0:
            posthoc_sweep.write_sweep_report(Path(config.run_dir), results, snapshots.config.sigma_rels or (),
                                             live_loss.last_loss)
    dist.barrier()  # no rank tears the group down while another still uses it
    if run_lock is not None:
        run_lock.release()
    dist.destroy_process_group()


def hold_run_folder(run_dir: Path, rank: int) -> WriterLock | None:
    """Collective: rank 0 locks the run folder for the whole job; a second job on it fails at once."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = WriterLock(run_dir, purpose="training").acquire()
        except Exception as exc:
            error = str(exc)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        dist.destroy_process_group()
        raise RunFolderError(f"cannot train into {run_dir}: {box[0]}")
    return lock


if __name__ == "__main__":
    sys.exit(run_worker(main))
