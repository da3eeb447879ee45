"""Any gptexp source as an EleutherAI lm-evaluation-harness model (`pip install -e ".[eval]"`), scoring exactly as
the harness's own Hugging Face backend (`lm_eval --model hf`) scores the same weights and tokenizer.

It is a `TemplateLM`, the harness's base of that backend, so the harness's own code tokenizes log-likelihood
requests: trailing spaces of a context move to its continuation; context + continuation is encoded whole and
split where the context's own tokens end; an empty context is conditioned on the prefix token alone. What
gptexp supplies follows `HFLM`:

- the start token (`add_bos_token`): null prepends BOS where the tokenizer adds one by default (LLaMA's
  SentencePiece, as its HF tokenizer does; GPT-2's BPE does not), true prepends it to every string (GPT-2's
  is <|endoftext|>), false never;
- the prefix token that conditions an empty context and a document's first window: BOS, else end-of-text;
- a sequence longer than the context keeps its last tokens (max_length + 1, input and target);
- loglikelihood_rolling: the harness's disjoint rolling windows over the document's encoding (with BOS where
  the start-token rule adds one, scored after the prefix token, as HFLM scores it);
- generate_until: the context's last max_length - max_gen_toks tokens; greedy (or sampled with do_sample)
  until end-of-text or a stop string (`until`, plus the end-of-text text); the new tokens decoded alone
  (special tokens dropped) and cut at the first stop string; max_gen_toks 256 unless the task says.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from gptexp.data import templates
from gptexp.data.tokenizers import encode_with_specials, token_text
from gptexp.inference.generation import decode
from gptexp.weights import Source

log = logging.getLogger(__name__)
SAMPLING_OPTIONS = ("do_sample", "temperature", "top_k", "top_p")


class GptexpLM(TemplateLM):
    """`source`'s model and tokenizer for the harness; `add_bos_token` as HFLM's (null: the tokenizer's default),
    `batch_size` log-likelihood sequences a forward pass."""

    max_gen_toks = 256  # HFLM's default when a task sets none

    def __init__(self, source: Source, add_bos_token: bool | None = None, batch_size: int = 8):
        super().__init__()
        self.model, self.tokenizer = source.model.eval(), source.tokenizer
        self.max_length = self.model.context_length
        self.batch_size = batch_size
        bos, eos = self.tokenizer.bos_id, getattr(self.tokenizer, "eos_id", None)
        self.bos = bos if bos is not None else self.tokenizer.eot_id  # GPT-2's BOS token is <|endoftext|>
        self.eos = eos if eos is not None else self.tokenizer.eot_id
        self.add_bos_token = bos is not None if add_bos_token is None else add_bos_token
        self.template = templates.get(source.template or templates.default_for(self.tokenizer))
        self.system = source.system  # an instruction run's system prompt: its chats' default
        if self.add_bos_token and self.bos is None:
            raise ValueError(f"add_bos_token=true, but the tokenizer {self.tokenizer.name} has no BOS or end-of-text "
                             f"token; use add_bos_token=false")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eot_token_id(self) -> int | None:
        return self.eos

    @property
    def prefix_token_id(self) -> int:
        if self.bos is None:
            raise ValueError(f"the tokenizer {self.tokenizer.name} has no BOS or end-of-text token to condition an "
                             f"empty context or a document's first token on")
        return self.bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self.bos is not None and string.startswith(token_text(self.tokenizer,
                                                                                                self.bos)):
            add = False  # a chat template's text starts with its own BOS (as HFLM reads it)
        return ([self.bos] if add and self.bos is not None else []) + self.encode(string)

    def encode(self, text: str) -> list[int]:
        """`text`'s tokens as the model's HF tokenizer reads it: a special token's text in it (GPT-2's
        <|endoftext|>, SentencePiece's <s> and </s>) is that token."""
        return encode_with_specials(self.tokenizer, text)

    @property
    def tokenizer_name(self) -> str:
        return f"gptexp-{self.tokenizer.name}-{self.template.name}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        """The source's template (an instruction run's own, else LLaMA-2's chat for a LLaMA tokenizer, plain for
        others) as a Jinja chat template, with the run's system prompt as its default; "" when not asked for."""
        if not chat_template:
            return ""
        self.template.check(self.tokenizer)
        return self.template.chat_template(self.tokenizer, self.system)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The harness's chat (system instruction, examples as turns with fewshot_as_multiturn, the request) as the
        text the source's template writes; its special tokens' texts are read back as those tokens."""
        if not add_generation_prompt:
            raise ValueError(f"the task continues an assistant message (gen_prefix), which template="
                             f"{self.template.name} cannot write: every answer it writes is closed")
        return templates.render_chat(self.chat_template(True), chat_history)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(summed log-probability, whether greedy decoding writes it) of each (_, context, continuation) token
        request; sequences of a batch right-padded (causal attention: padding after a row changes nothing)."""
        results = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="loglikelihood", leave=False,
                          disable=disable_tqdm):
            batch = requests[start:start + self.batch_size]
            inputs = [(context + continuation)[-(self.max_length + 1):][:-1] for _, context, continuation in batch]
            x = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
            for row, ids in enumerate(inputs):
                x[row, :len(ids)] = torch.tensor(ids)
            logits, _ = self.model(x.to(self.device))
            for row, ((_, _, continuation), ids) in enumerate(zip(batch, inputs)):
                scored = logits[row, len(ids) - len(continuation):len(ids)].float()
                targets = torch.tensor(continuation, device=scored.device)
                logprob = -F.cross_entropy(scored, targets, reduction="sum").item()
                results.append((logprob, bool((scored.argmax(-1) == targets).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, request in enumerate(requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(request.args[0]), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[index] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        eos_text = None if self.eos is None else token_text(self.tokenizer, self.eos)
        for request in tqdm(requests, desc="generate_until", leave=False, disable=disable_tqdm):
            context, options = request.args
            options = normalize_gen_kwargs(options, self.max_gen_toks)
            until = handle_stop_sequences(options.pop("until", None), eos=eos_text)
            max_new = options.pop("max_gen_toks")
            room = self.max_length - max_new
            if room <= 0:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in the model's "
                                 f"{self.max_length} tokens")
            ids = self.tok_encode(context)[-room:]
            if not ids:  # an empty context and no start token: condition on the prefix token, as a document
                ids = [self.prefix_token_id]
            text = self.continue_text(ids, max_new, until, self.sampling(options))
            results.append(postprocess_generated_text(text, until, None))
        return results

    def sampling(self, options: dict) -> dict:
        """decode()'s sampling arguments for a request's generation options: greedy unless do_sample."""
        unused = sorted(set(options) - set(SAMPLING_OPTIONS))
        if unused:
            log.warning("generation options %s are not used by gptexp's decoding", unused)
        if not options.get("do_sample"):
            return {"temperature": 0.0}
        return {"temperature": float(options.get("temperature") or 1.0), "top_k": options.get("top_k"),
                "top_p": options.get("top_p")}

    def continue_text(self, ids: list[int], max_new: int, until: list[str], sampling: dict) -> str:
        """The text of up to `max_new` tokens after `ids`, decoded alone: up to end-of-text, or further than
        the first stop string."""
        new = []
        steps = decode(self.model, torch.tensor([ids], device=self.device), max_new, **sampling)
        for column in steps:
            token = int(column[0, 0])
            if token == self.eos:
                break
            new.append(token)
            if any(stop and stop in self.tokenizer.decode(new) for stop in until):
                break
        steps.close()
        return self.tokenizer.decode(new)
