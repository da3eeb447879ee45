"""analysis/report.py renders every figure from a real run and a real sweep; the images are checked."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from training import ROOT, column, execute, metrics

sys.path.insert(0, str(ROOT / "analysis"))
from runs import load  # noqa: E402

RUN_FIGURES = {"loss", "perplexity", "throughput", "phases", "memory"}


def report(path, *extra) -> str:
    result = execute("analysis/report.py", str(path), *extra, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def check_figure(png, pdf) -> None:
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # lines, points and text, not a blank canvas
    assert (image < 128).any()  # something dark was drawn (axes, text)
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_report_of_a_run(run_dir):
    out = run_dir / "report"
    assert report(run_dir) == str(out)
    for name in RUN_FIGURES:
        check_figure(out / f"{name}.png", out / f"{name}.pdf")
    assert not (out / "sweep.png").exists()  # one run: nothing was swept
    summary = (out / "summary.md").read_text()
    best = min(v for _, v in column(metrics(run_dir), "val/loss"))
    assert f"{best:.4f}" in summary and "![loss](loss.png)" in summary


def test_report_of_a_sweep(sweep_dir, tmp_path):
    """Runs named by what differs between them, and an evaluation of one of them folded in."""
    evaluation = execute("-m", "gptexp", "evaluate", f"source={sweep_dir / '1'}", "logger=none",
                         f"hydra.run.dir={tmp_path / 'evaluate' / 'one'}", timeout=300)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    results = json.loads((tmp_path / "evaluate" / "one" / "results.json").read_text())
    report(sweep_dir, "--evaluations", tmp_path / "evaluate")
    out = sweep_dir / "report"
    for name in (*RUN_FIGURES, "sweep"):
        check_figure(out / f"{name}.png", out / f"{name}.pdf")
    summary = (out / "summary.md").read_text()
    assert "| optim.lr=0.001 | `optim.lr=0.001`" in summary and "| optim.lr=0.003 |" in summary
    assert "Best: **optim.lr=0.00" in summary
    assert "## Evaluations" in summary
    assert (f"| optim.lr=0.003 | perplexity | data=shakespeare split=val | {results['perplexity']:.4f} | "
            f"{results['bits_per_byte']:.4f} |") in summary
    assert [run.name for run in load(sweep_dir)] == ["optim.lr=0.001", "optim.lr=0.003"]


def test_wandb_offline_run_folder_gives_the_same_metrics(run_dir, tmp_path):
    (folder,) = run_dir.glob("wandb/offline-run-*")
    from_wandb, from_csv = load(folder)[0], load(run_dir)[0]
    for name in ("val/loss", "train/loss", "perf/tokens_per_sec"):
        a = from_wandb.metrics[["steps", name]].dropna()
        b = from_csv.metrics[["steps", name]].dropna()
        assert a["steps"].tolist() == b["steps"].tolist()
        assert a[name].to_numpy() == pytest.approx(b[name].to_numpy(), rel=1e-6)
    report(folder, "--out", str(tmp_path / "report"))
    check_figure(tmp_path / "report" / "loss.png", tmp_path / "report" / "loss.pdf")
