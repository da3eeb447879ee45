"""Benchmark gptexp's models against HF transformers' at the same configs.

    python -m gptexp.bench [preset=smoke|cpu|gpu] [device=cuda precision=bf16 compile=true ...]

Training cases time forward + backward + AdamW step and report tokens/s, MFU and peak memory;
generation cases report new tokens/s (greedy) with and without the KV cache. Implementations
run interleaved, one repeat of each in turn, so machine noise hits both alike; numbers are
medians after warm-up. Writes bench.csv (one row per implementation x case) and bench.png into
the run directory, and prints each case's gptexp / hf ratio.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from gptexp.hardware import peak_flops
from gptexp.models import GPT2, GPT2Config

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(impl: str, dims: dict, context: int, device: torch.device) -> torch.nn.Module:
    """gptexp's GPT2 or HF's GPT2LMHeadModel with the same shape (biases, tied head, tanh GELU)."""
    if impl == "gptexp":
        return GPT2(GPT2Config(block_size=context, **dims)).to(device)
    if impl == "hf":
        import transformers  # the reference; a dev dependency

        config = transformers.GPT2Config(n_positions=context, n_layer=dims["n_layer"], n_head=dims["n_head"],
                                         n_embd=dims["n_embd"], vocab_size=dims["vocab_size"], resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                                         attn_implementation="sdpa")
        return transformers.GPT2LMHeadModel(config).to(device)
    raise ValueError(f"unknown implementation {impl!r}: choose gptexp or hf")


def loss_of(impl: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same work for both: logits for every position, float32 cross-entropy against y."""
    if impl == "gptexp":
        return model(x, y)[1]
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainRun:
    """One implementation at one training case: model, AdamW, a fixed random batch."""

    def __init__(self, impl: str, dims: dict, batch: int, seq_len: int, cfg: DictConfig, device: torch.device):
        torch.manual_seed(0)
        self.impl, self.device = impl, device
        self.model = build_model(impl, dims, seq_len, device)
        if cfg.compile:
            self.model.compile()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        tokens = torch.randint(0, dims["vocab_size"], (batch, seq_len + 1), device=device)
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        dtype = DTYPES[cfg.precision]
        self.autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                         else contextlib.nullcontext())

    def step(self) -> float:
        """Seconds for one training step, device work included."""
        synchronize(self.device)
        start = time.perf_counter()
        with self.autocast:
            loss = loss_of(self.impl, self.model, self.x, self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)
        return time.perf_counter() - start

    def peak_memory(self) -> float:
        """Peak bytes allocated during one step (CUDA allocator statistics); NaN on CPU."""
        if self.device.type != "cuda":
            return float("nan")
        torch.cuda.reset_peak_memory_stats(self.device)
        self.step()
        return float(torch.cuda.max_memory_allocated(self.device))


def bench_training(name: str, case: DictConfig, cfg: DictConfig, device: torch.device) -> list[dict]:
    dims = OmegaConf.to_container(case.model)
    rows = []
    for batch, seq_len in itertools.product(case.batch, case.seq_len):
        runs = {impl: TrainRun(impl, dims, batch, seq_len, cfg, device) for impl in cfg.impls}
        times = {impl: [] for impl in runs}
        for i in range(cfg.warmup + cfg.repeats):
            for impl, run in runs.items():  # interleaved
                seconds = run.step()
                if i >= cfg.warmup:
                    times[impl].append(seconds)
        with torch.device("meta"):
            flops = GPT2(GPT2Config(block_size=seq_len, **dims)).flops_per_token(seq_len)
        peak, peak_source = peak_flops(device, DTYPES[cfg.precision])
        for impl, run in runs.items():
            step = statistics.median(times[impl])
            tokens_per_s = batch * seq_len / step
            rows.append(dict(kind="train", case=name, impl=impl, batch=batch, seq_len=seq_len, **dims,
                             step_ms=1e3 * step, tokens_per_s=tokens_per_s, mfu=flops * tokens_per_s / peak,
                             peak_memory_mb=run.peak_memory() / 2**20, peak_flops=peak, peak_source=peak_source))
        log.info("%s", ratios_text(rows[-len(runs):]))
        del runs
    return rows


