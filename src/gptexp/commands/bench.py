"""Benchmark gptexp's models against HF transformers' at the same configs.

    python -m gptexp bench [preset=smoke|cpu|gpu|decode] [precision=[fp32,bf16]] [quantize=[int8,int4]] [...]

Training cases time forward + backward + AdamW step and report tokens/s, MFU (against the peak of the
precision in use) and peak memory; generation cases report new tokens/s (greedy) with and without the KV
cache, beside the bound of reading every weight once per token (with quantize=, gptexp's int8 and int4 weights
too); finetuning cases compare full training with LoRA (and activation checkpointing) in step time and memory. Each case runs in every precision asked
for (fp32, and bf16: autocast for training, bf16 weights for generation, for both implementations alike).
Implementations run interleaved, one repeat of each in turn, so machine noise hits both alike; numbers are
medians after warm-up. Writes bench.csv (one row per implementation x precision x case) and bench.png into
the run directory, and prints each case's gptexp / hf ratio, and bf16 decoding against HF's fp32.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import statistics
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from gptexp import finetune
from gptexp.commands.cli import answered_errors, run_command
from gptexp.core.config import CONF_DIR, ConfigError
from gptexp.core.hardware import MemoryStream, peak_flops
from gptexp.core.memory import PeakMemory, resident_bytes
from gptexp.inference import quantize as quantization
from gptexp.models import GPT2, GPT2Config, Llama, LlamaConfig

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ("gptexp", "hf")
LLAMA_CPP_PEERS = {"int8": "q8_0", "int4": "q4_0"}  # gptexp's weight format -> llama.cpp's of the same bits
SHOWN = ["kind", "case", "impl", "precision", "batch", "seq_len", "kv_cache", "method", "activation_checkpointing",
         "step_ms", "ms_per_token", "tokens_per_s", "mfu", "stream_gb_s", "bandwidth_bound_tokens_per_s", "of_bound",
         "peak_memory_mb"]


def build_model(impl: str, dims: dict, context: int, device: torch.device) -> torch.nn.Module:
    """gptexp's model or HF's (GPT2LMHeadModel, LlamaForCausalLM) with the same shape; dims["arch"]
    picks the family (gpt2 when absent)."""
    dims = dict(dims)
    arch = dims.pop("arch", "gpt2")
    with torch.device(device):  # built (and initialised) where it will run
        return _build(impl, arch, dims, context)


def _build(impl: str, arch: str, dims: dict, context: int) -> torch.nn.Module:
    if impl == "gptexp":
        if arch == "llama":
            return Llama(LlamaConfig(max_seq_len=context, **dims))
        return GPT2(GPT2Config(block_size=context, **dims))
    if impl != "hf":
        raise ConfigError(f"unknown implementation {impl!r}: choose {' or '.join(IMPLS)}")
    import transformers  # the reference; a dev dependency

    if arch == "llama":
        config = transformers.LlamaConfig(hidden_size=dims["dim"], num_hidden_layers=dims["n_layers"],
                                          num_attention_heads=dims["n_heads"],
                                          num_key_value_heads=dims.get("n_kv_heads") or dims["n_heads"],
                                          intermediate_size=dims["hidden_dim"], vocab_size=dims["vocab_size"],
                                          max_position_embeddings=context, rms_norm_eps=1e-5, bos_token_id=None,
                                          eos_token_id=None, attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(n_positions=context, n_layer=dims["n_layer"], n_head=dims["n_head"],
                                     n_embd=dims["n_embd"], vocab_size=dims["vocab_size"], resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                                     attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(config)


def flops_per_token(dims: dict, seq_len: int) -> float:
    return build_model("gptexp", dims, seq_len, torch.device("meta")).flops_per_token(seq_len)


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
    """One implementation at one training case: model (LoRA-wrapped for method=lora), AdamW over
    what trains, a fixed random batch."""

    def __init__(self, impl: str, dims: dict, batch: int, seq_len: int, cfg: DictConfig, device: torch.device,
                 precision: str, method: str = "full", activation_checkpointing: bool = False):
        torch.manual_seed(0)
        self.impl, self.device = impl, device
        self.model = build_model(impl, dims, seq_len, device)
        if activation_checkpointing:
            self.model.activation_checkpointing = True
        if method != "full":
            self.model = finetune.apply(self.model, {"method": method})
        if cfg.compile:
            self.model.compile()
        params = [p for p in self.model.parameters() if p.requires_grad]
        # torch's fused AdamW (CPU and CUDA): the default of gptexp (optim.fused=null) and of HF's Trainer
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
        tokens = torch.randint(0, dims["vocab_size"], (batch, seq_len + 1), device=device)
        self.x, self.y = tokens[:, :-1], tokens[:, 1:]
        dtype = DTYPES[precision]
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
        """Peak bytes during one step (after at least one step: the optimizer state exists): CUDA allocations,
        or the process's resident set on a CPU."""
        with PeakMemory(self.device) as memory:
            self.step()
        return memory.peak


