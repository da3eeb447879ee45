"""The commands: thin Hydra apps over the rooms below them (weights, training, eval, inference, data, ...), and
cli.py, what every command does with bad input and faults. Run one as `python -m gptexp <command> [key=value ...]`
(or `python -m gptexp.commands.<command>`); `python train.py` is `train`. A command never imports another."""

import sys

from gptexp.core.interrupt import answer_while_starting

if sys.argv[:1] == ["-m"]:  # python -m gptexp.commands.<command>, while Python finds the command (its docs say so)
    answer_while_starting()  # Ctrl-C while the command imports torch and Lightning: one line, exit status 130

COMMANDS = {
    "train": "train or finetune a model (also: python train.py)",
    "sample": "write text with any model (mode=chat: talk to a LLaMA-2 chat model)",
    "evaluate": "score any model: perplexity and bits per byte on a dataset or file, multiple choice",
    "bench": "benchmark gptexp against HF transformers, fp32 and bf16",
    "export": "write a GPT-2 as llm.c's model file or an HF directory",
    "verify": "check a GPT-2 against llm.c's model + debug state",
    "prepare": "write a dataset as llm.c's token shards",
    "serve": "answer OpenAI's API and a chat page with any model",
}
