"""What speculative decoding buys, and where it loses: greedy tokens/s with and without a proposer.

    python benchmarks/speculative_decoding.py SOURCE [--draft ngram|<source>] [--precision bf16] [--quantize int8]
                                              [--draft-tokens 4] [--ngram-size 3] [--new-tokens 128] [--repeats 3]

SOURCE: any model gptexp reads, trained on Tiny Shakespeare (its validation split gives the prompts). Two kinds of
prompt, batch 1: "repeat", a passage of the split followed by its own first 24 tokens again, which an answer
that continues the passage verbatim repeats from; and "open", 16 tokens of the split, from which the text goes
its own way. Each is decoded greedily for --new-tokens tokens, plainly and speculatively, interleaved; the
tokens must agree. Prints the median tokens/s of each, the speed-up, the share of proposals accepted and the tokens
a forward pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptexp.data.shakespeare import load_splits  # noqa: E402
from gptexp.inference.generation import decode  # noqa: E402
from gptexp.inference.speculative import DraftModel, NgramProposer, SpeculationStats  # noqa: E402
from gptexp.weights import load_source  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--draft", default="ngram")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--quantize", default=None)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--ngram-size", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    source = load_source(args.source)
    source.place("cpu", args.precision, args.quantize)
    model, tokenizer = source.model, source.tokenizer
    if args.draft == "ngram":
        proposer = NgramProposer(args.ngram_size, args.draft_tokens)
    else:
        draft = load_source(args.draft)
        draft.place("cpu", args.precision)
        proposer = DraftModel(draft.model, args.draft_tokens)
    val = tokenizer.encode("".join(load_splits(0.1)["val"]))
    passage = val[1000:1000 + 200]
    prompts = {"repeat": passage + passage[:24], "open": val[5000:5016]}
    print(f"{args.source}, {args.precision}{' + ' + args.quantize if args.quantize else ''}, draft={args.draft} "
          f"({args.draft_tokens} tokens a step), {args.new_tokens} greedy tokens, batch 1, median of {args.repeats}\n")
    print("| prompt | plain tok/s | speculative tok/s | speed-up | accepted | tokens a forward pass | same tokens |")
    print("|---|---|---|---|---|---|---|")
    answers = {}
    for name, ids in prompts.items():
        idx = torch.tensor([ids])
        times = {"plain": [], "speculative": []}
        outputs, stats = {}, SpeculationStats()
        for repeat in range(1 + args.repeats):
            for kind in times:
                counted = SpeculationStats()
                start = time.perf_counter()
                columns = list(decode(model, idx, args.new_tokens, 0.0, proposer=proposer if kind == "speculative"
                                      else None, stats=counted))
                seconds = time.perf_counter() - start
                outputs[kind] = torch.cat(columns, dim=1)
                if repeat:
                    times[kind].append(seconds)
                    if kind == "speculative":
                        stats = counted
        plain, fast = (args.new_tokens / statistics.median(times[k]) for k in ("plain", "speculative"))
        print(f"| {name} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f}x | {stats.acceptance:.0%} | "
              f"{stats.tokens_per_forward:.2f} | {torch.equal(outputs['plain'], outputs['speculative'])} |", flush=True)
        answers[name] = tokenizer.decode(outputs["plain"][0].tolist())
    for name, text in answers.items():
        print(f"\n{name}: {text[:160]!r}")


if __name__ == "__main__":
    main()
