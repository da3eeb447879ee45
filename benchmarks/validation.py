"""Validation and evaluation over a big validation split: the loss by chunks (gptexp) against whole logits.

    python benchmarks/validation.py [--megabytes 50] [--n-layer 1] [--n-embd 32] [--precision 32-true]

The corpus is the issue's: the bundled TinyStories sample repeated to about --megabytes of text, read as
data=text (its last 10% validates: about 1.25M GPT-2 tokens). A GPT-2 of --n-layer x --n-embd (GPT-2's
50,257-token vocabulary), untrained, seed 0. Each case runs in a fresh process, so its peak memory is its own:

- validation: Lightning's `trainer.validate` over the whole validation split in windows of 1,024 tokens,
  8 per batch (train.py's validation), with gptexp's validation_step (head_loss: 32 MB of logits at a
  time) and with the reference step that computes the loss from the whole (8, 1024, 50257) logits;
- evaluate: `gptexp.eval.scoring.perplexity` (window 1,024, stride 512, 8 windows a batch) over the first
  --eval-tokens validation tokens, by chunks and from whole logits.

Prints seconds, tokens/s, the loss (equal to the reference within float32 rounding) and the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def corpus(path: Path, megabytes: float) -> None:
    from gptexp.data import tinystories

    stories = tinystories.stories((resources.files("gptexp.assets") / "tinystories_sample.txt").read_text())
    size = sum(len(s.encode()) + 2 for s in stories)
    with open(path, "w") as f:
        for copy in range(max(1, round(megabytes * 1e6 / size))):
            for i, story in enumerate(stories):
                f.write(f"{story}\n(Story {copy * len(stories) + i})\n\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case(args) -> dict:
    """One measurement, in this process."""
    import lightning as L
    import torch
    import torch.nn.functional as F

    from gptexp import data
    from gptexp.eval.scoring import perplexity
    from gptexp.training.module import LanguageModelModule
    from gptexp.training.optim import OptimConfig
    from gptexp.weights import pretrained

    torch.manual_seed(0)
    source = data.load({"name": "text", "path": args.text, "cache_dir": args.cache, "eval_batch_size": 8}, "gpt2")
    model = pretrained.build({"arch": "gpt2", "tokenizer": "gpt2", "n_layer": args.n_layer, "n_head": 1,
                          "n_embd": args.n_embd, "block_size": 1024}, vocab_size=source.tokenizer.vocab_size)
    datamodule = data.build(source, 1024)
    datamodule.prepare_data()
    datamodule.setup("fit")
    before = peak_rss_mb()
    if args.case.startswith("validation"):

        class WholeLogits(LanguageModelModule):
            def validation_step(self, batch, batch_idx):  # the loss from the whole (B, T, vocab) logits
                x, y = batch
                _, loss = self.model(x, y)
                self.val_loss.update(loss, weight=(y != -1).sum())

        cls = WholeLogits if args.case.endswith("whole") else LanguageModelModule
        module = cls(model, OptimConfig())
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=args.precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            inference_mode=False)
        began = time.perf_counter()
        (result,) = trainer.validate(module, datamodule=datamodule, verbose=False)
        seconds, loss = time.perf_counter() - began, result["val/loss"]
        tokens = sum(len(batch) for batch in datamodule.val_dataloader().sampler) * 1024
    else:
        ids = torch.from_numpy(datamodule.tokens["val"][:args.eval_tokens].astype("int64"))
        model.eval()

        class WholeLogits(torch.nn.Module):  # the reference: the whole logits, then the loss
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x, targets, return_logits=True):
                logits, _ = self.model(x)
                return None, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)

        scored = WholeLogits() if args.case.endswith("whole") else model
        autocast = torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16-mixed")
        began = time.perf_counter()
        with autocast:
            nll, tokens = perplexity(scored, ids, 1024, 512, batch_size=8, progress=False)
        seconds, loss = time.perf_counter() - began, nll / tokens
    return {"case": args.case, "seconds": seconds, "tokens": tokens, "loss": loss, "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=50)
    parser.add_argument("--n-layer", type=int, default=1)
    parser.add_argument("--n-embd", type=int, default=32)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--eval-tokens", type=int, default=262_144)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--text", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "tinystories_repeated.txt"
        corpus(text, args.megabytes)
        print(f"corpus: {text.stat().st_size / 1e6:.1f} MB; GPT-2 {args.n_layer} x {args.n_embd}, {args.precision}")
        rows = []
        for name in ("validation-whole", "validation-chunks", "evaluate-whole", "evaluate-chunks"):
            command = [sys.executable, __file__, "--case", name, "--text", str(text), "--cache", str(Path(tmp) / "c"),
                       "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--precision", args.precision,
                       "--eval-tokens", str(args.eval_tokens)]
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {name:18s} {r['tokens']:>10,} tokens in {r['seconds']:7.1f} s = "
                  f"{r['tokens'] / r['seconds']:9,.0f} tokens/s, loss {r['loss']:.6f}, "
                  f"peak RSS {r['peak_rss_mb']:6,.0f} MB ({r['peak_rss_mb'] - r['rss_before_mb']:+,.0f} MB during the pass)", flush=True)
        for kind in ("validation", "evaluate"):
            whole, chunks = (next(r for r in rows if r["case"] == f"{kind}-{m}") for m in ("whole", "chunks"))
            print(f"{kind}: chunks / whole logits: {whole['seconds'] / chunks['seconds']:.2f}x the speed, "
                  f"{chunks['peak_rss_mb'] / whole['peak_rss_mb']:.2f}x the peak memory, "
                  f"loss difference {abs(chunks['loss'] - whole['loss']):.1e}")


if __name__ == "__main__":
    main()
