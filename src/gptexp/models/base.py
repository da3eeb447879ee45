"""What every gptexp model provides, and the parts they share (loss, generation)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptexp.models import generation
from gptexp.models.kv_cache import KVCache


class LanguageModel(nn.Module):
    """A causal language model: `forward(idx, targets=None, cache=None) -> (logits, loss)`.

    Subclasses define `context_length`, `new_kv_cache`, `flops_per_token`, `from_pretrained` and
    `tokenizer_for`; generation, the loss and activation checkpointing are shared here.
    """

    activation_checkpointing = False  # recompute each block's activations in backward instead of storing them
    weights_hint = ""  # appended to the error when pretrained weights cannot be found
    lora_targets: tuple[str, ...] = ()  # the linear layers LoRA adapts unless told otherwise

    def run_block(self, block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    @classmethod
    def tokenizer_for(cls, weights: str) -> str:
        """The tokenizer that belongs to these weights: a name (gpt2) or a SentencePiece file path."""
        raise NotImplementedError

    @property
    def context_length(self) -> int:
        raise NotImplementedError

    def new_kv_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` positions; `pad`: each row's left padding."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at this sequence length."""
        raise NotImplementedError

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every target that is not -1, computed in float32."""
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, **kwargs) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens (greedy at temperature 0), with a KV cache."""
        return generation.generate(self, idx, max_new_tokens, temperature, top_k, top_p, **kwargs)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters())
