"""The package's floors (README, "Where things live"): each room imports only the rooms below it and nothing runs in
a circle, as import-linter's contracts in pyproject.toml say, and those contracts do catch an import that runs up a
floor; the package root holds the rooms and its entry points only, and the README's map names every room."""

import re
import shutil
import subprocess
import sys
import tomllib

from training import ROOT

PACKAGE = ROOT / "src" / "gptexp"


def lint_imports(source_root) -> subprocess.CompletedProcess:
    """import-linter on the package found under `source_root`, with the repository's contracts."""
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(source_root)})


def test_every_room_imports_only_the_floors_below_it_and_nothing_runs_in_a_circle():
    result = lint_imports(ROOT / "src")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_import_up_a_floor_or_in_a_circle_breaks_the_contracts(tmp_path):
    shutil.copytree(ROOT / "src" / "gptexp", tmp_path / "gptexp", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    base = tmp_path / "gptexp" / "models" / "base.py"
    base.write_text(base.read_text() + "\n\ndef reads_files():\n    from gptexp.weights import load_source\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1 and "gptexp.models.base -> gptexp.weights" in result.stdout, result.stdout[-3000:]
    assert "Contracts: 0 kept, 2 broken." in result.stdout  # up a floor, and a circle: weights imports models


def test_the_package_root_holds_the_rooms_and_the_readme_names_each():
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    rooms = {room.strip() for layer in layers for room in layer.split("|")}
    found = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert found == rooms | {"__init__.py", "__main__.py", "assets"}
    where = (ROOT / "README.md").read_text().split("## Where things live", 1)[1].split("```")[1]
    assert set(re.findall(r"^  (\w+)/", where, re.M)) == rooms
