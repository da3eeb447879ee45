"""Scoring a language model on text: perplexity by sliding windows, and multiple choice by log-likelihood.

Perplexity follows HF's "perplexity of fixed-length models": windows of `window` tokens that start `stride`
tokens apart; each window scores only the tokens no earlier window scored. With stride < window every token
after the first is scored exactly once, with at least `window - stride` tokens of context (stride = window,
HF's loop would leave each window's first token unscored, so it is refused).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm


def summary(nll: float, tokens: int, n_bytes: int) -> dict:
    """Perplexity's numbers from a summed NLL (nats) over `tokens` tokens whose text is `n_bytes` UTF-8 bytes;
    bits per byte compares models whatever their tokenizers."""
    nats = nll / tokens
    return {"nats_per_token": nats, "perplexity": math.exp(nats), "bits_per_byte": nll / math.log(2) / n_bytes,
            "tokens": tokens, "bytes": n_bytes}


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens."""
    spans, previous_end = [], 1  # the first token has nothing to be predicted from
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        spans.append((begin, end, previous_end))
        previous_end = end
        if end == n:
            break
    return spans


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int, stride: int, batch_size: int = 8,
               progress: bool = True) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of the 1-D token tensor `ids`; windows of one length share a batch."""
    if not 0 < stride < window:
        raise ValueError(f"stride must be in [1, window - 1 = {window - 1}], got {stride}")
    spans = windows(ids.numel(), window, stride)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    groups = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    bar = tqdm(total=len(spans), desc="windows", unit="window", disable=not progress, leave=False)
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
            # target j of a window is token begin + 1 + j; scored when it is past what earlier windows scored
            targets = x[:, 1:].clone()
            for row, (begin, _, first) in enumerate(chunk):
                targets[row, :max(0, first - begin - 1)] = -1
            scored = int((targets >= 0).sum())
            if scored:
                _, loss = model(x[:, :-1], targets, return_logits=False)  # by chunks: no (B, T, vocab) logits
                total += loss.item() * scored
                count += scored
            bar.update(len(chunk))
    bar.close()
    return total, count


@torch.inference_mode()
def ending_logprobs(model, context: list[int], endings: list[list[int]]) -> list[tuple[float, int]]:
    """(summed log-probability, tokens) of each ending after the context, all endings in one batch."""
    device = next(model.parameters()).device
    rows = [context + ending for ending in endings]
    length = max(map(len, rows))
    x = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    targets = torch.full((len(rows), length - 1), -1, dtype=torch.long, device=device)
    for i, (row, ending) in enumerate(zip(rows, endings)):
        x[i, :len(row)] = torch.tensor(row)
        targets[i, len(context) - 1:len(row) - 1] = torch.tensor(ending)
    logits, _ = model(x[:, :-1])
    logprobs = -F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1, reduction="none")
    return [(float(logprobs[i].sum()), len(ending)) for i, ending in enumerate(endings)]
