"""A small GPT-style character model and the Python standard library as its corpus.

Every machine with Python has the corpus, so the example trains on real text without
downloading anything. Batches are a pure function of (seed, step, rank): a resumed run
sees exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import math
import platform
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB_SIZE = 128  # ASCII; other bytes map to '?'


def load_corpus(max_bytes: int, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation byte tensors from the standard library's ``.py`` files.

    Files are taken in sorted order until ``max_bytes``; every ``1/val_fraction``-th
    file goes to validation, so the two splits share no file.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    if not files:
        raise RuntimeError(f"no Python source files found under {root}")
    train, val, total = [], [], 0
    every = max(2, round(1 / val_fraction))
    for i, path in enumerate(files):
        data = path.read_bytes()
        (val if i % every == every - 1 else train).append(data)
        total += len(data)
        if total >= max_bytes:
            break

    def encode(chunks: list[bytes]) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()
        return torch.where(raw < VOCAB_SIZE, raw, torch.full_like(raw, ord("?")))

    return encode(train), encode(val)


def describe_corpus(train: torch.Tensor, val: torch.Tensor) -> str:
    """One line naming the corpus exactly: sizes, Python version and a digest of the bytes.

    The standard library differs between Python releases, and so do the losses of a run on it.
    """
    digest = hashlib.sha256(train.to(torch.uint8).numpy().tobytes() + val.to(torch.uint8).numpy().tobytes())
    return (f"Corpus: {train.numel():,} train + {val.numel():,} validation characters of the Python "
            f"{platform.python_version()} standard library (sha256 {digest.hexdigest()[:12]}).")


def batch(data: torch.Tensor, batch_size: int, context: int, generator: torch.Generator):
    """Random (input, target) windows of ``context`` tokens."""
    starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s:s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1:s + 1 + context] for s in starts.tolist()])
    return x, y


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class CharGPT(nn.Module):
    """A character-level GPT: token and position embeddings, blocks, a linear head.

    ``forward`` returns the logits flattened to ``(batch * context, VOCAB_SIZE)``: the head
    runs on 2-D input, so the output is a fresh tensor. A ``(batch, context, vocab)`` output
    of ``nn.Linear`` is a view, which FSDP2 warns about when the root module returns one.
    """

    def __init__(self, width: int = 128, depth: int = 4, heads: int = 4, context: int = 64):
        super().__init__()
        self.token = nn.Embedding(VOCAB_SIZE, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB_SIZE)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).flatten(0, 1))


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy in nats."""
    logits = model(x)
    return F.cross_entropy(logits.float(), y.reshape(-1))


def bits_per_char(nats: float) -> float:
    """Convert a loss in nats to bits per character."""
    return nats / math.log(2)


def train_batch(data: torch.Tensor, data_config, seed: int, update: int, rank: int, device: torch.device):
    """The batch of ``rank`` at ``update``: a pure function of (seed, update, rank)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + update * 1_009 + rank)
    x, y = batch(data, data_config.batch_size, data_config.context, generator)
    return x.to(device), y.to(device)


def validation_batches(data: torch.Tensor, data_config, rank: int, world: int, device: torch.device) -> list:
    """This rank's share of a fixed validation set (``val_batches`` batches in all).

    Every rank gets the same number of batches: evaluation forwards are collective
    under FSDP2, so unequal counts would leave a rank waiting for the others.
    """
    if data_config.val_batches % world:
        raise ValueError(f"data.val_batches={data_config.val_batches} must be a multiple of the world size {world}")
    generator = torch.Generator().manual_seed(12_345)
    batches = [batch(data, data_config.batch_size, data_config.context, generator)
               for _ in range(data_config.val_batches)]
    return [(x.to(device), y.to(device)) for x, y in batches[rank::world]]
