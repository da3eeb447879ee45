"""Faults while a run writes (a full disk, a read-only or vanished directory, an I/O error on a
checkpoint, metrics.csv, samples.md or a logger's folder): one line naming the file, the cause and the last intact
checkpoint; a non-zero exit status; the previous checkpoint still loads. A logger's folder that cannot be written is
refused before the run, an export that cannot write is one line too, and an export's output of the wrong kind is bad
input."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from test_bad_input import in_process, one_line_error

from gptexp.core.config import asset_path
from gptexp.models import GPT2, GPT2Config
from gptexp.weights import save_hf
from training import ROOT, TINY, checkpoint_at_least, launch, wait_for

LONG = ["trainer.max_steps=100000", "trainer.val_check_interval=500", "callbacks.resume_point.every_n_steps=50",
        "trainer.log_every_n_steps=5", "logger=csv"]
STORIES = asset_path("stories260K/stories260K.bin")
FAULT = re.compile(r"error: cannot write (\S+): (.+); the last intact checkpoint is step (\d+), (\S+): once the "
                   r"cause is fixed, the same command resumes from it")


def mount_namespace() -> list[str]:
    """A prefix running a command in a private mount namespace (as root, or in a user namespace)."""
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        if shutil.which(prefix[0]) and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    pytest.skip("no private mount namespace here (unshare -m and unshare -rm both refused)")


def without_privileges() -> list[str]:
    """A prefix running a command as root without its capabilities, so that permissions bind it as any user."""
    return ["setpriv", "--bounding-set=-all"] if os.geteuid() == 0 else []


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
    run = subprocess.Popen([*without_privileges(), sys.executable, "train.py", *TINY, *LONG, f"hydra.run.dir={run_dir}"],
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


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_a_logger_folder_that_is_read_only_is_refused_before_training(logger, tmp_path):
    folder = tmp_path / "run" / logger
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    result = subprocess.run([*without_privileges(), sys.executable, "train.py", *TINY, f"logger={logger}",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    one_line_error(result.stderr, [f"logger.{logger}: cannot write {folder}: {folder} is not writable; make it "
                                   f"writable, or run in another directory (hydra.run.dir=, hydra.sweep.dir= for a "
                                   f"sweep) or without it (logger=csv)"])
    assert list(folder.iterdir()) == [] and not (tmp_path / "run" / "checkpoints").exists()


def test_a_tensorboard_folder_deleted_mid_run(tmp_path):
    """TensorBoard's writer thread meets the failed write first: it keeps quiet, and the run ends in one line."""
    run_dir = tmp_path / "run"
    run = launch(*LONG, "logger=tensorboard", "+logger.tensorboard.flush_secs=1", run_dir=run_dir)
    wait_for(checkpoint_at_least(run_dir / "checkpoints" / "last.ckpt", 50), run)
    shutil.rmtree(run_dir / "tensorboard")
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1
    written, reason, step, checkpoint = fault_line(stderr).groups()
    assert (written, reason) == (f"{run_dir}/tensorboard", "No such file or directory")
    assert torch.load(checkpoint, weights_only=False)["global_step"] == int(step) >= 50


def tiny_gpt2(directory) -> str:
    """A random GPT-2 written as an HF directory, a source every export format takes."""
    torch.manual_seed(0)
    save_hf(GPT2(GPT2Config(block_size=64, n_layer=1, n_head=2, n_embd=32)), directory)
    return str(directory)


def test_an_export_into_a_read_only_file_system_is_one_line_for_every_format(tmp_path):
    """Each format exported to a read-only mount (format=hf into a directory there): one line naming the file and the
    cause, exit status 1, nothing left; the temporary file that cannot be removed there never hides that line."""
    out, source = tmp_path / "out", tiny_gpt2(tmp_path / "gpt2")
    (out / "hf").mkdir(parents=True)
    exports = {"llmc": ["format=llmc", f"source={source}", f"output={out}/model.bin"],
               "hf": ["format=hf", f"source={source}", f"output={out}/hf"],
               "quantized": ["format=quantized", "quantize=int8", f"source={source}", f"output={out}/model.safetensors"],
               "gguf": ["format=gguf", f"source={STORIES}", f"output={out}/model.gguf"]}
    if importlib.util.find_spec("gguf") is None:
        del exports["gguf"]
    commands = "\n".join(f"{sys.executable} -m gptexp export {' '.join(arguments)} 2> {tmp_path}/{name}.err; "
                         f"echo $? > {tmp_path}/{name}.status" for name, arguments in exports.items())
    script = f"mount --bind {out} {out} && mount -o remount,ro,bind {out} && {{\n{commands}\n}}"
    subprocess.run([*mount_namespace(), "bash", "-c", script], cwd=ROOT, timeout=600,
                   env=os.environ | {"PYTHONWARNINGS": "ignore"})
    for name, arguments in exports.items():
        stderr = (tmp_path / f"{name}.err").read_text()
        assert (tmp_path / f"{name}.status").read_text().strip() == "1", stderr[-3000:]
        one_line_error(stderr, [f"cannot write {arguments[-1].removeprefix('output=')}: Read-only file system"])
    assert [p.name for p in out.iterdir()] == ["hf"] and list((out / "hf").iterdir()) == []


@pytest.mark.parametrize("arguments, message", [
    (["format=gguf", f"source={STORIES}", "output=<dir>/a.gguf"],
     "output=<dir>/a.gguf is a directory; format=gguf writes one file: name it, e.g. output=<dir>/a.gguf/model.gguf"),
    (["format=quantized", "quantize=int8", f"source={STORIES}", "output=<dir>/a.safetensors"],
     "output=<dir>/a.safetensors is a directory; format=quantized writes one file: name it, e.g. "
     "output=<dir>/a.safetensors/model.safetensors"),
    (["format=llmc", "source=<gpt2>", "output=<dir>"],
     "output=<dir> is a directory; format=llmc writes one file: name it, e.g. output=<dir>/model.bin"),
    (["format=llmc", "source=<gpt2>", "output=<dir>/model.bin", "state=<dir>"],
     "state=<dir> is a directory; format=llmc writes one file: name it, e.g. state=<dir>/state.bin"),
    (["format=hf", "source=<gpt2>", "output=<dir>/file"],
     "output=<dir>/file is a file; format=hf writes a directory: name a new one"),
])
def test_an_export_output_of_the_wrong_kind_is_bad_input(arguments, message, tmp_path, monkeypatch, capfd):
    """An existing directory where a file goes (or a file where format=hf's directory goes): refused before any work."""
    out, source = tmp_path / "out", tiny_gpt2(tmp_path / "gpt2")
    for directory in ("a.gguf", "a.safetensors"):
        (out / directory).mkdir(parents=True)
    (out / "file").write_text("keep me")
    given = [a.replace("<dir>", str(out)).replace("<gpt2>", source) for a in arguments]
    status, stderr = in_process("export", given, monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, [message.replace("<dir>", str(out))])
    assert sorted(p.name for p in out.rglob("*")) == ["a.gguf", "a.safetensors", "file"]
    assert (out / "file").read_text() == "keep me"
