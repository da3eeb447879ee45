"""Autoregressive generation shared by every model: sampling rules and the decode loop.

A model plugs in by providing `context_length`, `new_kv_cache(batch, max_len, pad)` and
`forward(idx, cache=...)` returning `(logits, loss)`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Generator, Iterator

import psutil
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptexp.core import hardware
from gptexp.inference import speculative

log = logging.getLogger(__name__)

# Decoding a few rows reads every weight once per token, so on a CPU it is bound by memory bandwidth.
# `generate` runs each nn.Linear through oneDNN's inner product (docs/benchmarks.md, "Decoding through
# oneDNN", "Decoding in bf16", "One float32 row"). 8 float32 rows stream a copy reordered into oneDNN's blocked
# layout 1.5-2.2x faster than MKL's product. In bf16 every batch reads such a copy: oneDNN's bf16 kernels want
# the input dimension in pairs (AB16b64a2b), and from the plain layout one row streams 1.2-1.5x slower. The
# copies are made once per call. One float32 row reads nn.Linear's (out, in) weight in place, through whichever
# of oneDNN and MKL is faster on this machine (oneDNN 1.5x on one AMD Zen 4, MKL 1.2x on one Xeon): measured
# once, on the first model decoded, and kept like the CPU's peak. Below ONEDNN_MIN_BYTES the weights stay in
# the CPU's caches, where the plain product wins (oneDNN adds ~20-40 µs a call).
ONEDNN_MIN_BYTES = 32 * 2**20
ONE_ROW_KERNELS = "cpu_one_row_kernel"  # the kept choices: {hardware.cpu_key(float32): "onednn" or "mkl"}


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the bad argument and its valid range."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None (no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None (no limit), got {top_p}")


def distribution(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                 top_p: float | None = None) -> torch.Tensor:
    """The float32 probabilities (..., V) that sampling at temperature > 0 draws from, after top_k and top_p."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token once the more likely ones already cover top_p; the most likely always stays
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return F.softmax(logits, dim=-1)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy at temperature 0, else sample. Returns (B, 1)."""
    if temperature == 0:
        return logits.float().argmax(dim=-1, keepdim=True)  # the same token; float32's argmax is twice as fast
    return torch.multinomial(distribution(logits, temperature, top_k, top_p), num_samples=1, generator=generator)


@contextlib.contextmanager
def onednn_linears(model: nn.Module, batch: int, min_bytes: int = ONEDNN_MIN_BYTES) -> Iterator[bool]:
    """Within the block, every nn.Linear of an eager float32 or bf16 CPU model runs through oneDNN, for
    `batch` rows a call: from its own weight for one float32 row, else from a copy in oneDNN's blocked
    layout; yields whether it did. Linears are left alone where oneDNN is missing or disabled, where their
    weights mix dtypes or total less than min_bytes, where the copies would not fit in the free memory, and
    for one float32 row where MKL's product reads the weights faster on this machine (one_row_kernel)."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)]
    dtypes = {m.weight.dtype for m in linears}
    pack = batch > 1 or dtypes == {torch.bfloat16}
    weight_bytes = sum(m.weight.nbytes for m in linears)
    usable = (linears and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
              and hasattr(torch.ops.mkldnn, "_linear_pointwise")  # private ops: a torch without them decodes plainly
              and getattr(model, "_compiled_call_impl", None) is None  # model.compile() traced the plain forward
              and all(m.weight.device.type == "cpu" for m in linears) and len(dtypes) == 1
              and dtypes <= {torch.float32, torch.bfloat16}
              and weight_bytes >= min_bytes and pack * weight_bytes < psutil.virtual_memory().available / 2)
    if not usable or (not pack and one_row_kernel(linears) == "mkl"):
        yield False
        return
    try:
        for m in linears:
            weight = m.weight.detach()
            if pack:
                weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch)
            m.forward = _onednn_forward(weight, m.bias)
        yield True
    finally:
        for m in linears:
            vars(m).pop("forward", None)


