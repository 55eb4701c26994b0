"""EmaCallback on 2 gloo ranks with FSDP2: children see the EMA weights, live weights come back,
swaps are collective and only when a child fires, OfflineLoss is reduced over ranks, save/resume."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from dist_harness import run_ranks
from torch import nn

from callback_probes import ProbeConfig, RecordingProbe
from shardema.callbacks import (
    CallbackRunner,
    EmaCallbackConfig,
    MemoryWriter,
    OfflineLossCallbackConfig,
)

pytestmark = pytest.mark.distributed

FACTORS = [0.9, 0.6]


class GatherProbeConfig(ProbeConfig):
    """Schedules only."""


class RaisingProbeConfig(ProbeConfig):
    """Schedules only."""


class GatherProbeCallback(RecordingProbe, kind="GatherProbeCallback"):
    """Gathers the full weights (a collective) each time it runs."""

    config_class = GatherProbeConfig

    def record(self, interval_type, update_counter):
        self.log_scalar("probe/runs", len(self.seen) + 1, update_counter)
        return (update_counter.update, _full_weights(self.model))


class RaisingProbeCallback(RecordingProbe, kind="RaisingProbeCallback"):
    """Raises on rank 1 only, inside the swap."""

    config_class = RaisingProbeConfig

    def record(self, interval_type, update_counter):
        self.model(torch.zeros(1, 5))  # a collective forward on every rank first
        if dist.get_rank() == 1:
            raise ValueError("child failed on rank 1")


def _full_weights(model):
    out = {}
    for name, p in model.named_parameters():
        value = p.detach()
        out[name] = (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
    return out


def _local_weights(model):
    return {n: (p.detach().to_local() if hasattr(p, "to_local") else p.detach()).clone()
            for n, p in model.named_parameters()}


def _make_model():
    torch.manual_seed(0)  # same init on every rank
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _fsdp_callbacks(root):
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    model = _make_model()
    reference_model = _make_model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)

    g = torch.Generator().manual_seed(123)
    train = [(torch.randn(2 * world, 5, generator=g), torch.randn(2 * world, 3, generator=g)) for _ in range(6)]
    val_x, val_y = torch.randn(8 * world, 5, generator=g), torch.randn(8 * world, 3, generator=g)
    # Each rank evaluates its own half, in two equal batches.
    mine = slice(rank * 8, (rank + 1) * 8)
    val = [(val_x[mine][:4], val_y[mine][:4]), (val_x[mine][4:], val_y[mine][4:])]

    writer = MemoryWriter()
    config = EmaCallbackConfig(
        target_factors=FACTORS, save_last_weights=True,
        eval_callbacks=[GatherProbeConfig(every_n_updates=2),
                        OfflineLossCallbackConfig(dataset_key="val", every_n_epochs=1)])
    runner = CallbackRunner([config], model=model, writer=writer, datasets={"val": val}, loss_fn=_loss_fn,
                            updates_per_epoch=3, effective_batch_size=2 * world, ema_root=root)
    runner.before_training()
    ema_cb = runner[0]
    swaps = {"count": 0}
    original = ema_cb.ema.swapped

    @contextlib.contextmanager
    def counting(factor, model_paths=None):
        swaps["count"] += 1
        with original(factor, model_paths):
            yield

    ema_cb.ema.swapped = counting

    # Independent reference: a float64 EMA of the gathered live weights.
    full = _full_weights(model)
    ref = {f: {k: v.double() for k, v in full.items()} for f in FACTORS}
    ref_at = {f: {} for f in FACTORS}
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for update, (x, y) in enumerate(train, start=1):
        part = slice(rank * 2, (rank + 1) * 2)
        opt.zero_grad()
        _loss_fn(model, (x[part], y[part])).backward()
        opt.step()
        full = _full_weights(model)
        for f in FACTORS:
            ref[f] = {k: f * ref[f][k] + (1 - f) * full[k].double() for k in full}
            ref_at[f][update] = {k: v.clone() for k, v in ref[f].items()}
        local_before = _local_weights(model)
        runner.after_update()
        for k, v in _local_weights(model).items():
            assert torch.equal(v, local_before[k]), f"live shard {k} not restored at update {update}"
        for k, v in _full_weights(model).items():
            assert torch.equal(v, full[k]), f"live weight {k} not restored at update {update}"
    runner.after_training()

    # Swaps: probe at updates 2, 4, 6; OfflineLoss at epochs 1, 2 (updates 3, 6): 5 hooks x 2 factors.
    assert swaps["count"] == 10, swaps
    for f in FACTORS:
        probe, _loss_cb = ema_cb.eval_callbacks[f]
        assert [u for u, _ in probe.seen] == [2, 4, 6]
        for update, weights in probe.seen:
            for k, w in weights.items():
                torch.testing.assert_close(w.double(), ref_at[f][update][k], rtol=0, atol=1e-6)
        # OfflineLoss over both ranks' halves == a plain model holding the reference EMA, on all the data
        losses = writer.values(f"ema={f!r}/loss/val")
        assert len(losses) == 2
        reference_model.load_state_dict({k: v.float() for k, v in ref_at[f][6].items()})
        with torch.no_grad():
            expected = float(nn.functional.mse_loss(reference_model(val_x), val_y))
        assert losses[-1] == pytest.approx(expected, rel=1e-5), (losses, expected)
    assert not any(r["key"].startswith(("probe", "loss")) for r in writer.records)
    final_ema = {k: v.detach().clone() for k, v in _ema_state_locals(ema_cb.ema).items()}

    # Resume on both ranks: cp=last (written by after_training) is found and loaded.
    model2 = _make_model()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # different live weights, so an init from live would not match
    fully_shard(model2[0])
    fully_shard(model2[2])
    fully_shard(model2)
    resumed = CallbackRunner([config.model_copy(update={"save_last_weights": False})], model=model2,
                             writer=MemoryWriter(), effective_batch_size=2 * world, ema_root=root)
    resumed.resume_from_checkpoint(runner.state_dict())
    resumed.before_training()
    assert resumed[0].resumed_from == "last"
    for k, v in _ema_state_locals(resumed[0].ema).items():
        assert torch.equal(v, final_ema[k]), k
    assert [len(c.seen) for c in resumed[0].get_children() if isinstance(c, GatherProbeCallback)] == [0, 0]

    # A child failing on one rank inside the swap: every rank raises, none hangs, live weights restored.
    from shardema._swap import SwapAbortedError

    failing = CallbackRunner([EmaCallbackConfig(target_factors=[0.5], save_last_weights=False,
                                                eval_callbacks=[RaisingProbeConfig(every_n_updates=1)])],
                             model=model, writer=MemoryWriter(), effective_batch_size=2 * world)
    failing.before_training()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # make the EMA differ from the live weights
    live = _local_weights(model)
    expected_error = ValueError if rank == 1 else SwapAbortedError
    with pytest.raises(expected_error):
        failing.after_update()
    for k, v in _local_weights(model).items():
        assert torch.equal(v, live[k]), f"live shard {k} not restored after a failed child"
    return swaps["count"]


def _ema_state_locals(ema):
    out = {}
    for k, v in ema.state_dict().items():
        if k.startswith("ema="):
            out[k] = v.to_local() if hasattr(v, "to_local") else v
    return out


def test_fsdp2_children_see_ema_weights_and_live_weights_are_restored(tmp_path):
    assert run_ranks(_fsdp_callbacks, 2, str(tmp_path / "ema"), timeout=240) == [10, 10]
