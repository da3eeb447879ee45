"""The README is an executable spec: its setup commands are what CI runs, its main commands run."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_test_one():
    train, test = setup_commands()
    assert train.endswith(".venv/bin/python train.py") and "constraints/cpu.txt" in train
    assert test.endswith(".venv/bin/python -m pytest -n auto") and ".[dev]" in test
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_gpt2_124m_on_bpe_shakespeare_runs(tmp_path):
    """`python train.py model=gpt2 data=shakespeare`, shortened to two steps on short windows."""
    result = subprocess.run(
        [sys.executable, "train.py", "model=gpt2", "data=shakespeare", "trainer.max_steps=2", "data.seq_len=64",
         "data.batch_size=2", "data.eval_batch_size=2", "trainer.limit_val_batches=2", "logger=csv",
         "callbacks.samples.max_new_tokens=8",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model: gpt2, 124.44M parameters; tokenizer gpt2 (50257 tokens)" in result.stdout + result.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_the_python_api_section_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's Python API block, run in a fresh directory: a GPT-2 written as HF's format and read back, and
    the bundled stories260K writing its story."""
    section = (ROOT / "README.md").read_text().split("## Python API", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README.md (Python API)", "exec"), namespace)
    written, read_back = namespace["model"].eval(), namespace["source"].model
    idx = namespace["idx"]
    assert (read_back(idx)[0] - written(idx)[0]).abs().max() <= 1e-5
    assert capsys.readouterr().out.splitlines()[-1].startswith("Once upon a time")
