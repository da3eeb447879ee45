"""CUDA paths: run on a GPU machine, skipped cleanly elsewhere (see conftest.py)."""

import csv
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
