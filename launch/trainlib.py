"""The example trainer's config, model set-up, model/optimizer checkpoints and report."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import charlm
from runfolder import committed_updates
from shardema.callbacks import CallbackConfig, CallbackRunner, EmaCallback, factor_prefix, load_callback_configs

log = logging.getLogger("shardema.train")


class RunFolderError(RuntimeError):
    """The run folder cannot take this job (held by another job, trained with another config):
    :func:`run_worker` prints it as one line, no traceback."""


def run_worker(main: Callable[[], None]) -> int:
    """Run ``main`` in a torchrun worker; returns the exit status.

    A Ctrl-C reaches torchrun's agent, which forwards SIGINT to every worker: with the default
    action the workers end without a traceback each, and the launcher says what happened. A
    :class:`RunFolderError` is printed once, by rank 0, and exits with status 2.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        main()
    except RunFolderError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:
            time.sleep(5)  # rank 0 reports; the launcher stops this rank once rank 0 has exited
        return 2
    return 0


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    width: int = Field(128, gt=0)
    depth: int = Field(4, gt=0)
    heads: int = Field(4, gt=0)
    context: int = Field(64, gt=1)


class DataConfig(_Section):
    corpus_bytes: int = Field(4_000_000, gt=0)
    batch_size: int = Field(16, gt=0)
    context: int = Field(64, gt=1)
    val_batches: int = Field(16, gt=0)


