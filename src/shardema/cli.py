"""The ``shardema`` command line: ``consolidate``, ``inspect``, ``posthoc`` (no process group needed) and ``launch``.

Each subcommand is one ``_add_<name>(subparsers)`` function that registers its
parser and sets ``handler`` to a ``_run_<name>(args) -> int`` function; :func:`main`
dispatches. New subcommands add one pair and one line in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence


def _add_consolidate(subparsers) -> None:
    p = subparsers.add_parser(
        "consolidate", help="write the full EMA weights of one factor to one safetensors file",
        description="Assemble the full (unsharded) EMA weights of one model path, tag and factor from the "
                    "per-rank files, one tensor at a time, and write them to FILE. Keys are FQNs relative to "
                    "the model path; load with module.load_state_dict(safetensors.torch.load_file(FILE)).")
    p.add_argument("root", help="checkpoint root given to ema.save")
    p.add_argument("--factor", type=float, required=True, help="the EMA factor to export, e.g. 0.9999")
    p.add_argument("--model-path", default=None, help="dotted model path (default: the whole model)")
    p.add_argument("--tag", default="latest", help="checkpoint tag (default: latest)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.set_defaults(handler=_run_consolidate)


def _run_consolidate(args) -> int:
    from .checkpoint import consolidate_to_file

    path = consolidate_to_file(args.root, args.factor, args.out, model_path=args.model_path, tag=args.tag,
                               progress=False if args.no_progress else None)
    print(f"wrote {path}")
    return 0


def _add_inspect(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="list the EMA checkpoints under a root",
        description="List model paths, tags, states (committed, old, incomplete, uncommitted, staging), steps, "
                    "factors, world sizes and sizes of the checkpoints under ROOT.")
    p.add_argument("root", help="checkpoint root given to ema.save")
    p.add_argument("--verify", action="store_true", help="also check every file's size and CRC-32")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_run_inspect)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _run_inspect(args) -> int:
    from .checkpoint import list_checkpoints

    infos = list_checkpoints(args.root, verify=args.verify)
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=1))
        return 0
    if not infos:
        from .checkpoint._inspect import roots_below

        below = roots_below(args.root)  # e.g. a run folder given for its ema/ folder
        hint = f"; they are under {', '.join(map(str, below))}: shardema inspect {below[0]}" if below else ""
        print(f"no EMA checkpoints under {args.root}{hint}")
        return 0
    header = ("model path", "tag", "state", "step", "factors", "world", "files", "size", "saved")
    rows = [header]
    for i in infos:
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_unix)) if i.created_unix else "-"
        rows.append((i.model_path, i.tag, i.state, "-" if i.step is None else str(i.step),
                     ",".join(repr(f) for f in i.factors) or "-", "-" if i.world_size is None else str(i.world_size),
                     str(i.files), _human_bytes(i.bytes), saved))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for i in infos:
        if i.step is not None:
            print(f"{i.model_path}/cp={i.tag}: {i.layout()}")
    for i in infos:
        if i.problem:
            print(f"{i.model_path}/cp={i.tag}: {i.problem}")
    return 0


def _add_launch(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", add_help=False, help="torchrun with defaults: --standalone, --nproc-per-node = GPUs or 2",
        description="Run torch.distributed.run (torchrun) with every flag it takes. When no rendezvous flag "
                    "is given, --standalone is added; when no --nproc-per-node is given, the number of GPUs "
                    "(2 without GPUs) is used. Example: shardema launch launch/train.py --config CONFIG")
    p.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="torchrun flags, the script and its arguments")
    p.set_defaults(handler=_run_launch)


def launch_help() -> str:
    """``shardema launch --help``: what it adds to torchrun, with this machine's defaults."""
    import torch

    from ._launch import default_nproc_per_node

    nproc = f"--nproc-per-node={default_nproc_per_node()}".ljust(25)
    where = "the GPUs visible here" if torch.cuda.is_available() else "2 on a machine without GPUs, like this one"
    return f"""usage: shardema launch [TORCHRUN FLAGS] SCRIPT [SCRIPT ARGS]

Run SCRIPT on several processes with torchrun (torch.distributed.run). Every torchrun flag works
here; shardema adds these defaults when you give none of the corresponding flags:

  --standalone              single node, local rendezvous (unless --nnodes, --rdzv-*,
                            --master-addr, --master-port or --node-rank is given)
  {nproc} {where}
  OMP_NUM_THREADS=1         for each worker, unless set in the environment

A failed or interrupted job ends with one line (LOGLEVEL=INFO shows torchrun's own logs), and
workers that call shardema.exit_with_launcher() stop when the launcher is killed.

example: shardema launch launch/train.py --config launch/configs/charlm.yaml
torchrun's flags: torchrun --help"""


