"""Write a dataset as llm.c's token shards: python -m gptexp prepare data=<dataset> [output=<dir>]

data=hf and its presets (fineweb_edu, openwebtext, tinystories_hub): the dataset is tokenized once, in
data.num_proc processes, into the cache that `python train.py data=<the same>` reads (output: another cache
directory), resuming a preparation that was interrupted.

Other datasets: each split becomes {output}/{data.name}_{split}_{k:06d}.bin (GPT-2 tokens, <|endoftext|>
before every document). Train on them with `python train.py model=gpt2 data.shards={output}/{data.name}`,
or hand them to llm.c's train_gpt2 (-i / -j).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from gptexp import data
from gptexp.commands.cli import answered_errors, run_command
from gptexp.core.config import CONF_DIR
from gptexp.core.writing import writing
from gptexp.data.llmc_shards import encode_for_llmc, write_split


def prepare(cfg: DictConfig) -> dict[str, int]:
    """Tokens written per split."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) | {"shards": None, "tokenizer": "model"}
    if data_cfg.get("loader") == "hf":
        if cfg.output is not None:
            data_cfg["cache_dir"] = cfg.output
        done = data.load(data_cfg, cfg.tokenizer).tokens.prepare()
        for split in sorted(done.tokens, reverse=True):
            print(done.split(split))
        rate = f", {done.tokens_per_second:,.0f} tokens/s" if done.seconds else " (there already)"
        if done.resumed_at:
            rate += f" (resumed at block {done.resumed_at:,} of {done.blocks:,})"
        print(f"-> {done.directory} in {done.seconds:.1f} s{rate}")
        return done.tokens
    output = cfg.output or "data/llmc"
    source = data.load(data_cfg, cfg.tokenizer)
    counts = {}
    for split, documents in source.splits.items():
        tokens = encode_for_llmc(documents, source.tokenizer)
        with writing(output):
            paths = write_split(output, source.config.name, split, tokens, cfg.shard_tokens)
        counts[split] = len(tokens)
        print(f"{split}: {len(documents)} documents, {len(tokens):,} tokens -> {', '.join(map(str, paths))}")
    return counts


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="tools/prepare")
def main(cfg: DictConfig) -> None:
    with answered_errors():
        prepare(cfg)


if __name__ == "__main__":
    run_command(main)
