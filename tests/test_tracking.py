"""Browsing runs without an account: TensorBoard over a sweep's one TensorBoard directory, and `mlflow server` over
the SQLite store a parallel sweep's jobs wrote at once, each started on 127.0.0.1, serve every job (named by its
swept value), its metrics as metrics.csv holds them, its samples, its hyperparameters, and the evaluation of a job
beside it. A tracking package that is missing, or an MLflow store or TensorBoard folder that cannot be used, is one
line, before any work."""

import json
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
from test_bad_input import in_process, one_line_error, train_in_process

from gptexp.core.config import asset_path
from servers import free_port, get, wait_for_json
from training import column, execute, metrics, train

pytest.importorskip("tensorboard")


def test_tensorboard_serves_the_whole_sweep_and_its_evaluation(sweep_dir, tmp_path):
    result = execute("-m", "gptexp", "evaluate", f"source={sweep_dir / '0'}", "checkpoint=last",
                     "logger=tensorboard", f"hydra.run.dir={tmp_path / 'eval'}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    perplexity = json.loads((tmp_path / "eval" / "results.json").read_text())["perplexity"]

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "tensorboard"), "--logdir",
                               str(sweep_dir / "tensorboard"), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/data"
        runs = wait_for_json(f"{url}/runs", server, ready=lambda runs: len(runs) == 3)
        assert sorted(runs) == ["optim.lr=0.001", "optim.lr=0.001/eval", "optim.lr=0.003"]

        def scalars(run: str, tag: str) -> list[tuple[int, float]]:
            query = urllib.parse.urlencode({"run": run, "tag": tag})
            return [(step, value) for _, step, value in get(f"{url}/plugin/scalars/scalars?{query}")]

        for job, run in (("0", "optim.lr=0.001"), ("1", "optim.lr=0.003")):
            expected = column(metrics(sweep_dir / job), "val/loss")
            assert scalars(run, "val/loss") == [(step, pytest.approx(value, rel=1e-6)) for step, value in expected]
        ((_, logged),) = scalars("optim.lr=0.001/eval", "eval/perplexity")
        assert logged == pytest.approx(perplexity, rel=1e-6)
        texts = get(f"{url}/plugin/text/tags")
        assert texts["optim.lr=0.001"] == ["samples/text_summary"] and texts["optim.lr=0.001/eval"]
        experiment = get(f"{url}/plugin/hparams/experiment", json.dumps({"experimentName": ""}).encode())
        hparams = {info["name"]: info for info in experiment["hparamInfos"]}
        assert hparams["optim/lr"]["differs"] and not hparams["model/n_embd"]["differs"]
        metrics_shown = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"val/loss", "train/loss", "perf/tokens_per_sec"} <= metrics_shown
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_mlflow_serves_a_parallel_sweep_from_one_sqlite_store(tmp_path):
    pytest.importorskip("mlflow")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=1e-3,3e-3", "trainer.max_steps=20",
                   "logger=mlflow", f"logger.mlflow.tracking_uri={store}", run_dir=tmp_path / "sweep", multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr  # two jobs writing the store at once
    evaluation = execute("-m", "gptexp", "evaluate", f"source={tmp_path / 'sweep' / '1'}",
                         "checkpoint=last", "logger=mlflow", f"logger.mlflow.tracking_uri={store}",
                         f"hydra.run.dir={tmp_path / 'eval'}", timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        experiments = wait_for_json(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10",
                                    server, timeout=120)["experiments"]
        (sweep,) = [e for e in experiments if e["name"] == str(tmp_path / "sweep")]
        runs = get(f"{api}/runs/search", json.dumps({"experiment_ids": [sweep["experiment_id"]]}).encode())["runs"]
        by_name = {run["info"]["run_name"]: run for run in runs}
        assert set(by_name) == {"optim.lr=0.001", "optim.lr=0.003", "eval: optim.lr=0.003"}
        for job, name in (("0", "optim.lr=0.001"), ("1", "optim.lr=0.003")):
            run = by_name[name]
            query = urllib.parse.urlencode({"run_id": run["info"]["run_id"], "metric_key": "val/loss"})
            history = [(m["step"], m["value"]) for m in get(f"{api}/metrics/get-history?{query}")["metrics"]]
            assert history == [(step, pytest.approx(value, rel=1e-6)) for step, value in
                               column(metrics(tmp_path / "sweep" / job), "val/loss")]
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            assert float(params["optim/lr"]) == float(name.split("=")[1])
            query = urllib.parse.urlencode({"run_id": run["info"]["run_id"], "path": "samples"})
            assert get(f"{api}/artifacts/list?{query}")["files"]  # the text samples
        tags = {t["key"]: t["value"] for t in by_name["eval: optim.lr=0.003"]["data"]["tags"]}
        metrics_logged = {m["key"]: m["value"] for m in by_name["eval: optim.lr=0.003"]["data"]["metrics"]}
        assert tags["job_type"] == "eval" and metrics_logged["eval/perplexity"] == pytest.approx(
            json.loads((tmp_path / "eval" / "results.json").read_text())["perplexity"], rel=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("overrides, message", [
    (["logger=mlflow", "logger.mlflow.tracking_uri=sqlite:////proc/gptexp/mlflow.db"],
     "logger.mlflow.tracking_uri=sqlite:////proc/gptexp/mlflow.db: cannot write the MLflow store"),
    (["logger=mlflow", "logger.mlflow.tracking_uri=file:///tmp/mlruns"],
     "gptexp keeps MLflow runs in SQLite, sqlite:///<path to a .db file>"),
    (["logger=tensorbored"], "Could not find 'logger/tensorbored'; Available options in 'logger': all, csv, many, "
                             "mlflow, none, tensorboard, wandb"),
])
def test_a_logger_that_cannot_work_is_one_line(overrides, message, tmp_path, monkeypatch, capfd):
    status, stderr = train_in_process(*overrides, f"hydra.run.dir={tmp_path / 'run'}", monkeypatch=monkeypatch,
                                      capfd=capfd)
    assert status == 2
    one_line_error(stderr, [message])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("store, reason", [("a directory", "{path} is a directory"),
                                           ("a corrupt file", "{path} is not a SQLite database (file is not a database)")])
def test_an_mlflow_store_that_cannot_be_used_is_refused_at_once_and_left_alone(store, reason, tmp_path, monkeypatch,
                                                                                capfd):
    """Checked before MLflow sees it (which retries an unusable store for minutes): one line, no lock file beside it."""
    path = tmp_path / "mlflow.db"
    if store == "a directory":
        path.mkdir()
    else:
        path.write_bytes(b"not a database\n" * 100)
    started = time.monotonic()
    status, stderr = train_in_process("logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{path}",
                                      f"hydra.run.dir={tmp_path / 'run'}", monkeypatch=monkeypatch, capfd=capfd)
    assert status == 2 and time.monotonic() - started < 60
    one_line_error(stderr, [f"logger.mlflow.tracking_uri=sqlite:///{path}: cannot write the MLflow store: "
                            f"{reason.format(path=path)}; choose another path"])
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]  # no .lock, no run directory
    assert path.is_dir() if store == "a directory" else path.read_bytes() == b"not a database\n" * 100


@pytest.mark.parametrize("logger, message", [
    ("wandb", "logger=wandb: cannot write {run}/wandb: {run}/wandb is a file, not a directory; make it writable, or "
              "evaluate without it (logger=none)"),
    ("tensorboard", "logger=tensorboard: cannot write {run}/tensorboard/eval: {run}/tensorboard is a file, not a "
                    "directory; make it writable, or evaluate without it (logger=none)"),
    ("mlflow", "logger.mlflow.tracking_uri=sqlite:///{run}/tensorboard/mlflow.db: cannot write the MLflow store: "
               "{run}/tensorboard is a file, not a directory; choose another path"),
])
def test_evaluate_checks_where_its_loggers_write_before_the_work(logger, message, tmp_path, monkeypatch, capfd):
    run = tmp_path / "eval"
    run.mkdir()
    for folder in ("wandb", "tensorboard"):
        (run / folder).write_text("")  # a file where a folder must go
    store = [f"logger.mlflow.tracking_uri=sqlite:///{run}/tensorboard/mlflow.db"] if logger == "mlflow" else []
    status, stderr = in_process("evaluate", [f"source={asset_path('stories260K/stories260K.bin')}", f"logger={logger}",
                                             *store, f"hydra.run.dir={run}"], monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, [message.format(run=run)])
    assert not (run / "results.json").exists()


def test_a_tracking_package_that_is_not_installed_is_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    status, stderr = train_in_process("logger=tensorboard", f"hydra.run.dir={tmp_path / 'run'}",
                                      monkeypatch=monkeypatch, capfd=capfd)
    assert status == 2
    one_line_error(stderr, ["logger=tensorboard needs tensorboard: pip install tensorboard"])
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_keeps_its_one_mlflow_run(tmp_path):
    """Run again in its directory with more steps, a run goes on in the MLflow run it started (its id travels in the
    checkpoint, as wandb's does)."""
    mlflow = pytest.importorskip("mlflow")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for steps in (20, 40):
        result = train(f"trainer.max_steps={steps}", "logger=mlflow", f"logger.mlflow.tracking_uri={store}",
                       run_dir=tmp_path / "run")
        assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.tracking.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("gptexp").experiment_id])
    assert run.info.run_name == "run"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [19, 39]
