"""Write text with any model: python -m gptexp sample source=<...> [prompt=... | prompts=<file> | mode=chat] [...]

The text streams to stdout token by token (valid UTF-8 even while a character is split across byte tokens),
samples separated by a line of dashes; stderr gets each sample's prompt tokens, new tokens, time to the
first token and tokens/s. With prompts=<file> every line is a prompt, all decoded as one left-padded batch
(one batch per prompt length where the longest prompt and max_new_tokens outgrow the context). Every run writes samples.jsonl into its output directory:
prompt, completion, token counts and what ended each sample. mode=chat talks to a chat model: one turn a line from
stdin, until an empty line or EOF, in the template the run was trained in (gptexp.data.templates), or for other
sources LLaMA-2's chat template (a LLaMA tokenizer) or plain.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gptexp.commands.cli import answered_errors, run_command
from gptexp.core.config import CONF_DIR, ConfigError
from gptexp.core.writing import write_atomically
from gptexp.data import templates
from gptexp.data.text_file import read_utf8
from gptexp.data.tokenizers import TextStream, continuation_text, end_of_text_ids, prompt_ids, vocabulary
from gptexp.inference import quantize as quantization
from gptexp.inference import speculative
from gptexp.inference.generation import check_sampling, decode
from gptexp.weights import PRECISIONS, load_source

log = logging.getLogger(__name__)
SEPARATOR = "-" * 40


@dataclass
class Completion:
    """One sample: the text past the prompt, and why it ended (max_new_tokens, eos or the stop string)."""

    prompt: str
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    ended_by: str | None = None

    def update(self, tokenizer) -> str:
        self.text = continuation_text(tokenizer, self.prompt_ids, self.ids)
        return self.text

    def record(self) -> dict:
        return {"prompt": self.prompt, "completion": self.text, "prompt_tokens": len(self.prompt_ids),
                "new_tokens": len(self.ids), "ended_by": self.ended_by or "max_new_tokens"}


def read_prompts(cfg: DictConfig) -> list[str]:
    if cfg.prompts is not None:
        path = Path(str(cfg.prompts)).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompts={cfg.prompts} is not a file; pass a text file with one prompt a line")
        lines = [line for line in read_utf8(path).splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"prompts={cfg.prompts} holds no prompt (every line is empty)")
        return lines
    prompt = str(cfg.prompt)
    if prompt.startswith("FILE:"):
        path = Path(prompt.removeprefix("FILE:")).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt={prompt}: {path} is not a file")
        return [read_utf8(path)]
    return [prompt]


def encode(tokenizer, text: str, context: int, crop: bool) -> list[int]:
    try:
        ids = prompt_ids(tokenizer, text)
    except ValueError as error:  # a character the vocabulary lacks
        raise ConfigError(f"the prompt cannot be encoded: {error}") from error
    if len(ids) > context:
        if not crop:
            raise ConfigError(f"the prompt is {len(ids)} tokens, longer than the model's context ({context}); "
                              f"shorten it, or pass crop=true to keep its last {context} tokens")
        log.info("prompt cropped to its last %d of %d tokens", context, len(ids))
        ids = ids[-context:]
    return ids


def check(cfg: DictConfig) -> None:
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r}: choose fp32 or bf16")
    quantization.check(cfg.quantize, cfg.quantize_group_size, quantization.LOADING_SCHEMES)
    for key in ("draft_tokens", "ngram_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    for key in ("num_samples", "max_new_tokens"):
        if not isinstance(cfg[key], int) or cfg[key] < (1 if key == "num_samples" else 0):
            raise ConfigError(f"{key} must be an integer >= {1 if key == 'num_samples' else 0}, got {cfg[key]!r}")
    try:
        check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from error
    if cfg.mode not in ("generate", "chat"):
        raise ConfigError(f"mode={cfg.mode!r}: choose generate or chat")
    stops = [cfg.stop] if isinstance(cfg.stop, str) else list(cfg.stop)
    # Hydra passes "\n" on as a backslash and an n: read escapes as Python does, so stop=['\n\n'] is a blank line
    cfg.stop = [str(stop).encode("latin-1", "backslashreplace").decode("unicode_escape") for stop in stops]
    if not all(cfg.stop):
        raise ConfigError("stop=[...]: an empty stop string would end every sample at once")


def sample_batch(model, tokenizer, batch: list[Completion], prompts: list[list[int]], cfg: DictConfig,
                 generator: torch.Generator, stream: bool, proposer: speculative.Proposer | None = None) -> None:
    """Decode the samples of `batch` together, each from its prompt ids (left-padded where their lengths
    differ), filling each Completion; with `stream`, the one sample's text goes to stdout as it comes; with a
    `proposer`, speculatively."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    pad = None if all(len(p) == width for p in prompts) else torch.tensor([width - len(p) for p in prompts])
    ends = set() if cfg.ignore_eos else end_of_text_ids(tokenizer)
    text_stream = TextStream(cfg.stop)
    start, first = time.perf_counter(), None
    stats = speculative.SpeculationStats()
    steps = decode(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator=generator,
                   pad=pad, proposer=proposer, stats=stats)
    for column in steps:
        first = first or time.perf_counter()
        for completion, token in zip(batch, column[:, 0].tolist()):
            if completion.ended_by:
                continue
            if token in ends:
                completion.ended_by = "eos"
                continue
            completion.ids.append(token)
            completion.update(tokenizer)
            for stop in cfg.stop:
                if stop in completion.text:
                    completion.text, completion.ended_by = completion.text[:completion.text.index(stop)], repr(stop)
            if stream and not completion.ended_by:
                sys.stdout.write(text_stream.new_text(completion.text))
                sys.stdout.flush()
        if all(c.ended_by for c in batch):
            steps.close()
            break
    if stream:
        given = text_stream.given
        sys.stdout.write(batch[0].text[given:] + "\n")
        sys.stdout.flush()
    seconds = time.perf_counter() - start
    new_tokens = sum(len(c.ids) for c in batch)
    timing = (f", first token after {1e3 * (first - start):.0f} ms, {new_tokens / seconds:.1f} tokens/s"
              if new_tokens else "")  # no token, no time to it nor rate
    lengths = sorted({len(p) for p in prompts})
    shape = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
    print(f"[{len(batch)} x {shape} prompt tokens, {new_tokens} new tokens{timing}"
          f"{f'; draft: {stats}' if proposer else ''}]", file=sys.stderr, flush=True)


