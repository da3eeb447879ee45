"""gptexp: train, finetune, sample and measure GPT-2 and LLaMA-2 language models with Lightning + Hydra."""

__version__ = "0.1.0"
