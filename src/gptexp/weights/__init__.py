"""Weights in and out: every file format gptexp reads and writes, and the one dispatch from a path or hub id to its
reader (`locate`), used by source=, finetune.init_from=, model.pretrained= and model.checkpoint= alike.

- locate.py: what a path or id names; hub.py: a hub id fetched into HF's cache;
- readers and writers, one file a format, each `read(path) -> Source` (a model, its tokenizer, what it was) and
  `tokenizer(path)`: hf.py (Hugging Face directories), meta.py (Meta's consolidated.*.pth), llama2c.py (llama2.c's
  .bin), llmc.py (llm.c's model and debug state), gguf.py (llama.cpp's GGUF), quantized.py (gptexp's int8 / int4
  file), runs.py (gptexp's training checkpoints, a LoRA adapter merged in);
- checkpoints.py: writing training checkpoints so that a crash never corrupts one, and reading them safely;
- source.py: `Source`, and `assemble`, the one way a model is built from a config and tensors;
- load.py: `load_source` (source=: a model and its tokenizer) and `load_model` (the model alone); pretrained.py: the
  model a conf/model/*.yaml describes (train.py).

Architectures never read files: the readers import gptexp.models, never the other way.
"""

from gptexp.weights.hf import write as save_hf
from gptexp.weights.load import load_model, load_source
from gptexp.weights.locate import Location, locate
from gptexp.weights.source import PRECISIONS, Source

__all__ = ["PRECISIONS", "Location", "Source", "load_model", "load_source", "locate", "save_hf"]
