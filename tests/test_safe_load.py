"""Loading never runs code from a file: a pickled file (a checkpoint, a Meta .pth, a pytorch_model.bin) that asks
the unpickler for anything but tensors and plain data is refused by every entry point in one line, before
anything of it runs; trust_checkpoint=true is the one way to load such a file; gptexp's own checkpoints, new
and written before, need no trust and resume exactly."""

import json
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from test_bad_input import in_process, one_line_error

from gptexp.core.safe_load import UnsafeFileError, torch_load
from gptexp.training.callbacks.resume import rng_states, set_rng_states
from gptexp.weights import checkpoints
from training import TINY, history, train


class Payload:
    """What a malicious file carries: unpickled in full, it runs a shell command (here: makes a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


REFUSED = ["asks to unpickle posix.system", "could run code", "load it with trust_checkpoint=true"]


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "pwned"


@pytest.fixture
def payload(tmp_path, marker) -> Path:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload(marker)}, path)
    return path


@pytest.fixture
def victim(run_dir, tmp_path, payload) -> Path:
    """A copy of a real run directory whose checkpoints/last.ckpt was replaced by the payload."""
    victim = tmp_path / "victim"
    shutil.copytree(run_dir, victim)
    shutil.copyfile(payload, victim / "checkpoints" / "last.ckpt")
    return victim


def contents(directory: Path) -> dict[str, bytes]:
    """What a run directory holds, but what any command started in it rewrites (its config, log and lock,
    the last released when the process ends: here the test's)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.parent.name != ".hydra" and p.name not in ("train.log", ".lock")}


# (command, arguments, the file that is refused); {payload} / {victim} / {tmp} are filled in
ENTRY_POINTS = {
    "sample a .ckpt": ("sample", ["source={payload}"], "{payload}"),
    "sample mode=chat": ("sample", ["mode=chat", "source={payload}"], "{payload}"),
    "evaluate a .ckpt": ("evaluate", ["source={payload}"], "{payload}"),
    "export a .ckpt": ("export", ["source={payload}", "output={tmp}/out.bin"], "{payload}"),
    "train.py ckpt_path=<file>": ("train.py", ["ckpt_path={payload}", "hydra.run.dir={tmp}/run"], "{payload}"),
    "train.py ckpt_path=<run directory>": ("train.py", ["ckpt_path={victim}", "hydra.run.dir={tmp}/run"],
                                           "{victim}/checkpoints/last.ckpt"),
    "train.py resuming its run directory": ("train.py", ["hydra.run.dir={victim}"], "{victim}/checkpoints/last.ckpt"),
    "sample a run directory": ("sample", ["source={victim}", "checkpoint=last"], "{victim}/checkpoints/last.ckpt"),
    "evaluate a run directory": ("evaluate", ["source={victim}", "checkpoint=last"], "{victim}/checkpoints/last.ckpt"),
    "export a run directory": ("export", ["source={victim}", "output={tmp}/out.bin"], "{victim}/checkpoints/last.ckpt"),
}


@pytest.mark.parametrize("case", ENTRY_POINTS)
def test_every_entry_point_refuses_a_payload_before_it_runs(case, payload, victim, marker, tmp_path, monkeypatch,
                                                             capfd):
    command, arguments, refused = ENTRY_POINTS[case]
    fill = {"payload": payload, "victim": victim, "tmp": tmp_path}
    work = tmp_path / "work"  # the commands' default output directories are made under the working directory
    work.mkdir()
    monkeypatch.chdir(work)
    before = contents(victim)
    if command == "train.py":
        arguments = [*TINY, *arguments]
    status, stderr = in_process(command, [a.format(**fill) for a in arguments], monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, [f"{refused.format(**fill)} {REFUSED[0]}", *REFUSED[1:]])
    assert not marker.exists()  # nothing of the file ran
    assert list(work.iterdir()) == [] and not (tmp_path / "run").exists() and not (tmp_path / "out.bin").exists()
    assert contents(victim) == before  # the run directory it was fed is as it was


def test_pickled_weights_of_other_formats_are_refused_alike(tmp_path, marker, monkeypatch, capfd):
    """An HF directory's pytorch_model.bin and a Meta directory's consolidated.00.pth: the same refusal, from the
    commands and from train.py's pretrained weights."""
    evil = {"x": Payload(marker)}
    hf, meta = tmp_path / "hf", tmp_path / "meta"
    hf.mkdir(), meta.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8,
                                                "n_positions": 16, "vocab_size": 50257}))
    torch.save(evil, hf / "pytorch_model.bin")
    (meta / "params.json").write_text(json.dumps({"dim": 8, "n_layers": 1, "n_heads": 2, "vocab_size": -1}))
    torch.save(evil, meta / "consolidated.00.pth")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for command, arguments, refused in [("sample", [f"source={hf}"], hf / "pytorch_model.bin"),
                                        ("sample", [f"source={meta}"], meta / "consolidated.00.pth"),
                                        ("train.py", ["model=gpt2", f"model.pretrained={hf}", "data.batch_size=2",
                                                      f"hydra.run.dir={tmp_path / 'run'}"], hf / "pytorch_model.bin")]:
        status, stderr = in_process(command, arguments, monkeypatch, capfd)
        assert status == 2
        one_line_error(stderr, [f"{refused} {REFUSED[0]}", *REFUSED[1:]])
    assert not marker.exists() and list(work.iterdir()) == [] and not (tmp_path / "run").exists()


