"""QLoRA against plain LoRA in bf16, on a stack of LLaMA-2 7B-width layers: peak memory and step time.

    python benchmarks/qlora_memory.py [--layers 8] [--seq-len 256] [--steps 3]

The model: --layers LLaMA-2 7B layers (4096 wide, 32 heads, 11,008 in the MLP) with LLaMA-2's 32,000-token
embedding and head, random weights in bf16. Each method runs in a fresh process, so that each one's peak is its own:
- "lora-bf16": finetune=lora on the bf16 base;
- "qlora-nf4": finetune=lora finetune.quantize=4bit, the base's linear layers in NF4 (bitsandbytes; the head and
  the embedding stay bf16, as in any QLoRA).
Both train LoRA r=8 on q_proj and v_proj (gptexp's default for LLaMA) with AdamW, batch 1 of --seq-len tokens,
activations in bf16. Memory is the process's resident set (VmRSS / VmHWM from /proc): "base" once the model is
ready to train, "load peak" while it was built and (QLoRA) quantized, "train peak" over the steps alone (the
kernel's high-water mark is reset before them). Step time is the median of --steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptexp import finetune  # noqa: E402
from gptexp.models import Llama, LlamaConfig  # noqa: E402

METHODS = {"lora-bf16": {"method": "lora"}, "qlora-nf4": {"method": "lora", "quantize": "4bit"}}


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since start or the last reset) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(method: str, layers: int, seq_len: int, steps: int) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(dim=4096, n_layers=layers, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000,
                         max_seq_len=seq_len)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: never a float32 copy of the base
    model = Llama(config)
    torch.set_default_dtype(torch.float32)
    model.rebuild_buffers()
    model = finetune.apply(model, METHODS[method] | {"r": 8, "alpha": 16, "dropout": 0.0})
    model.train()
    base, load_peak = memory_mb("VmRSS"), memory_mb("VmHWM")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    x = torch.randint(0, config.vocab_size, (1, seq_len))
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    times, losses = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(x, x)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"method": method, "layers": layers, "seq_len": seq_len, "trainable": sum(p.numel() for p in trainable),
            "base_mb": base, "load_peak_mb": load_peak, "train_peak_mb": memory_mb("VmHWM"),
            "step_s": statistics.median(times[1:]), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", choices=METHODS, help="measure one method in this process (what main spawns)")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(measure(args.method, args.layers, args.seq_len, args.steps)))
        return
    rows = []
    for method in METHODS:
        result = subprocess.run([sys.executable, __file__, "--method", method, "--layers", str(args.layers),
                                 "--seq-len", str(args.seq_len), "--steps", str(args.steps)],
                                capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"{args.layers} LLaMA-2 7B-width layers + 32,000-token embedding and head; batch 1 x {args.seq_len} tokens; "
          f"LoRA r=8 on q_proj, v_proj ({rows[0]['trainable']:,} trainable)")
    print(f"{'method':<10} {'base MB':>9} {'load peak MB':>13} {'train peak MB':>14} {'step s':>7}  first losses")
    for row in rows:
        print(f"{row['method']:<10} {row['base_mb']:>9.0f} {row['load_peak_mb']:>13.0f} {row['train_peak_mb']:>14.0f} "
              f"{row['step_s']:>7.2f}  {', '.join(f'{x:.4f}' for x in row['losses'][:2])}")
    lora, qlora = rows
    saved = lora["train_peak_mb"] - qlora["train_peak_mb"]
    print(f"QLoRA / LoRA: base {qlora['base_mb'] / lora['base_mb']:.2f}x, train peak "
          f"{qlora['train_peak_mb'] / lora['train_peak_mb']:.2f}x ({saved:.0f} MB saved), "
          f"step time {qlora['step_s'] / lora['step_s']:.2f}x")


if __name__ == "__main__":
    main()
