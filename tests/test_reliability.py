"""Nothing is lost: exact resume after SIGKILL, SIGTERM stops with a checkpoint, atomic checkpoint
writes, non-finite losses, determinism and DDP. Runs go through train.py in subprocesses, as a user's."""

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from gptexp import data
from gptexp.training.callbacks import ResumePoint, ResumeState
from gptexp.training.checkpoint_io import AtomicCheckpointIO
from gptexp.training.module import LanguageModelModule, NonFiniteLossError
from gptexp.training.optim import OptimConfig
from gptexp.weights import checkpoints, pretrained
from training import checkpoint_at_least, column, launch, metrics, saved_step, train, wait_for

# long enough to be killed between two checkpoints; dropout makes the torch RNG state matter
LONG = ["trainer.max_steps=150", "optim.decay_steps=150", "trainer.val_check_interval=75", "trainer.log_every_n_steps=1",
        "model.dropout=0.1", "callbacks.resume_point.every_n_steps=20", "callbacks.samples.at_steps=[10]"]
# full training, LoRA, Muon and bf16-mixed each resume exactly
VARIANTS = {"full": [], "lora": ["finetune=lora", "finetune.r=4"], "muon": ["optim.name=muon"],
            "bf16-mixed": ["trainer.precision=bf16-mixed"]}


