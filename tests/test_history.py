"""A run's history survives every kind of stop: one directory, stopped by SIGTERM, Ctrl-C and SIGKILL and
extended after it finished, ends with the metrics.csv, samples.md and checkpoint of a run never stopped."""

import signal
import sys

import torch

from training import ROOT, checkpoint_at_least, column, history, launch, metrics, saved_step, train, wait_for

# a fixed schedule (decay_steps), so that a run of 600 steps extended to 1200 is the 1200-step run;
# dropout makes the RNG state matter
ARGS = ["trainer.max_steps=1200", "optim.decay_steps=1200", "trainer.val_check_interval=300",
        "trainer.log_every_n_steps=5", "model.dropout=0.1", "callbacks.resume_point.every_n_steps=20",
        "callbacks.samples.at_steps=[10,650]"]


def stop(signum: int, after_step: int, run_dir) -> int:
    """Start the run in `run_dir`, send `signum` once it has passed `after_step`; its exit status."""
    run = launch(*ARGS, run_dir=run_dir)
    wait_for(checkpoint_at_least(run_dir / "checkpoints" / "last.ckpt", after_step), run)
    run.send_signal(signum)
    run.communicate(timeout=120)
    return run.returncode


def test_history_survives_stops_kills_and_extensions(tmp_path):
    reference = train(*ARGS, run_dir=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "run"
    finished = train(*ARGS, "trainer.max_steps=600", run_dir=run)  # a finished run, extended below
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert stop(signal.SIGTERM, 700, run) == 128 + signal.SIGTERM
    assert stop(signal.SIGINT, 800, run) == 128 + signal.SIGINT
    assert stop(signal.SIGKILL, 900, run) == -signal.SIGKILL
    assert 900 <= saved_step(run / "checkpoints" / "last.ckpt") < 1200
    last = train(*ARGS, run_dir=run)
    assert last.returncode == 0, last.stderr[-3000:]

    assert history(run) == history(tmp_path / "reference")  # every row once, in order, with the same values
    assert [step for step, _ in column(metrics(run), "train/loss")] == list(range(4, 1200, 5))
    assert (run / "samples.md").read_text() == (tmp_path / "reference" / "samples.md").read_text()
    log = (run / "train.log").read_text()
    assert log.count("model: gpt2,") == 5 and log.count("=== resumed at step") == 4  # every process's lines
    ids = {folder.name.rsplit("-", 1)[1] for folder in (run / "wandb").glob("offline-run-*")}
    assert len(list((run / "wandb").glob("offline-run-*"))) == 5 and len(ids) == 1  # one wandb run throughout
    weights = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
               for d in (run, tmp_path / "reference")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
    assert not (run / ".lock").exists()

    sys.path.insert(0, str(ROOT / "analysis"))
    from report import report
    from runs import load

    (loaded,) = load(run)
    steps = loaded.metrics[["steps", "train/loss"]].dropna()["steps"]
    assert steps.is_monotonic_increasing and steps.is_unique  # one curve, each step once
    summary = (report(run) / "summary.md").read_text()
    assert "| 1200 |" in summary and (run / "report" / "loss.png").is_file()


def test_a_run_killed_before_its_first_checkpoint_starts_its_history_again(tmp_path):
    """Steps redone replace their first record: killed before any checkpoint, the run starts over, and the
    rows of its first attempt go. (Killed after a checkpoint, the rows after it go: the test above.)"""
    run = tmp_path / "run"
    args = [*ARGS, "trainer.max_steps=200", "callbacks.resume_point.every_n_steps=1000", "logger=csv"]
    killed = launch(*args, run_dir=run)
    wait_for(lambda: (run / "metrics.csv").exists() and len(metrics(run)) > 10, killed)  # no checkpoint yet
    killed.kill()
    killed.wait()
    assert not (run / "checkpoints" / "last.ckpt").exists()
    again = train(*args, run_dir=run)
    assert again.returncode == 0, again.stderr[-3000:]
    reference = train(*args, run_dir=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert history(run) == history(tmp_path / "reference")
