"""Do finished answers stop costing? GRPO's rollouts (gptexp.finetune.grpo) decode G answers to each of P story
requests with `decode(..., ends=...)`: a row that has chosen an end token leaves the batch, so the longest answer
no longer pays for every row. Both ways stop once every answer has ended; they are timed side by side on the same
prompts, interleaved, and the greedy answers are checked to be the same tokens.

    python benchmarks/rollouts.py [SOURCE] [--prompts 4] [--generations 8] [--temperature 0.7] [--rounds 3]

SOURCE: anything `source=` reads (default: the bundled stories260K, answering in llama2_chat); a run trained on
instructions (stories260k_instruct) answers in its own template and ends its answers with EOS, as in training.
Prints, for greedy answers to 32 held-out requests and for P x G sampled ones (fan-out: one prefill a prompt), the
median seconds of both ways and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from instruction_following import held_out_requests  # noqa: E402

from gptexp.core.config import asset_path  # noqa: E402
from gptexp.data import templates  # noqa: E402
from gptexp.data.tokenizers import end_of_text_ids  # noqa: E402
from gptexp.inference.generation import decode  # noqa: E402
from gptexp.weights import load_source  # noqa: E402


def batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    return (torch.tensor([[0] * (width - len(p)) + p for p in prompts]),
            torch.tensor([width - len(p) for p in prompts]))


def until_every_row_ended(steps, ends: set[int]):
    """The columns until every row has chosen an end token (what GRPO's rollouts did before rows left the batch)."""
    done = None
    for column in steps:
        yield column
        ended = torch.isin(column[:, 0], torch.tensor(sorted(ends)))
        done = ended if done is None else done | ended
        if done.all():
            break
    steps.close()


def answers(columns: torch.Tensor, ends: set[int]) -> list[list[int]]:
    """Each row's tokens up to and including its first end token."""
    out = []
    for row in columns.tolist():
        cut = next((i + 1 for i, token in enumerate(row) if token in ends), len(row))
        out.append(row[:cut])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default=str(asset_path("stories260K/stories260K.bin")))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source = load_source(args.source, "best")
    model, tokenizer = source.model, source.tokenizer
    template = templates.get(source.template or templates.default_for(tokenizer))
    ends = end_of_text_ids(tokenizer) | {templates.end_of_answer(tokenizer)}
    requests = held_out_requests(32)
    prompts = [templates.prompt_ids(template, tokenizer, [], r) for r in requests]
    new = min(args.max_new_tokens, model.context_length - max(map(len, prompts)))
    cases = {"greedy, 32 requests": (batch(prompts), 0.0, 1),
             f"T {args.temperature}, {args.prompts} x {args.generations}": (batch(prompts[:args.prompts]),
                                                                           args.temperature, args.generations)}
    print(f"{args.source}: {torch.get_num_threads()} threads, max_new_tokens={new}, median of {args.rounds} rounds")
    for name, ((idx, pad), temperature, fan_out) in cases.items():
        seconds = {"every row to the end": [], "rows leave at their end": []}
        kept = {}
        for _ in range(args.rounds):  # interleaved, so that a slow moment of the machine slows both
            for way, stop in (("every row to the end", None), ("rows leave at their end", ends)):
                generator = torch.Generator().manual_seed(0)
                started = time.perf_counter()
                columns = torch.cat(list(until_every_row_ended(decode(model, idx, new, temperature, pad=pad,
                                                                      generator=generator, fan_out=fan_out,
                                                                      ends=stop), ends)), dim=1)
                seconds[way].append(time.perf_counter() - started)
                kept[way] = answers(columns, ends)
        plain, leaving = (statistics.median(s) for s in seconds.values())
        lengths = [len(a) for a in kept["rows leave at their end"]]
        same = "; the same tokens" if temperature == 0 and kept["every row to the end"] == kept[
            "rows leave at their end"] else ""
        if temperature == 0 and not same:
            raise SystemExit(f"{name}: the greedy answers differ between the two ways")
        print(f"{name}: answers of {statistics.mean(lengths):.0f} tokens on average (longest {max(lengths)}): "
              f"{plain:.2f} s every row to the end, {leaving:.2f} s with rows leaving, {plain / leaving:.2f}x{same}")


if __name__ == "__main__":
    main()
