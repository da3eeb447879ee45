"""train.py end to end, in subprocesses: the real Hydra app, Lightning Trainer, CSV and offline wandb."""

import math

import pytest

from training import column, metrics, train


def test_training_lowers_val_loss(run_dir):
    val = column(metrics(run_dir), "val/loss")
    assert [step for step, _ in val] == [19, 39]  # every 20 steps, and the run ends validated
    assert val[-1][1] < val[0][1] < math.log(65)
    for (_, loss), (_, ppl) in zip(val, column(metrics(run_dir), "val/ppl")):
        assert ppl == pytest.approx(math.exp(loss), rel=1e-5)
    assert len(column(metrics(run_dir), "train/loss")) == 4 and column(metrics(run_dir), "train/lr")


def test_run_directory_holds_config_checkpoints_samples_and_wandb(run_dir):
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    assert not (run_dir / ".lock").exists()  # the run released its directory
    samples = (run_dir / "samples.md").read_text()
    assert "## after 20 steps" in samples and "## after 40 steps" in samples
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1
    (record,) = wandb_runs[0].glob("run-*.wandb")  # the offline run: config, metrics and the samples table
    content = record.read_bytes()
    assert b"n_layer" in content and b"val/loss" in content and b"samples" in content


def test_multirun_puts_every_job_in_one_sweep_directory(sweep_dir):
    assert (sweep_dir / "multirun.yaml").is_file()
    for job in ("0", "1"):
        assert column(metrics(sweep_dir / job), "val/loss")


def test_starts_from_pretrained_weights(tmp_path):
    """model.pretrained=<HF directory>: the model takes the checkpoint's architecture and weights."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=48, n_layer=2, n_head=3)
    hf = transformers.GPT2LMHeadModel(config)
    hf.save_pretrained(tmp_path / "hf")
    result = train("model=gpt2", "data=shakespeare", f"model.pretrained={tmp_path / 'hf'}", "data.seq_len=32",
                   "data.eval_batch_size=16", "trainer.max_steps=4", "trainer.limit_val_batches=2", "logger=csv",
                   run_dir=tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    n_params = sum(p.numel() for p in hf.parameters())  # not TINY's 1 layer x 32 wide
    assert f"model: gpt2, {n_params / 1e6:.2f}M parameters" in result.stdout + result.stderr
