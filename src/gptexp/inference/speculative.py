"""Speculative decoding: propose a few tokens cheaply, check them all in one forward pass of the model.

While decoding is bound by reading the weights, a forward pass over k + 1 tokens costs about as much as over one,
so every proposed token the model agrees with is a token for free. Proposers: `DraftModel`, a smaller model with the
same tokenizer (Leviathan et al. 2023, Chen et al. 2023), and `NgramProposer`, which proposes what followed the
latest earlier occurrence of the last n tokens (prompt lookup, as HF's prompt_lookup_num_tokens and llama.cpp's
lookup). What comes out is what plain decoding would give: greedy, the model's own argmax at every position (a
proposal is kept only where it equals it); sampling, the model's distribution exactly, by the accept/resample rule
(keep a proposed token x with probability min(1, p(x) / q(x)), else draw from the normalised max(0, p - q); a
proposer without a distribution (n-grams) has q = 1 at its token).

In a batch, every row keeps as many tokens as the row that agreed least (each row's tokens are still exact: where
a row is cut short it simply proposes again), so rows stay aligned in the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptexp.inference.kv_cache import KVCache


@dataclass
class SpeculationStats:
    """What speculation did: proposed and accepted tokens (per row), forward passes of the model, tokens out."""

    proposed: int = 0
    accepted: int = 0
    forwards: int = 0
    tokens: int = 0  # new tokens per row

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else float("nan")

    def __str__(self) -> str:
        """The rates that have something to count: nothing proposed (prompt lookup found no match, no room for a
        proposal) says so, and no forward pass (no token asked for) leaves the tokens a pass out."""
        kept = (f"{self.acceptance:.0%} of {self.proposed} proposed tokens accepted" if self.proposed
                else "no tokens proposed")
        return kept + (f", {self.tokens_per_forward:.2f} tokens a forward pass" if self.forwards else "")


class Proposer:
    """Proposes up to `tokens` tokens a row after the decoded ones. `propose(tokens (B, L), k, distribution,
    generator)` returns (drafts (B, k), their distributions (B, k, V) or None where each is certain, which drafts
    are real proposals (B, k) or None for all); `distribution` is None for greedy decoding, else the function that
    turns logits into the distribution sampled from. `rollback(length)`: only the first `length` tokens stand."""

    tokens = 4

    def models(self) -> list[torch.nn.Module]:
        """The models it runs, which decoding puts in eval mode (and oneDNN's layout) as it does its own."""
        return []

    def start(self, idx: torch.Tensor, max_len: int, pad: torch.Tensor | None) -> None:
        """A new decode of idx (B, T), up to max_len tokens a row, left-padded by pad (B,) or not (None)."""

    def propose(self, tokens, k, distribution, generator):
        raise NotImplementedError

    def rollback(self, length: int) -> None:
        pass


class DraftModel(Proposer):
    """A smaller model with the same tokenizer, decoding k tokens ahead with its own KV cache."""

    def __init__(self, model, tokens: int = 4):
        self.model, self.tokens = model, tokens
        self.cache: KVCache | None = None
        self.step = None  # the model's fused step for one token (gptexp.inference.fused_step), where it has one

    def models(self):
        return [self.model]

    def start(self, idx, max_len, pad):
        self.model.eval()
        self.cache = self.model.new_kv_cache(idx.size(0), max_len, pad)
        self.step = getattr(self.model, "fused_decode_step", lambda cache: None)(self.cache)

    def propose(self, tokens, k, distribution, generator):
        drafts, distributions = [], []
        new = tokens[:, self.cache.length:]
        for _ in range(k):
            if self.step is not None and new.size(1) == 1:
                logits = self.step(new, self.cache)[:, -1]
            else:
                logits = self.model(new, cache=self.cache)[0][:, -1]
            if distribution is None:
                new = logits.float().argmax(-1, keepdim=True)
            else:
                distributions.append(distribution(logits))
                new = torch.multinomial(distributions[-1], 1, generator=generator)
            drafts.append(new)
        return torch.cat(drafts, 1), torch.stack(distributions, 1) if distributions else None, None

    def rollback(self, length):
        self.cache.length = min(self.cache.length, length)


class NgramProposer(Proposer):
    """Prompt lookup: for each row, the k tokens that followed the latest earlier occurrence of its last n tokens
    with k tokens after it (n from `ngram_size` down to 1); a row without one proposes nothing that step."""

    def __init__(self, ngram_size: int = 3, tokens: int = 4):
        self.ngram_size, self.tokens = ngram_size, tokens
        self.pad: list[int] | None = None

    def start(self, idx, max_len, pad):
        self.pad = None if pad is None else pad.tolist()

    def propose(self, tokens, k, distribution, generator):
        drafts = tokens[:, -1:].repeat(1, k)  # placeholders, marked not real
        real = torch.zeros_like(drafts, dtype=torch.bool)
        for b, row in enumerate(tokens.tolist()):
            found = _latest_continuation(row[self.pad[b] if self.pad else 0:], self.ngram_size, k)
            if found:
                drafts[b, :len(found)] = torch.tensor(found)
                real[b, :len(found)] = True
        return drafts, None, real


def _latest_continuation(row: list[int], ngram_size: int, k: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of row's last n tokens, the longest n first: the latest
    occurrence with k tokens after it, else the one with the most (an occurrence just before the tail has few)."""
    for n in range(min(ngram_size, len(row) - 1), 0, -1):
        tail, best = row[-n:], []
        for start in range(len(row) - n - 1, -1, -1):  # latest first, the tail itself excluded
            if row[start:start + n] == tail:
                found = row[start + n:start + n + k]
                if len(found) == k:
                    return found
                best = max(best, found, key=len)
        if best:
            return best
    return []


def verify(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, real: torch.Tensor | None,
           greedy: bool, generator: torch.Generator | None) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The model's verdict on k drafts a row. p: its distributions (B, k + 1, V), or for greedy its argmax tokens
    (B, k + 1); q: the drafts' distributions (B, k, V) or None (certain). Returns (n, tokens (B, n + 1), accepted
    per row (B,)): the n drafts every row keeps, then each row's token at position n (its correction, its next
    accepted draft, or past all k drafts a token drawn from p)."""
    B, k = drafts.shape
    if greedy:
        agrees = drafts == p[:, :k]
    else:
        rows = torch.arange(B, device=drafts.device)[:, None]
        p_draft = p[rows, torch.arange(k, device=p.device), drafts]  # (B, k): p(x) of each draft x
        q_draft = torch.ones_like(p_draft) if q is None else q[rows, torch.arange(k, device=p.device), drafts]
        u = torch.rand(B, k, generator=generator, device=p.device)
        agrees = u * q_draft < p_draft  # u < p / q, without dividing by zero
    if real is not None:
        agrees &= real
    accepted = agrees.int().cumprod(1).sum(1)  # (B,): leading drafts each row keeps
    n = int(accepted.min())
    last = drafts[:, n] if n < k else torch.zeros(B, dtype=drafts.dtype, device=drafts.device)
    cut = accepted == n  # rows whose token at n is the model's own
    if greedy:
        own = p[:, n]
    else:
        target = p[:, n]
        if n < k:  # a draft rejected at n: draw from the normalised max(0, p - q); where none was proposed, from p
            draft_q = F.one_hot(drafts[:, n], target.size(-1)).to(target.dtype) if q is None else q[:, n]
            residual = (target - draft_q).clamp(min=0)
            total = residual.sum(-1, keepdim=True)
            rejected = total > 0 if real is None else (total > 0) & real[:, n, None]  # total 0: p == q, any draw
            target = torch.where(rejected, residual / total.clamp(min=1e-30), target)
        own = torch.multinomial(target, 1, generator=generator)[:, 0]
    last = torch.where(cut, own, last)
    return n, torch.cat([drafts[:, :n], last[:, None]], 1), accepted
