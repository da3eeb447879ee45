"""Sweeps: the basic launcher (conftest's sweep_dir), joblib's parallel jobs, Optuna (and its study file, refused in
one line when it is not a database), and SLURM by composition."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from test_bad_input import one_line_error

from servers import free_port, wait_for_json
from training import ROOT, column, execute, metrics, train

SHORT = ["trainer.max_steps=20", "callbacks.samples.at_steps=[]", "callbacks.samples.after_validation=false"]


def wandb_runs(directory: Path) -> list[dict]:
    """What wandb recorded of each run under `directory`/wandb, read back by wandb's own reader, in start order."""
    runs = []
    for record in sorted(directory.glob("wandb/offline-run-*/run-*.wandb")):
        lines = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(record)],
                               capture_output=True, text=True, check=True).stdout.splitlines()
        runs.append(next(json.loads(line)["run"] for line in lines if '"type":"run"' in line))
    return runs


def test_a_sweep_is_one_wandb_directory_of_runs_named_and_grouped_by_what_they_vary(sweep_dir, tmp_path):
    """`wandb leet <sweep>/wandb` shows every job: each a run in the sweep's group, named by its swept value
    (TINY's fixed keys are not), which its config holds too; an evaluation of a job joins it there."""
    assert not list(sweep_dir.glob("*/wandb"))  # no job keeps a wandb folder of its own
    runs = wandb_runs(sweep_dir)
    assert [run["display_name"] for run in runs] == ["optim.lr=0.001", "optim.lr=0.003"]
    assert {run["run_group"] for run in runs} == {str(sweep_dir)} and runs[0]["run_id"] != runs[1]["run_id"]
    assert [run["config"]["update"]["swept"] for run in runs] == [{"optim.lr": "0.001"}, {"optim.lr": "0.003"}]

    result = execute("-m", "gptexp", "evaluate", f"source={sweep_dir / '1'}", "checkpoint=last",
                     f"hydra.run.dir={tmp_path / 'eval'}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = wandb_runs(sweep_dir)[-1]
    assert (evaluation["job_type"], evaluation["run_group"]) == ("eval", str(sweep_dir))
    assert evaluation["display_name"] == "eval: optim.lr=0.003"
    assert not (tmp_path / "eval" / "wandb").exists()


def test_optuna_minimises_the_returned_val_loss_in_a_study_the_same_command_continues(tmp_path):
    for trials in (3, 1):  # the second command continues the study its SQLite file in the sweep directory holds
        result = train("hparams_search=optuna", f"hydra.sweeper.n_trials={trials}", "logger=csv", *SHORT,
                       run_dir=tmp_path, multirun=True)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing study gptexp" in result.stdout + result.stderr and (tmp_path / "optuna.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]  # none reused
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    finals = [min(v for _, v in column(metrics(tmp_path / job), "val/loss")) for job in ("0", "1", "2", "3")]
    assert best["best_value"] == min(finals)
    # TINY fixes optim.lr and data.batch_size on the command line, which Hydra's sweeper respects
    assert set(best["best_params"]) == {"optim.weight_decay"}

    if shutil.which("optuna-dashboard", path=str(Path(sys.executable).parent)):  # .[tracking]: it opens the study
        port = free_port()
        server = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"),
                                   f"sqlite:///{tmp_path / 'optuna.db'}", "--host", "127.0.0.1", "--port", str(port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            study = wait_for_json(f"http://127.0.0.1:{port}/api/studies/1", server)
            assert study["name"] == "gptexp" and len(study["trials"]) == 4
        finally:
            server.terminate()
            server.wait(timeout=30)

    report = execute("analysis/report.py", str(tmp_path), timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "optuna_history.png" in summary and "optuna_importance.png" in summary
    assert (tmp_path / "report" / "optuna_history.png").stat().st_size > 10_000


def test_optuna_refuses_a_corrupt_study_file_in_one_line_and_leaves_it(tmp_path):
    study = tmp_path / "optuna.db"
    study.write_bytes(b"not a database\n" * 100)
    result = train("hparams_search=optuna", "hydra.sweeper.n_trials=1", "logger=csv", *SHORT, run_dir=tmp_path,
                   multirun=True)
    assert result.returncode == 2
    one_line_error(result.stderr, [f"hydra.sweeper.storage=sqlite:///{study}: cannot open the study: {study} is not a "
                                   f"SQLite database (file is not a database); it is left as it is: move it away to "
                                   f"start a new study, or keep the study elsewhere with hydra.sweeper.storage="])
    assert list(tmp_path.iterdir()) == [study] and study.read_bytes() == b"not a database\n" * 100


def test_slurm_launcher_composes():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2",
                                          "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 4, 4, "gpu")
