"""Scale model: how the checkpoint metadata costs grow with the world size W (no processes).

    python benchmarks/scale_model.py                  # -> benchmarks/results/scale_model.{json,md}
    python benchmarks/scale_model.py --worlds 8 64 256 1024 --models 70B 405B

Synthetic tensor tables of Llama-3-shaped 70B and 405B models, every tensor sharded on dim 0
over W ranks as FSDP2 does (``torch.chunk`` sizes, empty pieces where W exceeds the rows), one
factor. The real planning code is called directly:

- the save's agreement: the bytes one rank contributes to the all-gather (its claims and tensor
  table, pickled) and what every rank receives (W times that), and ``union_tables`` over the W
  tables, which every rank runs;
- the manifest: ``_build_manifest`` (the writer's), its JSON size (``indent=1``, as written),
  ``json.loads`` + ``validate_manifest`` (what every reader runs, coverage check included);
- resume planning: ``plan_reads`` for one rank (which file holds which slice), resuming at the
  same W.

Each cost is reported with its cost per piece (W x tensors pieces), so the figures at
W = 16,384 are extrapolated from the largest W measured (the growth is linear in pieces:
docs/scaling.md shows the fit).
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from shardema.checkpoint._manifest import Candidate, Version, validate_manifest
from shardema.checkpoint._reader import plan_reads
from shardema.checkpoint._table import union_tables
from shardema.checkpoint._writer import _build_manifest
from shardema.config import DecaySchedule

MODELS = {
    # layers, hidden, ffn, kv width, vocab (Llama 3 / 3.1 shapes)
    "70B": (80, 8192, 28672, 1024, 128256),
    "405B": (126, 16384, 53248, 1024, 128256),
}


def tensor_shapes(name: str) -> dict[str, list[int]]:
    layers, hidden, ffn, kv, vocab = MODELS[name]
    shapes = {"tok_embeddings.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": [hidden, hidden], p + "attention.wk.weight": [kv, hidden],
                       p + "attention.wv.weight": [kv, hidden], p + "attention.wo.weight": [hidden, hidden],
                       p + "feed_forward.w1.weight": [ffn, hidden], p + "feed_forward.w2.weight": [hidden, ffn],
                       p + "feed_forward.w3.weight": [ffn, hidden], p + "attention_norm.weight": [hidden],
                       p + "ffn_norm.weight": [hidden]})
    shapes.update({"norm.weight": [hidden], "output.weight": [vocab, hidden]})
    return shapes


def shard(shape: list[int], rank: int, world: int) -> tuple[list[int], list[int]]:
    """FSDP2's Shard(0) piece of ``rank``: offset and shape (torch.chunk sizes; empty past the rows)."""
    rows = shape[0]
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    size = max(0, min(chunk, rows - start))
    return [start, *[0] * (len(shape) - 1)], [size, *shape[1:]]


def rank_table(shapes) -> dict:
    return {None: {fqn: {"global_shape": shape, "dtype": "float32", "blended": True, "is_buffer": False,
                         "aliases": [], "placements": "(Shard(dim=0),)", "mesh_shape": [0]}
                   for fqn, shape in shapes.items()}}


def files_of(shapes, world: int) -> list[dict]:
    files = []
    for rank in range(world):
        pieces = {}
        for fqn, shape in shapes.items():
            offset, local = shard(shape, rank, world)
            if local[0]:
                pieces[fqn] = {"offset": offset, "shape": local, "crc32": "0123abcd"}
        if pieces:
            files.append({"model_path": None, "path": f"ema=0.9999/rank-{rank:05d}-of-{world:05d}.safetensors",
                          "factor": 0.9999, "rank": rank, "size": 1, "crc32": "0123abcd", "pieces": pieces})
    return files