def test_a_file_that_needs_more_than_plain_data_is_refused_by_name(tmp_path):
    path = tmp_path / "more.ckpt"
    torch.save({"state_dict": {}, "where": PurePosixPath("/data"), "version": (1, 2)}, path)
    with pytest.raises(UnsafeFileError, match=r"more.ckpt asks to unpickle pathlib.PurePosixPath: not tensors"):
        torch_load(path)
    with pytest.raises(UnsafeFileError, match="pathlib.PurePosixPath"):
        checkpoints.load(path)


def test_gptexps_checkpoints_hold_only_tensors_and_plain_data(run_dir):
    """So torch.load with its own defaults (weights_only=True, no allowed types added) reads them."""
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        assert torch.load(path)["gptexp_model"]["class"] == "GPT2"


def legacy(state: dict) -> dict:
    """NumPy's RNG state as checkpoints held it before 2026-12-04: NumPy's own tuple, with an array."""
    numpy = state["numpy"]
    return state | {"numpy": (numpy["kind"], numpy["key"].numpy().astype(np.uint32), numpy["position"],
                              numpy["has_gauss"], numpy["cached_gaussian"])}


def test_numpys_rng_state_comes_back_from_either_form():
    np.random.seed(7)
    np.random.randn(3)  # an odd count: a cached Gaussian is part of the state
    state = rng_states()
    expected = np.random.randn(5)
    for form in (state, legacy(state)):
        set_rng_states(form)
        assert (np.random.randn(5) == expected).all()


def rewrite_pickle(path: Path, old: bytes, new: bytes) -> None:
    """Edit the pickle inside a torch.save zip, as another NumPy would have written it."""
    with zipfile.ZipFile(path) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data.replace(old, new) if name.endswith("data.pkl") else data)


def test_checkpoints_written_before_load_weights_only(run_dir, tmp_path):
    """Their NumPy array's types are allowed by name (under NumPy 2's module path and NumPy 1's), nothing more."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt")
    checkpoint["gptexp_resume"]["rng"] = legacy(checkpoint["gptexp_resume"]["rng"])
    for numpy_module in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
        path = tmp_path / "old.ckpt"
        torch.save(checkpoint, path)
        rewrite_pickle(path, b"numpy._core.multiarray", numpy_module)
        loaded = checkpoints.load(path)
        assert (loaded["gptexp_resume"]["rng"]["numpy"][1] == checkpoint["gptexp_resume"]["rng"]["numpy"][1]).all()


def test_old_and_trusted_checkpoints_resume_exactly(run_dir, tmp_path, monkeypatch, capfd):
    """From the same step: the state as written before 2026-12-04, and the run's own checkpoint with an extra
    non-plain entry, which needs trust_checkpoint=true and then loads as the checkpoint itself: one history."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt")
    old = checkpoint | {"gptexp_resume": checkpoint["gptexp_resume"] | {"rng": legacy(checkpoint["gptexp_resume"]["rng"])}}
    for name, state in [("old", old), ("trusted", checkpoint | {"where": PurePosixPath("/data")})]:
        shutil.copytree(run_dir, tmp_path / f"{name}_run")  # the same run, its last checkpoint replaced
        torch.save(state, tmp_path / f"{name}_run" / "checkpoints" / "last.ckpt")
    more = ["trainer.max_steps=50", "logger=csv"]
    status, stderr = in_process("train.py", [*TINY, *more, f"ckpt_path={tmp_path / 'trusted_run'}",
                                             f"hydra.run.dir={tmp_path / 'refused'}"], monkeypatch, capfd)
    assert status == 2 and "asks to unpickle pathlib.PurePosixPath" in stderr
    histories = []
    for name, extra in [("old", [f"ckpt_path={tmp_path / 'old_run'}"]),
                        ("trusted", [f"ckpt_path={tmp_path / 'trusted_run'}", "trust_checkpoint=true"])]:
        result = train(*more, *extra, run_dir=tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
        histories.append(history(tmp_path / name))
    assert "is unpickled in full (trust_checkpoint=true): it asks for pathlib.PurePosixPath" in result.stdout + result.stderr
    assert histories[0] == histories[1]
    assert max(int(row[0]) for row in histories[0]) >= 49  # it went on past the checkpoint's step 40


def test_trust_checkpoint_takes_only_a_boolean(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    status, stderr = in_process("sample", ["source=x.ckpt", "trust_checkpoint=maybe"], monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, ["trust_checkpoint must be true or false, got 'maybe'"])
