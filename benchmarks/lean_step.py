"""Where a quantized decoding step's time goes, with and without the fused step (gptexp.inference.fused_step).

    python benchmarks/lean_step.py [--schemes int8 int4] [--group-size 128] [--new-tokens 128] [--repeats 5]

GPT-2 124M (random weights: the time does not depend on them), float32 activations, batch 1, a 16-token prompt.
For each scheme, interleaved, median of --repeats:
- "forward": greedy decoding with every step through the model's forward (torch ops, the fused step turned off);
- "fused": greedy decoding as `sample` runs it, each step after the prompt's in one C call;
- "products": the step's 49 products alone, gptexp's operators called in a loop, nothing else;
- the streaming rate (gptexp.core.hardware.MemoryStream) measured beside them, and the bound it sets: the bytes of
  weights a step reads over that rate.
Prints ms a token for each, what the step spends outside its products, and each one's share of the bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptexp.core.hardware import MemoryStream  # noqa: E402
from gptexp.inference import kernels  # noqa: E402
from gptexp.inference.generation import decode  # noqa: E402
from gptexp.inference.quantize import QuantizedLinear, quantize, read_bytes_per_token  # noqa: E402
from gptexp.models import GPT2, GPT2Config  # noqa: E402


def decoding_seconds(model, prompt, new_tokens: int) -> float:
    start = time.perf_counter()
    for _ in decode(model, prompt, new_tokens, temperature=0):
        pass
    return (time.perf_counter() - start) / new_tokens


def products(model) -> callable:
    """One pass of the step's products through gptexp's operators, as the fused step runs them (one float32 row)."""
    calls = []
    for layer in (m for m in model.modules() if isinstance(m, QuantizedLinear)):
        if layer.scheme == "int8":
            calls.append((torch.ops.gptexp.int8_mm, (torch.randn(1, layer.in_features), layer.qweight,
                                                    layer.scales32)))
        else:
            calls.append((torch.ops.gptexp.int4_mv, (torch.randn(layer.in_features), layer.qweight,
                                                    layer.scale_zero_pairs, layer.group_size)))
    return lambda: [operator(*arguments) for operator, arguments in calls]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", nargs="+", default=["int8", "int4"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if kernels.decode_step() is None:
        sys.exit("gptexp's kernels are not built here (no C++ compiler, or GPTEXP_KERNELS=0): nothing to compare")
    stream = MemoryStream()
    print("| scheme | forward ms/token | fused ms/token | products alone | outside the products: forward, fused | "
          "streaming GB/s | bound ms | share of the bound: forward, fused |")
    print("|---|---|---|---|---|---|---|---|")
    for scheme in args.schemes:
        torch.manual_seed(0)
        model = quantize(GPT2(GPT2Config()).eval(), scheme, args.group_size)
        prompt = torch.randint(0, 50257, (1, 16))
        run_products = products(model)
        times = {"forward": [], "fused": [], "products": [], "stream": []}
        with torch.inference_mode():
            for i in range(args.repeats + 1):  # the first round warms up
                model.fused_decode_step = lambda cache: None  # the model's own forward at every step
                seconds = {"forward": decoding_seconds(model, prompt, args.new_tokens)}
                del model.fused_decode_step
                seconds["fused"] = decoding_seconds(model, prompt, args.new_tokens)
                start = time.perf_counter()
                for _ in range(10):
                    run_products()
                seconds["products"] = (time.perf_counter() - start) / 10
                seconds["stream"] = stream(repeats=3)
                if i:
                    for key, value in seconds.items():
                        times[key].append(value)
        ms = {key: 1e3 * statistics.median(values) for key, values in times.items() if key != "stream"}
        rate = statistics.median(times["stream"])
        bound = 1e3 * read_bytes_per_token(model) / rate
        print(f"| {scheme} | {ms['forward']:.2f} | {ms['fused']:.2f} | {ms['products']:.2f} | "
              f"{ms['forward'] - ms['products']:.2f}, {ms['fused'] - ms['products']:.2f} | {rate / 1e9:.1f} | "
              f"{bound:.2f} | {bound / ms['forward']:.0%}, {bound / ms['fused']:.0%} |", flush=True)


if __name__ == "__main__":
    main()
