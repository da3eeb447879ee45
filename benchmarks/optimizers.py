"""Muon against AdamW at the same model: the wall time each needs to reach a val/loss, on this machine.

    python benchmarks/optimizers.py [--target 1.60] [--muon 400,600] [--adamw 1000,1200] [overrides ...]

Runs `python train.py optim=<name> trainer.max_steps=<n>` (the embedded default's model, data, batch,
learning rates and precision; only the optimizer and the run length change) for each length, each timed
from start to exit, its val/loss on the whole validation split at the end. An optimizer's time to quality
is the wall time of its shortest run that reaches --target (each length is its own run: the schedule's
cosine ends where the run does).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from time_to_quality import gptexp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=1.60)
    parser.add_argument("--muon", default="400,600", help="run lengths for optim=muon, comma-separated")
    parser.add_argument("--adamw", default="1000,1200", help="run lengths for optim=adamw, comma-separated")
    parser.add_argument("overrides", nargs="*", help="for train.py, e.g. logger=csv")
    args = parser.parse_args()
    results = {"muon": [], "adamw": []}
    with tempfile.TemporaryDirectory(prefix="optimizers_") as tmp:
        for name in results:
            for steps in (int(n) for n in getattr(args, name).split(",")):
                result = gptexp(Path(tmp) / f"{name}-{steps}",
                                [f"optim={name}", f"trainer.max_steps={steps}", *args.overrides])
                results[name].append(result)
                print(f"{result['run']}: val/loss {result['val_loss']:.4f} in {result['wall_s']:.1f} s", flush=True)
    print("\n| run | val/loss, whole split | wall s | load before | |\n|---|---|---|---|---|")
    for result in results["muon"] + results["adamw"]:
        print(f"| `{result['run']}` | {result['val_loss']:.4f} | {result['wall_s']:.1f} | {result['load']:.2f} "
              f"| {result['note']} |")
    fastest = {name: min((r for r in runs if r["val_loss"] <= args.target), key=lambda r: r["wall_s"], default=None)
               for name, runs in results.items()}
    for name, result in fastest.items():
        print(f"{name}: " + (f"val/loss <= {args.target} in {result['wall_s']:.1f} s ({result['run']})" if result
                             else f"no run reached val/loss {args.target}: give it longer ones"))
    if all(fastest.values()):
        print(f"ratio muon / adamw: {fastest['muon']['wall_s'] / fastest['adamw']['wall_s']:.3f}")


if __name__ == "__main__":
    main()
