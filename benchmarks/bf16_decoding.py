"""What bf16 weights change in a trained GPT-2's decoding: speed, greedy text and perplexity.

    python benchmarks/bf16_decoding.py RUN [--prompts 8] [--new-tokens 128] [--repeats 5]

RUN: a run directory of a GPT-2 trained on `data=shakespeare` (GPT-2 BPE), a .ckpt, an HF GPT-2 directory
or an llm.c model. The same weights, in float32 and rounded to bf16, decode greedily from prompts of 16
tokens taken evenly from Tiny Shakespeare's validation split, batch 1 and batch 8 (gptexp, and HF's
`generate` on the same weights where transformers is installed), interleaved; and each precision scores
the whole validation split in windows of the model's context. Prints tokens/s, the bound of reading the
bf16 weights once per token at this machine's streaming rate, the greedy tokens' agreement between the
precisions, and the perplexity of each.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptexp.core.hardware import measured_cpu_memory_bandwidth  # noqa: E402
from gptexp.data.shakespeare import load_splits  # noqa: E402
from gptexp.data.tokenizers import gpt2_tokenizer  # noqa: E402
from gptexp.weights import load_source  # noqa: E402
from gptexp.weights.hf import gpt2_state_to_hf  # noqa: E402


def hf_copy(model):
    import transformers

    c = model.config
    config = transformers.GPT2Config(n_positions=c.block_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                     vocab_size=c.vocab_size, bos_token_id=None, eos_token_id=None,
                                     attn_implementation="sdpa")
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.load_state_dict(gpt2_state_to_hf(model.state_dict()), strict=False)  # its causal-mask buffers stay
    hf.tie_weights()
    return hf


def decode(impl: str, model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        if impl == "gptexp":
            out = model.generate(prompt, new_tokens, temperature=0)
        else:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return out[:, prompt.size(1):], time.perf_counter() - start


@torch.inference_mode()
def mean_nll(model, tokens: torch.Tensor, window: int, batch: int = 8) -> float:
    """Mean negative log-likelihood (nats) of every token after the first, in consecutive windows of
    `window` predictions (the last one shorter), each token scored once."""
    rows = [tokens[s:s + window + 1] for s in range(0, tokens.numel() - 1, window)]
    full, last = [r for r in rows if r.numel() == window + 1], [r for r in rows if r.numel() != window + 1]
    groups = [torch.stack(full[i:i + batch]) for i in range(0, len(full), batch)] + [r[None] for r in last]
    total = count = 0
    for group in groups:
        logits, _ = model(group[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), group[:, 1:].flatten(), reduction="sum").item()
        count += group[:, 1:].numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    fp32 = load_source(args.run).model.float().eval()
    models = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16)}
    tokenizer = gpt2_tokenizer()
    val = torch.tensor(tokenizer.encode("".join(load_splits(0.1)["val"])))
    context = fp32.config.block_size
    stride = (val.numel() - 16) // args.prompts
    prompts = torch.stack([val[i * stride:i * stride + 16] for i in range(args.prompts)])

    try:
        impls = {"gptexp": models, "hf": {p: hf_copy(m).to(m.lm_head.weight.dtype) for p, m in models.items()}}
    except ImportError:
        impls = {"gptexp": models}
    bandwidth = measured_cpu_memory_bandwidth()
    bf16_bytes = sum(p.nbytes for p in models["bf16"].parameters())
    print(f"{args.run}: {fp32.num_parameters() / 1e6:.1f}M parameters, context {context}; "
          f"streaming {bandwidth / 1e9:.1f} GB/s, bf16 weights {bf16_bytes / 1e6:.0f} MB")

    texts = {}
    for batch in (1, args.prompts):
        times = {(impl, p): [] for impl in impls for p in models}
        for repeat in range(1 + args.repeats):
            for impl, by_precision in impls.items():
                for precision, model in by_precision.items():
                    outs = []
                    seconds = 0.0
                    for i in range(0, args.prompts, batch):
                        out, s = decode(impl, model, prompts[i:i + batch], args.new_tokens)
                        outs.append(out)
                        seconds += s
                    if repeat:
                        times[impl, precision].append(seconds)
                    texts[impl, precision, batch] = torch.cat(outs)
        print(f"\nbatch {batch}, {args.new_tokens} new tokens a prompt, median of {args.repeats}:")
        for (impl, precision), ts in times.items():
            rate = args.prompts * args.new_tokens / statistics.median(ts)
            print(f"  {impl:6s} {precision}: {rate:7.1f} tok/s")
        bound = batch * bandwidth / bf16_bytes
        gptexp_bf16 = args.prompts * args.new_tokens / statistics.median(times["gptexp", "bf16"])
        print(f"  bound of reading the bf16 weights once per token: {bound:.1f} tok/s; gptexp bf16 at "
              f"{gptexp_bf16 / bound:.0%} of it")
        if ("hf", "fp32") in times:
            hf_fp32 = args.prompts * args.new_tokens / statistics.median(times["hf", "fp32"])
            print(f"  gptexp bf16 / hf fp32: {gptexp_bf16 / hf_fp32:.2f}")

    a, b = texts["gptexp", "fp32", 1], texts["gptexp", "bf16", 1]
    same = (a == b).float().mean().item()
    prefix = [int((row_a != row_b).int().argmax()) if (row_a != row_b).any() else row_a.numel()
              for row_a, row_b in zip(a, b)]
    print(f"\ngreedy tokens, bf16 against fp32: {same:.1%} of positions equal; identical prefix "
          f"{statistics.mean(prefix):.1f} of {args.new_tokens} tokens on average ({sorted(prefix)}); "
          f"{sum(p == args.new_tokens for p in prefix)} of {args.prompts} samples identical")
    batched = all(torch.equal(texts["gptexp", p, 1], texts["gptexp", p, args.prompts]) for p in models)
    print(f"batch {args.prompts} gives the same tokens as batch 1: {batched}")
    print(f"first prompt, fp32: {tokenizer.decode(prompts[0].tolist() + a[0].tolist())!r}")
    print(f"first prompt, bf16: {tokenizer.decode(prompts[0].tolist() + b[0].tolist())!r}")

    print(f"\nperplexity on the whole validation split ({val.numel():,} tokens, windows of {context}):")
    nll = {p: mean_nll(m, val, context) for p, m in models.items()}
    for p, v in nll.items():
        print(f"  {p}: {v:.4f} nats/token, perplexity {math.exp(v):.3f}")
    print(f"  bf16 - fp32: {nll['bf16'] - nll['fp32']:+.4f} nats/token "
          f"({math.exp(nll['bf16']) / math.exp(nll['fp32']) - 1:+.2%} perplexity)")


if __name__ == "__main__":
    main()
