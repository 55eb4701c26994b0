"""A sharded EMA in a Lightning run: 2 CPU processes, DDP or FSDP2, validation on the EMA weights.

Run (Lightning starts the second process itself; needs ``pip install "shardema[lightning]"``):

    python examples/lightning_ema.py --strategy ddp --root runs/lightning
    python examples/lightning_ema.py --strategy fsdp2 --root runs/lightning-fsdp2
    # resume: two more epochs from the last checkpoint, EMA included
    python examples/lightning_ema.py --strategy ddp --root runs/lightning --epochs 4 --resume

The model fits a fixed random linear map; ``val_loss`` is computed with the EMA weights swapped
in. After ``fit`` the model holds the EMA (``leave_ema_in_model=True``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shardema.integrations.lightning import ShardedEMACallback


class Regressor(pl.LightningModule):
    """A two-layer MLP; ``configure_model`` shards it with FSDP2 under ``ModelParallelStrategy``."""

    def __init__(self, width: int = 16, lr: float = 0.05):
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(8, width), nn.Tanh(), nn.Linear(width, 4))

    def configure_model(self) -> None:
        if self.device_mesh is None:  # DDP, single device: nothing to shard
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def datasets(n_train: int = 64, n_val: int = 32, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """A noisy random linear map, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 4, generator=g)
    x = torch.randn(n_train + n_val, 8, generator=g)
    y = x @ w + 0.3 * torch.randn(n_train + n_val, 4, generator=g)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def make_trainer(strategy: str, root: Path, epochs: int, callbacks: list, devices: int = 2,
                 accumulate: int = 1) -> pl.Trainer:
    """A CPU trainer with ``devices`` processes; ``strategy``: ``ddp`` or ``fsdp2``."""
    chosen = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if strategy == "fsdp2" \
        else strategy
    return pl.Trainer(accelerator="cpu", devices=devices, strategy=chosen, max_epochs=epochs,
                      default_root_dir=str(root), callbacks=callbacks, accumulate_grad_batches=accumulate,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, deterministic=True)


def main(argv: list[str] | None = None) -> tuple[pl.Trainer, ShardedEMACallback]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], default="ddp")
    parser.add_argument("--root", type=Path, default=Path("runs/lightning"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    parser.add_argument("--resume", action="store_true", help="continue from <root>/last.ckpt")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    pl.seed_everything(0, verbose=False)
    train, val = datasets()
    ema = ShardedEMACallback(0.9)  # validation runs on these EMA weights
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=args.root, save_last=True, save_top_k=0)
    trainer = make_trainer(args.strategy, args.root, args.epochs, [ema, checkpoints], accumulate=args.accumulate)
    model = Regressor()
    trainer.fit(model, DataLoader(train, batch_size=8), DataLoader(val, batch_size=16),
                ckpt_path=str(args.root / "last.ckpt") if args.resume else None)
    assert ema.ema is not None
    if trainer.is_global_zero:
        logging.getLogger("example").info("EMA step %d, val_loss on the EMA weights %.4f", ema.ema.step,
                                          float(trainer.callback_metrics["val_loss"]))
    return trainer, ema


if __name__ == "__main__":
    main()
