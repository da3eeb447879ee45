"""Chaos: a run killed with SIGKILL at 20 random moments (a third of them aimed at checkpoint writes) and
restarted with the same command each time ends with the weights, metrics.csv and samples.md of a run never
stopped."""

import os
import random
import signal
import time

import torch

from training import history, launch, train

ARGS = ["trainer.max_steps=1500", "optim.decay_steps=1500", "trainer.val_check_interval=250",
        "trainer.log_every_n_steps=5", "model.dropout=0.1", "callbacks.resume_point.every_n_steps=10",
        "callbacks.samples.at_steps=[15,600]", "data.batch_size=8", "logger=csv"]
KILLS = 20


def partial_writes(checkpoints) -> list[str]:
    return [name for name in os.listdir(checkpoints) if name.endswith(".tmp")] if checkpoints.is_dir() else []


def test_twenty_kills_change_nothing(tmp_path):
    reference = train(*ARGS, run_dir=tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    run, rng = tmp_path / "run", random.Random(0)
    checkpoints, last = run / "checkpoints", run / "checkpoints" / "last.ckpt"
    mid_write = 0
    for kill in range(KILLS):
        before = last.stat().st_mtime_ns if last.exists() else 0
        process = launch(*ARGS, run_dir=run)
        aim_at_a_write = kill % 3 == 0
        while process.poll() is None:
            if aim_at_a_write:
                if partial_writes(checkpoints):
                    break  # a checkpoint is being written: kill now
                time.sleep(0.0002)  # a write takes milliseconds; leave the other worker its core
            elif last.exists() and last.stat().st_mtime_ns > before:
                time.sleep(rng.uniform(0, 0.3))  # a random moment after some progress
                break
            else:
                time.sleep(0.005)
        assert process.poll() is None, f"kill {kill}: the run ended first\n{process.communicate()[1][-3000:]}"
        process.send_signal(signal.SIGKILL)
        process.wait()
        mid_write += bool(partial_writes(checkpoints))
    assert mid_write >= 3  # killed while a checkpoint was half written, several times
    final = train(*ARGS, run_dir=run)
    assert final.returncode == 0, final.stderr[-3000:]

    assert history(run) == history(tmp_path / "reference")
    assert (run / "samples.md").read_text() == (tmp_path / "reference" / "samples.md").read_text()
    got, expected = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
                     for d in (run, tmp_path / "reference"))
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6
    assert not partial_writes(checkpoints)  # the killed writers' temporary files are cleaned up
