"""source= (and finetune.init_from=, draft=): any model gptexp reads, with its tokenizer, through `locate`."""

from __future__ import annotations

from os import PathLike

from gptexp.core.config import BadInput, ConfigError
from gptexp.core.safe_load import trusting
from gptexp.models import LanguageModel
from gptexp.weights import runs
from gptexp.weights.locate import READERS, locate
from gptexp.weights.source import Source


def load_source(source: str | PathLike, checkpoint: str = "best", trust: bool = False, key: str = "source",
                with_tokenizer: bool = True) -> Source:
    """The model and tokenizer `source` names (gptexp.weights); `checkpoint` picks a run directory's best or last
    checkpoint. Raises ConfigError naming what was looked for (as `key`=source: the option that named it), and
    UnsafeFileError for a pickled file that asks for more than tensors and plain data, unless `trust`
    (trust_checkpoint=true)."""
    with trusting(trust):  # first: a trust_checkpoint that is not a boolean is refused before anything is read
        location = locate(str(source), key, checkpoint)
        read = runs.read if location.kind == "checkpoint" else READERS[location.kind].read
        try:
            return read(location.path, with_tokenizer=with_tokenizer)
        except BadInput:
            raise
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"{location.option}: {error}") from error


def load_model(source: str | PathLike, checkpoint: str = "best", trust: bool = False) -> LanguageModel:
    """The model alone (GPT2 or Llama) of anything load_source reads: no tokenizer is looked for."""
    return load_source(source, checkpoint, trust, with_tokenizer=False).model