def peak_memory(impl: str, dims: dict, batch: int, seq_len: int, cfg: DictConfig, device: torch.device,
                precision: str, method: str = "full", activation_checkpointing: bool = False,
                run: TrainRun | None = None) -> float:
    """Peak memory of a steady-state training step: weights, gradients, optimizer state and activations.
    CUDA: the allocator's peak. CPU: a process keeps resident what it once allocated, so each measurement
    runs in a fresh process, as its peak resident set above the process's size before the model."""
    if not cfg.memory:
        return float("nan")
    if device.type == "cuda":  # the allocator counts exactly in any process: reuse the run when given one
        torch.cuda.empty_cache()
        run = run or TrainRun(impl, dims, batch, seq_len, cfg, device, precision, method, activation_checkpointing)
        run.step()
        return run.peak_memory()
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_processes()) as pool:
        return pool.submit(_fresh_process_peak, impl, dims, batch, seq_len, OmegaConf.to_container(cfg), precision,
                           method, activation_checkpointing).result()


@functools.cache
def _fresh_processes():
    """Processes forked from a server that imported the libraries once and never trains: they start in
    milliseconds, and with an allocator that holds nothing from earlier measurements."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    # not gptexp.commands.bench itself: each process runs the main module again, and runpy warns about a
    # module it finds imported already
    context.set_forkserver_preload(["gptexp.models", "gptexp.finetune", "gptexp.core.memory", "transformers", "peft"])
    return context


def _fresh_process_peak(impl, dims, batch, seq_len, cfg, precision, method, activation_checkpointing) -> float:
    """Peak resident bytes of a training step above the process's own (every library imported first,
    so implementations start level)."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    torch.set_num_threads(cfg["threads"])
    baseline = resident_bytes()
    run = TrainRun(impl, dims, batch, seq_len, OmegaConf.create(cfg), torch.device("cpu"), precision, method,
                   activation_checkpointing)
    run.step()
    return run.peak_memory() - baseline


def interleaved_medians(runs: dict, cfg: DictConfig) -> dict[str, float]:
    """Median step seconds per run, taking one step of each in turn after cfg.warmup untimed rounds."""
    times = {key: [] for key in runs}
    for i in range(cfg.warmup + cfg.repeats):
        for key, run in runs.items():
            seconds = run.step()
            if i >= cfg.warmup:
                times[key].append(seconds)
    return {key: statistics.median(t) for key, t in times.items()}


def bench_training(name: str, case: DictConfig, cfg: DictConfig, device: torch.device, peaks: dict) -> list[dict]:
    dims = OmegaConf.to_container(case.model)
    rows = []
    for batch, seq_len, precision in itertools.product(case.batch, case.seq_len, cfg.precision):
        runs = {impl: TrainRun(impl, dims, batch, seq_len, cfg, device, precision) for impl in cfg.impls}
        medians = interleaved_medians(runs, cfg)
        flops = flops_per_token(dims, seq_len)
        del runs  # memory is measured with one model alive at a time
        memory = {impl: peak_memory(impl, dims, batch, seq_len, cfg, device, precision) for impl in cfg.impls}
        for impl in cfg.impls:
            tokens_per_s = batch * seq_len / medians[impl]
            rows.append(dict(kind="train", case=name, impl=impl, precision=precision, batch=batch, seq_len=seq_len,
                             **dims, step_ms=1e3 * medians[impl], tokens_per_s=tokens_per_s,
                             mfu=flops * tokens_per_s / peaks[precision], peak_memory_mb=memory[impl] / 2**20))
        log.info("%s", ratios_text(rows[-len(cfg.impls):]))
    return rows


