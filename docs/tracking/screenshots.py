"""Screenshots of a sweep in TensorBoard and in MLflow's run comparison, taken with headless Chromium (Debian's
`chromium` package), each checked to show every run of the sweep (their names in the page Chromium rendered).

    python train.py experiment=minigpt_lr_sweep logger=all hydra.sweep.dir=multirun/minigpt_lr_sweep
    python docs/tracking/screenshots.py multirun/minigpt_lr_sweep [--mlflow sqlite:///outputs/mlflow.db]

Writes docs/tracking/tensorboard.png and docs/tracking/mlflow.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def serve(command: list[str], url: str) -> subprocess.Popen:
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"error: {command[0]} did not answer at {url}")
            time.sleep(0.5)


def chromium(url: str, screenshot: Path | None = None, budget_ms: int = 20000, height: int = 1000) -> str:
    """The page Chromium rendered at `url` (its DOM, after `budget_ms` of the page's own time); with `screenshot`,
    a PNG of it too."""
    base = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size=1600,{height}", f"--virtual-time-budget={budget_ms}"]
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=300)
    return subprocess.run([*base, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=300).stdout


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--mlflow", default="sqlite:///outputs/mlflow.db", help="the MLflow store the sweep wrote")
    args = parser.parse_args()
    names = sorted(p.name for p in (args.sweep / "tensorboard").iterdir() if p.is_dir())

    # TensorBoard draws its run list inside web components, which a DOM dump does not reach: the runs it lists
    # are those its API serves the page
    server = serve([str(BIN / "tensorboard"), "--logdir", str(args.sweep / "tensorboard"), "--host", "127.0.0.1",
                    "--port", "16123"], "http://127.0.0.1:16123/data/runs")
    try:
        chromium("http://127.0.0.1:16123/?darkMode=false#scalars&tagFilter=loss%7Cppl", HERE / "tensorboard.png")
        with urllib.request.urlopen("http://127.0.0.1:16123/data/runs", timeout=10) as response:
            served = sorted(json.loads(response.read()))
    finally:
        server.terminate()
    print(f"tensorboard.png: runs {served}; the sweep's jobs: {names}")

    server = serve([str(BIN / "mlflow"), "server", "--backend-store-uri", args.mlflow, "--host", "127.0.0.1",
                    "--port", "15123", "--workers", "1"], "http://127.0.0.1:15123/health")
    try:
        api = "http://127.0.0.1:15123/api/2.0/mlflow"
        query = urllib.parse.urlencode({"experiment_name": str(args.sweep)})  # as the sweep named it
        with urllib.request.urlopen(f"{api}/experiments/get-by-name?{query}", timeout=10) as response:
            experiment = json.loads(response.read())["experiment"]["experiment_id"]
        runs = [run for run in post(f"{api}/runs/search", {"experiment_ids": [experiment]})["runs"]
                if {"key": "job_type", "value": "eval"} not in run["data"].get("tags", [])]
        ids = json.dumps([run["info"]["run_id"] for run in runs], separators=(",", ":"))
        url = (f"http://127.0.0.1:15123/#/compare-runs?runs={urllib.parse.quote(ids)}"
               f"&experiments={urllib.parse.quote(json.dumps([experiment]))}")
        page = chromium(url, HERE / "mlflow.png", budget_ms=30000, height=1500)
    finally:
        server.terminate()
    shown = [run["info"]["run_name"] for run in runs if run["info"]["run_name"] in page]
    print(f"mlflow.png: {len(runs)} runs, {len(shown)} named in the page")


if __name__ == "__main__":
    main()
