"""Browsing runs without an account: TensorBoard, started on 127.0.0.1 over a sweep's one TensorBoard directory,
serves every job (named by its swept value), its metrics as metrics.csv holds them, its text samples, its
hyperparameters, and the evaluation of a job beside it; a tracking package that is missing is one line."""

import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from servers import free_port, get, wait_for_json
from test_bad_input import one_line_error, train_in_process
from training import ROOT, column, metrics

pytest.importorskip("tensorboard")


def test_tensorboard_serves_the_whole_sweep_and_its_evaluation(sweep_dir, tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptexp", "evaluate", f"source={sweep_dir / '0'}", "checkpoint=last",
                             "logger=tensorboard", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
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


def test_a_tracking_package_that_is_not_installed_is_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    status, stderr = train_in_process("logger=tensorboard", f"hydra.run.dir={tmp_path / 'run'}",
                                      monkeypatch=monkeypatch, capfd=capfd)
    assert status == 2
    one_line_error(stderr, ["logger=tensorboard needs tensorboard: pip install tensorboard"])
    assert not (tmp_path / "run").exists()
