"""Experiment loggers: a metrics.csv that keeps a run's history, wandb that never prompts, never waits for a
network it does not have, and never stops a run, TensorBoard and MLflow (on SQLite). A sweep's jobs log into one
place per sweep (`run_place`), so that wandb leet, TensorBoard and MLflow's UI show them side by side."""

from __future__ import annotations

import csv
import fcntl
import io
import logging
import netrc
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from gptexp.core.config import ConfigError
from gptexp.core.hydra_callbacks import unwritable_reason
from gptexp.core.stores import sqlite_path, sqlite_problem
from gptexp.core.writing import WriteError, replace_atomically, writing

log = logging.getLogger(__name__)
WANDB_MODES = ("auto", "online", "offline", "disabled")
DEFAULT_WANDB_URL = "https://api.wandb.ai"
# where a run whose logger cannot write its folder may log instead
ELSEWHERE = "run in another directory (hydra.run.dir=, hydra.sweep.dir= for a sweep) or without it (logger=csv)"


def read_metrics(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a metrics.csv (none if it is missing); a torn last line, left by a crash
    mid-append, is not a row."""
    path = Path(path)
    if not path.is_file():
        return [], []
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def write_metrics(path: str | os.PathLike, keys: list[str], rows: list[dict]) -> None:
    """Replace `path` with a metrics.csv of these columns and rows, atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    replace_atomically(path, buffer.getvalue().encode("utf-8"))


class MetricsFile(ExperimentWriter):
    """Lightning's metrics.csv writer, made to keep what the file holds (the history a resumed run
    carried over, gptexp.training.callbacks.history): rows are appended, a new column rewrites the file whole
    and atomically, and a failed write raises WriteError. `rows_on_disk` counts the file's rows."""

    def __init__(self, log_dir: str):
        super().__init__(log_dir)
        self.metrics_keys, rows = read_metrics(self.metrics_file_path)
        self.rows_on_disk = len(rows)

    def _check_log_dir_exists(self) -> None:
        """Lightning's deletes an existing metrics.csv; here it is the run's history, kept."""

    def save(self) -> None:
        if not self.metrics:
            return
        path = self.metrics_file_path
        with writing(path):
            if self._record_new_keys() or not os.path.isfile(path):
                _, rows = read_metrics(path)
                write_metrics(path, self.metrics_keys, rows + self.metrics)
            else:
                with open(path, "a", newline="", encoding="utf-8") as f:
                    csv.DictWriter(f, fieldnames=self.metrics_keys).writerows(self.metrics)
        self.rows_on_disk += len(self.metrics)
        self.metrics = []

    def sync(self) -> int:
        """Write the rows logged so far and flush them to disk; the number of rows the file holds."""
        self.save()
        if os.path.isfile(self.metrics_file_path):
            with writing(self.metrics_file_path):
                fd = os.open(self.metrics_file_path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return self.rows_on_disk

    def log_hparams(self, params: dict) -> None:
        with writing(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)):
            super().log_hparams(params)


class MetricsCSVLogger(CSVLogger):
    """Lightning's CSVLogger over a MetricsFile: metrics.csv in the run directory, a row per logging step,
    a column per metric, holding the whole run across resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> MetricsFile:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = MetricsFile(log_dir=self.log_dir)
        return self._experiment

    def finalize(self, status: str) -> None:
        if status != "failed":
            return super().finalize(status)
        with suppress(WriteError):  # the run already failed: that error is the one to report
            super().finalize(status)


def wandb_url() -> str:
    """The wandb server this process would talk to: WANDB_BASE_URL, wandb's settings files, or its default."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"]
    try:
        import wandb

        settings = wandb.Settings()
        settings.update_from_system_settings()
        return settings.base_url
    except Exception:  # an old or broken settings file: wandb would fall back to its default too
        return DEFAULT_WANDB_URL


def wandb_api_key_configured() -> bool:
    """True when wandb has credentials: WANDB_API_KEY, or a ~/.netrc entry for its server (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    hosts = {"api.wandb.ai", urllib.parse.urlparse(wandb_url()).hostname}
    try:
        entries = netrc.netrc()
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any(entries.authenticators(host) for host in hosts if host)


def unreachable(url: str, timeout: float) -> str | None:
    """Why `url` gives no HTTP answer within `timeout` seconds (name lookup included), or None if it answers."""
    outcome: dict[str, BaseException | None] = {}

    def ask() -> None:
        try:
            urllib.request.urlopen(url, timeout=timeout).close()
            outcome["error"] = None
        except urllib.error.HTTPError:  # any status is an answer
            outcome["error"] = None
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=ask, daemon=True)  # a hanging name lookup ignores urlopen's timeout
    thread.start()
    thread.join(timeout)
    if "error" not in outcome:
        return f"no answer from {url} within {timeout:g} s"
    error = outcome["error"]
    if error is None:
        return None
    reason = getattr(error, "reason", error)
    return f"no answer from {url} ({reason})"


class ResilientWandbLogger(WandbLogger):
    """A WandbLogger that logs offline when the server cannot be used (`offline_because` says why, or
    wandb.init fails), and says where the offline run is and how to upload it."""

    def __init__(self, *args, offline_because: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.offline_because = offline_because

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        import wandb

        if not self._offline:
            try:
                return super().experiment
            except wandb.errors.Error as error:  # a refused key, a server that fails mid-handshake, ...
                self.offline_because = f"wandb.init failed ({error})"
                self._offline, self._wandb_init["mode"] = True, "offline"
        experiment = super().experiment
        if self.offline_because and getattr(experiment, "dir", None):
            folder = Path(experiment.dir).parent
            log.warning("wandb: %s; this run logs offline to %s: upload it later with `wandb sync %s`",
                        self.offline_because, folder, folder)
        return experiment


@dataclass
class RunPlace:
    """Where a run's loggers put it and what they call it: `directory` holds the `wandb/` and `tensorboard/` folders
    (a sweep's directory for each of its jobs, so that `wandb leet <sweep>/wandb` and TensorBoard show them all;
    else the run's own), `group` gathers a sweep's runs (and a run's evaluations; MLflow's experiment), `name` says
    what sets a sweep's job apart (`optim.lr=0.003`; None outside a sweep) and `swept` holds those values."""
    directory: str
    group: str
    name: str | None = None
    swept: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """What to call the run where a name is needed: its swept values, or its directory's name."""
        return self.name or Path(self.directory).name

    @property
    def experiment(self) -> str:
        """Its MLflow experiment: the sweep (its group) for a sweep's job, else `gptexp`."""
        return self.group if self.name else "gptexp"


def run_place(hydra: DictConfig) -> RunPlace:
    """The RunPlace of the run Hydra's config `hydra` describes: the running job's (HydraConfig.get()) or a finished
    run's (its .hydra/hydra.yaml)."""
    if getattr(hydra.mode, "name", hydra.mode) != "MULTIRUN":  # a RunMode, or its name in a saved hydra.yaml
        return RunPlace(hydra.runtime.output_dir, hydra.runtime.output_dir)
    sweep = Path(hydra.sweep.dir)
    directory = sweep if sweep.is_absolute() else Path(hydra.runtime.cwd) / sweep
    keys = swept_keys(directory / "multirun.yaml")
    values = dict(override.lstrip("+~").split("=", 1) for override in hydra.overrides.task if "=" in override)
    swept = {key: value for key, value in values.items() if keys is None or key in keys}
    name = ", ".join(f"{key}={value}" for key, value in swept.items()) or "defaults"
    return RunPlace(str(directory), hydra.sweep.dir, name, swept)


def swept_keys(multirun_yaml: Path) -> set[str] | None:
    """The keys a sweep varies, from the multirun.yaml Hydra writes in its directory: command-line overrides with
    more than one value, and the sweeper's params (an experiment's grid, Optuna's search space); None without
    the file."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if not multirun_yaml.is_file():
        return None
    hydra = OmegaConf.load(multirun_yaml).hydra
    overrides = OverridesParser.create().parse_overrides(list(hydra.overrides.task))
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return {o.key_or_group for o in overrides if o.is_sweep_override()} | set(params)


def wandb_logger(save_dir: str, project: str = "gptexp", mode: str = "auto", group: str | None = None,
                 name: str | None = None, connect_timeout_s: float = 3.0, **kwargs) -> WandbLogger:
    """A WandbLogger writing under `save_dir/wandb`. mode=auto: WANDB_MODE if set, else online only
    when an API key is configured, otherwise offline (sync later with `wandb sync <run folder>`).
    Online, the server must answer within `connect_timeout_s`, or the run logs offline and says so.
    In a Hydra job, unless group / name are given, the run goes where `run_place` says: a sweep's jobs into one
    `<sweep>/wandb`, grouped by the sweep and named by their swept values (also in their config)."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)  # wandb's older names
    offline_because = unreachable(wandb_url(), connect_timeout_s) if mode == "online" else None
    if offline_because:
        mode = "offline"
    if group is None and name is None:
        place = current_place(save_dir)
        if place.name is not None:  # a sweep's job
            save_dir, group, name = place.directory, place.group, place.name
            kwargs["config"] = {"swept": place.swept} | kwargs.get("config", {})
        else:
            group = place.group
    writable_folder(Path(save_dir) / "wandb", "logger.wandb", ELSEWHERE)
    os.makedirs(save_dir, exist_ok=True)
    return ResilientWandbLogger(project=project, save_dir=save_dir, offline=mode == "offline", mode=mode,
                                group=group, name=name, offline_because=offline_because, **kwargs)


def current_place(save_dir: str) -> RunPlace:
    """The running Hydra job's RunPlace; outside Hydra, a run in `save_dir`."""
    from hydra.core.hydra_config import HydraConfig

    return run_place(HydraConfig.get()) if HydraConfig.initialized() else RunPlace(save_dir, save_dir)


def require(module: str, option: str) -> None:
    """Raise ConfigError with the install line when `module`, which `option` needs, is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{option} needs {module}: pip install {module} (or pip install -e \".[tracking]\")")


def writable_folder(folder: Path, key: str, fix: str) -> Path:
    """`folder`, where the logger `key` writes; ConfigError naming it and `fix` when it cannot be made and written,
    checked before the work (TensorBoard would fail at its first write, in a thread of its own)."""
    if reason := unwritable_reason(folder):
        raise ConfigError(f"{key}: cannot write {folder}: {reason}; make it writable, or {fix}")
    return folder


def tensorboard_directory(place: RunPlace) -> tuple[str, str]:
    """(root, run): a run's TensorBoard events go to root/run. A sweep's jobs share the root
    `<sweep>/tensorboard`, each in a folder named by its swept values; a single run's root is
    `<run>/tensorboard`, its own events at the top."""
    return str(Path(place.directory) / "tensorboard"), place.name or ""


class HParamsTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger, whose hyperparameters also reach TensorBoard's HParams tab, beside each run's
    metrics, without the placeholder `hp_metric` scalar Lightning writes for that; a failed write raises WriteError
    (TensorBoard's writer thread, which met it first, keeps quiet: `quiet_event_writers`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        quiet_event_writers()

    @rank_zero_only
    def log_hyperparams(self, params, metrics=None) -> None:
        with writing(self.log_dir):
            super().log_hyperparams(params, metrics)
            if metrics is None:
                from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
                from torch.utils.tensorboard.summary import hparams

                flat = self._sanitize_params(_flatten_dict(_convert_params(params)))
                _, session_start, session_end = hparams(flat, {})
                writer = self.experiment._get_file_writer()
                # the sessions alone: TensorBoard builds the experiment from every run's (what differs, the scalars)
                writer.add_summary(session_start)
                writer.add_summary(session_end)

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        with writing(self.log_dir):
            super().log_metrics(metrics, step)

    @rank_zero_only
    def save(self) -> None:
        with writing(self.log_dir):
            super().save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        try:
            with writing(self.log_dir):
                super().finalize(status)
        except WriteError:
            if status != "failed":  # else the run's own error is the one to report
                raise


def quiet_event_writers() -> None:
    """Keep TensorBoard's writer threads from printing a traceback when a write fails: such a thread stops, and the
    next write of the main thread raises the same error, which the command reports in one line."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "quiet_event_writers", False):
        return

    def hook(args) -> None:
        if not (isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.quiet_event_writers = True
    threading.excepthook = hook


def tensorboard_logger(save_dir: str, **kwargs) -> TensorBoardLogger:
    """A TensorBoardLogger where `tensorboard_directory` says (`tensorboard --logdir <that root>`), its folder checked
    (`writable_folder`)."""
    require("tensorboard", "logger=tensorboard")
    root, run = tensorboard_directory(current_place(save_dir))
    writable_folder(Path(root) / run, "logger.tensorboard", ELSEWHERE)
    return HParamsTensorBoardLogger(save_dir=root, name="", version=run, default_hp_metric=False, **kwargs)


def sqlite_file(tracking_uri: str) -> Path:
    """The database file of an MLflow `sqlite:///<path>` store, its directory made; ConfigError for any other store,
    or for a file that cannot be a writable SQLite database (gptexp.core.stores), which is left as it is."""
    path = sqlite_path(tracking_uri)
    if path is None:
        raise ConfigError(f"logger.mlflow.tracking_uri={tracking_uri}: gptexp keeps MLflow runs in SQLite, "
                          f"sqlite:///<path to a .db file> (MLflow 3.13 and later refuse the old file store)")
    reason = sqlite_problem(path)
    if reason is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            reason = f"{error.strerror}: {error.filename}"
    if reason:
        raise ConfigError(f"logger.mlflow.tracking_uri={tracking_uri}: cannot write the MLflow store: {reason}; "
                          f"choose another path")
    return path


class ContinuingMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger which, continuing a resumed run's MLflow run, logs only the params that run lacks:
    MLflow refuses to change a logged param, and a resumed run may change some (trainer/max_steps, extended). The
    run keeps its first values; the new ones of changed params go to tags `resumed.<param>`."""

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

        flat = _flatten_dict(_convert_params(params))
        held = self.experiment.get_run(self.run_id).data.params
        for key, value in flat.items():
            if key in held and held[key] != str(value)[:6000]:
                self.experiment.set_tag(self.run_id, f"resumed.{key}", str(value)[:5000])
        super().log_hyperparams({key: value for key, value in flat.items() if key not in held})


def mlflow_logger(tracking_uri: str, save_dir: str, experiment_name: str | None = None, run_name: str | None = None,
                  tags: dict | None = None, **kwargs) -> MLFlowLogger:
    """Lightning's MLFlowLogger on a SQLite store: a sweep's jobs are the runs of one experiment named by the sweep
    directory, each named by its swept values (also its tags); a single run goes to experiment `gptexp`, named by
    its directory. Runs' files (text samples) go to mlflow-artifacts/ beside the database. The store and the
    experiment are made under a lock beside the database, so that the jobs of a multirun starting together do
    not both create them; SQLite itself serialises their writes."""
    require("mlflow", "logger=mlflow")
    path = sqlite_file(tracking_uri)
    place = current_place(save_dir)
    experiment = experiment_name or place.experiment
    artifacts = (path.parent / "mlflow-artifacts").absolute().as_uri()
    lock_file = path.with_name(path.name + ".lock")
    made = not lock_file.exists()
    try:
        with open(lock_file, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri)  # makes the database's tables the first time
            if client.get_experiment_by_name(experiment) is None:
                client.create_experiment(experiment, artifact_location=artifacts)
    except BaseException:  # a store MLflow refuses: leave nothing of this run beside it
        if made:
            with suppress(OSError):
                lock_file.unlink()
        raise
    tags = {"gptexp.run_dir": str(save_dir), **{f"swept.{k}": v for k, v in place.swept.items()}, **(tags or {})}
    return ContinuingMLFlowLogger(experiment_name=experiment,
                                  run_name=run_name or place.label,
                                  tracking_uri=tracking_uri, artifact_location=artifacts, tags=tags, **kwargs)
