"""Does a model do what it is asked? Held-out requests of data=stories_instruct ("Write a story that uses the
words: a, b, c."), answered greedily in the model's template, measured as behaviour:

- word rate: the share of requested words that the answer uses (whole words, any case);
- EOS rate: the share of answers that end with the template's end-of-sequence token before max_new_tokens (an
  answer also stops at BOS, where a base model starts its next document, but that is not counted as EOS);

and as fluency, so that a higher word rate bought with broken prose shows:

- perplexity: of the answers' tokens under the bundled stories260K (each answer a TinyStories document after BOS),
  pooled over every answer's tokens: how much they still read like TinyStories prose;
- repetition: the share of an answer's word 4-grams that repeat an earlier one of the same answer, pooled over the
  answers (0: no 4-gram twice; a loop of one sentence approaches 1).

    python benchmarks/instruction_following.py SOURCE [SOURCE ...] [--limit N] [--max-new-tokens 400]

SOURCE: anything `source=` reads (a run directory, the bundled stories260K.bin, ...); a run trained on instructions
answers in its own template, other sources in llama2_chat (a LLaMA tokenizer) or plain. Prints one row per source,
and one answer of each to the first request.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptexp.core.config import CACHE_DIR, asset_path  # noqa: E402
from gptexp.data import (
    DataConfig,  # noqa: E402
    templates,  # noqa: E402
)
from gptexp.data.instruct import InstructExamples, story_request_words  # noqa: E402
from gptexp.data.tokenizers import end_of_text_ids  # noqa: E402
from gptexp.inference.generation import decode  # noqa: E402
from gptexp.weights import load_source  # noqa: E402


def held_out_requests(limit: int) -> list[str]:
    """The validation split of data=stories_instruct (its YAML's hold-out rule: one record in 10)."""
    config = DataConfig(name="stories_instruct", loader="instruct", builder="story_words", val_fraction=0.1,
                        cache_dir=CACHE_DIR)
    return [conversation.exchanges[0].user for conversation in InstructExamples(config).parsed["val"]][:limit]


def uses(answer: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", answer, re.IGNORECASE) is not None


@torch.inference_mode()
def answers(source, requests: list[str], max_new_tokens: int, batch: int = 16) -> list[tuple[str, bool]]:
    """(answer text, whether it ended with EOS) for each request, greedy, in batches left-padded."""
    template = templates.get(source.template or templates.default_for(source.tokenizer))
    tokenizer, model = source.tokenizer, source.model.eval()
    ends, eos = end_of_text_ids(tokenizer), templates.end_of_answer(tokenizer)
    out = []
    for start in range(0, len(requests), batch):
        prompts = [templates.prompt_ids(template, tokenizer, [], r) for r in requests[start:start + batch]]
        room = model.context_length - max(map(len, prompts))
        width = max(map(len, prompts))
        idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        pad = torch.tensor([width - len(p) for p in prompts])
        new = [[] for _ in prompts]
        done, ended = [False] * len(prompts), [False] * len(prompts)
        steps = decode(model, idx, min(max_new_tokens, room), temperature=0, pad=pad)
        for column in steps:
            for row, token in enumerate(column[:, 0].tolist()):
                if done[row]:
                    continue
                if token in ends:
                    done[row], ended[row] = True, token == eos
                else:
                    new[row].append(token)
            if all(done):
                break
        steps.close()
        out += [(tokenizer.decode(ids), e) for ids, e in zip(new, ended)]
    return out


@torch.inference_mode()
def perplexity(judge, texts: list[str]) -> float:
    """exp of the mean negative log-likelihood of every token of `texts` (each after BOS) under `judge` (a Source)."""
    nats, tokens = 0.0, 0
    for text in filter(None, texts):
        ids = [judge.tokenizer.bos_id] + judge.tokenizer.encode(text)
        ids = ids[:judge.model.context_length + 1]
        _, loss = judge.model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
        nats, tokens = nats + loss.item() * (len(ids) - 1), tokens + len(ids) - 1
    return math.exp(nats / tokens) if tokens else float("nan")


def repetition(texts: list[str]) -> float:
    """The share of word 4-grams that repeat an earlier 4-gram of the same text, pooled over `texts`."""
    repeated = total = 0
    for text in texts:
        words = re.findall(r"\w+", text.lower())
        grams = list(zip(words, words[1:], words[2:], words[3:]))
        repeated, total = repeated + len(grams) - len(set(grams)), total + len(grams)
    return repeated / total if total else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--limit", type=int, default=None, help="held-out requests to answer (default: all 128)")
    parser.add_argument("--max-new-tokens", type=int, default=400)
    args = parser.parse_args()
    requests = held_out_requests(args.limit)
    words = [story_request_words(r) for r in requests]
    rows, examples = [], []
    judge = load_source(asset_path("stories260K/stories260K.bin"))  # fluency: the bundled TinyStories model
    for name in args.sources:
        source = load_source(name, "best")
        started = time.perf_counter()
        said = answers(source, requests, args.max_new_tokens)
        used = sum(uses(text, w) for (text, _), ws in zip(said, words) for w in ws)
        rate = used / sum(map(len, words))
        eos = sum(ended for _, ended in said) / len(said)
        template = source.template or templates.default_for(source.tokenizer)
        seconds = time.perf_counter() - started
        texts = [text for text, _ in said]
        rows.append(f"{name}: template {template}, word rate {rate:.3f} ({used} of {sum(map(len, words))} words), "
                    f"EOS rate {eos:.3f}, perplexity {perplexity(judge, texts):.2f}, repetition "
                    f"{repetition(texts):.3f}, {len(said)} requests in {seconds:.0f} s")
        examples.append(f"--- {name}:\n{said[0][0]}{' [EOS]' if said[0][1] else ' [max_new_tokens]'}")
    print(f"{len(requests)} held-out requests of data=stories_instruct, greedy, max_new_tokens={args.max_new_tokens}")
    print("\n".join(rows))
    print(f"\nThe first request: {requests[0]}")
    print("\n".join(examples))


if __name__ == "__main__":
    main()
