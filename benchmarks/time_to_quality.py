"""Time to quality: `python train.py` (the embedded default) against the reference recipe, same machine.

    python benchmarks/time_to_quality.py [--repeats 2] [overrides for train.py ...]

Runs benchmarks/reference_recipe.py (nanoGPT's CPU recipe in plain PyTorch) and `python train.py`
in turn, each as its own command in a fresh process, and times each command from start to exit:
start-up, training, evaluation and everything a run writes. Prints each run's validation loss on
the whole validation split, its wall time, the machine's load average around it, and the ratio of
the medians (goal: gptexp at most 0.5x the reference, at val/loss <= 1.886).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.886


def timed(command: list[str]) -> tuple[float, str, float]:
    """(wall seconds, stdout, the 1-minute load average just before) of one command."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout, load


def reference() -> dict:
    seconds, out, load = timed([sys.executable, "benchmarks/reference_recipe.py"])
    estimated = float(re.findall(r"val (\d+\.\d+)", out)[-1])
    whole = float(re.search(r"whole validation split: (\d+\.\d+)", out).group(1))
    return {"run": "reference recipe (2000 iters, eval every 250 on 20 batches)", "val_loss": whole,
            "note": f"its own estimate at the end: {estimated:.4f}", "wall_s": seconds, "load": load}


def gptexp(run_dir: Path, overrides: list[str]) -> dict:
    seconds, _, load = timed([sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides])
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    startup = [float(r["time/startup_s"]) for r in rows if r.get("time/startup_s")]
    steps = max(int(r["step"]) for r in rows) + 1
    return {"run": " ".join(["python train.py", *overrides]), "val_loss": val[-1],
            "note": f"{steps} steps; first step {startup[0]:.1f} s after the command", "wall_s": seconds, "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="for train.py, e.g. logger=csv")
    args = parser.parse_args()
    runs = {"reference": [], "gptexp": []}
    with tempfile.TemporaryDirectory(prefix="time_to_quality_") as tmp:
        for repeat in range(args.repeats):  # interleaved, so a slow spell of the machine hits both
            runs["reference"].append(reference())
            runs["gptexp"].append(gptexp(Path(tmp) / f"run{repeat}", args.overrides))
            for result in (runs["reference"][-1], runs["gptexp"][-1]):
                print(f"{result['run']}: val/loss {result['val_loss']:.4f} in {result['wall_s']:.1f} s "
                      f"(load {result['load']:.2f}; {result['note']})", flush=True)
    print("\n| run | val/loss, whole split | wall s | load before | |\n|---|---|---|---|---|")
    for result in runs["reference"] + runs["gptexp"]:
        print(f"| `{result['run']}` | {result['val_loss']:.4f} | {result['wall_s']:.1f} | {result['load']:.2f} "
              f"| {result['note']} |")
    medians = {name: statistics.median(r["wall_s"] for r in results) for name, results in runs.items()}
    reached = all(r["val_loss"] <= TARGET for r in runs["gptexp"])
    print(f"\nmedian wall: reference {medians['reference']:.1f} s, gptexp {medians['gptexp']:.1f} s; "
          f"ratio {medians['gptexp'] / medians['reference']:.3f} (goal <= 0.5); "
          f"gptexp val/loss <= {TARGET} in every run: {reached}")


if __name__ == "__main__":
    main()
