"""plotnine figures of runs: each function takes runs and returns a ggplot, or None when the runs
did not log what it draws."""

from __future__ import annotations

import pandas as pd
from plotnine import (aes, coord_flip, facet_wrap, geom_col, geom_line, geom_point, ggplot, labs, scale_x_log10,
                      scale_y_log10, theme, theme_bw)

from runs import Run, differing_keys

PHASES = ["data", "forward", "backward", "optimizer"]


def tidy(runs: list[Run], prefix: str) -> pd.DataFrame:
    """Long rows (run, steps, metric, value) for every metric whose name starts with `prefix`."""
    frames = []
    for run in runs:
        columns = [c for c in run.metrics if c.startswith(prefix)]
        if columns:
            long = run.metrics.melt(id_vars="steps", value_vars=columns, var_name="metric").dropna()
            frames.append(long.assign(run=run.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def style(figure: ggplot, runs: list[Run]) -> ggplot:
    return figure + theme_bw() + theme(legend_position="bottom" if len(runs) > 1 else "right")


def loss(runs: list[Run]) -> ggplot | None:
    """Training and validation loss against steps; one colour per run in a sweep."""
    data = pd.concat([tidy(runs, "train/loss"), tidy(runs, "val/loss")], ignore_index=True)
    if data.empty:
        return None
    data["split"] = data["metric"].str.split("/").str[0]
    colour = "run" if len(runs) > 1 else "split"
    figure = (ggplot(data, aes("steps", "value", color=colour, linetype="split")) + geom_line()
              + geom_point(data=data[data["split"] == "val"], size=1.5) + labs(x="optimizer steps", y="loss (nats/token)",
                                                                               title="loss: train and validation"))
    return style(figure, runs)


def perplexity(runs: list[Run]) -> ggplot | None:
    data = tidy(runs, "val/ppl")
    if data.empty:
        return None
    figure = (ggplot(data, aes("steps", "value", color="run")) + geom_line() + geom_point() + scale_y_log10()
              + labs(x="optimizer steps", y="validation perplexity (log scale)", title="perplexity = exp(val/loss)"))
    return style(figure, runs)


def faceted(runs: list[Run], prefix: str, title: str, *layers) -> ggplot | None:
    """Every metric under `prefix` against steps, one panel each, one colour per run."""
    data = tidy(runs, prefix)
    if data.empty:
        return None
    data["metric"] = data["metric"].str.removeprefix(prefix)
    figure = ggplot(data, aes("steps", "value", color="run")) + geom_line()
    for layer in layers:
        figure = figure + layer
    figure = figure + facet_wrap("metric", scales="free_y") + labs(x="optimizer steps", y="", title=title)
    return style(figure, runs)


def throughput(runs: list[Run]) -> ggplot | None:
    return faceted(runs, "perf/", "throughput and model FLOPs utilisation")


def phases(runs: list[Run]) -> ggplot | None:
    """Typical time per step in each phase (median over logging intervals, so one-off stalls such as the
    first write of a logger do not dominate), one bar per run."""
    rows = []
    for run in runs:
        for phase in PHASES:
            column = f"time/{phase}_ms"
            if column in run.metrics and run.metrics[column].notna().any():
                rows.append({"run": run.name, "phase": phase, "ms": run.metrics[column].median()})
    if not rows:
        return None
    data = pd.DataFrame(rows)
    data["phase"] = pd.Categorical(data["phase"], categories=PHASES[::-1], ordered=True)
    figure = (ggplot(data, aes("run", "ms", fill="phase")) + geom_col() + coord_flip()
              + labs(x="", y="ms per step (median over logging intervals)",
                   title="where a training step's time goes"))
    return style(figure, runs)


def memory(runs: list[Run]) -> ggplot | None:
    return faceted(runs, "mem/", "memory (MB) and tensor allocations per step", geom_point(size=1))


def sweep(runs: list[Run]) -> ggplot | None:
    """Each run's best validation loss against each hyperparameter the sweep varied, one panel per parameter."""
    swept = differing_keys(runs)
    rows = [{"parameter": key, "value": run.overrides.get(key), "best val/loss": run.metrics["val/loss"].min(),
             "run": run.name}
            for run in runs if "val/loss" in run.metrics for key in swept]
    if len(runs) < 2 or not rows:
        return None
    data = pd.DataFrame(rows)
    numeric = pd.to_numeric(data["value"], errors="coerce")
    if numeric.notna().all():
        data["value"] = numeric
    figure = (ggplot(data, aes("value", "best val/loss")) + geom_point(size=2.5, color="#1f77b4")
              + facet_wrap("parameter", scales="free_x")
              + labs(x="", y="best validation loss", title="sweep: validation loss against each swept setting"))
    if numeric.notna().all() and (numeric > 0).all() and numeric.max() / numeric.min() >= 10:
        figure += scale_x_log10()
    return figure + theme_bw()


FIGURES = {"loss": loss, "perplexity": perplexity, "throughput": throughput, "phases": phases, "memory": memory,
           "sweep": sweep}


def optimisation_history(study) -> ggplot | None:
    """An Optuna study's trials in order: each one's value, and the best so far."""
    values = [(t.number, t.value) for t in study.trials if t.value is not None]
    if not values:
        return None
    data = pd.DataFrame(values, columns=["trial", "value"]).sort_values("trial")
    data["best so far"] = data["value"].cummin() if study.direction.name == "MINIMIZE" else data["value"].cummax()
    return (ggplot(data, aes("trial", "value")) + geom_point(size=2.5, color="#1f77b4")
            + geom_line(aes(y="best so far"), color="#d62728")
            + labs(x="trial", y="best validation loss of the trial",
                   title=f"Optuna study {study.study_name}: optimisation history (red: best so far)") + theme_bw())


def parameter_importance(study) -> ggplot | None:
    """How much each searched parameter explains of the trials' values: Optuna's mean decrease in impurity of a
    random forest fitted to them (its fANOVA evaluator fails on today's NumPy in the optuna 2.10 Hydra's sweeper
    pins)."""
    import optuna

    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError):  # too few finished trials, or no parameter that varied
        return None
    if not importances:
        return None
    data = pd.DataFrame(list(importances.items()), columns=["parameter", "importance"])
    data["parameter"] = pd.Categorical(data["parameter"], categories=list(reversed(importances)))
    title = f"Optuna study {study.study_name}: parameter importance"
    return (ggplot(data, aes("parameter", "importance")) + geom_col(fill="#1f77b4") + coord_flip()
            + labs(x="", y="importance (mean decrease in impurity)", title=title) + theme_bw())


STUDY_FIGURES = {"optuna_history": optimisation_history, "optuna_importance": parameter_importance}