def bench_generation(name: str, case: DictConfig, cfg: DictConfig, device: torch.device) -> list[dict]:
    dims = OmegaConf.to_container(case.model)
    dtype = DTYPES[cfg.precision]
    rows = []
    context = case.prompt + case.new_tokens
    models = {impl: build_model(impl, dims, context, device).to(dtype).eval() for impl in cfg.impls}
    for batch, use_cache in itertools.product(case.batch, case.kv_cache):
        prompt = torch.randint(0, dims["vocab_size"], (batch, case.prompt), device=device)

        def decode(impl):
            synchronize(device)
            start = time.perf_counter()
            with torch.inference_mode():
                if impl == "gptexp":
                    out = models[impl].generate(prompt, case.new_tokens, temperature=0, use_cache=use_cache)
                else:
                    out = models[impl].generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                                max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens,
                                                use_cache=use_cache, pad_token_id=0)
            synchronize(device)
            assert out.shape == (batch, context)
            return time.perf_counter() - start

        times = {impl: [] for impl in models}
        for i in range(cfg.warmup + cfg.repeats):
            for impl in models:
                seconds = decode(impl)
                if i >= cfg.warmup:
                    times[impl].append(seconds)
        for impl in models:
            seconds = statistics.median(times[impl])
            rows.append(dict(kind="generate", case=name, impl=impl, batch=batch, seq_len=context, **dims,
                             kv_cache=use_cache, prompt=case.prompt, new_tokens=case.new_tokens,
                             tokens_per_s=batch * case.new_tokens / seconds, ms_per_token=1e3 * seconds / case.new_tokens))
        log.info("%s", ratios_text(rows[-len(models):]))
    return rows


def ratios_text(rows: list[dict]) -> str:
    import pandas as pd

    return ratios(pd.DataFrame(rows))


def ratios(table) -> str:
    """Each case's gptexp / hf tokens/s, as text lines."""
    keys = ["kind", "case", "batch", "seq_len"] + (["kv_cache"] if "kv_cache" in table else [])
    lines = []
    for key, group in table.groupby(keys, dropna=False):
        speeds = dict(zip(group["impl"], group["tokens_per_s"]))
        if {"gptexp", "hf"} <= speeds.keys():
            label = " ".join(f"{k}={v}" for k, v in zip(keys, key) if v == v)
            lines.append(f"{label}: gptexp {speeds['gptexp']:,.0f} tok/s, hf {speeds['hf']:,.0f} tok/s, "
                         f"ratio {speeds['gptexp'] / speeds['hf']:.2f}")
    return "\n".join(lines)


def plot(table, path: Path) -> None:
    from plotnine import aes, facet_wrap, geom_col, ggplot, labs, position_dodge, theme_bw

    table = table.assign(label=table.apply(lambda r: f"{r['case']} B{r['batch']} T{r['seq_len']}"
                                           + ("" if r["kind"] == "train" else f" cache={r['kv_cache']}"), axis=1))
    figure = (ggplot(table, aes("label", "tokens_per_s", fill="impl")) + geom_col(position=position_dodge())
              + facet_wrap("kind", scales="free") + labs(x="", y="tokens / s") + theme_bw())
    figure.save(path, width=10, height=4, dpi=120, verbose=False)


def run(cfg: DictConfig):
    import pandas as pd

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    peak, source = peak_flops(device, DTYPES[cfg.precision])  # first, on a quiet process
    log.info("peak %.1f TFLOP/s (%s)", peak / 1e12, source)
    rows = []
    for name, case in (cfg.preset.get("train") or {}).items():
        rows += bench_training(name, case, cfg, device)
    for name, case in (cfg.preset.get("generate") or {}).items():
        rows += bench_generation(name, case, cfg, device)
    table = pd.DataFrame(rows).assign(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                      precision=cfg.precision, compile=cfg.compile, torch=torch.__version__,
                                      threads=torch.get_num_threads())
    out = Path(cfg.output_dir)
    table.to_csv(out / "bench.csv", index=False)
    plot(table, out / "bench.png")
    print(table.drop(columns=["peak_flops", "peak_source"], errors="ignore").to_string(index=False, float_format="%.4g"))
    print(ratios(table))
    return table


@hydra.main(version_base="1.3", config_path="../../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
