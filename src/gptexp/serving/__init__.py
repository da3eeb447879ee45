"""Serving a model: OpenAI's API (chat and legacy completions, streamed or whole), vLLM's tokenizer routes and a chat
page, over one continuous-batching decoder (gptexp.inference.batching). `python -m gptexp serve` starts it."""

from gptexp.serving.app import Served, build_app

__all__ = ["Served", "build_app"]
