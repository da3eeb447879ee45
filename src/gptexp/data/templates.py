"""Prompt templates: how a conversation becomes tokens, and which of those tokens an instruction finetune trains.
The one source of truth for training on instructions (gptexp.data.instruct) and for talking to the result
(python -m gptexp sample mode=chat).

- llama2_chat: LLaMA-2's chat format, token by token as Meta's reference code builds it (llama/generation.py):
  every finished exchange is BOS + "[INST] {user} [/INST] {answer} " + EOS, the open one BOS + "[INST] {user}
  [/INST]"; a system prompt goes inside the first user message as "<<SYS>>\\n{system}\\n<</SYS>>\\n\\n".
- alpaca: Stanford Alpaca's prompt, for base models: "Below is an instruction ... ### Instruction:\\n{user}
  [\\n\\n### Input:\\n{input}]\\n\\n### Response:\\n", the answer, EOS; BOS first where the tokenizer has one.
- plain: the prompt, a newline (unless either side already has whitespace there), the answer, EOS; BOS first
  where the tokenizer has one. For GPT-2 (EOS = <|endoftext|>) and character models (EOS = END_MARKER).

An exchange's trained tokens are its answer and the EOS that closes it; the prompt's are not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from gptexp.data.tokenizers import CHAR_END, token_text

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{user}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{user}\n\n"
                "### Input:\n{input}\n\n### Response:\n")


@dataclass
class Exchange:
    user: str
    answer: str | None = None  # None: the open turn a model is to answer
    input: str | None = None  # Alpaca's optional context for the instruction


@dataclass
class Conversation:
    exchanges: list[Exchange]
    system: str | None = None


@dataclass
class Encoded:
    ids: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)  # which ids an instruction finetune takes as targets
    prompt_length: int = 0  # the tokens before the first trained one

    def add(self, ids: list[int], trained: bool) -> None:
        if trained and not any(self.trained):
            self.prompt_length = len(self.ids)
        self.ids += ids
        self.trained += [trained] * len(ids)


class Template:
    """A way to write conversations as tokens; subclasses give the text of each exchange's prompt and answer."""

    name = ""
    needs_bos = False

    def check(self, tokenizer) -> None:
        """ValueError naming what `tokenizer` lacks for this template."""
        if end_of_answer(tokenizer) is None:
            raise ValueError(f"template={self.name} closes every answer with an end-of-sequence token, which the "
                             f"tokenizer {tokenizer.name} does not have")
        if self.needs_bos and tokenizer.bos_id is None:
            raise ValueError(f"template={self.name} starts every exchange with BOS, which the tokenizer "
                             f"{tokenizer.name} does not have: use template=plain")

    def encode(self, tokenizer, conversation: Conversation) -> Encoded:
        """Every exchange of `conversation`: prompt tokens untrained, answer tokens and their EOS trained; the
        last exchange may be open (answer None), for generation."""
        self.check(tokenizer)
        out = Encoded()
        for index, exchange in enumerate(conversation.exchanges):
            start = self.start(tokenizer, index)
            prompt = self.prompt_text(exchange, conversation.system if index == 0 else None, index)
            if exchange.answer is None:
                out.add(start + tokenizer.encode(prompt), False)
                break
            answer = self.answer_text(prompt, exchange.answer)
            head, whole = tokenizer.encode(prompt), tokenizer.encode(prompt + answer)
            if whole[:len(head)] != head:  # the answer's first token would swallow the prompt's last
                raise ValueError(f"template={self.name}: the tokenizer {tokenizer.name} joins the prompt's end and "
                                 f"the answer's start into one token: {prompt[-20:]!r} + {answer[:20]!r}")
            out.add(start + head, False)
            out.add(whole[len(head):] + [end_of_answer(tokenizer)], True)
        return out

    def start(self, tokenizer, index: int) -> list[int]:
        return [tokenizer.bos_id] if tokenizer.bos_id is not None and index == 0 else []

    def prompt_text(self, exchange: Exchange, system: str | None, index: int) -> str:
        raise NotImplementedError

    JINJA = ""  # the template as a Jinja chat template over `messages` (see chat_template)

    def chat_template(self, tokenizer, system: str | None = None) -> str:
        """This template as a Jinja chat template, as HF tokenizers and OpenAI-compatible servers give one: it writes
        a list of {role, content} messages (an optional system one first, then user and assistant in turn) as the
        text whose tokens, special tokens' texts read as those tokens (gptexp.data.tokenizers.encode_with_specials),
        are `encode`'s; `system` is the one used where the messages give none."""
        literals = {"__SYSTEM__": "none" if system is None else json.dumps(system),
                    "__BOS__": json.dumps(token_text(tokenizer, tokenizer.bos_id)),
                    "__EOS__": json.dumps(token_text(tokenizer, end_of_answer(tokenizer)))}
        source = JINJA_HEAD + self.JINJA
        for name, literal in literals.items():
            source = source.replace(name, literal)
        return source

    def answer_text(self, prompt: str, answer: str) -> str:
        return answer


