"""Where a GPT-2 124M training step spends its time on one GPU, outside Lightning: the step train.py runs
(bf16 autocast over float32 weights, loss on every position, gradients clipped at 1.0, fused AdamW), timed
with CUDA events, then three steps under torch.profiler.

    python benchmarks/gpu_profile.py [--batch 16 32] [--vocab 50304] [--eager] [--out DIR]

Prints, per batch size: median step ms, tokens/s and MFU against the datasheet's dense bf16 peak
(gptexp.core.hardware), the share of the step's wall time the GPU was busy, the GPU time by kind of kernel
(matrix products, attention, compiled Triton kernels, the optimizer, the rest) and the costliest kernels.
With --out, the full kernel table of each case goes to DIR/profile_b<batch>.txt.
Compare its tokens/s with train.py's perf/tokens_per_sec at the same shape: the difference is what the
Trainer, the data loader and the callbacks cost.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from gptexp.core.hardware import peak_flops
from gptexp.models import GPT2, GPT2Config
from gptexp.training.optim import OptimConfig, build_optimizer

KINDS = [  # the first pattern a kernel's name matches names its kind (Inductor's kernels are all "..._fused_...")
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("matmul", r"gemm|matmul|cutlass|nvjet|cublas|wgmma|splitKreduce"),
    ("cross-entropy", r"cross_entropy|log_softmax|nll_loss"),
    ("optimizer + clipping", r"adamw|FusedOptimizer|multi_tensor_apply"),
    ("compiled elementwise + norms", r"^triton_"),
    ("fills + copies", r"memcpy|memset|FillFunctor|copy_"),
]


def kind(name: str) -> str:
    return next((label for label, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x, y)[1]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    peak, source = peak_flops(device, torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}; MFU against {peak / 1e12:.0f} TFLOP/s ({source}); torch {torch.__version__}")
    for batch in args.batch:
        torch._dynamo.reset()  # each shape compiled afresh: no dynamic-shape recompilation from the last one
        torch.manual_seed(0)
        with torch.device(device):
            model = GPT2(GPT2Config(block_size=args.seq_len, vocab_size=args.vocab, n_layer=12, n_head=12, n_embd=768))
        optimizer = build_optimizer(model, OptimConfig(lr=6e-4, min_lr=6e-5, weight_decay=0.1, betas=(0.9, 0.95)))
        if not args.eager:
            model.compile()
        tokens = torch.randint(0, 50257, (batch, args.seq_len + 1), device=device)
        x, y = tokens[:, :-1], tokens[:, 1:]

        step = functools.partial(train_step, model, optimizer, x, y)
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        tokens_per_s = batch * args.seq_len / (ms / 1e3)
        mfu = model.flops_per_token(args.seq_len) * tokens_per_s / peak
        print(f"\n== batch {batch} x {args.seq_len}, vocab {args.vocab}, {'eager' if args.eager else 'compiled'}: "
              f"{ms:.1f} ms a step (median of {args.steps}), {tokens_per_s:,.0f} tokens/s, MFU {100 * mfu:.1f}%; "
              f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profiler:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                step()
            end.record()
            end.synchronize()
        wall_ms = start.elapsed_time(end) / 3
        kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        by_name, by_kind = defaultdict(lambda: [0.0, 0]), defaultdict(float)
        for event in kernels:
            us = event.time_range.elapsed_us()  # a kernel's own duration on the device
            by_name[event.name][0] += us / 3
            by_name[event.name][1] += 1
            by_kind[kind(event.name)] += us / 3
        busy_ms = sum(by_kind.values()) / 1e3
        print(f"profiled: {wall_ms:.1f} ms a step; GPU busy {busy_ms:.1f} ms ({100 * busy_ms / wall_ms:.0f}%), "
              f"{sum(n for _, n in by_name.values()) // 3} kernels a step")
        for label, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"  {label:<18} {us / 1e3:7.2f} ms  {100 * us / 1e3 / wall_ms:5.1f}% of the step")
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])
        print("  costliest kernels (ms a step, calls a step):")
        for name, (us, calls) in ranked[:8]:
            print(f"    {us / 1e3:6.2f} ms {calls // 3:4d}x  {name[:90]}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            table = profiler.key_averages().table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=110)
            (args.out / f"profile_b{batch}.txt").write_text(table)
        del model, optimizer, x, y, tokens, step
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