def one_row_kernel(linears: list[nn.Linear], rounds: int = 4) -> str:
    """"onednn" or "mkl": which reads these float32 linears' weights in place faster for one row on this
    machine (CPU model, threads and torch alike). Kept in gptexp's cache after its first measurement: the
    fastest of `rounds` interleaved passes over the linears (0.2 s for GPT-2 124M's 496 MB on two cores)."""
    key = hardware.cpu_key(torch.float32)
    if (kept := hardware.read_kept(ONE_ROW_KERNELS).get(key)) in ("onednn", "mkl"):
        return kept
    onednn = torch.ops.mkldnn._linear_pointwise.default
    rows = [(torch.zeros(1, m.in_features), m.weight.detach(), m.bias) for m in linears]
    passes = {"onednn": lambda: [onednn(x, weight, bias, "none", [], "") for x, weight, bias in rows],
              "mkl": lambda: [F.linear(x, weight, bias) for x, weight, bias in rows]}
    seconds = dict.fromkeys(passes, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds):  # interleaved, so that a slow moment of the machine slows both
            for name, run in passes.items():
                start = time.perf_counter()
                run()
                seconds[name] = min(seconds[name], time.perf_counter() - start)
    choice = min(seconds, key=seconds.get)
    log.debug("one float32 row decodes through %s on this CPU: %.1f ms a pass over the linears, against %.1f "
              "(kept in %s)", choice, 1e3 * seconds[choice], 1e3 * max(seconds.values()),
              hardware.kept_path(ONE_ROW_KERNELS))  # debug: `sample` streams its text to the same terminal
    hardware.keep(ONE_ROW_KERNELS, key, choice)
    return choice


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (no dropout) inside the block, in the mode it was in after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _onednn_forward(weight: torch.Tensor, bias: torch.Tensor | None):
    linear = torch.ops.mkldnn._linear_pointwise.default  # the overload itself: 5 µs a call less than the packet
    return lambda x: linear(x, weight, bias, "none", [], "")