def bench_finetuning(name: str, case: DictConfig, cfg: DictConfig, device: torch.device) -> list[dict]:
    """gptexp alone: step time and peak memory per finetuning method and activation-checkpointing setting."""
    dims = OmegaConf.to_container(case.model)
    rows = []
    for batch, seq_len, precision in itertools.product(case.batch, case.seq_len, cfg.precision):
        for method, checkpointing in itertools.product(case.methods, case.activation_checkpointing):
            run = TrainRun("gptexp", dims, batch, seq_len, cfg, device, precision, method, checkpointing)
            seconds = interleaved_medians({method: run}, cfg)[method]
            trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
            memory = peak_memory("gptexp", dims, batch, seq_len, cfg, device, precision, method, checkpointing,
                                 run=run)
            del run
            rows.append(dict(kind="finetune", case=name, impl="gptexp", precision=precision, method=method,
                             activation_checkpointing=checkpointing, batch=batch, seq_len=seq_len, **dims,
                             trainable_params=trainable, step_ms=1e3 * seconds, tokens_per_s=batch * seq_len / seconds,
                             peak_memory_mb=memory / 2**20))
            log.info("%s %s %s activation_checkpointing=%s: %.0f ms/step, peak memory %.0f MiB", name, precision,
                     method, checkpointing, rows[-1]["step_ms"], rows[-1]["peak_memory_mb"])
    return rows


def bench_generation(name: str, case: DictConfig, cfg: DictConfig, device: torch.device) -> list[dict]:
    """Greedy decoding in every format: each precision for both implementations (bf16: the float32 weights
    rounded), each of cfg.quantize for gptexp alone (its linear layers quantized, activations in
    cfg.quantize_precision), and beside gptexp's int8 / int4 at batch 1, llama.cpp on the same weights in the GGUF type
    of as many bits (cfg.llama_cpp: q8_0, q4_0). Every row's bound is the measured streaming rate over the bytes of
    weights a step reads (gptexp.inference.quantize.read_bytes_per_token; a GGUF file's tensors), and `of_bound` the
    share of it reached: the rate is measured after each round of a row's decodes, and the median taken, as the
    decodes' times are."""
    import tempfile

    dims = OmegaConf.to_container(case.model)
    rows = []
    context = case.prompt + case.new_tokens
    built = {impl: build_model(impl, dims, context, device).eval() for impl in cfg.impls}
    # every weight is read once per decoding step: on a CPU, the fastest a step can be is bytes / bandwidth
    stream = MemoryStream() if device.type == "cpu" else None
    formats = [(p, DTYPES[p], None) for p in cfg.precision]
    formats += [(scheme, DTYPES[cfg.quantize_precision], scheme) for scheme in cfg.quantize]
    files = tempfile.TemporaryDirectory()  # the GGUF files llama.cpp reads
    for label, dtype, scheme in formats:
        models = {impl: copy.deepcopy(model).to(dtype) for impl, model in built.items()
                  if scheme is None or impl == "gptexp"}
        if scheme:
            quantization.quantize(models["gptexp"], scheme, cfg.quantize_group_size)
        read_bytes = {impl: quantization.read_bytes_per_token(models.get("gptexp") or models["hf"]) for impl in models}
        labels = dict.fromkeys(models, label)
        peer = LLAMA_CPP_PEERS.get(scheme)
        if peer in cfg.llama_cpp and device.type == "cpu":
            found = llama_cpp_model(name, built["gptexp"], peer, Path(files.name), case)
            if found:
                models["llama.cpp"], read_bytes["llama.cpp"] = found
                labels["llama.cpp"] = peer
        for batch, use_cache in itertools.product(case.batch, case.kv_cache):
            running = {impl: model for impl, model in models.items()
                       if impl != "llama.cpp" or (batch, use_cache) == (1, True)}
            prompt = torch.randint(0, dims["vocab_size"], (batch, case.prompt), device=device)
            times, rates = {impl: [] for impl in running}, []
            for i in range(cfg.warmup + cfg.repeats):
                for impl, model in running.items():
                    seconds = decoding_seconds(impl, model, prompt, case.new_tokens, use_cache)
                    if i >= cfg.warmup:
                        times[impl].append(seconds)
                if i >= cfg.warmup:
                    rates.append(stream(repeats=3) if stream else float("nan"))
            bandwidth = statistics.median(rates)
            for impl in running:
                seconds = statistics.median(times[impl])
                tokens_per_s = batch * case.new_tokens / seconds
                bound = batch * bandwidth / read_bytes[impl]
                rows.append(dict(kind="generate", case=name, impl=impl, precision=labels[impl], batch=batch,
                                 seq_len=context, **dims, kv_cache=use_cache, prompt=case.prompt,
                                 new_tokens=case.new_tokens, tokens_per_s=tokens_per_s,
                                 ms_per_token=1e3 * seconds / case.new_tokens,
                                 weight_mb_per_step=read_bytes[impl] / 1e6, stream_gb_s=bandwidth / 1e9,
                                 bandwidth_bound_tokens_per_s=bound, of_bound=tokens_per_s / bound))
            log.info("%s", ratios_text(rows[-len(running):]))
        del models
    files.cleanup()
    return rows