class OptimConfig(_Section):
    lr: float = Field(3e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = Field(0.0, ge=0)


class LoopConfig(_Section):
    updates: int = Field(1500, gt=0)
    checkpoint_every: int = Field(250, gt=0)
    log_every: int = Field(50, gt=0)


class TrainConfig(_Section):
    """The whole YAML file: trainer sections plus the callbacks list."""

    run_dir: str = "runs/charlm"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig = LoopConfig()
    callbacks: list = Field(default_factory=list)

    @field_validator("callbacks", mode="before")
    @classmethod
    def _callbacks(cls, value):
        return load_callback_configs(yaml.safe_dump(value or []))

    @classmethod
    def from_yaml(cls, path, *, run_dir: str | None = None, updates: int | None = None) -> TrainConfig:
        """Load and validate ``path``; ``run_dir`` / ``updates`` override the file."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if run_dir is not None:
            data["run_dir"] = run_dir
        if updates is not None:
            data.setdefault("train", {})["updates"] = updates
        config = cls.model_validate(data)
        if config.model.context != config.data.context:
            raise ValueError(f"model.context={config.model.context} must equal data.context={config.data.context}")
        return config


def build_model(config: ModelConfig, device: torch.device, *, mixed_precision: bool) -> torch.nn.Module:
    """CharGPT with every block and the root sharded by FSDP2 (bf16 compute on CUDA)."""
    model = charlm.CharGPT(config.width, config.depth, config.heads, config.context).to(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def posthoc_callback(runner: CallbackRunner) -> EmaCallback | None:
    """The EMA callback that snapshots power-function profiles (``sigma_rels``), if the config has one."""
    return next((cb for cb in _ema_callbacks(runner) if cb.config.snapshot_every_n_updates), None)


def _ema_callbacks(runner: CallbackRunner) -> list[EmaCallback]:
    return [cb for cb in runner.all_callbacks() if isinstance(cb, EmaCallback)]


class CheckpointManager:
    """Model + optimizer checkpoints with torch.distributed.checkpoint, one folder per update.

    ``<dir>/update_<N>/`` is committed when DCP's ``.metadata`` exists (DCP writes it last);
    ``trainer_state.json`` (the callback runner's state) is written before DCP starts. The
    newest ``keep`` committed folders are kept.

    [Note: model and EMA at the same update]
    The EMA is saved by ``EmaCallback`` inside ``runner.after_update``, the model right after;
    a kill between the two leaves ``cp=latest`` of the EMA one interval ahead of the newest
    model checkpoint. An asynchronous EMA save (``async_save: true``) overlaps the model's
    state-dict gathering and is waited for before DCP writes, so the EMA is never behind.
    On resume the EMA is therefore loaded from the iteration tag of the model's update
    (``save_weights: true`` on the checkpoint schedule) whenever ``cp=latest`` is at another
    step, so the continued run has exactly the EMA it would have had.
    """

    def __init__(self, directory: Path, keep: int = 2):
        self.directory = directory
        self.keep = keep

    def _committed(self) -> list[tuple[int, Path]]:
        return committed_updates(self.directory)

    def save(self, update: int, model, optimizer, runner: CallbackRunner) -> None:
        """Collective: write ``update_<update>``; prune older committed folders."""
        path = self.directory / f"update_{update:08d}"
        if dist.get_rank() == 0:
            if path.exists():
                shutil.rmtree(path)  # an uncommitted leftover of a killed run
            path.mkdir(parents=True)
            tmp = path / "trainer_state.json.tmp"
            tmp.write_text(json.dumps({"update": update, "runner": runner.state_dict()}))
            os.replace(tmp, path / "trainer_state.json")
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        for cb in _ema_callbacks(runner):  # an asynchronous EMA save must commit before the model does
            cb.wait_for_saves()
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
        dist.barrier()
        if dist.get_rank() == 0:
            for _, old in self._committed()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self, model, optimizer, runner: CallbackRunner) -> int:
        """Collective: load the newest committed checkpoint; returns its update (0 if none)."""
        # Rank 0 decides, so every rank loads the same folder whatever its file-system view.
        choice = [self._committed()[-1] if dist.get_rank() == 0 and self._committed() else None]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return 0
        update, path = choice[0]
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        saved = json.loads((path / "trainer_state.json").read_text())
        try:
            runner.resume_from_checkpoint(saved["runner"])
        except ValueError as error:  # e.g. other target_factors than the run folder was trained with
            run_dir = self.directory.parent
            raise RunFolderError(
                f"{run_dir} was trained with another callback config ({error}); train into a new run folder "
                f"(--run-dir runs/NEW) or delete {run_dir} to start over") from None
        tag = runner.update_counter.iteration_tag
        for cb in _ema_callbacks(runner):
            if cb.ema is not None and cb.ema.step != update:
                from shardema.checkpoint import load_ema

                log.warning("%s: EMA cp=latest is at step %d, the model at update %d; loading cp=%s",
                            cb.name, cb.ema.step, update, tag)
                try:
                    load_ema(cb.ema, cb.root, tag)
                except FileNotFoundError as error:
                    raise RuntimeError(
                        f"{cb.name}: no EMA checkpoint at the model's update {update} (cp={tag}); set "
                        "save_weights: true and every_n_updates equal to train.checkpoint_every so a resume "
                        f"can always find one, or delete {self.directory} to restart") from error
        log.info("resumed from %s (update %d)", path, update)
        return update


class ReportLine(NamedTuple):
    """What one line of the report is: a sentence for ``summary.md`` and a plot legend label."""

    description: str
    label: str


def ema_lines(runner: CallbackRunner) -> dict[str, ReportLine]:
    """Column name -> what that EMA line is: factor, schedule and the decay of its last update.

    Further lines of the report (e.g. other averages of the same run) belong here too.
    """
    lines = {}
    for cb in _ema_callbacks(runner):
        if cb.ema is None or cb.ema.step == 0 or cb.config.sigma_rels is not None:
            continue  # post-hoc profiles have no metric lines: the sweep reports them (posthoc_sweep.py)
        ema, last = cb.ema, cb.ema.step - 1
        per_update = ema.samples_seen / ema.step
        for factor in cb.target_factors:
            decay = ema.schedule.decay(factor, last, per_update, ema.samples_seen - per_update)
            half_life = math.log(0.5) / math.log(decay) if 0 < decay < 1 else float("nan")
            name = factor_prefix(factor).rstrip("/")
            lines[name] = ReportLine(
                f"EMA, target factor {factor!r}, `{ema.schedule.kind}` schedule: decay {decay:.4f} at the last "
                f"update (half-life {half_life:.0f} updates)", f"{name} (decay {decay:.3f} at the end)")
    return lines


def log_line(update: int, total: int, loss: float, step_seconds: list, ema_seconds: list) -> None:
    """One progress line: update, loss, step time and callback (EMA update) time."""
    log.info("update %d/%d  loss %.4f  step %.1f ms  ema+callbacks %.2f ms (median)", update, total, loss,
             1e3 * statistics.median(step_seconds), 1e3 * statistics.median(ema_seconds))


def write_report(run_dir: Path, lines: Mapping[str, ReportLine] | None = None, notes: tuple[str, ...] = ()) -> None:
    """``summary.md`` and ``val_loss.png`` (live vs each EMA factor) from metrics.jsonl.

    ``lines``: column name (``live``, ``ema=0.99``) -> what the line is, listed above the table;
    ``notes``: further lines (e.g. the corpus) printed before them.
    """
    rows: dict[int, dict[str, float]] = {}
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        key = record.get("key", "")
        if key.endswith("loss/val"):
            rows.setdefault(int(record["update"]), {})[key] = float(record["value"])
    columns = sorted({k for r in rows.values() for k in r}, key=lambda k: (k != "loss/val", k))
    header = "| update | " + " | ".join(_column_name(c) for c in columns) + " |"
    described = {"live": ReportLine("the trained weights", "live"), **(lines or {})}
    text = ["# Validation loss (nats per character): live vs EMA", "", *notes, *([""] if notes else []),
            *(f"- {_column_name(c)}: {described[_column_name(c)].description}" for c in columns
              if _column_name(c) in described), "", header, "|" + "---|" * (len(columns) + 1)]
    for update in sorted(rows):
        values = " | ".join(f"{rows[update][c]:.4f}" if c in rows[update] else "" for c in columns)
        text.append(f"| {update} | {values} |")
    (run_dir / "summary.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    try:
        import matplotlib

        matplotlib.use("Agg")
        logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # "building the font cache" (once)
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'shardema[train]')")
        return
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for column in columns:
        points = sorted((u, r[column]) for u, r in rows.items() if column in r)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                  label=described[name].label if (name := _column_name(column)) in described else name)
    axis.set_xlabel("update")
    axis.set_ylabel("validation loss (nats/char)")
    axis.set_title("Character GPT on the Python standard library: live vs EMA")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "val_loss.png", dpi=120)
    log.info("wrote %s and %s", run_dir / "summary.md", run_dir / "val_loss.png")


def _column_name(key: str) -> str:
    return "live" if key == "loss/val" else key.split("/")[0]


__all__ = ["CallbackConfig", "CheckpointManager", "ReportLine", "RunFolderError", "TrainConfig", "build_model",
           "ema_lines", "log_line", "posthoc_callback", "run_worker", "write_report"]
