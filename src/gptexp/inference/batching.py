"""Continuous batching: requests that arrive together decode together, rows joining and leaving the batch as their
requests start and finish (a server's decoder: gptexp.serving).

One thread (`Batcher.run`) owns the model. Each turn it reads the prompts that have arrived, each alone in one
forward pass (its prefill), puts the rows of their KV caches into the shared batch cache, and runs one decode step
for every row. Rows are left-padded in the shared cache (gptexp.inference.kv_cache): a row that joins is aligned at
the right, the others shifted right when its prompt is longer than what they hold, and when the cache is full its
rows are shifted left by the padding they all share. Each row samples with its own settings and random generator,
so a request decodes the same tokens whoever it shares the batch with (up to the float rounding of a different
batch size).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from gptexp.inference.generation import check_sampling, evaluating, onednn_linears, sample_next
from gptexp.inference.kv_cache import KVCache

log = logging.getLogger(__name__)


@dataclass
class Token:
    """A chosen token of choice `index`, with its log-probability (NaN where not asked for) and, where asked, the most
    likely tokens'."""

    index: int
    id: int
    logprob: float
    top: dict[int, float] | None = None


@dataclass
class Finished:
    """Choice `index` ended: "stop" (an end token, not given out) or "length" (max_new_tokens)."""

    index: int
    reason: str


@dataclass
class Failed:
    """The decoder failed while the request was in it (a bug, or no memory left): every choice of it has ended."""

    message: str


@dataclass
class PromptLogprobs:
    """Each prompt token's log-probability after the ones before it (the first has none), and its top tokens."""

    logprobs: list[float | None]
    top: list[dict[int, float] | None]


