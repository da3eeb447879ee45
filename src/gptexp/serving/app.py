"""The server's routes (FastAPI): OpenAI's chat and legacy completions, the model list, vLLM's tokenizer routes (which
lm-evaluation-harness's `local-completions` reads), health, and the chat page.

Every answer comes from one Batcher (gptexp.inference.batching), which decodes the requests in flight together.
A request becomes a Job: its choices' tokens arrive from the decoding thread as events, are turned into text (whole
characters, stop strings cut and never sent) and go out whole or streamed as server-sent events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from gptexp.data import templates
from gptexp.data.tokenizers import (
    TextStream,
    continuation_text,
    encode_with_specials,
    end_of_text_ids,
    prompt_ids,
    special_texts,
)
from gptexp.inference import batching
from gptexp.serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Generation,
    TokenizeRequest,
)
from gptexp.weights import Source

log = logging.getLogger(__name__)
ROLES = ("system", "developer", "user", "assistant")
PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # what api_key guards: all but the page, health


@dataclass
class Served:
    """The model the server answers with, fixed at start: no request can name another file."""

    name: str
    source: Source
    batcher: batching.Batcher
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.source.tokenizer

    @property
    def context(self) -> int:
        return self.source.model.context_length

    @property
    def template(self) -> templates.Template:
        return templates.get(self.source.template or templates.default_for(self.tokenizer))

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"The model `{model}` does not exist: this server serves `{self.name}`",
                           param="model", code="model_not_found")

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gptexp",
                "context_length": self.context, "max_model_len": self.context}


@dataclass
class Choice:
    prompt: list[int]
    stream: TextStream
    ids: list[int] = field(default_factory=list)
    raw: str = ""  # the new tokens' text
    text: str = ""  # what the client gets: chat answers without their leading space, cut at a stop string
    finish_reason: str | None = None
    tokens: list[str] = field(default_factory=list)  # each new token's text, with logprobs
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float] | None] = field(default_factory=list)


class Job:
    """One prompt decoded `n` ways by the batcher; its events, turned into text, come out of `pieces()`."""

    def __init__(self, served: Served, prompt: list[int], body: Generation, max_new: int, stops: list[str],
                 top_logprobs: int | None = None, prompt_logprobs: bool = False, answer: bool = False):
        self.served, self.stops = served, stops
        self.answer = answer  # a chat answer: without the space the template puts before it
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(prompt, TextStream(stops)) for _ in range(body.n)]
        self.prompt_logprobs: batching.PromptLogprobs | None = None
        ends = frozenset() if body.ignore_eos else frozenset(end_of_text_ids(served.tokenizer))
        self.request = batching.Request(prompt, max_new, self.listen, end_ids=ends, top_logprobs=top_logprobs,
                                        prompt_logprobs=prompt_logprobs, **body.sampling())
        try:
            served.batcher.submit(self.request)
        except ValueError as error:
            raise APIError(400, str(error)) from None
        self.start = time.perf_counter()

    def listen(self, event) -> None:  # called in the decoding thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, new text, finish reason or None) as the tokens arrive, until every choice has finished."""
        tokenizer = self.served.tokenizer
        while not all(c.finish_reason for c in self.choices):
            event = await self.events.get()
            if isinstance(event, batching.PromptLogprobs):
                self.prompt_logprobs = event
                continue
            if isinstance(event, batching.Failed):
                for choice in self.choices:
                    choice.finish_reason = choice.finish_reason or "error"
                raise APIError(500, f"decoding failed: {event.message}", kind="server_error")
            choice = self.choices[event.index]
            if choice.finish_reason:  # ended by a stop string while the batcher went on
                continue
            if isinstance(event, batching.Finished):
                choice.finish_reason = event.reason
                yield event.index, choice.text[choice.stream.given:], event.reason
                continue
            before = choice.raw
            choice.ids.append(event.id)
            choice.raw = continuation_text(tokenizer, choice.prompt, choice.ids)
            choice.tokens.append(choice.raw[len(before):] if choice.raw.startswith(before)
                                 else tokenizer.decode([event.id]))
            choice.text = choice.raw.lstrip() if self.answer else choice.raw
            choice.logprobs.append(event.logprob)
            choice.top.append(None if event.top is None else self.token_texts(event.top))
            cut = min((choice.text.find(s) for s in self.stops if s in choice.text), default=-1)
            if cut >= 0:
                choice.text, choice.finish_reason = choice.text[:cut], "stop"
                self.request.stop(event.index)
                yield event.index, choice.text[choice.stream.given:], "stop"
                continue
            piece = choice.stream.new_text(choice.text)
            if piece:
                yield event.index, piece, None

    async def finish(self) -> None:
        async for _ in self.pieces():
            pass

    def token_texts(self, top: dict[int, float]) -> dict[str, float]:
        return {self.served.tokenizer.decode([i]): logprob for i, logprob in top.items()}

    def usage(self) -> dict:
        new = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": len(self.request.prompt), "completion_tokens": new,
                "total_tokens": len(self.request.prompt) + new}

    def record(self, endpoint: str) -> None:
        seconds = time.perf_counter() - self.start
        new = sum(len(c.ids) for c in self.choices)
        log.info("%s: %d prompt tokens, %d new in %.2f s (%.1f tokens/s), %s", endpoint, len(self.request.prompt),
                 new, seconds, new / seconds if seconds else 0.0,
                 ", ".join(c.finish_reason or "client gone" for c in self.choices))


