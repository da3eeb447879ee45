"""CUDA paths: run on a GPU machine, skipped cleanly elsewhere (see conftest.py)."""

import copy
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptexp.models import GPT2, GPT2Config

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


def tiny_gpt2() -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_embd=64)).eval()


def test_cuda_forward_and_gradients_match_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = tiny_gpt2()
    gpu = tiny_gpt2().cuda()
    x = torch.randint(0, 97, (4, 64))
    logits, loss = cpu(x, x)
    logits_gpu, loss_gpu = gpu(x.cuda(), x.cuda())
    assert (logits_gpu.cpu() - logits).abs().max().item() <= 1e-4
    loss.backward(), loss_gpu.backward()
    for (name, p), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        assert ((p_gpu.grad.cpu() - p.grad).norm() / p.grad.norm()).item() <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_greedy_decoding_with_cache_equals_without(dtype):
    model = tiny_gpt2().cuda().to(dtype)
    prompt = torch.randint(0, 97, (3, 8), device="cuda")
    cached = model.generate(prompt, 40, temperature=0)
    uncached = model.generate(prompt, 40, temperature=0, use_cache=False)
    agree = (cached == uncached).float().mean().item()
    # float32 agrees exactly; bf16 rounding may flip a near-tie late in a sequence
    assert agree == 1.0 if dtype == torch.float32 else agree >= 0.9


def test_compiled_model_matches_eager():
    model = tiny_gpt2().cuda()
    x = torch.randint(0, 97, (4, 64), device="cuda")
    eager = model(x, x)[1]
    model.compile()
    assert torch.allclose(model(x, x)[1], eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_train_py_on_the_gpu(tmp_path, precision):
    result = subprocess.run(
        [sys.executable, "train.py", "trainer.accelerator=gpu", f"trainer.precision={precision}", "model.n_layer=2",
         "model.n_embd=64", "trainer.max_steps=100", "trainer.val_check_interval=50", "data.batch_size=32",
         "optim.lr=3e-3", "optim.warmup_steps=10", "logger=csv", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "metrics.csv") as f:
        val = [float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]]
    assert len(val) == 2 and val[1] < val[0] < 3.0


def test_qlora_trains_on_the_gpu():
    """finetune.quantize=4bit: the base in NF4 (bitsandbytes), LoRA adapters in full precision."""
    bnb = pytest.importorskip("bitsandbytes")
    from gptexp import finetune
    from gptexp.models import Llama, LlamaConfig

    torch.manual_seed(0)
    base = Llama(LlamaConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=512,
                             max_seq_len=128))
    x = torch.randint(0, 512, (4, 128))
    with torch.no_grad():
        reference = base.cuda()(x.cuda(), x.cuda())[1].item()
    model = finetune.apply(base.cpu(), {"method": "lora", "quantize": "4bit"})
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(x.cuda(), x.cuda())[1]
        loss.backward(), optimizer.step(), optimizer.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - reference) / reference < 0.05  # NF4 rounding moves the loss only a little
    assert losses[-1] < losses[0]


