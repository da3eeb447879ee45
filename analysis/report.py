"""A report of a run or a sweep: python analysis/report.py <run or sweep directory> [--wandb entity/project]

Writes <directory>/report/: each figure that the runs' metrics allow (loss, perplexity, throughput,
phases, memory, sweep) as PNG and PDF, and summary.md: a table of the runs, each named by the values that set
it apart (`optim.lr=0.003`), the evaluations run on them (`python -m gptexp evaluate source=<run>`, found
under --evaluations) and links to the figures.
The directory may also be a wandb offline run folder; with --wandb the runs come from the wandb API.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from gptexp.core.interrupt import answer_while_starting, started

answer_while_starting()  # Ctrl-C while pandas and plotnine import: one line, exit status 130
import figures  # noqa: E402
import pandas as pd  # noqa: E402
from runs import Run, differing_keys, evaluations, load  # noqa: E402

started()


def last(run: Run, column: str) -> float:
    values = run.metrics[column].dropna() if column in run.metrics else []
    return float(values.iloc[-1]) if len(values) else math.nan


def median(run: Run, column: str) -> float:
    values = run.metrics[column].dropna() if column in run.metrics else []
    return float(values.median()) if len(values) else math.nan


def summary(runs: list[Run], written: list[str], source: str, evaluated: list[dict] = ()) -> str:
    """Markdown: one row per run (its overrides, length, best and final validation, speed, phase shares)."""
    swept = differing_keys(runs) if len(runs) > 1 else list(runs[0].overrides)
    common = {k: v for k, v in runs[0].overrides.items() if k not in swept}
    lines = [f"# Report: {source}", "", f"{len(runs)} run{'s' if len(runs) > 1 else ''}"
             + (f"; every run with {', '.join(f'`{k}={v}`' for k, v in common.items())}" if common else "") + ".", "",
             "| run | overrides | steps | best val/loss | final val/ppl | tokens/s (median) | MFU | "
             "data / forward / backward / optimizer |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        best = run.metrics["val/loss"].min() if "val/loss" in run.metrics else math.nan
        means = [median(run, f"time/{phase}_ms") for phase in figures.PHASES]
        total = sum(m for m in means if m == m)
        shares = " / ".join(f"{100 * m / total:.0f}%" for m in means) if total else ""
        overrides = ", ".join(f"`{k}={run.overrides[k]}`" for k in swept if k in run.overrides)
        lines.append(f"| {run.name} | {overrides} | {int(run.metrics['steps'].max())} | {best:.4f} | "
                     f"{last(run, 'val/ppl'):.3f} | {median(run, 'perf/tokens_per_sec'):,.0f} | "
                     f"{median(run, 'perf/mfu'):.1%} | {shares} |")
    if len(runs) > 1 and any("val/loss" in r.metrics for r in runs):
        best_run = min((r for r in runs if "val/loss" in r.metrics), key=lambda r: r.metrics["val/loss"].min())
        lines += ["", f"Best: **{best_run.name}**, val/loss {best_run.metrics['val/loss'].min():.4f}."]
    if evaluated:
        lines += ["", "## Evaluations", "", "| run | task | on | perplexity | bits/byte | acc | acc_norm | scored |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in evaluated:
            cells = [f"{e[k]:.4f}" if isinstance(e.get(k), float) else "" for k in ("perplexity", "bits_per_byte",
                                                                                 "acc", "acc_norm")]
            scored = f"{e['tokens']:,} tokens" if "tokens" in e else f"{e.get('examples', 0):,} examples"
            lines.append(f"| {e['run']} | {e['task']} | {e.get('on', '')} | {' | '.join(cells)} | {scored} |")
    lines += ["", "## Figures", ""] + [f"![{name}]({name}.png) ([PDF]({name}.pdf))" for name in written]
    return "\n".join(lines) + "\n"


def report(path: str | Path, wandb_project: str | None = None, out: str | Path | None = None,
           evaluations_dir: str | Path = "outputs/evaluate") -> Path:
    runs = load(path, wandb_project)
    evaluated = evaluations(runs, evaluations_dir) if Path(evaluations_dir).is_dir() else []
    out = Path(out or Path(path) / "report")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    drawn = [(name, draw(runs)) for name, draw in figures.FIGURES.items()]
    study = optuna_study(Path(path))
    if study is not None:  # an Optuna search (hparams_search=optuna): its history and what mattered
        drawn += [(name, draw(study)) for name, draw in figures.STUDY_FIGURES.items()]
    for name, figure in drawn:
        if figure is not None:
            for extension in ("png", "pdf"):
                figure.save(out / f"{name}.{extension}", width=9, height=4.5, dpi=120, verbose=False)
            written.append(name)
    (out / "summary.md").write_text(summary(runs, written, wandb_project or str(path), evaluated))
    return out


def optuna_study(directory: Path):
    """The Optuna study an hparams_search=optuna sweep keeps in its directory (optuna.db), or None."""
    if not (directory / "optuna.db").is_file():
        return None
    import optuna

    storage = f"sqlite:///{(directory / 'optuna.db').resolve()}"
    names = [summary.study_name for summary in optuna.get_all_study_summaries(storage)]
    return optuna.load_study(study_name=names[0], storage=storage) if len(names) == 1 else None


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit status 2), like gptexp's commands."""

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message}; see python analysis/report.py --help\n")


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a run directory, a sweep directory or a wandb offline run folder")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from the wandb API instead")
    parser.add_argument("--out", help="where to write the report (default: <path>/report)")
    parser.add_argument("--evaluations", default="outputs/evaluate", metavar="DIR",
                        help="where to look for the results.json of `python -m gptexp evaluate` runs on these runs "
                             "(default: outputs/evaluate)")
    args = parser.parse_args()
    if not args.wandb and not Path(args.path).is_dir():
        parser.exit(2, f"error: {args.path} is not a directory; pass a run directory (outputs/<date>/<time>), "
                       f"a sweep directory (multirun/<date>/<time>) or a wandb offline-run-* folder\n")
    try:
        print(report(args.path, args.wandb, args.out, args.evaluations))
    except KeyboardInterrupt:
        parser.exit(130, "error: interrupted (Ctrl-C); the report is incomplete\n")
    except (FileNotFoundError, NotADirectoryError, PermissionError, pd.errors.EmptyDataError, pd.errors.ParserError,
            KeyError) as error:
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
