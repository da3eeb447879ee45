"""Runs as tables: from gptexp run directories (metrics.csv + .hydra), sweep directories, wandb's
offline run folders, or the wandb API when online."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml


@dataclass
class Run:
    name: str
    metrics: pd.DataFrame  # one row per logged step: `steps` (optimizer steps done) and a column per metric
    config: dict = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)  # the command line's key=value (sweeps vary these)
    path: Path | None = None  # the run directory, where there is one


def load(path: str | Path, wandb_project: str | None = None) -> list[Run]:
    """Every run under `path`: a run directory, a sweep directory (one run per job), a wandb offline run
    folder or a wandb directory; or, with `wandb_project` ("entity/project"), the runs the API lists."""
    if wandb_project:
        return load_wandb_api(wandb_project)
    path = Path(path)
    if (path / "metrics.csv").is_file():
        return [load_run_dir(path)]
    if list(path.glob("run-*.wandb")):
        return [load_wandb_offline(path)]
    runs = [load_run_dir(job) for job in sorted(path.iterdir(), key=_job_order) if (job / "metrics.csv").is_file()]
    runs = runs or [load_wandb_offline(folder) for folder in sorted(path.glob("offline-run-*"))]
    if not runs:
        raise FileNotFoundError(f"no runs under {path}: expected metrics.csv in it or in its job directories, "
                                f"or wandb offline-run-* folders")
    return named_by_differences(runs)


def differing_keys(runs: list[Run]) -> list[str]:
    """The overrides whose values differ between the runs."""
    return sorted({k for run in runs for k in run.overrides if len({r.overrides.get(k) for r in runs}) > 1})


def named_by_differences(runs: list[Run]) -> list[Run]:
    """Each run named by the values that set it apart (`optim.lr=0.003, seed=2`) instead of its job index;
    runs alike in every override keep their names after it."""
    keys = differing_keys(runs)
    if len(runs) < 2 or not keys:
        return runs
    labels = [", ".join(f"{k}={run.overrides[k]}" for k in keys if k in run.overrides) or "defaults" for run in runs]
    for run, label in zip(runs, labels):
        run.name = label if labels.count(label) == 1 else f"{label} ({run.name})"
    return runs


def evaluations(runs: list[Run], directory: str | Path) -> list[dict]:
    """The results.json of every `python -m gptexp evaluate` under `directory` whose source is one of the runs
    (the run directory, or a checkpoint in it), each with the run's name."""
    by_path = {run.path.resolve(): run for run in runs if run.path is not None}
    found = []
    for results_file in sorted(Path(directory).glob("**/results.json")):
        try:
            results = json.loads(results_file.read_text())
            source = Path(results["source"]).expanduser().resolve()
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not an evaluation's results
        run = by_path.get(source) or (by_path.get(source.parent.parent) if source.suffix == ".ckpt" else None)
        if run is not None:
            found.append(results | {"run": run.name, "file": str(results_file)})
    return found


def _job_order(job: Path):
    return (0, int(job.name), "") if job.name.isdigit() else (1, 0, job.name)


def with_steps(metrics: pd.DataFrame) -> pd.DataFrame:
    """`steps` = optimizer steps done; rows without it (older logs) count Lightning's 0-based `step` + 1."""
    fallback = metrics["step"] + 1 if "step" in metrics else pd.Series(range(len(metrics)), index=metrics.index)
    metrics["steps"] = metrics["steps"].fillna(fallback) if "steps" in metrics else fallback
    return metrics.sort_values("steps", kind="stable").reset_index(drop=True)


def load_run_dir(path: Path) -> Run:
    hydra = path / ".hydra"
    config = yaml.safe_load((hydra / "config.yaml").read_text()) if (hydra / "config.yaml").is_file() else {}
    overrides = yaml.safe_load((hydra / "overrides.yaml").read_text()) if (hydra / "overrides.yaml").is_file() else []
    pairs = dict(o.lstrip("+~").split("=", 1) for o in overrides or [] if "=" in o)
    return Run(name=path.name, metrics=with_steps(pd.read_csv(path / "metrics.csv")), config=config, overrides=pairs,
               path=path)


def load_wandb_offline(folder: Path) -> Run:
    """An offline run folder, read with wandb's own record reader (`wandb leet inspect --json`)."""
    (record,) = Path(folder).glob("run-*.wandb")
    wandb_cli = shutil.which("wandb") or str(Path(sys.executable).parent / "wandb")
    lines = subprocess.run([wandb_cli, "leet", "inspect", "--json", str(record)], capture_output=True, text=True,
                           check=True, timeout=300).stdout.splitlines()
    rows, config, name = [], {}, Path(folder).name
    for line in lines:
        item = json.loads(line)
        if "history" in item:  # gptexp's metrics: steps and namespaced numbers (not the samples table)
            row = {k: v for k, v in item["history"]["item"].items()
                   if (k == "steps" or "/" in k) and isinstance(v, (int, float)) and k != "trainer/global_step"}
            if row:
                rows.append(row | {"step": item["history"]["item"].get("trainer/global_step")})
        elif "run" in item:
            name = item["run"].get("display_name") or name
        elif "config" in item:
            config.update({k: v for k, v in item["config"].get("update", {}).items() if k != "_wandb"})
    return Run(name=name, metrics=with_steps(pd.DataFrame(rows)), config=config)


def load_wandb_api(project: str) -> list[Run]:
    import wandb

    runs = []
    for run in wandb.Api().runs(project):
        metrics = run.history(pandas=True).rename(columns={"trainer/global_step": "step"})
        runs.append(Run(name=run.name, metrics=with_steps(metrics), config=dict(run.config)))
    return runs
