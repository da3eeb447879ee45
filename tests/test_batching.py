"""Continuous batching (gptexp.inference.batching): requests that join and leave a running batch decode the tokens
each would decode alone (decode(), what `sample` runs), greedy or seeded; their rows end where asked."""

import pytest
import torch

from gptexp.core.config import asset_path
from gptexp.data.tokenizers import prompt_ids
from gptexp.inference.batching import Batcher, Failed, Finished, Request, Token
from gptexp.inference.generation import decode
from gptexp.weights import load_source


@pytest.fixture(scope="module")
def stories():
    source = load_source(asset_path("stories260K/stories260K.bin"))
    source.model.eval()
    return source


class Recorder:
    """A request's events, as its listener receives them."""

    def __init__(self, n: int = 1):
        self.tokens = [[] for _ in range(n)]
        self.finished = [None] * n

    def __call__(self, event) -> None:
        if isinstance(event, Token):
            self.tokens[event.index].append(event.id)
        elif isinstance(event, Finished):
            self.finished[event.index] = event.reason


def alone(model, prompt, max_new, ends=(), **sampling) -> list[int]:
    """The tokens decode() writes for one prompt, up to the first of `ends`."""
    out = []
    for column in decode(model, torch.tensor([prompt]), max_new, **sampling):
        if int(column[0, 0]) in ends:
            break
        out.append(int(column[0, 0]))
    return out


def test_rows_that_join_and_leave_decode_what_each_decodes_alone(stories):
    """A one-token prompt runs to nearly the whole context (512) while longer prompts join after it started (the
    batch shifts right to take them), leave at their max_new_tokens or EOS, and the cache fills (it shifts left)."""
    model, tokenizer = stories.model, stories.tokenizer
    texts = ["", "Lily and Tom went to the park. They saw a big dog. " * 4, "The cat", "Once upon a time, a bird"]
    budgets = [505, 60, 200, 120]
    arrivals = [0, 20, 25, 40]  # the step at which each request arrives
    ends = frozenset({tokenizer.eos_id})
    prompts = [prompt_ids(tokenizer, t) for t in texts]
    batcher, recorders = Batcher(model, max_batch=4), [Recorder() for _ in texts]
    step = 0
    while step < 600 and (step <= max(arrivals) or batcher.rows):
        for prompt, budget, arrival, recorder in zip(prompts, budgets, arrivals, recorders):
            if arrival == step:
                batcher.submit(Request(prompt, budget, recorder, temperature=0.0, end_ids=ends))
        batcher.turn()
        step += 1
    assert batcher.stats.largest_batch == 4 and batcher.stats.requests == 4
    for prompt, budget, recorder in zip(prompts, budgets, recorders):
        expected = alone(model, prompt, budget, ends, temperature=0.0)
        assert recorder.tokens[0] == expected
        assert recorder.finished == ["length" if len(expected) == budget else "stop"]


def test_seeded_choices_sample_what_decode_samples_with_that_seed(stories):
    model, tokenizer = stories.model, stories.tokenizer
    prompt = prompt_ids(tokenizer, "One day, a little dog")
    batcher = Batcher(model, max_batch=8)
    sampled, other = Recorder(3), Recorder()
    batcher.submit(Request(prompt, 40, sampled, temperature=0.9, top_k=50, seed=7, n=3))
    batcher.submit(Request(prompt_ids(tokenizer, "The sun"), 25, other, temperature=1.0))  # shares the batch
    while batcher.turn() and batcher.rows:
        pass
    for i in range(3):
        generator = torch.Generator().manual_seed(7 + i)
        assert sampled.tokens[i] == alone(model, prompt, 40, temperature=0.9, top_k=50, generator=generator)
    assert len({tuple(t) for t in sampled.tokens}) == 3


def test_stopped_and_cancelled_rows_leave_at_the_next_step(stories):
    model, tokenizer = stories.model, stories.tokenizer
    batcher = Batcher(model, max_batch=4)
    pair, single = Recorder(2), Recorder()
    request = Request(prompt_ids(tokenizer, "Tom"), 100, pair, temperature=0.0, n=2)
    gone = Request(prompt_ids(tokenizer, "Sue"), 100, single, temperature=0.0)
    batcher.submit(request)
    batcher.submit(gone)
    batcher.turn()
    request.stop(1)
    gone.cancel()
    batcher.turn()
    assert len(batcher.rows) == 1 and batcher.stats.stopped_rows == 2
    assert pair.finished == [None, None] and single.finished == [None]  # the caller knows why they ended
    assert len(pair.tokens[1]) == len(single.tokens[0]) == 2  # the prefill's token and one step's, no more


@pytest.mark.parametrize("change, message", [
    ({"prompt": list(range(1, 514))}, "longer than the model's context (512 tokens)"),
    ({"max_new_tokens": 510}, "max_new_tokens must be between 0 and 509"),
    ({"max_new_tokens": -1}, "max_new_tokens must be between 0"),
    ({"n": 5}, "n must be between 1 and 4"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
])
def test_requests_the_model_cannot_answer_are_refused_before_they_queue(stories, change, message):
    batcher = Batcher(stories.model, max_batch=4)
    arguments = {"prompt": [1, 2, 3], "max_new_tokens": 10, "listener": Recorder()} | change
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        batcher.submit(Request(**arguments))
    assert not batcher.waiting


def test_a_failure_in_the_decoder_ends_its_requests_with_an_error_and_the_next_ones_are_answered(stories):
    """A forward pass that raises (here: one made to, as a bug or no memory left would) fails the requests in the
    decoder, with the error; the decoder goes on and answers the next request."""
    import threading

    model, tokenizer = stories.model, stories.tokenizer
    batcher = Batcher(model, max_batch=4).start()
    forward, calls = model.forward, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    events, ended = [], threading.Event()

    def listener(event):
        events.append(event)
        if isinstance(event, (Failed, Finished)):
            ended.set()

    model.forward = failing_once
    prompt = prompt_ids(tokenizer, "Tom")
    try:
        batcher.submit(Request(prompt, 50, listener, temperature=0.0))
        assert ended.wait(30) and events[-1] == Failed("RuntimeError: out of memory")
        events.clear()
        ended.clear()
        batcher.submit(Request(prompt, 20, listener, temperature=0.0))
        assert ended.wait(30) and events[-1] == Finished(0, "length")
        assert [e.id for e in events if isinstance(e, Token)] == alone(model, prompt, 20, temperature=0.0)
    finally:
        model.forward = forward
        batcher.close()
