"""The LLaMA path end to end through train.py, on the bundled pretrained stories260K."""

import csv
import json
import subprocess
import time
from pathlib import Path

from training import execute

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["model=llama2_260k", "data.seq_len=64", "data.batch_size=16", "data.eval_batch_size=256",
         "trainer.max_steps=30", "trainer.val_check_interval=15", "optim.warmup_steps=5", "logger=csv",
         "callbacks.samples.max_new_tokens=32", "callbacks.samples.prompt=Once upon a time"]


def train(*overrides: str, run_dir: Path) -> subprocess.CompletedProcess:
    return execute("train.py", *SHORT, *overrides, f"hydra.run.dir={run_dir}", timeout=600)


def val_ppl(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["val/ppl"]) for r in csv.DictReader(f) if r["val/ppl"]]


def test_lora_finetune_on_shakespeare_lowers_perplexity_and_saves_the_adapter(tmp_path):
    result = train("finetune=lora", "data=shakespeare", "optim.lr=1e-2", run_dir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ppl = val_ppl(tmp_path)  # the pretrained model first (validate_first), then after 15 and 30 steps
    assert len(ppl) == 3 and ppl[2] < ppl[1] < ppl[0]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert "Once upon a time" in (tmp_path / "samples.md").read_text()


def test_full_finetune_on_tinystories(tmp_path):
    result = train("finetune=full", "data=tinystories", run_dir=tmp_path)  # finetune=full's lr: 1e-4
    assert result.returncode == 0, result.stderr[-3000:]
    ppl = val_ppl(tmp_path)
    assert len(ppl) == 3 and ppl[2] < ppl[0] < 20  # a pretrained TinyStories model starts low
    assert not (tmp_path / "adapter").exists()


def test_llama2_without_weights_offline_stops_at_once_naming_the_fixes(tmp_path):
    start = time.perf_counter()
    result = execute("train.py", "model=llama2", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert "model.checkpoint=meta-llama/Llama-2-7b-hf" in result.stderr
    assert "model=llama2_260k" in result.stderr and "local directory" in result.stderr
    assert time.perf_counter() - start < 60  # no waiting on a network
