"""What every gptexp model provides, and the parts they share (loss, generation)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptexp.inference import generation
from gptexp.inference.kv_cache import KVCache
from gptexp.inference.quantize import QuantizedLinear
from gptexp.models.attention import document_mask, document_positions

LOSS_CHUNK_LOGITS = 2**23  # logits per chunk of head_loss: 32 MB in float32 (GPT-2: 166 rows)


class LanguageModel(nn.Module):
    """A causal language model: `forward(idx, targets=None, cache=None, return_logits=True, documents=None) ->
    (logits, loss)`; with return_logits=False it computes the loss without materialising the logits (head_loss)
    and returns (None, loss); with `documents` (B, T), several examples packed in a row are computed each as if
    alone (packed_layout).

    Subclasses define `lm_head`, `context_length`, `new_kv_cache` and `flops_per_token`; generation, the head's output
    and loss, and activation checkpointing are shared here. Architectures never read files: gptexp.weights builds them
    from their config and loads their tensors.
    """

    activation_checkpointing = False  # recompute each block's activations in backward instead of storing them
    lora_targets: tuple[str, ...] = ()  # the linear layers LoRA adapts unless told otherwise

    def run_block(self, block: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    @staticmethod
    def packed_layout(idx: torch.Tensor, documents: torch.Tensor,
                      cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, T) and attention mask (B, 1, T, T) of the documents packed in idx's rows: `documents`
        (B, T) gives each token's document id, non-decreasing along a row (e.g. [0, 0, 0, 1, 1, 2]; padding at the
        end: one more id). Each token sees itself, so no attention row is empty and padding never makes NaN."""
        if cache is not None:  # a cache continues one sequence per row, and its mask is the padding's
            raise ValueError("documents (packed sequences) cannot be used with a KV cache: pass documents=None "
                             "to decode, or cache=None to run packed rows")
        if documents.shape != idx.shape:
            raise ValueError(f"documents must have idx's shape {tuple(idx.shape)}, got {tuple(documents.shape)}")
        return document_positions(documents), document_mask(documents)

    def rebuild_buffers(self) -> None:
        """Recompute the buffers the state dict does not hold (a model built on the meta device, then loaded)."""

    def tie_weights(self) -> None:
        """Share the weights the architecture ties again (loading with assign=True replaces a tied tensor)."""

    @property
    def context_length(self) -> int:
        raise NotImplementedError

    def new_kv_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` positions; `pad`: each row's left padding."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at this sequence length."""
        raise NotImplementedError

    def fused_decode_step(self, cache: KVCache):
        """A callable doing `self(idx, cache=cache)[0]` for one new token faster (gptexp.inference.fused_step), or
        None: decoding then runs `forward`. A model offers one by describing its blocks."""
        return None

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over every target that is not -1, computed in float32."""
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)

    def output(self, hidden: torch.Tensor, targets: torch.Tensor | None,
               return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """forward's result from the final normalised hidden states: (logits, loss), or (None, head_loss)."""
        if not return_logits and targets is not None:
            return None, self.head_loss(self.lm_head, hidden, targets)
        logits = self.lm_head(hidden)
        return logits, None if targets is None else self.loss(logits, targets)

    @staticmethod
    @torch.no_grad()
    def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """loss(head(hidden), targets) without the (B, T, vocab) logits, for validation and evaluation (no
        gradient; training keeps the logits backward needs): the logits of LOSS_CHUNK_LOGITS / vocab rows at a
        time, written into one reused buffer, their log-sum-exp taken in float32 in place. Memory stays bounded
        whatever the vocabulary, and no chunk allocates (a fresh 30 MB tensor per chunk costs more in page
        faults than its arithmetic)."""
        hidden, targets = hidden.flatten(0, 1), targets.reshape(-1)
        rows = max(1, LOSS_CHUNK_LOGITS // head.out_features)
        if type(head) is not nn.Linear:  # a wrapped (LoRA) or quantized head: its own forward, chunk by chunk
            return sum(F.cross_entropy(head(hidden[i:i + rows]).float(), targets[i:i + rows], ignore_index=-1,
                                       reduction="sum") for i in range(0, hidden.size(0), rows)) / (targets != -1).sum()
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
        weight, bias = head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)
        hidden = hidden.to(dtype)
        logits = torch.empty(min(rows, hidden.size(0)), weight.size(0), dtype=dtype, device=hidden.device)
        scratch = logits if dtype == torch.float32 else torch.empty_like(logits, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for i in range(0, hidden.size(0), rows):
            x, y = hidden[i:i + rows], targets[i:i + rows]
            z, f = logits[:len(x)], scratch[:len(x)]
            torch.mm(x, weight.t(), out=z)
            if bias is not None:
                z.add_(bias)
            f.copy_(z)  # float32 from here (a no-op in float32)
            scored = y != -1
            target = f.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
            top = f.amax(1, keepdim=True)
            log_sum_exp = f.sub_(top).exp_().sum(1).log_() + top.squeeze(1)
            total += ((log_sum_exp - target) * scored).sum(dtype=torch.float64)
        return (total / (targets != -1).sum()).float()

    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, **kwargs) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens (greedy at temperature 0), with a KV cache."""
        return generation.generate(self, idx, max_new_tokens, temperature, top_k, top_p, **kwargs)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied weight counts once; a quantized layer's weights and bias count too)."""
        quantized = [m for m in self.modules() if isinstance(m, QuantizedLinear)]
        return (sum(p.numel() for p in self.parameters())
                + sum(m.in_features * m.out_features + (m.out_features if m.bias is not None else 0) for m in quantized))
