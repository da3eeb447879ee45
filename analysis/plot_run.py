"""Loss and perplexity curves of one run: python analysis/plot_run.py <run directory>

Reads <run>/metrics.csv (written by every gptexp run) and writes <run>/curves.png:
train and validation loss against step, and validation perplexity.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from plotnine import aes, facet_wrap, geom_line, geom_point, ggplot, labs, theme_bw


def tidy_metrics(run_dir: Path) -> pd.DataFrame:
    """metrics.csv as long rows (step, metric, value) for loss and perplexity."""
    wide = pd.read_csv(run_dir / "metrics.csv")
    columns = [c for c in ("train/loss", "val/loss", "val/ppl") if c in wide]
    long = wide.melt(id_vars="step", value_vars=columns, var_name="metric", value_name="value").dropna()
    long["panel"] = long["metric"].map(lambda m: "perplexity" if m.endswith("ppl") else "loss")
    return long


def curves(metrics: pd.DataFrame, title: str) -> ggplot:
    return (ggplot(metrics, aes("step", "value", color="metric"))
            + geom_line() + geom_point(data=metrics[metrics["metric"].str.startswith("val")], size=1.5)
            + facet_wrap("panel", scales="free_y") + labs(title=title, x="step", y="") + theme_bw())


def main(run_dir: str) -> Path:
    run = Path(run_dir)
    out = run / "curves.png"
    curves(tidy_metrics(run), title=str(run)).save(out, width=9, height=3.5, dpi=120, verbose=False)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(main(sys.argv[1]))
