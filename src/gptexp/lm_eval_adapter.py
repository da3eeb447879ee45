"""Any gptexp source as an EleutherAI lm-evaluation-harness model (`pip install -e ".[eval]"`): the harness's
three request types, answered with gptexp's own models and tokenizers.

- loglikelihood(context, continuation): the continuation's summed log-probability, and whether greedy
  decoding would have written it;
- loglikelihood_rolling(text): the whole text's log-likelihood, every token scored once in windows of the
  model's context (the document starts after the tokenizer's BOS or end-of-text token);
- generate_until(context, {until, max_gen_toks}): greedy text up to the first stop string.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from tqdm import tqdm

from gptexp.data.tokenizers import end_of_text_ids
from gptexp.models.generation import decode
from gptexp.scoring import perplexity
from gptexp.sources import Source


class GptexpLM(LM):
    def __init__(self, source: Source):
        super().__init__()
        self.model, self.tokenizer = source.model.eval(), source.tokenizer
        self.context = self.model.context_length
        prefix = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eot_id
        self.prefix = [] if prefix is None else [prefix]  # what a document starts after

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        ids = (context + continuation)[-(self.context + 1):]
        x = torch.tensor([ids[:-1]], device=self.device)
        logits, _ = self.model(x)
        logits = logits[0, -len(continuation):].float()
        targets = torch.tensor(continuation, device=self.device)
        logprob = -F.cross_entropy(logits, targets, reduction="sum").item()
        return logprob, bool((logits.argmax(-1) == targets).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, desc="loglikelihood", leave=False):
            context, continuation = request.args
            context_ids = self.prefix + self.tokenizer.encode(context) if context else self.prefix
            if not context_ids:
                raise ValueError("an empty context needs a tokenizer with a BOS or end-of-text token")
            results.append(self._score(context_ids, self.tokenizer.encode(continuation)))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in tqdm(requests, desc="loglikelihood_rolling", leave=False):
            ids = torch.tensor(self.prefix + self.tokenizer.encode(request.args[0]))
            nll, _ = perplexity(self.model, ids, self.context, self.context - 1, progress=False)
            results.append(-nll)
        return results

    def generate_until(self, requests) -> list[str]:
        results = []
        ends = end_of_text_ids(self.tokenizer)
        for request in tqdm(requests, desc="generate_until", leave=False):
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.get("max_gen_toks", 256))
            ids = (self.prefix + self.tokenizer.encode(context))[-max(1, self.context - max_new):]
            prefix_text, new = self.tokenizer.decode(ids), []
            text = ""
            steps = decode(self.model, torch.tensor([ids], device=self.device), max_new, temperature=0)
            for column in steps:
                token = int(column[0, 0])
                if token in ends:
                    break
                new.append(token)
                text = self.tokenizer.decode(ids + new)[len(prefix_text):]
                if any(stop in text for stop in until):
                    break
            steps.close()
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results