def generate(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, *, use_cache: bool = True,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Extend idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

    With the KV cache each step feeds only the newest token. Once the sequence outgrows the
    context, every step re-reads the last `context_length` tokens, as a model without a cache
    would. The model is put in eval mode for the call and restored afterwards.
    """
    steps = decode(model, idx, max_new_tokens, temperature, top_k, top_p, use_cache=use_cache, generator=generator)
    return torch.cat([idx, *steps], dim=1)


def decode(model: torch.nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, *, use_cache: bool = True,
           generator: torch.Generator | None = None, pad: torch.Tensor | None = None,
           proposer: speculative.Proposer | None = None, stats: speculative.SpeculationStats | None = None,
           fan_out: int = 1, ends: Collection[int] | None = None) -> Iterator[torch.Tensor]:
    """`generate` one step at a time: yields each new column of tokens (B, 1) as soon as it is chosen, so a
    caller can stream them or stop early (closing the iterator restores the model's mode). Prompts of
    different lengths decode in one batch left-padded, `pad` (B,) counting each row's padding tokens; such a
    batch decodes with the KV cache and within the context. With a `proposer` (gptexp.inference.speculative) the
    KV cache checks its proposals several tokens a forward pass, with the same result; `stats` counts how it
    went. With `fan_out` n each prompt is read once (one prefill) and continued n ways: the columns then have
    B·n rows, prompt b's continuations being rows b·n ... b·n + n - 1. With `ends` (token ids) a row is done at
    the first of them it chooses: it leaves the batch, which decodes on without it (a sampling batch's random
    draws then differ from those of a batch that keeps it), its later columns repeat that token, and decoding
    stops once every row is done."""
    check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError(f"prompt must be a (batch, tokens) tensor with at least one token, got shape "
                         f"{tuple(idx.shape)}")
    context = model.context_length
    if idx.size(1) > context:
        raise ValueError(f"prompt has {idx.size(1)} tokens but the model's context is {context}; "
                         f"shorten the prompt to at most {context} tokens")
    if pad is not None and (not use_cache or idx.size(1) + max_new_tokens > context):
        raise ValueError(f"a padded batch decodes with the KV cache and within the context: {idx.size(1)} prompt "
                         f"tokens + {max_new_tokens} new ones exceed the model's {context}")
    if proposer is not None and not use_cache:
        raise ValueError("speculative decoding checks proposals with the KV cache: pass use_cache=True")
    if fan_out < 1 or (fan_out > 1 and (proposer is not None or not use_cache
                                        or idx.size(1) + max_new_tokens > context)):
        raise ValueError(f"fan_out={fan_out}: continuations of one prefill need fan_out >= 1, the KV cache, no "
                         f"proposer, and room in the context for every new token")
    if ends is not None and (proposer is not None or not use_cache or idx.size(1) + max_new_tokens > context):
        raise ValueError("rows that leave the batch at an end token need the KV cache, no proposer, and room in "
                         "the context for every new token")
    steps = _decode(model, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator, pad, proposer,
                    stats if stats is not None else speculative.SpeculationStats(), fan_out)
    return steps if ends is None else _until_ends(steps, ends)


def _decode(model, idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator, pad, proposer,
            stats, fan_out) -> Iterator[torch.Tensor]:
    context = model.context_length
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        for m in [model, *(proposer.models() if proposer is not None else [])]:
            stack.enter_context(evaluating(m))
            stack.enter_context(onednn_linears(m, idx.size(0) * fan_out))
        length = min(context, idx.size(1) + max_new_tokens)
        cache = model.new_kv_cache(idx.size(0), length, pad) if use_cache else None
        out = idx
        if fan_out > 1 and max_new_tokens:  # one prefill per prompt, its cache and last logits copied n ways
            logits, _ = model(idx, cache=cache)
            cache.repeat_rows(fan_out)
            new = sample_next(logits[:, -1].repeat_interleave(fan_out, 0), temperature, top_k, top_p, generator)
            out = torch.cat([idx.repeat_interleave(fan_out, 0), new], dim=1)
            if (keep := (yield new)) is not None:
                new, out = new[keep], out[keep]
                cache.keep_rows(keep.nonzero().squeeze(1))
        if proposer is not None:
            for column in _speculate(model, idx, max_new_tokens, temperature, top_k, top_p, generator, pad,
                                     proposer, stats, cache):
                out = torch.cat([out, column], dim=1)
                yield column
        new = out[:, cache.length:] if cache is not None else out
        fused = getattr(model, "fused_decode_step", lambda cache: None)(cache) if cache is not None else None
        for _ in range(max_new_tokens - (out.size(1) - idx.size(1))):
            if cache is not None and cache.length + new.size(1) > cache.max_len:
                cache = None  # context full: from here on, recompute over a sliding window
            if cache is None:
                logits, _ = model(out[:, -context:])
            elif fused is not None and new.size(1) == 1:  # one token of one row: the whole step in one call
                logits = fused(new, cache)
            else:
                logits, _ = model(new, cache=cache)
            new = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            out = torch.cat([out, new], dim=1)
            if (keep := (yield new)) is not None:  # sent by _until_ends: the rows that go on
                new, out = new[keep], out[keep]
                cache.keep_rows(keep.nonzero().squeeze(1))


def _until_ends(steps: Generator[torch.Tensor, torch.Tensor | None, None], ends: Collection[int]
                ) -> Iterator[torch.Tensor]:
    """decode's columns with `ends`: after each column, the rows that chose an end token leave `steps`' batch (sent
    to it as the mask of the rows that go on); the columns keep every row, a finished one repeating its end."""
    try:
        new = next(steps)
        column, active = new, torch.arange(new.size(0), device=new.device)
        ends = torch.tensor(sorted(ends), dtype=torch.long, device=new.device)
        while True:
            yield column
            done = torch.isin(new[:, 0], ends)
            if done.all():
                return
            keep = ~done if done.any() else None  # None: every row goes on, the batch as it was
            if keep is not None:
                active = active[keep]
            new = steps.send(keep)
            column = column.clone()
            column[active] = new
    except StopIteration:
        return
    finally:
        steps.close()


def _speculate(model, idx, max_new_tokens, temperature, top_k, top_p, generator, pad, proposer, stats,
               cache) -> Iterator[torch.Tensor]:
    """decode's steps with a proposer, while the KV cache has room for a step's proposals: each round the
    proposer offers up to k tokens a row, one forward pass of the model scores them all, and the tokens it
    keeps (gptexp.inference.speculative.verify) come out a column at a time."""
    greedy = temperature == 0
    probabilities = None if greedy else (lambda logits: distribution(logits, temperature, top_k, top_p))
    proposer.start(idx, cache.max_len, pad)
    out, made = idx, 0
    while made < max_new_tokens and out.size(1) < cache.max_len:
        k = min(proposer.tokens, max_new_tokens - made - 1, cache.max_len - out.size(1))
        drafts, q, real = (proposer.propose(out, k, probabilities, generator) if k else (out[:, :0], None, None))
        start = out.size(1)
        readable = drafts.clamp(max=model.config.vocab_size - 1)  # a draft's padded vocabulary: refused below
        logits = model(torch.cat([out[:, cache.length:], readable], dim=1), cache=cache)[0][:, -(k + 1):]
        if greedy:
            p = logits.float().argmax(-1)
        else:
            p = probabilities(logits)
            if q is not None and q.size(-1) != p.size(-1):  # vocabularies padded to different sizes
                size = max(q.size(-1), p.size(-1))
                p, q = F.pad(p, (0, size - p.size(-1))), F.pad(q, (0, size - q.size(-1)))
        n, tokens, accepted = speculative.verify(p, drafts, q, real, greedy, generator)
        stats.proposed += int(real.sum()) if real is not None else drafts.numel()
        stats.accepted += int(accepted.sum())
        stats.forwards += 1
        stats.tokens += n + 1
        cache.length = start + n  # the rejected proposals' keys are overwritten next round
        proposer.rollback(start + n)
        out, made = torch.cat([out, tokens], dim=1), made + n + 1
        yield from tokens.split(1, dim=1)