class Llama2Chat(Template):
    name = "llama2_chat"
    needs_bos = True

    def start(self, tokenizer, index: int) -> list[int]:
        return [tokenizer.bos_id]  # every exchange

    def prompt_text(self, exchange: Exchange, system: str | None, index: int) -> str:
        user = joined(exchange)
        if system is not None:  # an empty one too: Meta's code and HF's template write its <<SYS>> block
            user = B_SYS + system + E_SYS + user
        return f"{B_INST} {user.strip()} {E_INST}"

    def answer_text(self, prompt: str, answer: str) -> str:
        return f" {answer.strip()} "

    JINJA = """
{%- for m in turns -%}
  {%- if m.role == 'user' -%}
    {%- set user = m.content -%}
    {%- if loop.first and system is not none -%}
      {%- set user = '<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' ~ user -%}
    {%- endif -%}
    {{- __BOS__ ~ '[INST] ' ~ user | trim ~ ' [/INST]' -}}
  {%- else -%}
    {{- ' ' ~ m.content | trim ~ ' ' ~ __EOS__ -}}
  {%- endif -%}
{%- endfor -%}"""


class Alpaca(Template):
    name = "alpaca"

    def prompt_text(self, exchange: Exchange, system: str | None, index: int) -> str:
        text = (ALPACA_INPUT if exchange.input else ALPACA).format(user=exchange.user, input=exchange.input)
        text = (system + "\n\n" + text) if system else text
        return text if index == 0 else "\n\n" + text

    JINJA = """
{%- for m in turns -%}
  {%- if m.role == 'user' -%}
    {%- set text = __ALPACA_HEAD__ ~ m.content ~ __ALPACA_TAIL__ -%}
    {%- if loop.first -%}
      {{- __BOS__ ~ (system ~ '\\n\\n' if system else '') ~ text -}}
    {%- else -%}
      {{- '\\n\\n' ~ text -}}
    {%- endif -%}
  {%- else -%}
    {{- m.content ~ __EOS__ -}}
  {%- endif -%}
{%- endfor -%}""".replace("__ALPACA_HEAD__", json.dumps(ALPACA.split("{user}")[0])).replace(
        "__ALPACA_TAIL__", json.dumps(ALPACA.split("{user}")[1]))


class Plain(Template):
    name = "plain"

    def prompt_text(self, exchange: Exchange, system: str | None, index: int) -> str:
        text = joined(exchange)
        return f"{system}\n{text}" if system else text

    def answer_text(self, prompt: str, answer: str) -> str:
        if not prompt or prompt[-1].isspace() or answer[:1].isspace():
            return answer
        return "\n" + answer

    JINJA = """
{%- for m in turns -%}
  {%- if m.role == 'user' -%}
    {{- (__BOS__ if loop.first else '') ~ (system ~ '\\n' if loop.first and system else '') ~ m.content -}}
  {%- else -%}
    {%- set prompt = (system ~ '\\n' if loop.index0 == 1 and system else '') ~ loop.previtem.content -%}
    {%- set joined = prompt and not prompt[-1:].isspace() and not m.content[:1].isspace() -%}
    {{- ('\\n' if joined else '') ~ m.content ~ __EOS__ -}}
  {%- endif -%}
{%- endfor -%}"""


JINJA_HEAD = """
{%- set has_system = messages and messages[0].role in ['system', 'developer'] -%}
{%- set system = messages[0].content if has_system else __SYSTEM__ -%}
{%- set turns = messages[1:] if has_system else messages -%}"""


def render_chat(chat_template: str, messages: list[dict]) -> str:
    """A Jinja chat template (Template.chat_template) applied to `messages`, in a sandbox."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    return environment.from_string(chat_template).render(messages=messages, add_generation_prompt=True)


TEMPLATES: dict[str, Template] = {t.name: t for t in (Llama2Chat(), Alpaca(), Plain())}
END_MARKER = CHAR_END  # what closes an answer in a character vocabulary (it joins the vocabulary)


def get(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"template={name!r} is not a template; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def default_for(tokenizer) -> str:
    """llama2_chat where the tokenizer has BOS and EOS (a LLaMA), else plain."""
    return "llama2_chat" if tokenizer.bos_id is not None and getattr(tokenizer, "eos_id", None) is not None else "plain"


def end_of_answer(tokenizer) -> int | None:
    """The token that closes an answer: SentencePiece's EOS, GPT-2's <|endoftext|>, a character vocabulary's
    END_MARKER."""
    eos = getattr(tokenizer, "eos_id", None)
    return eos if eos is not None else tokenizer.eot_id


def joined(exchange: Exchange) -> str:
    """The user's message with an Alpaca input folded in, for templates without an input section."""
    return f"{exchange.user}\n\n{exchange.input}" if exchange.input else exchange.user


def prompt_ids(template: Template, tokenizer, history: list[tuple[str, str]], message: str,
               system: str | None = None) -> list[int]:
    """The prompt for `message` after the finished (user, answer) exchanges of `history`."""
    exchanges = [Exchange(user, answer) for user, answer in history] + [Exchange(message)]
    return template.encode(tokenizer, Conversation(exchanges, system)).ids


def fitting_history(template: Template, tokenizer, history: list[tuple[str, str]], message: str, system: str | None,
                    room: int) -> tuple[list[tuple[str, str]], list[int]]:
    """The newest exchanges of `history` whose prompt for `message` fits in `room` tokens, and that prompt
    (the oldest exchanges are dropped first; the system prompt stays)."""
    for start in range(len(history) + 1):
        ids = prompt_ids(template, tokenizer, history[start:], message, system)
        if len(ids) <= room:
            return history[start:], ids
    raise ValueError(f"the message alone is {len(ids)} tokens with the template, more than the {room} the context "
                     f"leaves after max_new_tokens; shorten it or lower max_new_tokens")
