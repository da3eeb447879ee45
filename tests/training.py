"""Running train.py the way a user does, and reading what it wrote.

Each run is a process of its own, as `python train.py ...` starts one: its own arguments, environment, working
directory, signals, exit status and output. A fresh interpreter spends ~5 s importing torch and Lightning before it
does anything, so these processes are forked from a server that imported them once and did nothing else
(multiprocessing's forkserver, as `bench`'s memory measurement uses). What differs is only that import: the tests of
start-up itself (test_readme, test_wandb_offline, test_run_lock's second run, ...) and DDP's other ranks start fresh
interpreters.
"""

import atexit
import csv
import multiprocessing
import os
import resource
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
# a tiny character-level GPT: seconds per run; AdamW in float32 whatever the CPU (the default recipe's Muon and
# the other precisions have tests of their own)
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "data.batch_size=16",
        "data.eval_batch_size=512", "optim.name=adamw", "optim.lr=3e-3", "optim.warmup_steps=5",
        "trainer.max_steps=40", "trainer.val_check_interval=20", "callbacks.samples.max_new_tokens=40",
        "trainer.precision=32-true"]
SERVER = multiprocessing.get_context("forkserver")
# the server imports this module, and with it torch, Lightning and train.py's own modules; not the commands that
# run as __main__, which runpy would find imported already
SERVER.set_forkserver_preload(["training", "gptexp.commands.train"])


class Process:
    """`python <arguments>` running in a process of its own, with subprocess.Popen's face: args, pid, poll(), wait(),
    send_signal(), kill(), communicate() -> (stdout, stderr), returncode (negative: killed by that signal)."""

    def __init__(self, arguments: list[str], env: dict, input: str = "", memory_limit: int | None = None):
        self.args = [sys.executable, *arguments]  # as Popen's
        self.output = tempfile.TemporaryDirectory()
        self.paths = [os.path.join(self.output.name, name) for name in ("stdin", "stdout", "stderr")]
        Path(self.paths[0]).write_text(input)
        self.process = SERVER.Process(target=child_main, args=(arguments, env, *self.paths, memory_limit))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        texts = tuple(Path(path).read_text(errors="replace") for path in self.paths[1:])
        self.output.cleanup()
        return texts


def child_main(arguments: list[str], env: dict, stdin: str, stdout: str, stderr: str,
               memory_limit: int | None = None) -> None:
    """In the forked process: what `python <arguments>` runs (a script of the repository, or -m <module>), in the
    repository, with `env`, reading the file `stdin`, its output into the files `stdout` and `stderr`, mapping at most
    `memory_limit` bytes more than the server had mapped (an allocation beyond it fails instead of swapping)."""
    if memory_limit:
        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory_limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    os.dup2(os.open(stdin, os.O_RDONLY), 0)
    sys.stdin = open(0, closefd=False)  # multiprocessing gave the process /dev/null
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.environ.clear()
    os.environ.update(env)
    if env.get("PYTHONWARNINGS") == "ignore":
        warnings.simplefilter("ignore")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(ROOT)
    status = 0
    try:
        if arguments[0] == "-m":
            sys.argv = [arguments[1], *arguments[2:]]
            runpy.run_module(arguments[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(arguments)
            sys.path.insert(0, str((ROOT / arguments[0]).parent))  # as python puts a script's directory first
            runpy.run_path(str(ROOT / arguments[0]), run_name="__main__")
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
        if not isinstance(exit.code, (int, type(None))):
            print(exit.code, file=sys.stderr)
    except BaseException as error:
        traceback.print_exc()
        status = -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1  # python ends by its own SIGINT
    # an interpreter's end, in its order: wait for threads (their own exit hooks first: joblib's workers stop), run
    # the atexit functions, flush; then no more, where multiprocessing's end would wait for processes it did not start
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if status == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def start(*arguments: str, env: dict | None = None, input: str = "", memory_limit: int | None = None) -> Process:
    """`python <arguments>` started in the repository (warnings off), to be waited for or stopped by the test."""
    return Process([os.fspath(a) for a in arguments], dict(env or os.environ) | {"PYTHONWARNINGS": "ignore"}, input,
                   memory_limit)


def execute(*arguments: str, env: dict | None = None, input: str = "", timeout: float = 600,
            memory_limit: int | None = None) -> subprocess.CompletedProcess:
    """`python <arguments>` in the repository, to its end (subprocess.run's result: returncode, stdout, stderr)."""
    process = start(*arguments, env=env, input=input, memory_limit=memory_limit)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(["python", *arguments], process.returncode, stdout, stderr)


def train(*overrides: str, run_dir: Path | None = None, multirun: bool = False) -> subprocess.CompletedProcess:
    """`python train.py <TINY> <overrides>` (-m: a multirun), to its end."""
    arguments = [*(["-m"] if multirun else []), *TINY, *overrides]
    if run_dir is not None:
        arguments.append(f"hydra.{'sweep' if multirun else 'run'}.dir={run_dir}")
    return execute("train.py", *arguments)


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict], name: str, step: str = "step") -> list[tuple[int, float]]:
    return [(int(float(r[step])), float(r[name])) for r in rows if r.get(name)]


# the columns two runs of the same config and seed must agree on, row for row: the rest are timings, and
# `epoch` counts Lightning's passes over a sampler that spans the whole run (an extended run is in its second)
DETERMINISTIC = ("step", "steps", "train/loss", "train/lr", "val/loss", "val/ppl")


def history(run_dir: Path) -> list[tuple[str, ...]]:
    return [tuple(row.get(name, "") for name in DETERMINISTIC) for row in metrics(run_dir)]


def launch(*overrides: str, run_dir: Path, env: dict | None = None) -> Process:
    """train.py started in the background, to be stopped by the test."""
    return start("train.py", *TINY, *overrides, f"hydra.run.dir={run_dir}", env=env)


def saved_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def wait_for(condition, process: Process, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def checkpoint_at_least(path: Path, step: int):
    """A condition: `path` exists and holds at least `step` optimizer steps."""
    def reached() -> bool:
        try:
            return path.exists() and saved_step(path) >= step
        except (RuntimeError, EOFError, OSError):  # replaced while it was read
            return False
    return reached


class GradientDump(L.Callback):
    """A callback for train.py (+callbacks.grads._target_=training.GradientDump +callbacks.grads.path=<file>): the
    gradients of the first optimizer step, once accumulated (and all-reduced under DDP), before clipping, written
    by rank 0."""

    def __init__(self, path: str):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0 and trainer.is_global_zero:
            torch.save({name: p.grad.detach().clone() for name, p in pl_module.named_parameters()
                        if p.grad is not None}, self.path)