def llama_cpp_model(name: str, model: torch.nn.Module, dtype: str, directory: Path, case: DictConfig):
    """(llama.cpp's model of `model` written as GGUF in `dtype`, the bytes a decoding step reads of it), or None with a
    line saying why: llama-cpp-python is not installed, or GGUF has no tokenizer for the model (it carries GPT-2's
    BPE: a 50,257-token GPT-2). llama.cpp runs on torch's number of threads."""
    from gptexp.data.tokenizers import gpt2_tokenizer
    from gptexp.weights import gguf

    try:
        import llama_cpp
    except ImportError:
        log.warning("no llama.cpp rows: pip install llama-cpp-python (it builds llama.cpp, minutes)")
        return None
    if not isinstance(model, GPT2) or model.config.vocab_size != gpt2_tokenizer().vocab_size:
        log.warning("no llama.cpp rows for %s: GGUF carries GPT-2's BPE tokenizer, a 50,257-token GPT-2", name)
        return None
    path = directory / f"{name}-{dtype}.gguf"
    gguf.write(model, gpt2_tokenizer(), path, dtype)
    threads = torch.get_num_threads()
    llm = llama_cpp.Llama(str(path), n_ctx=case.prompt + case.new_tokens, n_batch=case.prompt, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    import gguf as gguf_package

    read_bytes = sum(int(t.n_bytes) for t in gguf_package.GGUFReader(str(path)).tensors
                     if t.name != "token_embd.weight")  # of the token embedding, one row is read
    return llm, read_bytes


def decoding_seconds(impl: str, model, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> float:
    """Seconds to decode `new_tokens` greedy tokens after `prompt` (B, T), its prefill included."""
    if impl == "llama.cpp":  # one row, with its KV cache
        start = time.perf_counter()
        tokens = model.generate(prompt[0].tolist(), top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        for _ in zip(range(new_tokens), tokens):
            pass
        return time.perf_counter() - start
    synchronize(prompt.device)
    start = time.perf_counter()
    with torch.inference_mode():
        if impl == "gptexp":
            out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
        else:
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=use_cache,
                                 pad_token_id=0)
    synchronize(prompt.device)
    assert out.shape == (prompt.size(0), prompt.size(1) + new_tokens)
    return time.perf_counter() - start


def ratios_text(rows: list[dict]) -> str:
    import pandas as pd

    return ratios(pd.DataFrame(rows))


def ratios(table) -> str:
    """Each case's gptexp / hf tokens/s, as text lines; for decoding, gptexp's bf16 against HF's fp32 too."""
    keys = ["kind", "case", "precision", "batch", "seq_len"] + (["kv_cache"] if "kv_cache" in table else [])
    lines = []
    for key, group in table.groupby(keys, dropna=False):
        speeds = dict(zip(group["impl"], group["tokens_per_s"]))
        if {"gptexp", "hf"} <= speeds.keys():
            label = " ".join(f"{k}={v}" for k, v in zip(keys, key) if v == v)
            lines.append(f"{label}: gptexp {speeds['gptexp']:,.0f} tok/s, hf {speeds['hf']:,.0f} tok/s, "
                         f"ratio {speeds['gptexp'] / speeds['hf']:.2f}")
    decoding = table[table["kind"] == "generate"] if "kind" in table else table.iloc[:0]
    for key, group in decoding.groupby([k for k in keys if k != "precision"], dropna=False):
        label = " ".join(f"{k}={v}" for k, v in zip([k for k in keys if k != "precision"], key) if v == v)
        hf = group[(group["impl"] == "hf") & (group["precision"] == "fp32")]["tokens_per_s"]
        for row in group[group["impl"] == "gptexp"].itertuples():
            against = f" against hf fp32 {hf.iloc[0]:,.0f} tok/s, ratio {row.tokens_per_s / hf.iloc[0]:.2f};" if len(hf) else ""
            share = f" {row.of_bound:.0%} of its bandwidth bound" if row.of_bound == row.of_bound else ""
            if against or share:
                lines.append(f"{label}: gptexp {row.precision} {row.tokens_per_s:,.0f} tok/s{against}{share}")
        theirs = group[group["impl"] == "llama.cpp"]
        llama_cpp = dict(zip(theirs["precision"], theirs["tokens_per_s"]))
        for row in group[group["impl"] == "gptexp"].itertuples():
            peer = LLAMA_CPP_PEERS.get(row.precision)
            if peer in llama_cpp:
                lines.append(f"{label}: gptexp {row.precision} {row.tokens_per_s:,.1f} tok/s against llama.cpp {peer} "
                             f"{llama_cpp[peer]:,.1f} tok/s, ratio {row.tokens_per_s / llama_cpp[peer]:.2f}")
    return "\n".join(lines)


def plot(table, path: Path) -> None:
    from plotnine import aes, coord_flip, facet_wrap, geom_col, ggplot, labs, position_dodge, theme_bw

    def label(row) -> str:
        extra = {"generate": f" cache={row.get('kv_cache')}",
                 "finetune": f" {row.get('method')}{' +ckpt' if row.get('activation_checkpointing') is True else ''}"}
        return f"{row['case']} {row['precision']} B{row['batch']} T{row['seq_len']}" + extra.get(row["kind"], "")

    table = table.assign(label=table.apply(label, axis=1))
    figure = (ggplot(table, aes("label", "tokens_per_s", fill="impl")) + geom_col(position=position_dodge())
              + coord_flip() + facet_wrap("kind", scales="free", ncol=1) + labs(x="", y="tokens / s") + theme_bw())
    figure.save(path, width=8, height=2 + 0.4 * len(table), dpi=120, verbose=False, limitsize=False)


def run(cfg: DictConfig):
    import pandas as pd

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    cfg.threads = torch.get_num_threads()
    peaks = {}
    for precision in cfg.precision:  # first, on a quiet process
        peaks[precision], source = peak_flops(device, DTYPES[precision])
        log.info("%s peak %.0f GFLOP/s (%s)", precision, peaks[precision] / 1e9, source)
    rows = []
    for name, case in (cfg.preset.get("train") or {}).items():
        rows += bench_training(name, case, cfg, device, peaks)
    for name, case in (cfg.preset.get("generate") or {}).items():
        rows += bench_generation(name, case, cfg, device)
    for name, case in (cfg.preset.get("finetune") or {}).items():
        rows += bench_finetuning(name, case, cfg, device)
    table = pd.DataFrame(rows).assign(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                      compile=cfg.compile, torch=torch.__version__, threads=torch.get_num_threads())
    table = table.assign(peak_flops=table["precision"].map(peaks))
    out = Path(cfg.output_dir)
    table.to_csv(out / "bench.csv", index=False)
    plot(table, out / "bench.png")
    shown = [c for c in SHOWN if c in table and table[c].notna().any()]
    print(table[shown].to_string(index=False, float_format="%.4g", na_rep=""))
    print(ratios(table))
    return table


def check(cfg: DictConfig) -> None:
    """Bad settings, named before any work."""
    unknown = [impl for impl in cfg.impls if impl not in IMPLS]
    if unknown or not cfg.impls:
        raise ConfigError(f"impls={list(cfg.impls)}: choose from {', '.join(IMPLS)}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r}: choose auto, cpu or cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda, but torch sees no CUDA device here; use device=cpu (or auto)")
    if isinstance(cfg.precision, str):  # precision=bf16: that one alone
        cfg.precision = [cfg.precision]
    unknown = [p for p in cfg.precision if p not in DTYPES]
    if unknown or not cfg.precision:
        raise ConfigError(f"precision={list(cfg.precision)}: choose {' and/or '.join(DTYPES)}, "
                          f"e.g. precision=bf16 or precision=[fp32,bf16]")
    if isinstance(cfg.quantize, str):
        cfg.quantize = [cfg.quantize]
    for scheme in cfg.quantize:
        quantization.check(scheme, cfg.quantize_group_size)
    if isinstance(cfg.llama_cpp, str):
        cfg.llama_cpp = [cfg.llama_cpp]
    from gptexp.weights.gguf import DTYPES as GGUF_DTYPES

    unknown = [dtype for dtype in cfg.llama_cpp if dtype not in GGUF_DTYPES]
    if unknown:
        raise ConfigError(f"llama_cpp={list(cfg.llama_cpp)}: choose from {', '.join(GGUF_DTYPES)}")
    if cfg.quantize_precision not in DTYPES:
        raise ConfigError(f"quantize_precision={cfg.quantize_precision!r}: choose fp32 or bf16")
    for key, least in (("warmup", 0), ("repeats", 1)):
        if not isinstance(cfg[key], int) or cfg[key] < least:
            raise ConfigError(f"{key} must be an integer >= {least}, got {cfg[key]!r}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="bench")
def main(cfg: DictConfig) -> None:
    with answered_errors(cfg.output_dir):
        check(cfg)
        run(cfg)


if __name__ == "__main__":
    run_command(main)