def measure(model: str, world: int) -> dict:
    shapes = tensor_shapes(model)
    table = rank_table(shapes)
    for info in table[None].values():
        info["mesh_shape"] = [world]
    claims = {(None, fqn, tuple(shard(shape, 0, world)[0])) for fqn, shape in shapes.items()}
    proposal = {"save_id": "0" * 32, "tag": "latest", "created": 0.0, "lock_error": None}
    per_rank = len(pickle.dumps((proposal, claims, table)))
    tic = time.perf_counter()
    union, conflicts = union_tables([table] * world)
    union_s = time.perf_counter() - tic
    assert not conflicts
    files = files_of(shapes, world)
    pieces = sum(len(f["pieces"]) for f in files)
    ema = SimpleNamespace(model_paths=(None,), step=1, counters=lambda: {"samples_seen": 0.0, "samples_pending": 0.0},
                          schedule=DecaySchedule(), target_factors=(0.9999,), shadow_dtype=None, buffers="copy")
    plan = {"save_id": "0" * 32, "created": 0.0, "tag": "latest", "table": union}
    tic = time.perf_counter()
    manifest = _build_manifest(ema, None, plan, world, files)
    text = json.dumps(manifest, indent=1)
    build_s = time.perf_counter() - tic
    tic = time.perf_counter()
    loaded = json.loads(text)
    validate_manifest(loaded)
    read_s = time.perf_counter() - tic
    tracked = [SimpleNamespace(fqn=fqn, key=(None, fqn), model_path=None, blended=True,
                               global_offset=shard(shape, 0, world)[0], local_shape=shard(shape, 0, world)[1],
                               local_numel=math.prod(shard(shape, 0, world)[1]))
               for fqn, shape in shapes.items()]
    load = SimpleNamespace(tracked=lambda mps: tracked, shadow=lambda k, key: None)
    candidate = Candidate("latest", loaded["save_id"], {None: Version(None, "latest", Path("/ckpt"), loaded)})
    tic = time.perf_counter()
    reads = plan_reads(ema, load, candidate)
    plan_s = time.perf_counter() - tic
    return {"model": model, "world": world, "tensors": len(shapes), "pieces": pieces,
            "agreement_bytes_per_rank": per_rank, "agreement_bytes_received": per_rank * world,
            "union_tables_s": union_s, "manifest_bytes": len(text), "manifest_build_s": build_s,
            "manifest_read_validate_s": read_s, "plan_reads_s": plan_s, "files_read_by_rank0": len(reads)}


def extrapolate(row: dict, world: int) -> dict:
    """Linear in pieces (W x tensors) for the per-piece costs, linear in W for the gathered bytes."""
    shapes = tensor_shapes(row["model"])
    pieces = sum(1 for fqn, shape in shapes.items() for r in range(world) if shard(shape, r, world)[1][0])
    scale = pieces / row["pieces"]
    out = {"model": row["model"], "world": world, "tensors": row["tensors"], "pieces": pieces, "extrapolated": True,
           "agreement_bytes_per_rank": row["agreement_bytes_per_rank"],
           "agreement_bytes_received": row["agreement_bytes_per_rank"] * world,
           "union_tables_s": row["union_tables_s"] * world / row["world"], "files_read_by_rank0": None}
    for key in ("manifest_bytes", "manifest_build_s", "manifest_read_validate_s", "plan_reads_s"):
        out[key] = row[key] * scale
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--extrapolate-to", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--out", type=Path, default=C.DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for model in args.models:
        for world in args.worlds:
            rows.append(measure(model, world))
            print(json.dumps(rows[-1]), flush=True)
        largest = rows[-1]
        rows.extend(extrapolate(largest, w) for w in args.extrapolate_to if w > largest["world"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_model.json").write_text(json.dumps({"benchmark": "scale_model", "rows": rows}, indent=1))
    header = ["model", "W", "pieces", "agreement: bytes gathered per rank", "union_tables (s)", "manifest size",
              "manifest read + validate (s)", "plan_reads, one rank (s)"]
    table = [[r["model"], f"{r['world']:,}" + (" (extrapolated)" if r.get("extrapolated") else ""),
              f"{r['pieces']:,}", f"{r['agreement_bytes_received'] / 2**20:,.0f} MiB",
              f"{r['union_tables_s']:.3g}", f"{r['manifest_bytes'] / 2**20:,.0f} MiB",
              f"{r['manifest_read_validate_s']:.3g}", f"{r['plan_reads_s']:.3g}"] for r in rows]
    text = C.md_table(header, table)
    (args.out / "scale_model.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