def test_lora_finetune_of_the_real_llama_in_bf16_on_the_gpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "model=llama2_260k", "finetune=lora", "trainer.accelerator=gpu",
         "trainer.precision=bf16-mixed", "trainer.max_steps=60", "trainer.val_check_interval=30", "data.batch_size=32",
         "data.seq_len=128", "optim.lr=1e-2", "optim.warmup_steps=5", "logger=csv", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "metrics.csv") as f:
        ppl = [float(r["val/ppl"]) for r in csv.DictReader(f) if r["val/ppl"]]
    assert len(ppl) == 3 and ppl[2] < ppl[1] < ppl[0]  # before training (finetune=lora validates first), 30, 60
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_measuring_callbacks_on_the_gpu(tmp_path):
    """CUDA-event phase times, allocator statistics and a memory snapshot for pytorch.org/memory_viz."""
    result = subprocess.run(
        [sys.executable, "train.py", "trainer.accelerator=gpu", "trainer.max_steps=40", "trainer.val_check_interval=20",
         "callbacks=all", "callbacks.memory.snapshot_at_step=15", "logger=csv", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    measured = [r for r in rows if r.get("mem/peak_allocated_mb")]
    assert measured and all(float(r["mem/allocations"]) > 10 and float(r["mem/peak_reserved_mb"]) > 0 for r in measured)
    timed = [r for r in rows if r.get("time/step_ms")]
    assert timed and all(float(r["time/forward_ms"]) > 0 and 0 < float(r["perf/mfu"]) < 1 for r in timed)
    assert (tmp_path / "memory_snapshot.pickle").stat().st_size > 1000
    assert "time per phase" in result.stdout + result.stderr


# ---- what arrived since the H100 session of 2026-11-23 (issue 30) -------------------------------------------

def _stories() -> str:
    """The bundled llama2.c stories260K."""
    from gptexp.core.config import asset_path

    return asset_path("stories260K/stories260K.bin")


def train_tiny(tmp_path, *overrides: str):
    """train.py with tests/training.py's tiny character-level GPT (its overrides first: these win)."""
    from training import train

    result = train(*overrides, run_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def val_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["val/loss"]) for r in csv.DictReader(f) if r["val/loss"]]


def test_train_py_in_bf16_mixed_clips_beside_the_fused_adamw(tmp_path):
    """Lightning's mixed-precision plugin refuses to clip for torch's fused AdamW; gptexp clips those gradients
    itself (gptexp.training.module.configure_gradient_clipping). On the GPU, through train.py."""
    output = train_tiny(tmp_path, "trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "optim.name=adamw",
                        "optim.fused=true", "trainer.gradient_clip_val=1.0", "trainer.max_steps=100",
                        "trainer.val_check_interval=50", "logger=csv")
    assert "precision: bf16-mixed (as asked)" in output and "optimizer: AdamW" in output
    assert "bf16-mixed with gradient clipping and the fused AdamW: gradients clipped by torch directly" in output
    assert f"(datasheet: {torch.cuda.get_device_name()})" in output  # MFU against this GPU's known bf16 peak
    val = val_losses(tmp_path)
    assert len(val) == 2 and all(math.isfinite(v) for v in val) and val[1] < val[0] < math.log(65)


def test_precision_auto_is_bf16_mixed_on_cuda_and_muon_trains_there(tmp_path):
    """trainer.precision=auto (the default) picks bf16-mixed on a CUDA GPU with bf16, and says why; Muon (the
    miniGPT recipe's optimizer) trains in it, its gradients clipped by Lightning's plugin (Muon is not fused)."""
    from gptexp.training import precision

    assert precision.resolve("auto", "gpu")[0] == precision.resolve("auto", "auto")[0] == "bf16-mixed"
    output = train_tiny(tmp_path, "trainer.accelerator=gpu", "trainer.precision=auto", "optim.name=muon",
                        "trainer.gradient_clip_val=1.0", "trainer.max_steps=100", "trainer.val_check_interval=50",
                        "logger=csv")
    name = torch.cuda.get_device_name()
    assert f"precision: bf16-mixed (auto: {name} supports bf16)" in output
    assert "optimizer: Muon for the hidden matrices, AdamW for the rest" in output
    val = val_losses(tmp_path)
    assert len(val) == 2 and all(math.isfinite(v) for v in val) and val[1] < val[0] < math.log(65)


def clipped_gradient_norms(accelerator: str, optimizer: str, clip: float = 0.05, steps: int = 3):
    """A few bf16-mixed steps of a tiny GPT-2 through Lightning with gradient_clip_val=clip: the total gradient
    norm before and after each clipping, and the optimizer Lightning stepped."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from gptexp.training.module import LanguageModelModule
    from gptexp.training.optim import OptimConfig

    def total_norm(optimizer) -> float:
        grads = [p.grad.float() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()

    class Recording(LanguageModelModule):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            before = total_norm(optimizer)
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            self.norms.append((before, total_norm(optimizer)))

    module = Recording(tiny_gpt2().train(), OptimConfig(name=optimizer, lr=1e-3, warmup_steps=1))
    module.norms = []
    x = torch.randint(0, 97, (4 * steps, 65))
    loader = DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=4)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision="bf16-mixed", gradient_clip_val=clip,
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    return module.norms, trainer.optimizers[0]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bf16_mixed_gradients_are_clipped_on_the_gpu(optimizer):
    from gptexp.training.optim import MuonWithAdamW

    norms, stepped = clipped_gradient_norms("gpu", optimizer)
    assert len(norms) == 3
    assert all(before > 0.05 and after <= 0.05 * (1 + 1e-3) for before, after in norms), norms
    adamw = stepped.adamw if optimizer == "muon" else stepped
    assert isinstance(stepped, MuonWithAdamW if optimizer == "muon" else torch.optim.AdamW)
    assert adamw.defaults["fused"] is True  # the fused kernel on CUDA (optim.fused=null)


def command(name: str, *args: str, out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "gptexp", name, *args, f"hydra.run.dir={out}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_hf_gpt2(tmp_path_factory) -> Path:
    """A random GPT-2 (GPT-2's BPE vocabulary, 2 layers, context 64) saved in HF's format."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.2)
    path = tmp_path_factory.mktemp("hf_gpt2") / "hf"
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(path)
    return path


def source_of(name: str, tiny_hf_gpt2: Path) -> str:
    return _stories() if name == "stories260K" else str(tiny_hf_gpt2)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", ["stories260K", "gpt2"])
def test_sample_on_cuda_writes_the_cpus_greedy_text(name, tiny_hf_gpt2, tmp_path):
    """python -m gptexp sample, greedy, float32 weights: the same text on the GPU as on the CPU (and, for
    stories260K from BOS, llama2.c's own expected text)."""
    args = [f"source={source_of(name, tiny_hf_gpt2)}", "temperature=0", "ignore_eos=true", "precision=fp32"]
    args += ["prompt=''", "max_new_tokens=200"] if name == "stories260K" else ["prompt='To be, or not'",
                                                                               "max_new_tokens=48"]
    cuda, cpu = (command("sample", *args, f"device={d}", out=tmp_path / d) for d in ("cuda", "cpu"))
    assert "fp32 on cuda" in cuda.stderr and "fp32 on cpu" in cpu.stderr
    assert cuda.stdout == cpu.stdout and len(cuda.stdout) > 20
    assert jsonl(tmp_path / "cuda" / "samples.jsonl") == jsonl(tmp_path / "cpu" / "samples.jsonl")
    if name == "stories260K":
        from test_llama_real import LLAMA2C_EXPECTED

        assert cuda.stdout == LLAMA2C_EXPECTED + "\n"


def test_a_file_of_prompts_decodes_as_one_padded_batch_on_cuda_as_on_the_cpu(tmp_path):
    prompts = ["Once upon a time", "The cat", "Once upon a dog", "A big red ball"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    args = [f"source={_stories()}", f"prompts={tmp_path / 'prompts.txt'}", "temperature=0", "max_new_tokens=40"]
    cuda, cpu = (command("sample", *args, f"device={d}", out=tmp_path / d) for d in ("cuda", "cpu"))
    assert "[4 x 4-8 prompt tokens" in cuda.stderr  # one left-padded batch
    assert cuda.stdout == cpu.stdout
    assert jsonl(tmp_path / "cuda" / "samples.jsonl") == jsonl(tmp_path / "cpu" / "samples.jsonl")


@pytest.mark.parametrize("name", ["stories260K", "gpt2"])
def test_evaluate_on_cuda_gives_the_cpus_perplexity(name, tiny_hf_gpt2, tmp_path):
    """python -m gptexp evaluate (loss by chunks, token-weighted): float32 on the GPU within 1e-3 of the CPU."""
    if name == "stories260K":
        args = [f"source={_stories()}", "data=tinystories", "data.source=bundled"]
    else:
        text = (ROOT / "src/gptexp/assets/tinyshakespeare.txt").read_text()[:20000]
        (tmp_path / "text.txt").write_text(text)
        args = [f"source={tiny_hf_gpt2}", f"text={tmp_path / 'text.txt'}", "stride=48"]
    for device in ("cuda", "cpu"):
        command("evaluate", *args, f"device={device}", "precision=fp32", "logger=none", out=tmp_path / device)
    cuda, cpu = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cuda", "cpu"))
    assert cuda["tokens"] == cpu["tokens"] > 1000
    for key in ("nats_per_token", "perplexity"):
        assert abs(cuda[key] - cpu[key]) <= 1e-3 * abs(cpu[key]), (key, cuda[key], cpu[key])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompts_of_different_lengths_decode_in_one_padded_batch_on_cuda(arch, dtype):
    """Left-padded rows on the GPU write what each prompt writes alone (float32: exactly; bf16: rounding may
    flip a near-tie late in a row, as for the cache, above)."""
    from gptexp.inference.generation import decode
    from gptexp.models import Llama, LlamaConfig

    torch.manual_seed(0)
    model = (GPT2(GPT2Config(block_size=48, vocab_size=97, n_layer=2, n_head=2, n_embd=32)) if arch == "gpt2" else
             Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=97,
                               max_seq_len=48))).eval().cuda().to(dtype)
    prompts = [torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9, 6, 1)]
    width = max(map(len, prompts))
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    pad = torch.tensor([width - len(p) for p in prompts])
    batched = torch.cat(list(decode(model, idx, 16, temperature=0, pad=pad)), dim=1)
    assert batched.device.type == "cuda"
    agree = []
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt], device="cuda"), 16, temperature=0)[0, len(prompt):]
        agree.append((batched[row] == alone).float().mean().item())
    assert all(a == 1.0 for a in agree) if dtype == torch.float32 else sum(agree) / len(agree) >= 0.9, agree


