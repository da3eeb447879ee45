"""One run per directory: a second run on a busy directory stops at once naming the holder; a lock left by
a killed run is taken over with a line saying so; the other ranks of a distributed run are not locked out
(the DDP multirun of test_reliability runs two processes in each job's directory)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gptexp.core.run_lock import DirectoryInUse, RunLock, secondary_rank
from training import checkpoint_at_least, launch, saved_step, train, wait_for


def test_a_held_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = RunLock(tmp_path / "run")
    assert first.acquire() is None
    with pytest.raises(DirectoryInUse, match=rf"in use by another run, pid {os.getpid()} on host {socket.gethostname()}"):
        RunLock(tmp_path / "run").acquire()  # a second open file: flock refuses it even in this process
    first.release()
    assert not (tmp_path / "run" / ".lock").exists()
    again = RunLock(tmp_path / "run")
    assert again.acquire() is None  # released: free again
    again.release()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0.0,
                                                "command": "train.py seed=1"}))
    lock = RunLock(tmp_path)
    message = lock.acquire()
    assert message.startswith(f"took over {tmp_path} from pid {dead.pid} on host {socket.gethostname()}")
    assert "train.py seed=1" in message and "ended without releasing it" in message
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.parametrize("variable, value, secondary", [("LOCAL_RANK", "1", True), ("LOCAL_RANK", "0", False),
                                                        ("NODE_RANK", "2", True), ("RANK", "3", True),
                                                        ("SLURM_PROCID", "1", True), ("SLURM_PROCID", "0", False)])
def test_only_rank_zero_locks(variable, value, secondary, monkeypatch):
    for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    assert secondary_rank() == secondary


def test_a_second_run_on_a_busy_directory_stops_at_once_and_a_killed_one_is_taken_over(tmp_path):
    run = tmp_path / "run"
    args = ["trainer.max_steps=100000", "callbacks.resume_point.every_n_steps=20", "logger=csv"]
    first = launch(*args, run_dir=run)
    wait_for(checkpoint_at_least(run / "checkpoints" / "last.ckpt", 20), first)
    config = (run / ".hydra" / "config.yaml").read_bytes()
    start = time.time()
    second = train(*args, run_dir=run)
    assert second.returncode == 2 and time.time() - start < 60
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"error: {run} is in use by another run, pid {first.pid} on host {socket.gethostname()} "
                           f"(started ")
    assert f"{' '.join(first.args[1:])}); wait for it to end or stop it" in line
    assert line.endswith("or give this run a directory of its own with hydra.run.dir=<directory>")
    assert (run / ".hydra" / "config.yaml").read_bytes() == config  # the holder's directory untouched
    assert first.poll() is None  # and the holder still training

    first.send_signal(signal.SIGKILL)
    first.wait()
    third = train(*args, f"trainer.max_steps={saved_step(run / 'checkpoints' / 'last.ckpt') + 10}", run_dir=run)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over {run} from pid {first.pid} on host {socket.gethostname()}" in third.stdout
    assert "=== resumed at step" in third.stdout
    assert f"took over {run}" in (run / "train.log").read_text()
    assert not (run / ".lock").exists()  # released at the end
