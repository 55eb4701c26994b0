"""A sharded EMA in a Hugging Face Trainer run: a tiny Llama, 2 CPU ranks, DDP or FSDP2 (accelerate).

Run with torchrun (needs ``pip install "shardema[transformers]"``; nothing is downloaded):

    torchrun --nproc-per-node 2 examples/transformers_ema.py --output-dir runs/hf
    torchrun --nproc-per-node 2 examples/transformers_ema.py --output-dir runs/hf-fsdp2 --fsdp2
    # resume: 4 more steps from checkpoint-4, EMA included
    torchrun --nproc-per-node 2 examples/transformers_ema.py --output-dir runs/hf --max-steps 8 \\
        --resume runs/hf/checkpoint-4

The log shows ``eval_loss`` (live weights) beside ``ema=0.9/eval_loss`` (EMA weights); the EMA is
saved in every ``checkpoint-<step>/shardema`` and exported to ``<output-dir>/ema=0.9`` at the end,
loadable with ``LlamaForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from shardema.integrations.transformers import ShardedEMACallback

VOCAB, LENGTH = 32, 16


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama of ~20k parameters, built from a config (no download)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=LENGTH)
    return LlamaForCausalLM(config)


def sequences(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Counting sequences modulo VOCAB from random starts: easy to learn, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (starts + torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def training_args(output_dir: Path, max_steps: int, fsdp2: bool) -> TrainingArguments:
    """CPU, gloo, 2 accumulated micro-batches per step, evaluation and a checkpoint every 2 steps."""
    fsdp = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}) \
        if fsdp2 else {}
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, per_device_eval_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, logging_steps=2,
        use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True, seed=0, save_only_model=False,
        dataloader_num_workers=0, ddp_find_unused_parameters=False, **fsdp)


def main(argv: list[str] | None = None, callbacks: tuple = ()) -> tuple[Trainer, ShardedEMACallback]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/hf"))
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--fsdp2", action="store_true", help="shard with FSDP2 through accelerate")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint-<step> folder to resume from")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    trainer = Trainer(model=tiny_llama(), args=training_args(args.output_dir, args.max_steps, args.fsdp2),
                      train_dataset=sequences(64, seed=1), eval_dataset=sequences(16, seed=2),
                      callbacks=list(callbacks))
    ema = ShardedEMACallback(0.9).attach(trainer)  # evaluates, checkpoints and exports the EMA
    trainer.train(resume_from_checkpoint=str(args.resume) if args.resume else None)
    if trainer.is_world_process_zero():
        final = [e for e in trainer.state.log_history if "eval_loss" in e][-1:]
        ema_final = [e for e in trainer.state.log_history if "ema=0.9/eval_loss" in e][-1:]
        logging.getLogger("example").info("step %d: eval_loss %s (live), %s (EMA); EMA exported to %s",
                                          trainer.state.global_step, final, ema_final, ema.exported_to)
    return trainer, ema


if __name__ == "__main__":
    main()
