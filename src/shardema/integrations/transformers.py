"""A Hugging Face ``transformers.TrainerCallback`` that keeps a :class:`~shardema.ShardedEMA`.

Works with the ``Trainer`` under DDP and under FSDP2 through ``accelerate``: each rank keeps
the EMA of its own shards, nothing is deep-copied. Needs ``transformers`` and ``accelerate``:
``pip install "shardema[transformers]"``. See docs/integrations.md.

[Note: how the transformers callback finds its checkpoint to resume]
The Trainer does not hand the ``resume_from_checkpoint`` folder to callbacks. At
``on_train_begin`` the callback looks, in order, at its own ``resume_from`` argument, and, when
the Trainer restored a step above 0, at ``args.resume_from_checkpoint`` when it is a path, else
``<output_dir>/checkpoint-<global step>`` (what ``resume_from_checkpoint=True`` picks). The
EMA is saved in ``<checkpoint folder>/shardema`` (shardema's per-rank format, tag ``latest``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _dist
from .._compat import DTensor
from .._ema import ShardedEMA, build_config
from .._log import logger
from ..callbacks import factor_prefix
from ..config import EMAConfig
from ._require import missing, pick_factor

try:
    import accelerate  # noqa: F401  (the Trainer needs it; fail here, with the pip command)
    import transformers
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as _exc:
    raise missing(getattr(_exc, "name", None) or "transformers", "transformers", _exc) from _exc

__all__ = ["EMA_SUBDIR", "ShardedEMACallback", "export_pretrained"]

EMA_SUBDIR = "shardema"
"""The folder inside each ``checkpoint-<step>`` that holds the EMA."""


class ShardedEMACallback(transformers.TrainerCallback):
    """Exponential moving averages of the Trainer's model, sharded like the model.

    - ``on_train_begin`` builds the :class:`~shardema.ShardedEMA` over the (prepared, possibly
      FSDP2-sharded) model, and when the run resumes loads the EMA saved in the checkpoint
      folder (see the note in this module; a folder without one restarts the EMA from the
      restored live weights, with a warning; a missing ``resume_from`` raises).
    - ``on_step_end`` (after each optimizer step, not each accumulation micro-batch) calls
      ``ema.update()``.
    - ``on_evaluate``: after the Trainer's evaluation of the live weights, evaluates again with
      each factor's EMA swapped in (``ema.swapped``, rank-coordinated) and reports those metrics
      with the prefix ``ema=<factor>/`` (``ema=0.999/eval_loss``) in the log and in the metrics
      ``trainer.evaluate()`` returns. Needs the trainer: build the callback with
      ``trainer=`` or call :meth:`attach`.
    - ``on_save`` writes the EMA into ``checkpoint-<step>/shardema`` (collective).
    - ``on_train_end`` exports the EMA of ``export_factor`` with ``save_pretrained`` (full,
      unsharded weights, loadable with ``from_pretrained``) to ``export_dir``, default
      ``<output_dir>/ema=<factor>``; ``export=False`` skips it.

    Args:
        config: the target factors or an :class:`~shardema.EMAConfig`, as for
            :class:`~shardema.ShardedEMA`.
        trainer: the ``Trainer``, for the EMA evaluation (or call :meth:`attach` later).
        evaluate: evaluate with the EMA weights at each evaluation.
        export: export the final EMA with ``save_pretrained``.
        export_factor: the exported factor (default: the first target factor).
        export_dir: where to export (default ``<output_dir>/ema=<factor>``).
        resume_from: the checkpoint folder to resume the EMA from (default: found, see above).
        process_group: the group the model is sharded over (default: the world).
        **options: :class:`~shardema.EMAConfig` fields, as for :class:`~shardema.ShardedEMA`.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        ShardedEMACallback(0.999).attach(trainer)
        trainer.train()
    """

    def __init__(self, config: EMAConfig | float | Sequence[float] | None = None, *, trainer=None,
                 evaluate: bool = True, export: bool = True, export_factor: float | None = None,
                 export_dir: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None,
                 process_group=None, **options: Any):
        self.config: EMAConfig = build_config(config, options)  # errors now, not at train start
        self.export_factor = pick_factor(self.config, export_factor, "export_factor")
        self.evaluate = evaluate
        self.export = export
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.process_group = process_group
        self.trainer = None
        self.ema: ShardedEMA | None = None
        """The EMA, from ``on_train_begin`` on (None before)."""
        self.resumed_from: Path | None = None
        """The checkpoint folder whose EMA was loaded (None: started from the live weights)."""
        self.exported_to: Path | None = None
        self._evaluating = False
        self._warned_no_trainer = False
        if trainer is not None:
            self.attach(trainer)

    def attach(self, trainer) -> ShardedEMACallback:
        """Add this callback to ``trainer`` (once) and keep it for the EMA evaluation; returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ------------------------------------------------------------------ building, resuming, updating
    def _resume_dir(self, args, state) -> Path | None:
        if self.resume_from is not None:
            return self.resume_from
        if state.global_step == 0:  # the Trainer restored no state: a fresh run
            return None
        if isinstance(args.resume_from_checkpoint, str | os.PathLike):
            return Path(args.resume_from_checkpoint)
        return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"

    @torch.no_grad()
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Build the EMA over the prepared model; load the checkpoint's EMA when resuming."""
        if model is None:
            raise ValueError("ShardedEMACallback.on_train_begin got no model; the Trainer passes model=...")
        if self.ema is None or self.ema.model is not model:
            self.ema = ShardedEMA(model, self.config, process_group=self.process_group)
        folder = self._resume_dir(args, state)
        if folder is None:
            return
        if not (folder / EMA_SUBDIR).is_dir():
            if self.resume_from is not None:
                raise FileNotFoundError(f"ShardedEMACallback(resume_from={str(self.resume_from)!r}): "
                                        f"{folder / EMA_SUBDIR} does not exist; give the checkpoint-<step> folder the "
                                        "Trainer resumes from")
            logger.warning("resuming at step %d, but %s holds no EMA (saved without ShardedEMACallback, or the run "
                           "resumes from another folder: pass it as ShardedEMACallback(resume_from=...)); the EMA "
                           "starts from the restored live weights", state.global_step, folder / EMA_SUBDIR)
            return
        tag = self.ema.resume(folder / EMA_SUBDIR)
        if tag is None:
            logger.warning("no EMA checkpoint under %s; the EMA starts from the restored live weights",
                           folder / EMA_SUBDIR)
            return
        self.resumed_from = folder
        logger.info("resumed the EMA at step %d from %s", self.ema.step, folder / EMA_SUBDIR)

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        """One EMA update per optimizer step."""
        if self.ema is not None:
            self.ema.update()

    # ------------------------------------------------------------------ evaluation
    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Evaluate each factor's EMA weights; add their metrics, prefixed ``ema=<factor>/``."""
        if self._evaluating or not self.evaluate or self.ema is None:
            return
        if self.trainer is None:
            if not self._warned_no_trainer:
                logger.warning("ShardedEMACallback has no trainer, so it cannot evaluate the EMA weights; build it "
                               "with trainer=... or call callback.attach(trainer)")
                self._warned_no_trainer = True
            return
        self._evaluating = True  # trainer.evaluate() below calls on_evaluate again
        try:
            for factor in self.ema.target_factors:
                prefix = factor_prefix(factor)
                with self.ema.swapped(factor):
                    ema_metrics = self.trainer.evaluate(metric_key_prefix=f"{prefix}eval")
                if metrics is not None:
                    metrics.update(ema_metrics)
        finally:
            self._evaluating = False

    # ------------------------------------------------------------------ checkpoints and export
    def on_save(self, args, state, control, **kwargs):
        """Write the EMA into the checkpoint folder the Trainer just saved (collective)."""
        if self.ema is None:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        self.ema.save(folder / EMA_SUBDIR, "latest")

    @torch.no_grad()
    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Export the EMA of ``export_factor`` with ``save_pretrained`` (collective)."""
        if self.ema is None or not self.export:
            return
        target = self.export_dir or Path(args.output_dir) / f"ema={self.export_factor!r}"
        self.exported_to = export_pretrained(self.ema, self.export_factor, target)


@torch.no_grad()
def export_pretrained(ema: ShardedEMA, factor: float, target: str | os.PathLike) -> Path:
    """Collective: ``save_pretrained`` the model with the EMA of ``factor`` swapped in, on rank 0.

    Sharded tensors are gathered one at a time (``full_tensor``) on every rank; rank 0 keeps them
    on the CPU and writes. The model must have ``save_pretrained`` (a ``PreTrainedModel``).
    """
    model: Any = ema.model
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"cannot export the EMA of a {type(model).__name__}: it has no save_pretrained(); export "
                        "with shardema's checkpoint format instead (ema.save, shardema consolidate)")
    target = Path(target)
    is_zero = _dist.rank(ema.process_group) == 0
    with ema.swapped(factor):
        state: dict[str, torch.Tensor] = {}
        for name, value in model.state_dict().items():
            full = value.full_tensor() if isinstance(value, DTensor) else value  # collective, same order
            if is_zero:
                state[name] = full.detach().to("cpu", copy=True)
    failure: BaseException | None = None
    if is_zero:
        try:
            model.save_pretrained(target, state_dict=state)
            logger.info("exported the EMA of factor %r with save_pretrained to %s", factor, target)
        except BaseException as exc:
            failure = exc
    failed = _dist.failed_ranks(failure is not None, ema.process_group)  # every rank learns the outcome
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(f"exporting the EMA to {target} failed on rank(s) {failed}: see their logs")
    return target
