"""OfflineLossCallback: the mean loss over a named dataset, reduced across ranks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .. import _dist
from ._base import NO_VALUES, CallbackContext, IntervalType, PeriodicCallback
from ._config import OfflineLossCallbackConfig
from ._counter import UpdateCounter


def mean_over_ranks(total, count, process_group=None) -> float:
    """Collective: ``sum(total) / sum(count)`` over the ranks of ``process_group``.

    One all-reduce of a two-element float64 tensor; every rank gets the same value.
    Raises ``ValueError`` on every rank when the summed count is zero.
    """
    device = _dist.collective_device(process_group)
    pair = torch.stack([torch.as_tensor(total, dtype=torch.float64).reshape(()).to(device),
                        torch.as_tensor(count, dtype=torch.float64).reshape(()).to(device)])
    if _dist.is_distributed():
        dist.all_reduce(pair, op=dist.ReduceOp.SUM, group=process_group)
    total_sum, total_count = pair.tolist()
    if total_count <= 0:
        raise ValueError("no samples to average over on any rank (summed count is 0)")
    return total_sum / total_count


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (tensor, sequence or mapping)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError("cannot count the samples of a 0-d tensor batch")
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        items = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = list(batch)
    else:
        items = []
    for item in items:
        try:
            return batch_size_of(item)
        except ValueError:
            continue
    raise ValueError(f"cannot count the samples of a batch of type {type(batch).__name__}; "
                     "make loss_fn return (loss_sum, sample_count)")


class OfflineLossCallback(PeriodicCallback, kind="OfflineLossCallback"):
    """Mean loss of the model over ``datasets[dataset_key]``, all-reduced across ranks.

    ``loss_fn(model, batch)`` (the runner's, or the ``loss_fn`` argument) returns the
    batch's mean loss, weighted here by the batch's sample count, or an explicit
    ``(loss_sum, sample_count)`` pair. Each rank iterates its own loader (e.g. with a
    ``DistributedSampler``); under FSDP every rank must see the same number of
    batches, since each forward is collective. The model is put in eval mode for
    the pass and back in its previous mode afterwards. The metric is
    ``loss/<dataset_key>`` unless ``metric_key`` is set.
    """

    config_class: ClassVar = OfflineLossCallbackConfig
    config: OfflineLossCallbackConfig

    def __init__(self, config: OfflineLossCallbackConfig | None = None, context: CallbackContext | None = None,
                 *, loss_fn: Callable[..., Any] | None = None):
        super().__init__(config, context)
        self.loss_fn = loss_fn
        self.last_loss: float | None = None

    @property
    def metric_key(self) -> str:
        """Key the loss is written under (before any ``ema=<factor>/`` prefix)."""
        return self.config.metric_key or f"loss/{self.config.dataset_key}"

    def _loader(self):
        datasets = self.context.datasets or {}
        key = self.config.dataset_key
        if key not in datasets:
            raise ValueError(f"{self.name}: dataset_key={key!r} is not among the runner's datasets "
                             f"{sorted(datasets)}; pass datasets={{{key!r}: loader}}")
        return datasets[key]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Collective: the mean loss over the dataset (same value on every rank)."""
        loss_fn = self.loss_fn or self.context.loss_fn
        if loss_fn is None:
            raise ValueError(f"{self.name}: no loss function; pass loss_fn=... to the runner or the callback")
        model = self.model
        if model is None:
            raise ValueError(f"{self.name}: the callback context has no model")
        loader = self._loader()
        was_training = model.training
        model.eval()
        total: torch.Tensor | float = 0.0
        count = 0
        try:
            for batch in loader:
                out = loss_fn(model, batch)
                if isinstance(out, tuple):
                    loss_sum, n = out
                    loss_sum = torch.as_tensor(loss_sum).detach().to(torch.float64)
                    n = int(n)
                else:
                    n = batch_size_of(batch)
                    loss_sum = torch.as_tensor(out).detach().to(torch.float64) * n
                # Accumulate on the loss's device: no host sync per batch.
                total = loss_sum if isinstance(total, float) else total + loss_sum.to(total.device)
                count += n
        finally:
            model.train(was_training)
        try:
            return mean_over_ranks(total, count, self.context.process_group)
        except ValueError:
            raise ValueError(f"{self.name}: dataset {self.config.dataset_key!r} yielded no samples on any rank") \
                from None

    @torch.no_grad()
    def periodic_callback(self, *, interval_type: IntervalType, update_counter: UpdateCounter,
                          values: Mapping[str, Any] = NO_VALUES) -> None:
        """Evaluate and write the mean loss."""
        self.last_loss = self.evaluate()
        self.log_scalar(self.metric_key, self.last_loss, update_counter)

    def state_dict(self) -> dict:
        """The latest loss."""
        return {"last_loss": self.last_loss}

    def load_state_dict(self, state: dict) -> None:
        """Restore the latest loss."""
        self.last_loss = state.get("last_loss")