@dataclass(eq=False)
class Request:
    """A prompt to continue `n` ways. `listener` is called from the decoding thread with every PromptLogprobs,
    Token and Finished event; `cancel()` (from any thread) stops the request's rows at the next step."""

    prompt: list[int]
    max_new_tokens: int
    listener: Callable[[object], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # choice i samples from a generator seeded seed + i (None: unseeded)
    n: int = 1
    end_ids: frozenset[int] = frozenset()  # tokens that end a choice ("stop"); not given out
    top_logprobs: int | None = None  # None: no log-probabilities (Token.logprob NaN); k: each token's and k most likely
    prompt_logprobs: bool = False
    stopped: set[int] = field(default_factory=set)  # choices to end at the next step (a stop string was written)
    cancelled: bool = False

    def stop(self, index: int) -> None:
        """End choice `index` at the next step, without a Finished event (its caller knows why it ended)."""
        self.stopped.add(index)

    def cancel(self) -> None:
        """End every choice at the next step, without Finished events (a client that went away)."""
        self.cancelled = True

    def ends(self, index: int) -> bool:
        return self.cancelled or index in self.stopped


@dataclass(eq=False)
class Row:
    request: Request
    index: int
    generator: torch.Generator | None
    made: int = 0  # new tokens chosen so far
    next: int = 0  # the last chosen token, fed at the next step
    done: bool = False

    def choose(self, logits: torch.Tensor) -> None:
        """Pick the next token from this row's logits (V,), tell the listener, and end the row where it ends."""
        request = self.request
        token = int(sample_next(logits[None], request.temperature, request.top_k, request.top_p, self.generator))
        self.made += 1
        if token in request.end_ids:
            self.finish("stop")
            return
        if request.top_logprobs is None:  # log-probabilities not asked for: none computed (a softmax a row a step)
            request.listener(Token(self.index, token, math.nan))
        else:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            request.listener(Token(self.index, token, float(logprobs[token]), top_tokens(logprobs,
                                                                                          request.top_logprobs)))
        self.next = token
        if self.made >= request.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.done = True
        self.request.listener(Finished(self.index, reason))


def top_tokens(logprobs: torch.Tensor, k: int | None) -> dict[int, float] | None:
    if k is None:
        return None
    values, ids = logprobs.topk(min(k, logprobs.numel()))
    return dict(zip(ids.tolist(), values.tolist()))


@dataclass
class Stats:
    """What the decoder has done: steps, tokens, the largest batch it ran, rows ended by stop() or cancel()."""

    requests: int = 0
    steps: int = 0
    tokens: int = 0
    largest_batch: int = 0
    stopped_rows: int = 0
    active_rows: int = 0
    waiting: int = 0


class Batcher:
    """Decodes every submitted Request on `model`, up to `max_batch` rows at a time, in a thread of its own
    (`start()`; `close()` stops it)."""

    def __init__(self, model: nn.Module, max_batch: int = 8):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.stats = Stats()
        self.changed = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self.run, name="gptexp-batcher", daemon=True)

    def check(self, request: Request) -> None:
        """ValueError naming what the model cannot do for `request` (a caller answers it as bad input)."""
        context = self.model.context_length
        check_sampling(request.temperature, request.top_k, request.top_p)
        if not request.prompt:
            raise ValueError("the prompt has no tokens")
        if len(request.prompt) > context:
            raise ValueError(f"the prompt is {len(request.prompt)} tokens, longer than the model's context "
                             f"({context} tokens)")
        if request.max_new_tokens < 0 or len(request.prompt) + request.max_new_tokens > context:
            raise ValueError(f"max_new_tokens must be between 0 and {context - len(request.prompt)} (the context "
                             f"of {context} tokens less the prompt's {len(request.prompt)}), got "
                             f"{request.max_new_tokens}")
        if not 1 <= request.n <= self.max_batch:
            raise ValueError(f"n must be between 1 and {self.max_batch} (the rows decoded together), got {request.n}")

    def submit(self, request: Request) -> None:
        self.check(request)
        with self.changed:
            self.waiting.append(request)
            self.changed.notify()

    def start(self) -> Batcher:
        """Decode in a thread of its own from now on (tests may call turn() instead)."""
        self.thread.start()
        return self

    def close(self) -> None:
        with self.changed:
            self.closing = True
            self.changed.notify()
        if self.thread.is_alive():
            self.thread.join()

    def run(self) -> None:
        with evaluating(self.model), onednn_linears(self.model, self.max_batch):  # as decode() runs a batch
            while True:
                try:
                    if not self.turn(wait=True):
                        return
                except Exception as error:  # noqa: BLE001 - a failure must not leave every request waiting forever
                    log.exception("decoding failed; the requests in the decoder end with an error, the next go on")
                    self.fail(f"{type(error).__name__}: {error}")

    def fail(self, message: str) -> None:
        """End every request in the decoder, and those waiting, with Failed; start again from an empty batch."""
        with self.changed:
            requests = list(dict.fromkeys([row.request for row in self.rows] + list(self.waiting)))
            self.waiting.clear()
        self.rows, self.cache = [], None
        for request in requests:
            request.listener(Failed(message))

    @torch.inference_mode()
    def turn(self, wait: bool = False) -> bool:
        """Prefill the requests that have arrived (while places are free), take out the rows that ended, and run one
        decode step; with `wait`, first wait for work. False once close() was called."""
        with self.changed:
            while wait and not self.closing and not self.waiting and not self.rows:
                self.changed.wait()
            if self.closing:
                return False
            joining = []
            while self.waiting and len(self.rows) + sum(r.n for r in joining) + self.waiting[0].n <= self.max_batch:
                joining.append(self.waiting.popleft())
            self.stats.waiting = len(self.waiting)
        for request in joining:
            if not request.cancelled:
                self.prefill(request)
                self.stats.requests += 1
        self.leave()
        if self.rows:
            self.step()
        self.stats.active_rows = len(self.rows)
        return True

    def prefill(self, request: Request) -> None:
        """Read `request`'s prompt, tell its prompt log-probabilities where asked, choose each row's first token,
        and put the rows still going into the batch."""
        ids = torch.tensor([request.prompt], device=self.device)
        cache = self.model.new_kv_cache(1, len(request.prompt))
        logits, _ = self.model(ids, cache=cache)
        if request.prompt_logprobs:
            logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            chosen = logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist()
            request.listener(PromptLogprobs([None, *chosen], [None, *(
                top_tokens(row, request.top_logprobs) for row in logprobs)]))
        rows = [Row(request, i, None if request.seed is None else
                    torch.Generator(self.device).manual_seed(request.seed + i)) for i in range(request.n)]
        for row in rows:
            if request.max_new_tokens == 0:
                row.finish("length")
            else:
                row.choose(logits[0, -1])
        going = [row for row in rows if not row.done]
        if going:
            self.join(cache, going)

    def join(self, cache: KVCache, rows: list[Row]) -> None:
        """Add `rows`, which continue the one prompt held by `cache`, to the batch cache (made as long as needed, up
        to the context, so that rows join and leave by copying what they hold, not the whole context)."""
        if self.cache is None or not self.rows:
            self.cache = self.model.new_kv_cache(0, 0, torch.zeros(0, dtype=torch.long, device=self.device))
        shared, length = self.cache, cache.length
        shared.grow(self.room(max(shared.length, length) + 1))
        if shared.length < length:
            shared.shift(length - shared.length)
        shared.append(cache, len(rows))
        self.rows += rows

    def room(self, needed: int) -> int:
        """A cache length holding `needed` positions: doubled from the needed one, up to the context."""
        return min(self.model.context_length, max(64, 2 * needed))

    def leave(self) -> None:
        """Take the rows that finished or were cancelled out of the batch."""
        for row in self.rows:
            if not row.done and row.request.ends(row.index):
                row.done = True
                self.stats.stopped_rows += 1
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if keep:
                self.cache.keep_rows(torch.tensor(keep, device=self.device))

    def step(self) -> None:
        """One new token for every row."""
        cache = self.cache
        if cache.length == cache.max_len:  # full: more room, or at the context drop the padding every row has
            if cache.max_len < self.model.context_length:
                cache.grow(self.room(cache.length + 1))
            else:
                cache.shift(-int(cache.pad.min()))
        x = torch.tensor([[row.next] for row in self.rows], device=self.device)
        logits, _ = self.model(x, cache=cache)
        for row, row_logits in zip(self.rows, logits[:, -1]):
            row.choose(row_logits)
        self.stats.steps += 1
        self.stats.tokens += len(self.rows)
        self.stats.largest_batch = max(self.stats.largest_batch, len(self.rows))
        self.leave()