def chat(model, tokenizer, template: templates.Template, cfg: DictConfig, system: str | None,
         generator: torch.Generator,
         proposer: speculative.Proposer | None = None) -> list[dict]:
    """Turns from stdin, one a line, answered in `template` until an empty line or EOF; the oldest exchanges are
    dropped, with a note, when the history no longer fits the context."""
    room = model.context_length - cfg.max_new_tokens
    if room < 1:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a message in the model's "
                          f"context ({model.context_length})")
    history, records = [], []
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return records
        message = line.rstrip("\n")
        try:
            kept, ids = templates.fitting_history(template, tokenizer, history, message, system, room)
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if len(kept) < len(history):
            print(f"[the history no longer fits the context: the oldest {len(history) - len(kept)} exchange(s) "
                  f"dropped]", file=sys.stderr, flush=True)
            history = kept
        completion = Completion(message, ids)
        sample_batch(model, tokenizer, [completion], [ids], cfg, generator, stream=True, proposer=proposer)
        history.append((message, completion.text))
        records.append(completion.record() | {"prompt_ids": ids, "answer_ids": completion.ids})


def sample(cfg: DictConfig) -> list[dict]:
    check(cfg)
    prompts = read_prompts(cfg) if cfg.mode == "generate" else []
    draft = load_draft(cfg)
    source = load_source(str(cfg.source), cfg.checkpoint, cfg.trust_checkpoint)
    device = source.place(cfg.device, cfg.precision, cfg.quantize, cfg.quantize_group_size)
    model, tokenizer = source.model, source.tokenizer
    proposer = make_proposer(cfg, draft, tokenizer, device)
    encoded = [encode(tokenizer, text, model.context_length, cfg.crop) for text in prompts]
    log.info("%s: %.2fM parameters, tokenizer %s (%d tokens), %s on %s", source.description,
             model.num_parameters() / 1e6, tokenizer.name, tokenizer.vocab_size,
             " + ".join(filter(None, [cfg.precision, cfg.quantize])), device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if cfg.mode == "chat":
        template = templates.get(source.template or templates.default_for(tokenizer))
        try:
            template.check(tokenizer)
        except ValueError as error:
            raise ConfigError(f"mode=chat: {error}") from None
        system = cfg.system if cfg.system is not None else source.system  # the run's, unless one is given
        log.info("chat in template %s%s%s", template.name, " (the run's)" if source.template else "",
                 ", with the run's system prompt" if cfg.system is None and system is not None else "")
        records = chat(model, tokenizer, template, cfg, system, generator, proposer)
        write_records(Path(cfg.output_dir) / "samples.jsonl", records)
        return records
    completions = [[Completion(text, ids) for _ in range(cfg.num_samples)] for text, ids in zip(prompts, encoded)]
    if cfg.prompts is None:  # one prompt: its samples one after another, each streamed
        for i, completion in enumerate(completions[0]):
            if i:
                print(SEPARATOR, flush=True)
            sys.stdout.write(prompts[0])
            sample_batch(model, tokenizer, [completion], [encoded[0]], cfg, generator, stream=True, proposer=proposer)
    else:  # a file of prompts: every sample of every prompt in one left-padded batch, when it fits the context;
        # else one batch per prompt length (a sample that outgrows the context slides its window)
        fits = max(map(len, encoded)) + cfg.max_new_tokens <= model.context_length
        groups = [range(len(encoded))] if fits else [
            [i for i, ids in enumerate(encoded) if len(ids) == length] for length in sorted(set(map(len, encoded)))]
        for rows in groups:
            batch = [c for i in rows for c in completions[i]]
            sample_batch(model, tokenizer, batch, [encoded[i] for i in rows for _ in range(cfg.num_samples)],
                         cfg, generator, stream=False, proposer=proposer)
        for i, completion in enumerate(c for row in completions for c in row):
            if i:
                print(SEPARATOR)
            print(completion.prompt + completion.text)
    records = [c.record() for row in completions for c in row]
    write_records(Path(cfg.output_dir) / "samples.jsonl", records)
    return records


def load_draft(cfg: DictConfig):
    """The draft model's source draft= names (None for none or ngram), loaded before the model: a bad draft= is
    said before any work."""
    if cfg.draft is None or str(cfg.draft) == "ngram":
        return None
    return load_source(str(cfg.draft), cfg.checkpoint, cfg.trust_checkpoint, key="draft")


def make_proposer(cfg: DictConfig, draft, tokenizer, device: str) -> speculative.Proposer | None:
    """What draft= asks for: prompt lookup (ngram), the draft model (sharing the model's tokenizer, placed like the
    model, unquantized), or None."""
    if cfg.draft is None:
        return None
    if draft is None:
        return speculative.NgramProposer(cfg.ngram_size, cfg.draft_tokens)
    if vocabulary(draft.tokenizer) != vocabulary(tokenizer):
        raise ConfigError(f"draft={cfg.draft}: its tokenizer ({draft.tokenizer.name}, {draft.tokenizer.vocab_size} "
                          f"tokens) differs from the model's ({tokenizer.name}, {tokenizer.vocab_size}); a draft must "
                          f"share the model's tokenizer, or use draft=ngram")
    draft.place(device, cfg.precision)
    log.info("draft model %s, %d tokens a step", draft.description, cfg.draft_tokens)
    return speculative.DraftModel(draft.model, cfg.draft_tokens)


def write_records(path: Path, records: list[dict]) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    write_atomically(path, lambda f: f.write(lines))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    with answered_errors(cfg.output_dir):
        sample(cfg)


if __name__ == "__main__":
    run_command(main)