def conversation(served: Served, messages) -> list[int]:
    """The chat prompt: an optional system message first, then user and assistant messages in turn, the last the
    user's, in the served run's template (its saved system prompt where the messages give none)."""
    for message in messages:
        if message.role not in ROLES:
            raise APIError(400, f"messages: unknown role {message.role!r}; use one of {', '.join(ROLES)}",
                           param="messages")
    system = served.source.system
    if messages[0].role in ("system", "developer"):
        system, messages = messages[0].text(), messages[1:]
    turns = [m.role for m in messages]
    expected = ["user", "assistant"] * (len(turns) // 2) + ["user"]
    if turns != expected[:len(turns)] or len(turns) % 2 == 0:
        raise APIError(400, f"messages: after an optional system message the roles must alternate user, assistant, "
                            f"..., user; got {', '.join(turns) or 'no message after the system one'}",
                       param="messages")
    history = [(messages[i].text(), messages[i + 1].text()) for i in range(0, len(messages) - 1, 2)]
    try:
        return templates.prompt_ids(served.template, served.tokenizer, history, messages[-1].text(), system)
    except ValueError as error:
        raise APIError(400, f"messages: {error}", param="messages") from None


def prompt_tokens(served: Served, prompt) -> list[list[int]]:
    """Every prompt of a completion request as token ids: a text starts with BOS where the tokenizer has one (as
    `sample` reads it); ids are taken as they are."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt: no prompt given", param="prompt")
    vocabulary = served.source.model.lm_head.out_features if hasattr(served.source.model, "lm_head") else None
    out = []
    for item in prompt:
        if isinstance(item, str):
            try:
                out.append(prompt_ids(served.tokenizer, item))
            except ValueError as error:
                raise APIError(400, f"prompt cannot be encoded: {error}", param="prompt") from None
        else:
            if not item or any(i < 0 or vocabulary is not None and i >= vocabulary for i in item):
                raise APIError(400, f"prompt: token ids must be a non-empty list of ids in [0, {vocabulary})",
                               param="prompt")
            out.append(list(item))
    return out


def fitting(served: Served, prompt: list[int], asked: int | None, param: str) -> int:
    """The new tokens a request may have: what it asks, or by default (None) all the context leaves, never more."""
    if len(prompt) > served.context:
        raise APIError(400, f"This model's maximum context length is {served.context} tokens; the {param} take "
                            f"{len(prompt)}. Shorten them.", param=param, code="context_length_exceeded")
    room = served.context - len(prompt)
    return room if asked is None else min(asked, room)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(served: Served) -> FastAPI:
    app = FastAPI(title=f"gptexp: {served.name}", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("gptexp.serving").joinpath("chat.html").read_text().replace("{{MODEL}}", served.name)

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "malformed")
            where, message = "", f"the request body is not valid JSON ({reason})"
        else:
            message = f"{where or 'body'}: {first.get('msg', 'invalid')}"
        return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if served.api_key and request.url.path.startswith(PROTECTED):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
                error = APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <api_key>`",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    @app.get("/health")
    async def health():
        stats = served.batcher.stats
        return {"status": "ok", "model": served.name, "requests": stats.requests, "active_rows": stats.active_rows,
                "waiting": stats.waiting, "steps": stats.steps, "tokens": stats.tokens,
                "largest_batch": stats.largest_batch, "stopped_rows": stats.stopped_rows,
                "api_key_required": bool(served.api_key)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [served.card()]}

    @app.get("/v1/models/{model}")
    async def model_card(model: str):
        served.check_model(model)
        return served.card()

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        specials = {i: text for text, i in special_texts(served.tokenizer).items()}
        eos = templates.end_of_answer(served.tokenizer)
        return {"tokenizer_class": served.tokenizer.name, "eos_token": specials.get(eos),
                "bos_token": specials.get(served.tokenizer.bos_id), "pad_token": None,
                "chat_template": served.template.chat_template(served.tokenizer, served.source.system),
                "model_max_length": served.context}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        ids = encode_with_specials(served.tokenizer, body.prompt)
        if body.add_special_tokens and served.tokenizer.bos_id is not None:
            ids = [served.tokenizer.bos_id, *ids]
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        return {"prompt": served.tokenizer.decode(body.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        served.check_model(body.model)
        body.refuse_unsupported()
        prompt = conversation(served, body.messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        new = fitting(served, prompt, body.new_tokens(), "messages")
        job = Job(served, prompt, body, new, body.stops(), top, answer=True)
        head = {"id": new_id("chatcmpl"), "created": int(time.time()), "model": served.name}
        if body.stream:
            return StreamingResponse(stream_chat(job, head, body), media_type="text/event-stream")
        await job.finish()
        job.record("chat")
        return head | {"object": "chat.completion", "usage": job.usage(), "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
             "logprobs": chat_logprobs(c) if body.logprobs else None} for i, c in enumerate(job.choices)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        served.check_model(body.model)
        body.refuse_unsupported()
        prompts = prompt_tokens(served, body.prompt)
        if body.stream and (body.echo or len(prompts) > 1):
            raise APIError(400, "stream=true answers one prompt without echo", param="stream")
        stops, budgets = body.stops(), [fitting(served, p, body.max_tokens, "prompt") for p in prompts]
        jobs = []
        try:
            for prompt, budget in zip(prompts, budgets):
                jobs.append(Job(served, prompt, body, budget, stops, body.logprobs,
                                prompt_logprobs=body.echo and body.logprobs is not None))
        except APIError:
            for job in jobs:  # the request is refused whole: nothing of it goes on decoding
                job.request.cancel()
            raise
        head = {"id": new_id("cmpl"), "created": int(time.time()), "model": served.name}
        if body.stream:
            return StreamingResponse(stream_completion(jobs[0], head, body), media_type="text/event-stream")
        await asyncio.gather(*(job.finish() for job in jobs))
        choices = []
        for job in jobs:
            job.record("completions")
            for c in job.choices:
                text = served.tokenizer.decode(job.request.prompt) + c.text if body.echo else c.text
                choices.append({"index": len(choices), "text": text, "finish_reason": c.finish_reason,
                                "logprobs": None if body.logprobs is None else completion_logprobs(job, c, body.echo)})
        usage = {key: sum(job.usage()[key] for job in jobs) for key in ("prompt_tokens", "completion_tokens")}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return head | {"object": "text_completion", "choices": choices, "usage": usage}

    return app


async def stream_chat(job: Job, head: dict, body: ChatRequest) -> AsyncIterator[str]:
    chunk = head | {"object": "chat.completion.chunk"}
    try:
        for i in range(len(job.choices)):
            yield sse(chunk | {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}]})
        async for i, piece, reason in job.pieces():
            delta = {"content": piece} if piece else {}
            yield sse(chunk | {"choices": [{"index": i, "delta": delta, "finish_reason": reason}]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse(chunk | {"choices": [], "usage": job.usage()})
        yield sse("[DONE]")
        job.record("chat, streamed")
    except APIError as error:  # the decoder failed after the headers went: the error object is the last event
        yield sse(error.body())
    finally:
        if not all(c.finish_reason for c in job.choices):  # the client went away: stop decoding for it
            job.request.cancel()
            job.record("chat, streamed, client gone")


async def stream_completion(job: Job, head: dict, body: CompletionRequest) -> AsyncIterator[str]:
    chunk = head | {"object": "text_completion"}
    try:
        async for i, piece, reason in job.pieces():
            yield sse(chunk | {"choices": [{"index": i, "text": piece, "logprobs": None, "finish_reason": reason}]})
        if body.stream_options and body.stream_options.include_usage:
            yield sse(chunk | {"choices": [], "usage": job.usage()})
        yield sse("[DONE]")
        job.record("completions, streamed")
    except APIError as error:
        yield sse(error.body())
    finally:
        if not all(c.finish_reason for c in job.choices):
            job.request.cancel()
            job.record("completions, streamed, client gone")


def chat_logprobs(choice: Choice) -> dict:
    return {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode()),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                          for t, lp in (top or {}).items()]}
                        for token, logprob, top in zip(choice.tokens, choice.logprobs, choice.top)]}


def completion_logprobs(job: Job, choice: Choice, echo: bool) -> dict:
    """The legacy shape: tokens, token_logprobs, top_logprobs, text_offset; with echo the prompt's tokens first
    (the first one without a log-probability: nothing precedes it)."""
    tokenizer = job.served.tokenizer
    tokens, logprobs, top = [], [], []
    if echo:
        prompt, before = job.request.prompt, ""
        for n in range(1, len(prompt) + 1):
            text = tokenizer.decode(prompt[:n])
            tokens.append(text[len(before):] if text.startswith(before) else tokenizer.decode([prompt[n - 1]]))
            before = text
        scored = job.prompt_logprobs
        logprobs += scored.logprobs
        top += [None if t is None else job.token_texts(t) for t in scored.top]
    tokens, logprobs, top = tokens + choice.tokens, logprobs + choice.logprobs, top + choice.top
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}
