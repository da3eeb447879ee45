"""Faults while a run writes (a full disk, a read-only or vanished directory, an I/O error on a
checkpoint, metrics.csv or samples.md): one line naming the file, the cause and the last intact
checkpoint; a non-zero exit status; the previous checkpoint still loads."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from training import ROOT, TINY, checkpoint_at_least, launch, wait_for

LONG = ["trainer.max_steps=100000", "trainer.val_check_interval=500", "callbacks.resume_point.every_n_steps=50",
        "trainer.log_every_n_steps=5", "logger=csv"]
FAULT = re.compile(r"error: cannot write (\S+): (.+); the last intact checkpoint is step (\d+), (\S+): once the "
                   r"cause is fixed, the same command resumes from it")


def mount_namespace() -> list[str]:
    """A prefix running a command in a private mount namespace (as root, or in a user namespace)."""
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        if shutil.which(prefix[0]) and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    pytest.skip("no private mount namespace here (unshare -m and unshare -rm both refused)")


def fault_line(stderr: str) -> re.Match:
    assert "Traceback" not in stderr, stderr[-3000:]
    match = FAULT.fullmatch(stderr.strip().splitlines()[-1])
    assert match, stderr[-3000:]
    return match


def test_a_disk_that_fills_mid_run(tmp_path):
    """The run directory on a 4 MiB tmpfs of its own; once the first checkpoint is written, the disk is
    filled under the running process."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    command = " ".join([sys.executable, "train.py", *TINY, *LONG, f"hydra.run.dir={disk / 'run'}"])
    script = textwrap.dedent(f"""
        mount -t tmpfs -o size=4m none {disk}
        {command} > {out}/stdout 2> {out}/stderr &
        pid=$!
        while [ ! -f {disk}/run/checkpoints/last.ckpt ] && kill -0 $pid 2>/dev/null; do sleep 0.05; done
        sleep 0.3
        dd if=/dev/zero of={disk}/filler bs=4096 2>/dev/null
        wait $pid
        echo $? > {out}/status
        rm {disk}/filler
        cp -r {disk}/run {out}/run
    """)
    subprocess.run([*mount_namespace(), "bash", "-c", script], cwd=ROOT, timeout=300,
                   env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert (out / "status").read_text().strip() == "1", (out / "stderr").read_text()[-3000:]
    written, reason, step, checkpoint = fault_line((out / "stderr").read_text()).groups()
    assert written.startswith(f"{disk}/run/") and reason == "No space left on device"
    assert checkpoint.startswith(f"{disk}/run/checkpoints/")
    kept = torch.load(out / "run" / "checkpoints" / os.path.basename(checkpoint), weights_only=False)
    assert kept["global_step"] == int(step) > 0


def test_a_run_directory_made_read_only_mid_run(tmp_path):
    """chmod a-w on the run directory while it trains (root runs train.py without its capabilities, so that
    permissions bind it as they bind any user)."""
    run_dir = tmp_path / "run"
    without_privileges = ["setpriv", "--bounding-set=-all"] if os.geteuid() == 0 else []
    run = subprocess.Popen([*without_privileges, sys.executable, "train.py", *TINY, *LONG, f"hydra.run.dir={run_dir}"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=os.environ | {"PYTHONWARNINGS": "ignore"})
    wait_for(checkpoint_at_least(run_dir / "checkpoints" / "last.ckpt", 50), run)
    for directory in (run_dir, run_dir / "checkpoints"):
        directory.chmod(0o555)
    try:
        _, stderr = run.communicate(timeout=120)
    finally:
        for directory in (run_dir, run_dir / "checkpoints"):
            directory.chmod(0o755)
    assert run.returncode == 1
    written, reason, step, checkpoint = fault_line(stderr).groups()
    assert written in (f"{run_dir}/metrics.csv", f"{run_dir}/samples.md", f"{run_dir}/checkpoints/last.ckpt")
    assert reason == "Permission denied"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == int(step) >= 50


def test_a_run_directory_deleted_mid_run(tmp_path):
    run_dir = tmp_path / "run"
    run = launch(*LONG, run_dir=run_dir)
    wait_for(checkpoint_at_least(run_dir / "checkpoints" / "last.ckpt", 50), run)
    while run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: cannot write {run_dir}/\S+: its directory {run_dir}\S* does not exist; no "
                        rf"checkpoint of this run is left to resume from", line), line


WRITES = """
import json, resource, sys, torch
from pathlib import Path
from gptexp.weights.checkpoints import load, save_atomically
from gptexp.training.callbacks.samples import TextSamples
from gptexp.training.loggers import MetricsFile, read_metrics
from gptexp.core.writing import WriteError

out, errors = Path(sys.argv[1]), {}
save_atomically({"w": torch.ones(10)}, out / "last.ckpt")
metrics = MetricsFile(str(out))
metrics.log_metrics({"train/loss": 1.0}, step=0)
metrics.save()
samples = TextSamples(str(out))
samples.write(5, None, "a first sample")
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # no file may grow past 4 KiB: writes fail with EFBIG
for name, write in {"checkpoint": lambda: save_atomically({"w": torch.zeros(10_000)}, out / "last.ckpt"),
                    "metrics": lambda: [metrics.log_metrics({"train/loss": 2.0, "x" * 5000: 1}, step=1), metrics.save()],
                    "samples": lambda: samples.write(10, None, "y" * 5000)}.items():
    try:
        write()
    except WriteError as error:
        errors[name] = str(error)
print(json.dumps({"errors": errors, "checkpoint": load(out / "last.ckpt")["w"].tolist(),
                  "metrics": read_metrics(out / "metrics.csv")[1][:1], "samples": (out / "samples.md").read_text()[:40]}))
"""


def test_io_errors_on_a_checkpoint_metrics_or_samples_name_the_file_and_keep_what_was_there(tmp_path):
    result = subprocess.run([sys.executable, "-c", WRITES, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["errors"] == {"checkpoint": f"cannot write {tmp_path}/last.ckpt: File too large",
                                "metrics": f"cannot write {tmp_path}/metrics.csv: File too large",
                                "samples": f"cannot write {tmp_path}/samples.md: File too large"}
    assert report["checkpoint"] == [1.0] * 10  # the checkpoint that was there
    assert report["metrics"] == [{"step": "0", "train/loss": "1.0"}]
    assert report["samples"].startswith("## after 5 steps\n\n```text\na first sample")
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written temporary files
