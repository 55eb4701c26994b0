"""A short 2-rank CPU demo: ShardedEMA on an FSDP2 model, live vs EMA numbers.

Run with ``torchrun --standalone --nproc_per_node=2 launch/demo.py``.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import shardema


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    # Noisy regression: y = x @ w_true + noise. SGD with a large step rattles around
    # the optimum; the EMA of its weights sits much closer to it.
    w_true = torch.randn(16, 1)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    ema = shardema.ShardedEMA(model, target_factors=[0.9, 0.99])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    generator = torch.Generator().manual_seed(1 + rank)
    x_val = torch.randn(512, 16, generator=torch.Generator().manual_seed(99))
    y_val = x_val @ w_true

    def val_loss() -> float:
        with torch.no_grad():
            loss = (model(x_val) - y_val).square().mean()
        return loss.item()

    if rank == 0:
        print(f"{'step':>5} {'live':>9} {'ema=0.9':>9} {'ema=0.99':>9}   (validation MSE)")
    for step in range(1, 401):
        x = torch.randn(32, 16, generator=generator)
        y = x @ w_true + 0.5 * torch.randn(32, 1, generator=generator)
        (model(x) - y).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        if step % 50 == 0:
            live = val_loss()
            averaged = {}
            for factor in ema.target_factors:
                with ema.swapped(factor):
                    averaged[factor] = val_loss()
            if rank == 0:
                print(f"{step:>5} {live:>9.4f} {averaged[0.9]:>9.4f} {averaged[0.99]:>9.4f}")
    if rank == 0:
        print(f"EMA shadow bytes on rank 0: {ema.shadow_bytes} "
              f"(unsharded would be {sum(p.numel() for p in model.parameters()) * 2 * 4})")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
