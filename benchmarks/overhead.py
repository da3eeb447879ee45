"""What the Lightning Trainer and gptexp's callbacks cost per training step.

    python benchmarks/overhead.py [--model gpt2_mini] [--repeats 3] [--steps 40 140] [overrides ...]

Three ways to run the same model on the same batches: a plain PyTorch loop (AdamW, clipping, the
schedule: what LanguageModelModule does), the Trainer with no callbacks, and the Trainer with the
default callbacks (samples at fixed steps left out: that is work, timed as time/sample_ms). Each
time per step is a slope, (time of the long run - time of the short run) /
(steps between them), so set-up costs cancel; no validation runs. The three are interleaved and
repeated; medians are printed with their ratios to the plain loop.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir

from gptexp import data
from gptexp.commands.train import build_trainer
from gptexp.core.config import build_dataclass
from gptexp.data.windows import RandomBatches, TokenWindows
from gptexp.training.module import LanguageModelModule
from gptexp.training.optim import OptimConfig, adamw, lr_at
from gptexp.weights import pretrained

CONF = Path(__file__).resolve().parents[1] / "conf"


def config(model: str, callbacks: str, steps: int, output_dir: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"model={model}", f"callbacks={callbacks}", "logger=csv",
                                           f"trainer.max_steps={steps}", "trainer.limit_val_batches=0",
                                           "+trainer.enable_model_summary=false", f"output_dir={output_dir}",
                                           *overrides])


def prepared(cfg):
    L.seed_everything(cfg.seed, verbose=False)
    location = pretrained.weights_location(cfg.model)
    source = data.load(cfg.data, pretrained.tokenizer(cfg.model, location))
    model = pretrained.build(cfg.model, source.tokenizer.vocab_size, location)
    return model, data.build(source, model.context_length, seed=cfg.seed)


def trainer_seconds(cfg) -> float:
    model, datamodule = prepared(cfg)
    module = LanguageModelModule(model, build_dataclass(OptimConfig, cfg.optim, "optim"))
    trainer = build_trainer(cfg)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def plain_loop_seconds(cfg) -> float:
    """The training step LanguageModelModule defines, written out: same batches, same arithmetic."""
    model, datamodule = prepared(cfg)
    datamodule.setup("fit")
    optim = build_dataclass(OptimConfig, cfg.optim, "optim")
    steps = cfg.trainer.max_steps
    windows = TokenWindows(datamodule.tokens["train"], datamodule.seq_len)
    batches = RandomBatches(len(datamodule.tokens["train"]), datamodule.seq_len, datamodule.config.batch_size,
                            num_batches=steps, seed=(cfg.seed, 0))
    params = list(model.parameters())
    optimizer = adamw(params, optim)
    start = time.perf_counter()
    for step, offsets in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, optim, steps)
        x, y = windows[np.asarray(offsets)]
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2_mini")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs=2, default=(40, 140), metavar=("SHORT", "LONG"))
    parser.add_argument("--output-dir", default="outputs/overhead")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_size=8")
    args = parser.parse_args()
    short, long = args.steps
    ways = {"plain loop": lambda c: plain_loop_seconds(c),
            "Trainer, no callbacks": lambda c: trainer_seconds(c),
            "Trainer, default callbacks": lambda c: trainer_seconds(c)}
    callbacks = {"plain loop": "none", "Trainer, no callbacks": "none", "Trainer, default callbacks": "default"}
    # samples at fixed steps are work the run asked for, not per-step overhead: they are timed on their own
    overrides = {"Trainer, default callbacks": ["callbacks.samples.at_steps=[]"]}
    per_step = {way: [] for way in ways}
    for repeat in range(args.repeats):
        for way, run in ways.items():  # interleaved
            seconds = [run(config(args.model, callbacks[way], n, f"{args.output_dir}/{repeat}",
                                  [*overrides.get(way, []), *args.overrides])) for n in (short, long)]
            per_step[way].append(1e3 * (seconds[1] - seconds[0]) / (long - short))
            print(f"repeat {repeat}: {way}: {per_step[way][-1]:.2f} ms/step", flush=True)
    base = statistics.median(per_step["plain loop"])
    print(f"\n{args.model} {' '.join(args.overrides)}: median ms per step over {args.repeats} repeats "
          f"(slope between {short} and {long} steps), torch {torch.__version__}, {torch.get_num_threads()} threads")
    for way, values in per_step.items():
        median = statistics.median(values)
        print(f"{way:<28}{median:9.2f} ms   {median / base:6.3f}x the plain loop   (all: "
              f"{', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
