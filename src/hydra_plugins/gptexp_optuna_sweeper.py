"""gptexp's Hydra sweeper (a Hydra plugin lives in the hydra_plugins package): Optuna's, made to outlive its
process, with a study in a SQLite file in its sweep directory that running the same command again continues
(conf/hparams_search/optuna.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from gptexp.core.config import ConfigError
from gptexp.core.stores import sqlite_path, sqlite_problem

log = logging.getLogger(__name__)


def open_storage(storage):
    """The study's storage: an SQL URL opened with every statement committed as it runs. The optuna (2.10) that
    Hydra's sweeper pins records its schema's version in a transaction that SQLAlchemy 2 no longer commits by
    itself, and then cannot open its own database; with each statement committed it can, and the sweeper, the
    only writer, needs no longer transactions."""
    import optuna

    if isinstance(storage, str) and "://" in storage:
        return optuna.storages.RDBStorage(storage, engine_kwargs={"isolation_level": "AUTOCOMMIT"})
    return storage


def check_storage(storage) -> None:
    """ConfigError naming the study's SQLite file, which is left as it is, and what to do, when it cannot be a
    writable SQLite database (gptexp.core.stores): Optuna would stop with SQLAlchemy's traceback."""
    path = sqlite_path(storage) if isinstance(storage, str) else None
    reason = path and sqlite_problem(path)
    if reason:
        raise ConfigError(f"hydra.sweeper.storage={storage}: cannot open the study: {reason}; it is left as it is: "
                          f"move it away to start a new study, or keep the study elsewhere with "
                          f"hydra.sweeper.storage=sqlite:///<path>")


def finished_trials(storage, study_name: str | None) -> int:
    """How many trials the study in `storage` holds already; 0 for a new study or one kept in memory."""
    import optuna

    if storage is None:
        return 0
    try:
        return len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:  # optuna's answer for a study the storage does not hold
        return 0


class ResumableOptunaSweeper(OptunaSweeper):
    """An OptunaSweeper whose SQLite storage may live in the sweep directory (made first), and whose jobs in a
    continued study are numbered after the trials already run, so that none reuses an earlier trial's directory."""

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        check_storage(impl.storage)
        Path(impl.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        url, impl.storage = impl.storage, open_storage(impl.storage)
        impl.job_idx = finished_trials(impl.storage, impl.study_name)
        if impl.job_idx:
            log.info("continuing study %s in %s: %d trials so far, %d more", impl.study_name, url, impl.job_idx,
                     impl.n_trials)
        return super().sweep(arguments)
