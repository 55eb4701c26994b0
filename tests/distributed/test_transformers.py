"""shardema.integrations.transformers on 2 real gloo ranks: the Trainer under DDP, and FSDP2 hooks.

One spawn of 2 processes: examples/transformers_ema.py (a tiny Llama from a config) trains 4
optimizer steps of 2 accumulated micro-batches under DDP; the EMA is checked against a float64
EMA of the live weights recorded after each step, the logged ``ema=0.9/eval_loss`` against the
loss of those reference weights computed here, the ``save_pretrained`` export against them, and a
run resumed from ``checkpoint-2`` against the uninterrupted one. accelerate ignores FSDP on CPU
(it shards only on accelerators), so the FSDP2 path drives the same callback's hooks around a
``fully_shard``-ed model: updates, EMA evaluation, save, resume and export of sharded weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from dist_harness import load_example, run_ranks

# find_spec, not importorskip: the parent process need not import the framework (seconds of CPU).
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("transformers", "accelerate")),
                                reason="needs transformers and accelerate (in the dev extra)")
DECAY = 0.9


def _example():
    return load_example("transformers_ema.py")


def _params(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _ema_step(reference: dict, live: dict) -> dict:
    return {n: DECAY * reference[n] + (1 - DECAY) * live[n].double() for n in reference}


def _max_err(a: dict, b: dict) -> float:
    return max((a[n].double() - b[n].double()).abs().max().item() for n in b)


def _eval_loss(ex, weights: dict) -> float:
    """Mean loss of ``weights`` over the example's eval set (equal-length sequences: the Trainer's mean)."""
    model = ex.tiny_llama()
    model.load_state_dict({n: w.float() for n, w in weights.items()}, strict=False)
    batch = ex.sequences(16, seed=2)
    ids = torch.stack([row["input_ids"] for row in batch])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _worker(tmp: str) -> dict:
    import transformers
    from torch.distributed.fsdp import fully_shard

    from shardema.integrations.transformers import ShardedEMACallback

    with pytest.raises(ValueError, match=r"export_factor=0\.5 is not one of the target factors \[0\.9\]"):
        ShardedEMACallback(0.9, export_factor=0.5)
    with pytest.raises(TypeError, match="unknown option"):
        ShardedEMACallback(0.9, decay_every=2)
    ex = _example()
    out: dict = {}
    run = Path(tmp) / "ddp"

    class Recorder(transformers.TrainerCallback):
        def __init__(self):
            self.live: list[dict] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.live.append(_params(model))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.live.append(_params(model))

    # 1. DDP, uninterrupted: 4 steps, evaluation and checkpoint every 2.
    recorder = Recorder()
    trainer, cb = ex.main(["--output-dir", str(run)], callbacks=(recorder,))
    references = [{n: p.double() for n, p in recorder.live[0].items()}]
    for live in recorder.live[1:]:
        references.append(_ema_step(references[-1], live))
    ema_state = {k.split("/", 2)[2]: v for k, v in cb.ema.state_dict().items() if k.startswith("ema=")}
    out["steps"] = (len(recorder.live) - 1, cb.ema.step)
    out["ema_err"] = _max_err(ema_state, references[-1])
    logged = {(e["step"], k): v for e in trainer.state.log_history for k, v in e.items() if k.endswith("eval_loss")}
    out["logged_keys"] = sorted(logged)
    out["ema_loss_err"] = max(abs(logged[(s, "ema=0.9/eval_loss")] - _eval_loss(ex, references[s])) for s in (2, 4))
    out["live_loss_err"] = abs(logged[(4, "eval_loss")] - _eval_loss(ex, recorder.live[4]))
    out["ema_vs_live_loss"] = abs(logged[(4, "ema=0.9/eval_loss")] - logged[(4, "eval_loss")])
    exported = transformers.LlamaForCausalLM.from_pretrained(run / "ema=0.9")
    out["export_err"] = _max_err(_params(exported), references[-1])
    out["live_err_vs_ref"] = _max_err(recorder.live[-1], references[-1])  # shows the checks can fail
    uninterrupted = {n: t.clone() for n, t in ema_state.items()}

    # 2. DDP, resumed from checkpoint-2 (EMA in checkpoint-2/shardema) to step 4.
    _, resumed = ex.main(["--output-dir", str(run), "--resume", str(run / "checkpoint-2")])
    out["resumed"] = (str(resumed.resumed_from), resumed.ema.step)
    resumed_state = {k.split("/", 2)[2]: v for k, v in resumed.ema.state_dict().items() if k.startswith("ema=")}
    out["resume_err"] = _max_err(resumed_state, uninterrupted)

    # 3. FSDP2: the callback's hooks around a fully_shard-ed model (accelerate does not shard on CPU).
    model = ex.tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = ex.sequences(8, seed=1)
    ids = torch.stack([row["input_ids"] for row in data])

    class EvalOnly:
        """The one Trainer method the callback calls: evaluate(metric_key_prefix=...)."""

        def __init__(self):
            self.seen: list[dict] = []

        def evaluate(self, metric_key_prefix="eval"):
            self.seen.append(_params(model))
            with torch.no_grad():
                return {f"{metric_key_prefix}_loss": float(model(input_ids=ids, labels=ids).loss)}

    fsdp_dir = Path(tmp) / "fsdp2"
    args = SimpleNamespace(output_dir=str(fsdp_dir), resume_from_checkpoint=None)
    state = SimpleNamespace(global_step=0)
    fake = EvalOnly()
    callback = ShardedEMACallback(DECAY, trainer=None)
    callback.trainer = fake
    callback.on_train_begin(args, state, None, model=model)
    reference = {n: p.double() for n, p in _params(model).items()}
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
        callback.on_step_end(args, state, None)
        reference = _ema_step(reference, _params(model))
    live_before = _params(model)
    metrics = {"eval_loss": 0.0}
    callback.on_evaluate(args, state, None, metrics=metrics)
    out["fsdp_shadow_bytes"] = (callback.ema.shadow_bytes, cb.ema.shadow_bytes)
    out["fsdp_eval_err"] = _max_err(fake.seen[0], reference)
    out["fsdp_metrics"] = sorted(metrics)
    out["fsdp_restored"] = all(torch.equal(p, live_before[n]) for n, p in _params(model).items())
    (fsdp_dir / "checkpoint-3").mkdir(parents=True, exist_ok=True)
    callback.on_save(args, state, None)
    callback.on_train_end(args, state, None, model=model)
    out["fsdp_export_err"] = _max_err(_params(transformers.LlamaForCausalLM.from_pretrained(fsdp_dir / "ema=0.9")),
                                      reference)
    again = ShardedEMACallback(DECAY)
    again.on_train_begin(args, state, None, model=model)  # global_step 3: finds checkpoint-3
    out["fsdp_resume"] = (again.ema.step, _max_err(_params_of_ema(again), reference))
    return out


def _params_of_ema(callback) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k.split("/", 2)[2]: (v.full_tensor() if isinstance(v, DTensor) else v)
            for k, v in callback.ema.state_dict().items() if k.startswith("ema=")}


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_transformers_callback_ddp_and_fsdp2(tmp_path):
    results = run_ranks(_worker, 2, str(tmp_path), timeout=220)
    for out in results:
        assert out["steps"] == (4, 4)  # one update per optimizer step, not per micro-batch
        assert out["ema_err"] < 1e-6
        assert out["logged_keys"] == [(2, "ema=0.9/eval_loss"), (2, "eval_loss"), (4, "ema=0.9/eval_loss"),
                                      (4, "eval_loss")]
        assert out["ema_loss_err"] < 1e-4 and out["live_loss_err"] < 1e-4
        assert out["ema_vs_live_loss"] > 1e-2
        assert out["live_err_vs_ref"] > 1e-3
        assert out["export_err"] < 1e-6
        assert out["resumed"][0].endswith("checkpoint-2") and out["resumed"][1] == 4
        assert out["resume_err"] < 1e-6
        sharded, replicated = out["fsdp_shadow_bytes"]
        assert sharded < replicated  # each rank holds its shards only
        assert out["fsdp_eval_err"] < 1e-6
        assert out["fsdp_metrics"] == ["ema=0.9/eval_loss", "eval_loss"]
        assert out["fsdp_restored"]
        assert out["fsdp_export_err"] < 1e-6
        assert out["fsdp_resume"][0] == 3 and out["fsdp_resume"][1] < 1e-6
