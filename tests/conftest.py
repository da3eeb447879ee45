"""Test setup: nothing may touch the network; token files go to a per-session cache."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
# pytest-xdist's workers share the cores: each worker, and the train.py processes it starts, gets its part
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from gptexp.core import hardware  # noqa: E402
from gptexp.inference import generation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory) -> Path:
    """A token-file cache shared by every test of the session (and by train.py subprocesses)."""
    path = tmp_path_factory.mktemp("token-cache")
    os.environ["GPTEXP_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def loggers_stay_enabled():
    """A command run in this process whose hydra/job_logging is `disabled` (export, verify, prepare) disables every
    logger that exists; the next tests still capture their logs."""
    enabled = [logger for logger in logging.root.manager.loggerDict.values()
               if isinstance(logger, logging.Logger) and not logger.disabled]
    yield
    for logger in enabled:
        logger.disabled = False


@pytest.fixture
def one_row_kernel(tmp_path, monkeypatch):
    """Call with "onednn" or "mkl" to make it the kernel one float32 row decodes through (the choice
    `generation.one_row_kernel` otherwise measures), kept in a cache of the test's own."""
    monkeypatch.setenv("GPTEXP_CACHE", str(tmp_path / "cache"))

    def choose(kernel: str) -> None:
        hardware.keep(generation.ONE_ROW_KERNELS, hardware.cpu_key(torch.float32), kernel)
    return choose


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """One tiny training run through train.py with the default callbacks and loggers."""
    from training import train

    run_dir = tmp_path_factory.mktemp("run")
    result = train(run_dir=run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir / "stdout.txt").write_text(result.stdout + result.stderr)
    return run_dir


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory) -> Path:
    """A tiny grid sweep through `train.py -m`: two learning rates, every callback measuring, every logger logging
    (logger=many: metrics.csv, wandb, TensorBoard)."""
    from training import train

    sweep_dir = tmp_path_factory.mktemp("sweep")
    result = train("optim.lr=1e-3,3e-3", "callbacks=all", "callbacks.memory.count_every=10", "logger=many",
                   run_dir=sweep_dir, multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir
