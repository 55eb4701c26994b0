"""A Lightning callback that keeps a :class:`~shardema.ShardedEMA` of the LightningModule.

A drop-in for the semantics of Lightning's ``WeightAveraging`` / ``EMAWeightAveraging``
that also works when the strategy shards the module (``ModelParallelStrategy``, FSDP2):
nothing is deep-copied, each rank keeps the EMA of its own shards. Needs the ``lightning``
package: ``pip install "shardema[lightning]"``. See docs/integrations.md.

[Note: where the Lightning EMA state goes]
Unsharded strategies (DDP, single device): every rank holds the whole EMA, so its
``state_dict`` goes inside the Lightning checkpoint, under ``checkpoint["shardema"]``,
and rank 0's copy is what ``trainer.save_checkpoint`` writes. Sharded strategies (any
tracked DTensor): each rank holds only its shards, so the EMA is written beside the
checkpoint in shardema's per-rank format (``ema.save(root, tag)``, collective, under
``ema_root``, default ``<trainer.default_root_dir>/ema``, with the tag ``step<global step>``),
and the Lightning checkpoint records only the root and the tag. Resuming with
``trainer.fit(..., ckpt_path=...)`` loads from whichever the checkpoint names.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch

from .._ema import ShardedEMA, build_config
from .._log import logger
from ..checkpoint import load_ema
from ..config import EMAConfig
from ._require import is_sharded, missing, pick_factor

try:
    import lightning.pytorch as pl
except ImportError as _exc:
    raise missing("lightning.pytorch", "lightning", _exc) from _exc

__all__ = ["ShardedEMACallback"]

CHECKPOINT_KEY = "shardema"
"""Top-level key of the Lightning checkpoint dict that holds this callback's EMA entries."""