def losses(run_dir: Path) -> dict[int, float]:
    return dict(column(metrics(run_dir), "train/loss"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_run_killed_at_any_step_resumes_exactly(variant, tmp_path):
    """SIGKILL between two checkpoints, then a resume into a new directory: its metrics.csv holds every step
    once (the old run's up to the checkpoint, copied in, then its own), with the uninterrupted run's losses
    (1e-6), and the wandb run goes on under the same id."""
    args = [*LONG, *VARIANTS[variant]]
    reference = train(*args, "logger=csv", run_dir=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = launch(*args, run_dir=tmp_path / "killed")
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    wait_for(checkpoint_at_least(last, 40), killed)
    time.sleep(0.15)  # some steps after that checkpoint, at no particular step
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    start = saved_step(last)
    assert 40 <= start < 150

    before = {p.name: p.read_bytes() for p in (tmp_path / "killed").iterdir() if p.is_file()}
    resumed = train(*args, f"ckpt_path={tmp_path / 'killed'}", run_dir=tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in (tmp_path / "killed").iterdir() if p.is_file()} == before
    assert "## after 10 steps" in (tmp_path / "resumed" / "samples.md").read_text()  # copied over
    expected, got = losses(tmp_path / "reference"), losses(tmp_path / "resumed")
    steps = [step for step, _ in column(metrics(tmp_path / "resumed"), "train/loss")]
    assert steps == list(range(150))  # every step once, in order: copied up to the checkpoint, then trained here
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-6), step
    if variant == "full":
        ids = [{p.name.rsplit("-", 1)[1] for p in (tmp_path / run / "wandb").glob("offline-run-*")}
               for run in ("killed", "resumed")]
        assert len(ids[0]) == 1 and ids[0] == ids[1]


def test_sigterm_stops_with_a_checkpoint_that_resumes(tmp_path):
    run = launch(*LONG, "trainer.max_steps=100000", "logger=csv", run_dir=tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    wait_for(last.exists, run)
    time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM after step" in stdout + stderr and "Traceback" not in stderr
    step = saved_step(last)
    assert step > 20 and step % 20 != 0  # written at the stop, not by the periodic save
    # the same command again (as a requeued SLURM job runs it): it resumes from its directory's checkpoint
    resumed = train(*LONG, f"trainer.max_steps={step + 5}", "logger=csv", run_dir=tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "=== resumed at step" in resumed.stdout + resumed.stderr
    assert saved_step(last) == step + 5


def test_last_ckpt_is_the_last_validation_even_when_it_is_not_the_best(tmp_path):
    """best.ckpt holds the best validation, last.ckpt the last one, whichever is better (Lightning 2.6's own
    ModelCheckpoint writes last.ckpt only beside a new best)."""
    # val/loss falls as the model trains: under mode=max the first validation stays the best
    run = train("best.metric=val/loss", "best.mode=max", "logger=csv", run_dir=tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    assert [step for step, _ in column(metrics(tmp_path / "run"), "val/loss")] == [19, 39]
    assert saved_step(tmp_path / "run" / "checkpoints" / "best.ckpt") == 20
    assert saved_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 40
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"]
    assert any(key.startswith("ModelCheckpoint{") for key in state)  # the key of runs written before the fix


def test_a_kill_during_a_save_leaves_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    checkpoints.save_atomically({"version": "good", "w": torch.ones(3)}, path)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch; from gptexp.weights.checkpoints import save_atomically; "
        "save_atomically({'version': 'new', 'w': torch.zeros(150_000_000)}, sys.argv[1])"), str(path)])
    wait_for(lambda: any(tmp_path.glob(".last.ckpt.*.tmp")), writer)
    writer.send_signal(signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL
    assert checkpoints.load(path)["version"] == "good"


def test_a_truncated_checkpoint_is_refused_before_any_work(run_dir, tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes()[:-1000])
    result = train(f"ckpt_path={broken}", run_dir=tmp_path / "run")
    assert result.returncode == 2
    assert f"error: {broken} is truncated or not a checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


class InjectInfinity(L.Callback):
    """Makes the loss of step `at` infinite (an infinite output-layer row) and repairs it afterwards."""

    def __init__(self, at: int):
        self.at, self.saved = at, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step + 1 == self.at:
            self.saved = module.model.lm_head.weight[0].clone()
            with torch.no_grad():
                module.model.lm_head.weight[0] = math.inf

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.saved is not None:
            with torch.no_grad():
                module.model.lm_head.weight[0] = self.saved
            self.saved = None


def nonfinite_run(tmp_path, action: str) -> tuple[LanguageModelModule, L.Trainer]:
    source = data.load({"name": "shakespeare", "tokenizer": "char", "batch_size": 4, "cache_dir": str(tmp_path)}, "char")
    model = pretrained.build({"arch": "gpt2", "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 16},
                         source.tokenizer.vocab_size)
    module = LanguageModelModule(model, OptimConfig(warmup_steps=2), on_nonfinite_loss=action)
    trainer = L.Trainer(max_steps=12, logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, log_every_n_steps=1,
                        callbacks=[InjectInfinity(at=8), ResumeState(),
                                   ResumePoint(str(tmp_path / "last.ckpt"), every_n_steps=5)],
                        plugins=[AtomicCheckpointIO()])
    trainer.fit(module, datamodule=data.build(source, context_length=16))
    return module, trainer


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match="the training loss is nan at step 8; the run stopped"):
        nonfinite_run(tmp_path, "stop")
    good = checkpoints.load(tmp_path / "last.ckpt")
    assert good["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())


def test_a_nonfinite_loss_can_skip_the_step(tmp_path):
    module, trainer = nonfinite_run(tmp_path, "skip")
    assert module.skipped_steps == 1 and trainer.global_step == 12
    assert all(torch.isfinite(p).all() for p in module.parameters())
    rows = metrics(Path(trainer.logger.log_dir))
    skipped = column(rows, "train/skipped_steps")
    assert skipped[0] == (7, 1.0) and {count for _, count in skipped} == {1.0}  # from the skipped step on
    assert all(math.isfinite(loss) for _, loss in column(rows, "train/loss"))


def test_the_same_seed_gives_the_same_curve(run_dir, tmp_path):
    again = train(run_dir=tmp_path / "again")
    assert again.returncode == 0, again.stderr[-3000:]
    for name in ("train/loss", "val/loss"):
        assert column(metrics(tmp_path / "again"), name) == column(metrics(run_dir), name)


DDP = ["trainer.accelerator=cpu", "trainer.log_every_n_steps=1", "trainer.max_steps=12",
       "trainer.val_check_interval=12", "logger=csv"]


def test_ddp_on_two_processes_matches_one_process_with_the_global_batch(tmp_path):
    """A Hydra multirun of two DDP jobs (2 CPU processes x batch 4 each): one directory per job, and the
    job with lr 1e-3 follows the loss curve of one process with batch 8."""
    one = train(*DDP, "data.batch_size=8", "optim.lr=1e-3", run_dir=tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    sweep = train(*DDP, "data.batch_size=4", "trainer.strategy=ddp", "trainer.devices=2", "optim.lr=1e-3,2e-3",
                  run_dir=tmp_path / "sweep", multirun=True)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0", "1"], jobs
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "sweep" / "0")
    assert sorted(got) == list(range(12))
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), step
    (val_one,), (val_two,) = (column(metrics(d), "val/loss") for d in (tmp_path / "one", tmp_path / "sweep" / "0"))
    assert val_two[1] == pytest.approx(val_one[1], abs=1e-5)
    assert sorted(losses(tmp_path / "sweep" / "1")) == list(range(12))
    assert losses(tmp_path / "sweep" / "1") != got
