"""QLoRA and NF4 through bitsandbytes, on the CPU: a QLoRA run trains, resumes exactly and writes an adapter that
transformers + peft load onto their own NF4 base to the same logits; `sample` and `evaluate` load a base in NF4;
without bitsandbytes, asking for either is one line with the install command."""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bad_input import in_process, one_line_error

from gptexp.core.config import asset_path
from gptexp.inference import nf4
from gptexp.weights import load_source
from training import column, metrics

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
STORIES = str(asset_path("stories260K/stories260K.bin"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A random HF LLaMA (LLaMA-2's layout, stories260K's tokenizer) whose every linear layer NF4 can quantize."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    directory = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    shutil.copyfile(asset_path("stories260K/tok512.model"), directory / "tokenizer.model")
    return directory


def qlora(base: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", "model=llama2", f"model.checkpoint={base}", "finetune=lora",
               "finetune.quantize=4bit", "data=tinystories", "data.source=bundled", "data.seq_len=32",
               "data.batch_size=8", "trainer.limit_val_batches=2", "trainer.val_check_interval=4",
               "trainer.log_every_n_steps=1", "optim.lr=1e-2", "optim.warmup_steps=2", "optim.decay_steps=8",
               "trainer.precision=32-true", "logger=csv", "callbacks.samples.max_new_tokens=4", *overrides,
               f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_qlora_on_the_cpu_trains_resumes_exactly_and_its_adapter_loads_in_hf_peft(tiny_llama, tmp_path):
    whole = qlora(tiny_llama, tmp_path / "whole", "trainer.max_steps=8")
    assert "quantized 14 linear layers to nf4 (bitsandbytes, on cpu)" in whole.stdout + whole.stderr
    rows = metrics(tmp_path / "whole")
    losses = [loss for _, loss in column(rows, "val/loss")]  # before training (validate_first), after 4 and 8 steps
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]

    # stopped after 4 steps (a validation in between) and resumed: the same losses, to the last bit
    qlora(tiny_llama, tmp_path / "first", "trainer.max_steps=4")
    qlora(tiny_llama, tmp_path / "resumed", "trainer.max_steps=8", f"ckpt_path={tmp_path / 'first'}")
    assert column(metrics(tmp_path / "resumed"), "train/loss") == column(rows, "train/loss")
    assert len(column(rows, "train/loss")) == 8

    # the adapter, on transformers' own NF4 base (bitsandbytes through transformers, double quantization, bf16
    # products), gives the run's model: gptexp's NF4 base dequantized, the adapter merged in, in float32
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_llama, quantization_config=quantization, device_map="cpu")
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "whole" / "adapter").eval()
    ours = load_source(str(tmp_path / "whole"), "last").model
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ours(x)[0]
        assert (hf(x).logits - logits).abs().max() <= 1e-2 * logits.abs().max()  # measured: 3e-3 (bf16 products)
        full = transformers.LlamaForCausalLM.from_pretrained(tiny_llama).eval()
        assert (peft.PeftModel.from_pretrained(full, tmp_path / "whole" / "adapter")(x).logits - logits).abs().max() \
            > 2e-2 * logits.abs().max()  # on the unquantized base it is another model: the check above can fail


@torch.inference_mode()
def test_nf4_layers_compute_with_the_weights_they_hold():
    """Every linear layer but the head in NF4; the logits are a float model's on the dequantized weights, up to
    bf16's rounding of the products (bitsandbytes' CPU kernel where the shape allows it, else its dequantizing
    path: stories260K has both)."""
    model = load_source(STORIES).model.eval()
    quantized = nf4.quantize(load_source(STORIES).model.eval(), "cpu", "quantize=nf4")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules()) == 5 * 7
    assert type(quantized.lm_head) is torch.nn.Linear
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                assert 0 < (weight - model.get_submodule(name).weight).abs().max() < 0.3  # NF4's rounding
                model.get_submodule(name).weight.copy_(weight)
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    expected = model(x)[0]
    assert (quantized(x)[0] - expected).abs().max() <= 3e-2 * expected.abs().max()


def run(command: str, arguments: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [command, *arguments])
    runpy.run_module(f"gptexp.commands.{command}", run_name="__main__")


def test_sample_and_evaluate_load_a_base_in_nf4(tmp_path, monkeypatch):
    story = Path(asset_path("tinystories_sample.txt")).read_text()[:6000]
    (tmp_path / "story.txt").write_text(story)
    perplexity = {}
    for quantize in ("null", "nf4"):
        run("evaluate", [f"source={STORIES}", f"quantize={quantize}", f"text={tmp_path / 'story.txt'}", "logger=none",
                         f"hydra.run.dir={tmp_path / quantize}"], monkeypatch)
        perplexity[quantize] = json.loads((tmp_path / quantize / "results.json").read_text())["perplexity"]
    # measured: +20% on this text, +12% over the validation split (4-bit costs a 260K-parameter model much)
    assert perplexity["null"] < perplexity["nf4"] < 1.3 * perplexity["null"]
    run("sample", [f"source={STORIES}", "quantize=nf4", "prompt=Once upon a time", "max_new_tokens=24",
                   "temperature=0", f"hydra.run.dir={tmp_path / 's'}"], monkeypatch)
    assert json.loads((tmp_path / "s" / "samples.jsonl").read_text())["completion"].strip()


@pytest.mark.parametrize("command, arguments, option", [
    ("train.py", ["model=llama2_260k", "finetune=lora", "finetune.quantize=4bit"], "finetune.quantize=4bit"),
    ("sample", [f"source={STORIES}", "quantize=nf4"], "quantize=nf4"),
])
def test_without_bitsandbytes_it_is_one_line_with_the_install_command(command, arguments, option, tmp_path,
                                                                        monkeypatch, capfd):
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed: importing it raises ImportError
    status, stderr = in_process(command, [*arguments, "logger=csv" if command == "train.py" else "max_new_tokens=4",
                                          f"hydra.run.dir={tmp_path / 'run'}"], monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, [f"{option} needs bitsandbytes: pip install bitsandbytes"])
    assert not (tmp_path / "run").exists()