def test_hf_shards_are_read_by_gpu_processes_as_by_the_cpu(tmp_path):
    """data=hf: local Parquet tokenized into llm.c shards, then read by two GPU processes (DDP) where the machine
    has two GPUs, else one; in float32 the losses follow a CPU process reading the same global batches."""
    from test_hf_data import SCALED_DOWN, parquet_files

    from training import column, metrics

    parquet_files(tmp_path / "parquet")
    devices = min(2, torch.cuda.device_count())
    common = [*SCALED_DOWN, f"data.files={tmp_path / 'parquet' / '*.parquet'}", "data.num_proc=2",
              f"data.cache_dir={tmp_path / 'cache'}", "trainer.precision=32-true", "trainer.max_steps=8"]
    runs = {"gpu": ["trainer.accelerator=gpu", f"trainer.devices={devices}", f"data.batch_size={8 // devices}",
                    "trainer.strategy=" + ("ddp" if devices > 1 else "auto")],
            "cpu": ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto", "data.batch_size=8"]}
    outputs = {}
    for name, overrides in runs.items():
        result = subprocess.run([sys.executable, "train.py", *common, *overrides, f"hydra.run.dir={tmp_path / name}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=600,
                                env=os.environ | {"PYTHONWARNINGS": "ignore"})
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = result.stdout + result.stderr
    assert f"{8 // devices} windows x 64 tokens x {devices} processes x 2 accumulated" in outputs["gpu"]
    assert "prepared" not in outputs["cpu"]  # the CPU run read the shards the GPU run made
    gpu, cpu = (dict(column(metrics(tmp_path / n), "train/loss")) for n in ("gpu", "cpu"))
    assert sorted(gpu) == sorted(cpu) == list(range(8))
    assert all(abs(gpu[s] - cpu[s]) <= 1e-3 for s in gpu), (gpu, cpu)
    val_gpu, val_cpu = (dict(column(metrics(tmp_path / n), "val/loss")) for n in ("gpu", "cpu"))
    assert sorted(val_gpu) == sorted(val_cpu) == [3, 7]  # after steps 4 and 8
    assert all(abs(val_gpu[s] - val_cpu[s]) <= 1e-3 for s in val_gpu), (val_gpu, val_cpu)


def test_train_py_compiled_validates_by_chunks_as_eager_does(tmp_path):
    """model.compile=true through train.py (the GPT-2 124M recipe's setting): training, validation's loss by chunks
    (return_logits=False) and sampling run compiled; in float32 the losses follow an eager run's."""
    common = ["trainer.accelerator=gpu", "trainer.precision=32-true", "trainer.max_steps=40",
              "trainer.val_check_interval=20", "callbacks.samples.max_new_tokens=8", "logger=csv"]
    train_tiny(tmp_path / "eager", *common)
    train_tiny(tmp_path / "compiled", *common, "model.compile=true")
    eager, compiled = val_losses(tmp_path / "eager"), val_losses(tmp_path / "compiled")
    assert len(compiled) == 2 and all(math.isfinite(v) for v in compiled) and compiled[1] < compiled[0]
    assert all(abs(a - b) <= 0.02 for a, b in zip(eager, compiled)), (eager, compiled)
    assert (tmp_path / "compiled" / "samples.md").read_text().count("## after") >= 2


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_models_decode_on_cuda_as_their_dequantized_weights_do(scheme):
    """ATen's CUDA kernels (int8: _weight_int8pack_mm; int4: tinygemm's _weight_int4pack_mm, bf16) against the
    float model holding the dequantized weights, and the CPU's greedy tokens."""
    from gptexp.inference.quantize import QuantizedLinear, quantize

    model = quantize(tiny_gpt2(), scheme, 32)
    cuda = copy.deepcopy(model).cuda().to(torch.bfloat16)
    reference = tiny_gpt2()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                reference.get_submodule(name).weight.copy_(module.dequantized())
    x = torch.randint(0, 97, (2, 20))
    logits = cuda(x.cuda())[0].float().cpu()
    assert (logits - reference(x)[0]).abs().max().item() < 0.05  # bf16 activations
    prompt = torch.randint(0, 97, (1, 5))
    assert (cuda.generate(prompt.cuda(), 20, temperature=0).cpu() == model.generate(prompt, 20, temperature=0)).float().mean() > 0.8
