"""Sweeps: the basic launcher (conftest's sweep_dir), joblib's parallel jobs, Optuna, and SLURM by composition."""

import json
import subprocess
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from training import ROOT, column, metrics, train

SHORT = ["trainer.max_steps=20", "callbacks.samples.at_steps=[]", "callbacks.samples.after_validation=false"]


def wandb_run(job_dir: Path) -> dict:
    (record,) = job_dir.glob("wandb/offline-run-*/run-*.wandb")
    lines = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(record)],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    return next(json.loads(line)["run"] for line in lines if '"type":"run"' in line)


def test_grid_jobs_are_wandb_runs_grouped_by_the_sweep(sweep_dir):
    runs = [wandb_run(sweep_dir / job) for job in ("0", "1")]
    assert {run["run_group"] for run in runs} == {str(sweep_dir)}
    assert "optim.lr=0.001" in runs[0]["display_name"] and "optim.lr=0.003" in runs[1]["display_name"]
    assert runs[0]["run_id"] != runs[1]["run_id"]


def test_joblib_runs_jobs_in_parallel_into_one_sweep_directory(tmp_path):
    result = train("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=1e-3,3e-3", "logger=csv",
                   *SHORT, run_dir=tmp_path, multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert all(column(metrics(tmp_path / job), "val/loss") for job in ("0", "1"))


def test_optuna_minimises_the_returned_val_loss(tmp_path):
    result = train("hparams_search=optuna", "hydra.sweeper.n_trials=3", "logger=csv", *SHORT, run_dir=tmp_path,
                   multirun=True)
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    finals = [min(v for _, v in column(metrics(tmp_path / job), "val/loss")) for job in ("0", "1", "2")]
    assert best["best_value"] == min(finals)
    # TINY fixes optim.lr and data.batch_size on the command line, which Hydra's sweeper respects
    assert set(best["best_params"]) == {"optim.weight_decay"}


def test_slurm_launcher_composes():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2",
                                          "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 4, 4, "gpu")
