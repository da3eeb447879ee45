"""Time to quality: `python train.py` (the embedded default) against nanoGPT's own train.py at the same model
shape and data, side by side on this machine.

    python benchmarks/time_to_quality.py --nanogpt <a checkout of karpathy/nanoGPT> [--iters 1200,1600]
                                         [--target 1.60] [overrides for train.py ...]

gptexp: the command as a user runs it, timed from start to exit (start-up, training, the validation and
everything the run writes); its val/loss is on the whole validation split.

nanoGPT: its train.py with config/train_shakespeare_char.py, given the default's shape (4 layers, 4 heads,
256 wide, a block of 128, biases, no dropout), batch (32) and schedule (AdamW at 2e-3 with 50 warm-up
iterations, cosine to 2e-4 over the run), on the CPU in float32 (its only CPU precision), uncompiled, once
for each --iters; each run is timed from start to exit, then its final checkpoint is scored on the whole
validation split as gptexp scores it (contiguous windows of the block, every token predicted once), with
nanoGPT's own model class. Its time to quality is the wall time of the shortest run that reaches --target.
The data is the same text (the bundled Tiny Shakespeare, written where nanoGPT's prepare.py reads it), split
90/10 with the same 65 characters.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "src" / "gptexp" / "assets" / "tinyshakespeare.txt"
SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 128, "batch_size": 32, "bias": True, "dropout": 0.0,
         "learning_rate": 2e-3, "min_lr": 2e-4, "warmup_iters": 50}


def timed(command: list[str], cwd: Path) -> tuple[float, str, float]:
    """(wall seconds, stdout, the 1-minute load average just before) of one command."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout, load


def gptexp(run_dir: Path, overrides: list[str]) -> dict:
    seconds, _, load = timed([sys.executable, "train.py", f"hydra.run.dir={run_dir}", *overrides], ROOT)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    startup = [float(r["time/startup_s"]) for r in rows if r.get("time/startup_s")]
    steps = max(int(float(r["steps"])) for r in rows if r.get("steps"))
    return {"run": " ".join(["python train.py", *overrides]), "val_loss": val[-1], "wall_s": seconds, "load": load,
            "note": f"{steps} steps; first step {startup[0]:.1f} s after the command"}


def prepare_nanogpt(checkout: Path, work: Path) -> Path:
    """A copy of the checkout with the bundled text as its shakespeare_char data, prepared by its prepare.py."""
    copy = work / "nanoGPT"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "out*"))
    shutil.copy(TEXT, copy / "data" / "shakespeare_char" / "input.txt")  # prepare.py downloads only without it
    timed([sys.executable, "data/shakespeare_char/prepare.py"], copy)
    return copy


def whole_split_loss(nanogpt: Path, out_dir: Path) -> float:
    """nanoGPT's final checkpoint scored on the whole validation split: contiguous windows of its block,
    every token predicted once, the mean over tokens (what gptexp reports as val/loss)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's own

    sys.path.remove(str(nanogpt))
    checkpoint = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()})
    model.eval()
    tokens = np.fromfile(nanogpt / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16).astype(np.int64)
    block = checkpoint["model_args"]["block_size"]
    offsets = np.arange((len(tokens) - 1) // block) * block
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(offsets), 256):
            windows = torch.from_numpy(tokens[offsets[start:start + 256, None] + np.arange(block + 1)])
            x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # nanoGPT views the targets flat
            logits, _ = model(x, y)  # with targets, nanoGPT returns the logits of every position
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    return total / count


def nanogpt_run(copy: Path, iters: int) -> dict:
    out_dir = copy / f"out-{iters}"
    settings = {**SHAPE, "max_iters": iters, "lr_decay_iters": iters, "eval_interval": iters, "eval_iters": 20,
                "log_interval": 100, "always_save_checkpoint": True, "out_dir": str(out_dir), "device": "cpu",
                "compile": False, "dtype": "float32"}
    command = [sys.executable, "train.py", "config/train_shakespeare_char.py",
               *(f"--{key}={value}" for key, value in settings.items())]
    seconds, out, load = timed(command, copy)
    estimate = [line for line in out.splitlines() if line.startswith(f"step {iters}:")]
    return {"run": f"nanoGPT train.py, {iters} iterations", "val_loss": whole_split_loss(copy, out_dir),
            "wall_s": seconds, "load": load, "note": f"its own estimate: {estimate[-1] if estimate else '?'}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--iters", default="1200,1600", help="nanoGPT run lengths, comma-separated")
    parser.add_argument("--target", type=float, default=1.60, help="the val/loss both must reach")
    parser.add_argument("overrides", nargs="*", help="for train.py, e.g. logger=csv")
    args = parser.parse_args()
    if not (args.nanogpt / "train.py").is_file():
        parser.exit(2, f"error: {args.nanogpt} holds no train.py; pass a checkout of karpathy/nanoGPT\n")
    results = []
    with tempfile.TemporaryDirectory(prefix="time_to_quality_") as tmp:
        copy = prepare_nanogpt(args.nanogpt, Path(tmp))
        results.append(gptexp(Path(tmp) / "gptexp", args.overrides))
        print(f"{results[-1]['run']}: val/loss {results[-1]['val_loss']:.4f} in {results[-1]['wall_s']:.1f} s", flush=True)
        for iters in (int(n) for n in args.iters.split(",")):
            results.append(nanogpt_run(copy, iters))
            print(f"{results[-1]['run']}: val/loss {results[-1]['val_loss']:.4f} in {results[-1]['wall_s']:.1f} s",
                  flush=True)
    print("\n| run | val/loss, whole split | wall s | load before | |\n|---|---|---|---|---|")
    for result in results:
        print(f"| `{result['run']}` | {result['val_loss']:.4f} | {result['wall_s']:.1f} | {result['load']:.2f} "
              f"| {result['note']} |")
    ours, theirs = results[0], [r for r in results[1:] if r["val_loss"] <= args.target]
    if ours["val_loss"] > args.target:
        print(f"\ngptexp did not reach val/loss {args.target}")
    elif not theirs:
        print(f"\nnanoGPT reached val/loss {args.target} in none of its runs: give it longer ones (--iters)")
    else:
        fastest = min(theirs, key=lambda r: r["wall_s"])
        print(f"\ntime to val/loss <= {args.target}: gptexp {ours['wall_s']:.1f} s, nanoGPT {fastest['wall_s']:.1f} s "
              f"({fastest['run']}); ratio {ours['wall_s'] / fastest['wall_s']:.3f}")


if __name__ == "__main__":
    main()