def _run_launch(args) -> int:
    from ._launch import LaunchError, _launcher_part, launch

    if not args.torchrun_args or {"-h", "--help"} & set(_launcher_part(args.torchrun_args)):
        print(launch_help())  # a --help after SCRIPT is the script's
        return 0
    try:
        launch(args.torchrun_args)
    except LaunchError as exc:
        print(f"shardema launch: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _add_posthoc(subparsers) -> None:
    p = subparsers.add_parser(
        "posthoc", help="reconstruct any EMA length (sigma_rel) from post-hoc snapshots",
        description="Combine the post-hoc snapshots (cp=snapshot-*) under ROOT into the power-function EMA of "
                    "relative width SIGMA_REL at a step (Karras et al., EDM2); see docs/posthoc.md. Give --out "
                    "(one safetensors file), --out-root (a sharded checkpoint that resume/swapped use), --plot "
                    "and/or --explain.")
    p.add_argument("root", help="checkpoint root the snapshots were saved under")
    p.add_argument("--sigma-rel", type=float, required=True, help="relative EMA width, e.g. 0.07")
    p.add_argument("--step", type=int, default=None, help="EMA step (default: the last snapshot's)")
    p.add_argument("--model-path", default=None, help="dotted model path (default: the whole model)")
    p.add_argument("--out", default=None, help="write one .safetensors file")
    p.add_argument("--out-root", default=None, help="write a sharded checkpoint under this root")
    p.add_argument("--tag", default="latest", help="tag of the --out-root checkpoint (default: latest)")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"), default=None,
                   help="dtype of the averaged tensors (default: float32, float64 for float64 shadows)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file or --out-root tag")
    p.add_argument("--plot", default=None, help="PNG of the target profile against the reconstructed one")
    p.add_argument("--explain", action="store_true", help="print the snapshots used and their coefficients")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.set_defaults(handler=_run_posthoc)


def _run_posthoc(args) -> int:
    import torch

    from . import posthoc

    if not (args.out or args.out_root or args.plot or args.explain):
        raise ValueError("nothing to do: give --out FILE, --out-root DIR, --plot FILE and/or --explain")
    plan = posthoc.plan_reconstruction(args.root, args.sigma_rel, args.step, args.model_path)
    if args.explain:
        print(plan.explain())
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    progress = False if args.no_progress else True
    if args.out:
        path = posthoc.reconstruct_to_file(args.root, args.sigma_rel, args.out, plan.step, args.model_path,
                                           dtype=dtype, overwrite=args.overwrite, progress=progress)
        print(f"wrote {path}")
    if args.out_root:
        path = posthoc.reconstruct_to_checkpoint(args.root, args.sigma_rel, args.out_root, args.tag, plan.step,
                                                 args.model_path, dtype=dtype, overwrite=args.overwrite,
                                                 progress=progress)
        print(f"wrote {path}")
    if args.plot:
        print(f"wrote {posthoc.plot_profiles(plan, args.plot)}")
    return 0


SUBCOMMANDS = (_add_consolidate, _add_inspect, _add_launch, _add_posthoc)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="shardema", description="Tools for shardema EMA checkpoints.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shardema`` command; returns the exit status (errors: 1 with a message)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        # Everything after `launch` belongs to torchrun, flags included: no parsing here.
        return _run_launch(argparse.Namespace(torchrun_args=argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (OSError, ValueError, NotImplementedError, ImportError) as exc:  # the user's input: one line, no traceback
        print(f"shardema {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
