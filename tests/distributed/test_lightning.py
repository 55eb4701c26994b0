"""shardema.integrations.lightning on 2 real gloo ranks: DDP and FSDP2 (ModelParallelStrategy) on CPU.

One spawn of 2 processes runs every fit (Lightning reuses the process group the harness made):
the EMA against a float64 EMA of the live weights recorded after each optimizer step (with
gradient accumulation), validation on the EMA weights, the EMA left in the model, resume from
a checkpoint against an uninterrupted run, and examples/lightning_ema.py under DDP and FSDP2
(the FSDP2 EMA, saved beside the checkpoint and resumed, against the DDP one).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from dist_harness import load_example, run_ranks

# find_spec, not importorskip: the parent process need not import the framework (seconds of CPU).
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("lightning",)),
                                reason="needs lightning (in the dev extra)")
DECAY = 0.9


def _example():
    return load_example("lightning_ema.py")


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _params(module) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in module.named_parameters()}


def _ema_full(callback) -> dict[str, torch.Tensor]:
    """The EMA of the only factor, full tensors keyed by parameter name."""
    state = callback.ema.state_dict()
    return {k.split("/", 2)[2]: _full(v) for k, v in state.items() if k.startswith("ema=")}


def _worker(tmp: str) -> dict:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from shardema.integrations.lightning import ShardedEMACallback

    os.environ["PL_DISABLE_FORK"] = "1"
    # bad arguments fail at construction, naming the value
    with pytest.raises(ValueError, match=r"eval_factor=0\.5 is not one of the target factors \[0\.9\]"):
        ShardedEMACallback(0.9, eval_factor=0.5)
    with pytest.raises(ValueError, match=r"checkpoint='sideways' must be"):
        ShardedEMACallback(0.9, checkpoint="sideways")
    with pytest.raises(TypeError, match="needs target factors"):
        ShardedEMACallback()
    ex = _example()
    root = Path(tmp)
    train, val = ex.datasets()

    class Recorder(pl.Callback):
        """Live weights at fit start and after each optimizer step; the weights seen by validation."""

        def __init__(self):
            self.live: list[dict] = []
            self.batches = 0
            self.after_val: list[tuple[int, dict]] = []

        def on_fit_start(self, trainer, pl_module):
            self.live.append(_params(pl_module))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches += 1
            if trainer.global_step > len(self.live) - 1:
                self.live.append(_params(pl_module))

        def on_validation_end(self, trainer, pl_module):
            self.after_val.append((trainer.global_step, _params(pl_module)))

    class Probe(ex.Regressor):
        def __init__(self):
            super().__init__()
            self.seen_in_val: list[tuple[int, dict]] = []

        def validation_step(self, batch, batch_idx):
            if batch_idx == 0:
                self.seen_in_val.append((self.trainer.global_step, _params(self)))
            return super().validation_step(batch, batch_idx)

    def fit(model, callbacks, run_dir, epochs, ckpt_path=None, accumulate=2):
        trainer = ex.make_trainer("ddp", run_dir, epochs, callbacks, accumulate=accumulate)
        trainer.fit(model, DataLoader(train, batch_size=8), DataLoader(val, batch_size=16), ckpt_path=ckpt_path)
        return trainer

    out: dict = {}
    # 1. Uninterrupted: 2 epochs of 4 batches per rank, 2 accumulated per optimizer step.
    recorder, ema_cb = Recorder(), ShardedEMACallback(DECAY)
    pl.seed_everything(0, verbose=False)  # the example's initial weights
    model = Probe()
    fit(model, [recorder, ema_cb], root / "a", epochs=2)
    out["batches"], out["ema_step"] = recorder.batches, ema_cb.ema.step
    reference = {n: p.double() for n, p in recorder.live[0].items()}
    references = [dict(reference)]
    for live in recorder.live[1:]:
        reference = {n: DECAY * reference[n] + (1 - DECAY) * live[n].double() for n in reference}
        references.append(dict(reference))
    out["ema_err"] = max((_ema_full(ema_cb)[n].double() - references[-1][n]).abs().max().item() for n in reference)
    out["val_err"] = max((seen[n].double() - references[step][n]).abs().max().item()
                         for step, seen in model.seen_in_val for n in seen)
    out["val_steps"] = [step for step, _ in model.seen_in_val]
    # after each validation the live weights are back, bit-exact (the last recorded step's)
    out["restored"] = all(torch.equal(params[n], recorder.live[step][n])
                          for step, params in recorder.after_val[:-1] for n in params)
    # the last validation runs before on_train_end: after fit the model holds the EMA
    out["left_err"] = max((p - references[-1][n]).abs().max().item() for n, p in _params(model).items())
    out["final_live_ne_ema"] = max((recorder.live[-1][n].double() - references[-1][n]).abs().max().item()
                                   for n in reference)
    uninterrupted = _ema_full(ema_cb)

    # 2. The example under DDP and under FSDP2 (ModelParallelStrategy): the same run stopped after
    # epoch 1 and resumed from last.ckpt (EMA inside it under DDP, beside it under FSDP2).
    for strategy in ("ddp", "fsdp2"):
        run = root / f"example-{strategy}"
        common = ["--strategy", strategy, "--root", str(run), "--accumulate", "2"]
        _, cb1 = ex.main([*common, "--epochs", "1"])
        out[f"{strategy}_mid_err"] = max((_ema_full(cb1)[n].double() - references[2][n]).abs().max().item()
                                         for n in uninterrupted)
        _, cb = ex.main([*common, "--epochs", "2", "--resume"])
        out[f"{strategy}_step"] = cb.ema.step
        out[f"{strategy}_shadow_bytes"] = cb.ema.shadow_bytes
        out[f"{strategy}_err"] = max((_ema_full(cb)[n] - uninterrupted[n]).abs().max().item() for n in uninterrupted)
    ddp_ckpt = torch.load(root / "example-ddp" / "last.ckpt", weights_only=False)
    out["ddp_entry"] = next(iter(ddp_ckpt["shardema"].values()))["format"]
    out["fsdp2_ckpt_is_dir"] = (root / "example-fsdp2" / "last.ckpt").is_dir()
    out["fsdp2_tags"] = sorted(p.name for p in (root / "example-fsdp2" / "ema" / "model").glob("cp=*"))
    return out


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_lightning_callback_ddp_and_fsdp2(tmp_path):
    results = run_ranks(_worker, 2, str(tmp_path), timeout=220)
    for out in results:
        assert out["batches"] == 8 and out["ema_step"] == 4  # 8 batches, 2 accumulated per step
        assert out["ema_err"] < 1e-6
        assert out["val_steps"] == [2, 4]
        assert out["val_err"] < 1e-6  # validation saw the EMA, not the live weights
        assert out["restored"]
        assert out["final_live_ne_ema"] > 1e-3  # the checks above can tell EMA from live
        assert out["left_err"] < 1e-6
        for strategy in ("ddp", "fsdp2"):  # resumed after epoch 1 == uninterrupted
            assert out[f"{strategy}_step"] == 4 and out[f"{strategy}_err"] < 1e-5, strategy
        assert out["ddp_entry"] == "inline"
        assert out["fsdp2_ckpt_is_dir"] and out["fsdp2_tags"] == ["cp=step2", "cp=step4"]  # beside, per step
        assert out["fsdp2_shadow_bytes"] * 2 == out["ddp_shadow_bytes"]  # each rank holds half
