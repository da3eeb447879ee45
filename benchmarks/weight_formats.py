"""What each weight format costs in quality: perplexity and greedy text, fp32 against bf16, int8 and int4.

    python benchmarks/weight_formats.py GPT2_RUN [--prompts 8] [--new-tokens 128] [--group-sizes 32 64 128 256]
                                        [--activations fp32|bf16]

GPT2_RUN: a GPT-2 trained here on data=shakespeare (a run directory, .ckpt, HF directory or llm.c .bin). It and
the bundled stories260K (on the TinyStories sample) are each scored by `python -m gptexp evaluate` itself
(composed in this process) on the whole validation split, in fp32, in bf16, int8 and int4 at each group size
(int8 and int4 with `--activations`, fp32 by default as `sample` decodes them); and decode greedily from `--prompts`
prompts of 16 tokens taken evenly from that split, one at a time as `sample` decodes a prompt (a quantized model's
step then runs fused, gptexp.inference.fused_step), their tokens compared position by position with fp32's. A format
a model cannot take (a width that a group size does not divide) is reported as such. Prints one markdown table a
model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptexp.commands.evaluate import documents, evaluate  # noqa: E402
from gptexp.core.config import CONF_DIR, ConfigError, asset_path  # noqa: E402
from gptexp.data.token_files import encode_documents  # noqa: E402
from gptexp.inference.generation import generate  # noqa: E402
from gptexp.inference.quantize import read_bytes_per_token  # noqa: E402
from gptexp.weights import load_source  # noqa: E402


def formats(group_sizes: list[int], activations: str) -> list[tuple[str, str, str | None, int]]:
    """(label, precision, quantize, group size)"""
    return ([("fp32", "fp32", None, 128), ("bf16", "bf16", None, 128), ("int8", activations, "int8", 128)]
            + [(f"int4 g{g}", activations, "int4", g) for g in group_sizes])


def evaluate_cfg(source: str, data: str, precision: str, quantize: str | None, group_size: int, out: str):
    overrides = [f"source={source}", *f"data={data}".split(), f"precision={precision}", f"quantize_group_size={group_size}",
                 "logger=none", f"output_dir={out}"]
    if quantize:
        overrides.append(f"quantize={quantize}")
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    from omegaconf import OmegaConf

    OmegaConf.set_struct(cfg, False)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gpt2_run")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--activations", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    out = tempfile.mkdtemp()
    for source, data in ((args.gpt2_run, "shakespeare"),
                         (str(asset_path("stories260K/stories260K.bin")), "tinystories data.source=bundled")):
        print(f"\n{source} on data={data}, split val (perplexity by `python -m gptexp evaluate`; greedy "
              f"{args.prompts} x {args.new_tokens} tokens against fp32's)\n")
        print("| format | weights read a token | nats/token | perplexity | vs fp32 | greedy tokens equal |")
        print("|---|---|---|---|---|---|")
        base = load_source(source)
        val = None
        reference = None
        fp32_ppl = None
        for label, precision, quantize, group_size in formats(args.group_sizes, args.activations):
            cfg = evaluate_cfg(source, data, precision, quantize, group_size, out)
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # the command prints its results.json
                    scored = evaluate(cfg)
            except ConfigError as error:
                print(f"| {label} | cannot: {error} | | | | |")
                continue
            if val is None:
                docs, _ = documents(cfg)
                val = torch.from_numpy(encode_documents(docs, base.tokenizer).astype("int64"))
            copy_ = copy.copy(base)
            copy_.model = copy.deepcopy(base.model)
            copy_.place("cpu", precision, quantize, group_size)
            stride = (val.numel() - 16) // args.prompts
            prompts = torch.stack([val[i * stride:i * stride + 16] for i in range(args.prompts)])
            greedy = torch.cat([generate(copy_.model, prompt[None], args.new_tokens, temperature=0)[:, 16:]
                                for prompt in prompts])
            reference = greedy if reference is None else reference
            fp32_ppl = fp32_ppl or scored["perplexity"]
            print(f"| {label} | {read_bytes_per_token(copy_.model) / 1e6:.1f} MB | {scored['nats_per_token']:.4f} | "
                  f"{scored['perplexity']:.3f} | {scored['perplexity'] / fp32_ppl - 1:+.2%} | "
                  f"{(greedy == reference).float().mean().item():.1%} |", flush=True)


if __name__ == "__main__":
    main()
