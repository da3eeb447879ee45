"""The OpenAI API's request bodies as gptexp reads them, and its error object.

Fields gptexp cannot honour are refused when set to anything but their neutral value (a penalty of 0, no tools),
so a client never gets an answer computed without what it asked for; unknown fields are ignored, as OpenAI-compatible
servers do. Beside OpenAI's fields: `top_k` and `ignore_eos`, as vLLM and llama.cpp's server take them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
           "tool_choice": ("none",), "functions": ([],), "function_call": ("none",), "suffix": ("",),
           "response_format": ({"type": "text"},), "repetition_penalty": (1, 1.0)}
MAX_LOGPROBS = 20


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class Generation(BaseModel):
    """What both endpoints take: the model, how to sample, when to stop, how many choices, streaming."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's: -1 (or 0, or null) for no limit
    max_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False

    def refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in NEUTRAL and value is not None and value not in NEUTRAL[name]:
                raise APIError(400, f"{name}={value!r} is not supported by gptexp's server; leave it out",
                               param=name, code="unsupported_parameter")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(stops):
            raise APIError(400, "stop: an empty stop string would end every answer at once", param="stop")
        if len(stops) > 4:
            raise APIError(400, f"stop: at most 4 stop strings, got {len(stops)}", param="stop")
        return stops

    def sampling(self) -> dict[str, Any]:
        """gptexp.inference.batching.Request's sampling fields."""
        return {"temperature": self.temperature, "top_p": None if self.top_p == 1 else self.top_p,
                "top_k": self.top_k if self.top_k and self.top_k > 0 else None, "seed": self.seed, "n": self.n}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(Generation):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(16, ge=0)  # the legacy endpoint's default, as OpenAI's


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    tokens: list[int]
