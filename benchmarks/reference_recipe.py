"""The reference for time to quality: nanoGPT's CPU recipe for character-level Tiny Shakespeare,
written out in plain PyTorch with nothing from gptexp (its own model, batches, schedule and loop).

    python benchmarks/reference_recipe.py [--iters 2000]

The recipe (nanoGPT's config/train_shakespeare_char.py with its README's CPU settings): GPT with
4 layers, 4 heads, 128 wide, block 64, no biases, no dropout; batch 12; AdamW (torch's default
implementation) lr 1e-3 with 100 warm-up iterations and a cosine to 1e-4 at iteration 2000, betas
(0.9, 0.99), weight decay 0.1 on matrices, gradient clipping at 1.0; every 250 iterations the loss
is estimated on 20 random batches of each split. The data: the characters of the whole text as the
vocabulary, the first 90% trains, the last 10% validates.

Prints one line per evaluation and, at the end, the loss on the whole validation split (contiguous
windows of 64), which is what gptexp reports as val/loss.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TEXT = Path(__file__).resolve().parents[1] / "src" / "gptexp" / "assets" / "tinyshakespeare.txt"
LAYERS, HEADS, WIDTH, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, WEIGHT_DECAY, BETAS, CLIP = 1e-3, 1e-4, 100, 0.1, (0.9, 0.99), 1.0
EVAL_INTERVAL, EVAL_ITERS = 250, 20


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH, bias=False), nn.LayerNorm(WIDTH, bias=False)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH, bias=False), nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, WIDTH), nn.Embedding(BLOCK, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln = nn.LayerNorm(WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def lr_at(it: int, iters: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = min(1.0, (it - WARMUP) / (iters - WARMUP))
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    split = int(0.9 * len(ids))
    data = {"train": torch.from_numpy(ids[:split]), "val": torch.from_numpy(ids[split:])}

    def batch(name: str):
        tokens = data[name]
        starts = torch.randint(len(tokens) - BLOCK, (BATCH,))
        x = torch.stack([tokens[i:i + BLOCK] for i in starts])
        return x, torch.stack([tokens[i + 1:i + 1 + BLOCK] for i in starts])

    model = GPT(len(chars))
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                   {"params": others, "weight_decay": 0.0}], lr=LR, betas=BETAS)

    @torch.no_grad()
    def estimate() -> dict[str, float]:
        model.eval()
        losses = {name: float(torch.stack([model(*batch(name)) for _ in range(EVAL_ITERS)]).mean()) for name in data}
        model.train()
        return losses

    start = time.perf_counter()
    for it in range(args.iters + 1):
        if it % EVAL_INTERVAL == 0 or it == args.iters:
            losses = estimate()
            print(f"iter {it}: train {losses['train']:.4f}, val {losses['val']:.4f} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
        if it == args.iters:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, args.iters)
        loss = model(*batch("train"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
    training = time.perf_counter() - start

    with torch.no_grad():  # the whole validation split, as gptexp's val/loss
        model.eval()
        val = data["val"]
        n = (len(val) - 1) // BLOCK * BLOCK
        x, y = val[:n].view(-1, BLOCK), val[1:n + 1].view(-1, BLOCK)
        whole = sum(float(model(x[i:i + 128], y[i:i + 128])) * len(x[i:i + 128]) for i in range(0, len(x), 128)) / len(x)
    print(f"whole validation split: {whole:.4f}; training and estimates {training:.1f} s")


if __name__ == "__main__":
    main()