class ShardedEMACallback(pl.Callback):
    """Exponential moving averages of a LightningModule's weights, sharded like the module.

    - ``on_fit_start`` (after the strategy wrapped or sharded the module, e.g. in
      ``configure_model``) builds the :class:`~shardema.ShardedEMA` over the LightningModule.
    - After every optimizer step it calls ``ema.update()``: with gradient accumulation only
      the batches that stepped the optimizer count (``trainer.global_step`` advanced).
    - Validation and test epochs run with the EMA of ``eval_factor`` swapped in
      (``ema.swapped``, rank-coordinated); the live weights come back bit-exact after them.
    - Checkpoints keep the EMA (see the note in this module) and ``trainer.fit(...,
      ckpt_path=...)`` restores it; a checkpoint without it restarts the EMA from the
      restored live weights, with a warning.
    - At the end of ``fit`` (``on_fit_end``, after the last checkpoint was saved with the
      live weights), with ``leave_ema_in_model=True`` (the default, as ``WeightAveraging``),
      the model keeps the EMA weights of ``eval_factor``.

    Args:
        config: the target factors (one decay or a list) or an :class:`~shardema.EMAConfig`,
            as for :class:`~shardema.ShardedEMA`.
        eval_factor: the factor swapped in for validation, test and the end of fit
            (default: the first target factor).
        leave_ema_in_model: copy the EMA into the model when ``fit`` ends.
        swap_during_eval: set False to validate and test with the live weights.
        checkpoint: ``"auto"`` (inline for unsharded modules, beside for sharded ones),
            ``"inline"`` or ``"beside"``.
        ema_root: where ``"beside"`` checkpoints go (default ``<default_root_dir>/ema``).
        process_group: the group the module is sharded over (default: the world).
        **options: :class:`~shardema.EMAConfig` fields (``shadow_dtype``, ``buffers``,
            ``update_every``, ...), as for :class:`~shardema.ShardedEMA`.

    Example::

        trainer = L.Trainer(strategy="ddp", callbacks=[ShardedEMACallback(0.999)])
        trainer.fit(model, train_loader, val_loader)
    """

    def __init__(self, config: EMAConfig | float | Sequence[float] | None = None, *,
                 eval_factor: float | None = None, leave_ema_in_model: bool = True, swap_during_eval: bool = True,
                 checkpoint: Literal["auto", "inline", "beside"] = "auto", ema_root: str | Path | None = None,
                 process_group=None, **options: Any):
        self.config: EMAConfig = build_config(config, options)  # errors now, not at fit start
        self.eval_factor = pick_factor(self.config, eval_factor, "eval_factor")
        if checkpoint not in ("auto", "inline", "beside"):
            raise ValueError(f"checkpoint={checkpoint!r} must be 'auto', 'inline' or 'beside'")
        self.leave_ema_in_model = leave_ema_in_model
        self.swap_during_eval = swap_during_eval
        self.checkpoint = checkpoint
        self.ema_root = None if ema_root is None else Path(ema_root)
        self.process_group = process_group
        self.ema: ShardedEMA | None = None
        """The EMA, from ``on_fit_start`` on (None before)."""
        self._step_before_batch: int | None = None
        self._pending: dict | None = None  # an EMA entry restored before the EMA exists (DDP restores early)
        self._swap = ExitStack()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_factors=list(self.config.target_factors))

    # ------------------------------------------------------------------ building and updating
    @torch.no_grad()
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the EMA from the (wrapped, sharded, possibly restored) module."""
        if self.ema is None or self.ema.model is not pl_module:
            self.ema = ShardedEMA(pl_module, self.config, process_group=self.process_group)
        if self._pending is not None:
            entry, self._pending = self._pending, None
            self._load_entry(entry, trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """``ema.update()`` when this batch stepped the optimizer (not on accumulation batches)."""
        # global_step counts optimizer steps; it is restored only after on_fit_start, so compare per batch.
        stepped = self._step_before_batch is not None and trainer.global_step > self._step_before_batch
        self._step_before_batch = None
        if self.ema is not None and stepped:
            self.ema.update()

    # ------------------------------------------------------------------ evaluation
    def _enter_swap(self) -> None:
        if self.ema is not None and self.swap_during_eval:
            self._swap.enter_context(self.ema.swapped(self.eval_factor))

    def _exit_swap(self) -> None:
        self._swap.close()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_swap()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_swap()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter_swap()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._exit_swap()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Restore the live weights if an evaluation epoch raised with the EMA swapped in."""
        try:
            self._exit_swap()
        except Exception as exc:  # the original exception is the one to report
            logger.warning("restoring the live weights after %s failed: %s: %s", type(exception).__name__,
                           type(exc).__name__, exc)

    @torch.no_grad()
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With ``leave_ema_in_model``: the model keeps the EMA weights of ``eval_factor``."""
        # on_fit_end, not on_train_end: ModelCheckpoint may still save last.ckpt in on_train_end, and
        # that checkpoint must hold the live weights whatever the order of the callbacks.
        if self.ema is not None and self.leave_ema_in_model:
            self.ema.copy_to(self.eval_factor)

    # ------------------------------------------------------------------ checkpoints
    def _mode(self) -> str:
        assert self.ema is not None
        if self.checkpoint != "auto":
            return self.checkpoint
        return "beside" if is_sharded(self.ema) else "inline"

    def _root(self, trainer: pl.Trainer) -> Path:
        return self.ema_root if self.ema_root is not None else Path(trainer.default_root_dir) / "ema"

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Put the EMA in the checkpoint (unsharded) or save it beside (sharded); collective."""
        if self.ema is None:
            return  # saving outside fit (e.g. after trainer.test): there is no EMA to keep
        if self._mode() == "inline":
            entry: dict[str, Any] = {"format": "inline", "state": self.ema.state_dict()}
        else:
            root, tag = self._root(trainer), f"step{trainer.global_step}"
            self.ema.save(root, tag)
            entry = {"format": "beside", "root": str(root), "tag": tag}
        checkpoint.setdefault(CHECKPOINT_KEY, {})[self.state_key] = entry

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Restore the EMA the checkpoint names (now, or in ``on_fit_start`` under DDP, which restores
        before the EMA exists)."""
        entry = checkpoint.get(CHECKPOINT_KEY, {}).get(self.state_key)
        if entry is None:
            logger.warning("the checkpoint has no shardema EMA for factors %s (was it saved without "
                           "ShardedEMACallback?); the EMA starts from the restored live weights",
                           list(self.config.target_factors))
            if self.ema is not None:
                self.ema.reset_to_live()
            return
        if self.ema is None:
            self._pending = entry
        else:
            self._load_entry(entry, trainer)

    @torch.no_grad()
    def _load_entry(self, entry: dict, trainer: pl.Trainer) -> None:
        assert self.ema is not None
        if entry.get("format") == "inline":
            self.ema.load_state_dict(entry["state"])
        elif entry.get("format") == "beside":
            load_ema(self.ema, entry["root"], entry["tag"])
        else:
            raise ValueError(f"unknown shardema checkpoint entry format {entry.get('format')!r}; this checkpoint "
                             "was written by a newer shardema?")
        logger.info("restored the EMA at step %d from the %s checkpoint entry", self.ema.step, entry["format"])
