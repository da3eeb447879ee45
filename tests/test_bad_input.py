"""Bad input, table-driven, for every command: each gets one line on stderr naming the problem and the fix,
exit status 2 and no traceback; a run that fails leaves no directory behind and changes nothing written
before."""

import hashlib
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptexp.commands.cli import OUR_FULL_ERROR
from gptexp.core.config import ConfigError, asset_path
from gptexp.finetune import apply as apply_finetune
from gptexp.weights import pretrained
from gptexp.weights.llmc import LlmcFormatError, read_model
from training import ROOT, TINY, execute, train

# (overrides of a tiny train.py run, what stderr must say: the problem, then the fix)
TRAIN_CASES = {
    "unknown group option": (["model=gpt3"], ["Could not find 'model/gpt3'", "gpt2_mini", "llama2_260k"]),
    "malformed override": (["optim.lr"], ["Error parsing override 'optim.lr'"]),
    "seed that is not a number": (["seed=abc"], ["seed must be an integer, got 'abc'"]),
    "unknown key": (["+model.colour=red"], ["unknown key model.colour", "valid keys of model:"]),
    "key that is not there": (["model.colour=red"], ["Could not override 'model.colour'", "Key 'colour' is not in struct"]),
    "wrong type": (["optim.lr=fast"], ["optim.lr must be a float, got 'fast'"]),
    "learning rate under the recipe's floor": (["optim.lr=1e-4"], ["need 0 <= min_lr <= lr", "optim.min_lr=1e-05"]),
    "zero size": (["data.batch_size=0"], ["batch_size must be a positive integer, got 0"]),
    "negative size": (["model.n_layer=-1"], ["n_layer", "-1"]),
    "zero steps": (["trainer.max_steps=0"], ["trainer.max_steps must be a positive number of optimizer steps"]),
    "n_embd not divisible by n_head": (["model.n_head=5"], ["n_embd (32) must be divisible by n_head (5)"]),
    "window longer than the context": (["data.seq_len=64"], ["data.seq_len=64 is longer than the model's context (32)",
                                                             "set data.seq_len<=32"]),
    "block larger than the data": (["model.block_size=200000"], ["needs at least 200001 tokens", "lower data.seq_len"]),
    "missing text file": (["data=text", "data.path=/no/such.txt"], ["data.path=/no/such.txt does not exist",
                                                                     "give the path of a UTF-8 text file"]),
    "text file not given": (["data=text"], ["data=text reads a local file: set data.path="]),
    "missing checkpoint": (["ckpt_path=/no/such/run"], ["ckpt_path=/no/such/run does not exist",
                                                        "pass a .ckpt file or a run directory"]),
    "tokenizer larger than the model": (["model.vocab_size=50"], ["the tokenizer has 65 tokens but the model only 50",
                                                                  "set model.vocab_size=null"]),
    "hub id without network": (["model=gpt2", "model.pretrained=gpt2-medium"], ["'gpt2-medium'", "the hub cannot be reached",
                                                                   "huggingface-cli download gpt2-medium"]),
    "unwritable output directory": ([], ["cannot write the output directory", "is a file, not a directory",
                                         "choose another with hydra.run.dir="]),
    "missing LoRA target": (["finetune=lora", "finetune.target_modules=[nope]"],
                            ["finetune.target_modules: ['nope'] match no linear layer of the model"]),
    "negative temperature": (["callbacks.samples.temperature=-1"], ["callbacks.samples: temperature must be >= 0"]),
    "top_k below 1": (["callbacks.samples.top_k=0"], ["callbacks.samples: top_k must be >= 1"]),
    "top_p above 1": (["callbacks.samples.top_p=1.5"], ["callbacks.samples: top_p must be in (0, 1]"]),
    "unknown nonfinite action": (["on_nonfinite_loss=ignore"], ["on_nonfinite_loss must be 'stop' or 'skip'"]),
    "fp16 on a CPU": (["trainer.precision=16-mixed"], ["trainer.precision=16-mixed needs a CUDA GPU", "32-true"]),
    "unknown optimizer": (["optim.name=sgd"], ["optim: name must be one of adamw, muon, got 'sgd'"]),
}


def in_process(command: str, arguments: list[str], monkeypatch, capfd) -> tuple[int, str]:
    """`python train.py ...` or `python -m gptexp.<command> ...`, run in this process as __main__ (each
    subprocess would spend seconds importing torch and Lightning): (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [command, *arguments])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # as run_command sets them; restored after the test
    monkeypatch.setenv(OUR_FULL_ERROR, "1")
    with pytest.raises(SystemExit) as exit:
        if command == "train.py":
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        else:
            runpy.run_module(f"gptexp.commands.{command}", run_name="__main__")
    return exit.value.code, capfd.readouterr().err


def train_in_process(*overrides: str, monkeypatch, capfd) -> tuple[int, str]:
    return in_process("train.py", [*TINY, *overrides], monkeypatch, capfd)


def one_line_error(stderr: str, messages: list[str]) -> None:
    """stderr is exactly one line, `error: ...`, holding every message."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for message in messages:
        assert message in lines[0], lines[0]


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_refuses_bad_input_cleanly(case, tmp_path, monkeypatch, capfd):
    overrides, messages = TRAIN_CASES[case]
    run_dir = tmp_path / "run"
    if case == "unwritable output directory":
        (tmp_path / "a_file").write_text("")
        run_dir = tmp_path / "a_file" / "run"
    earlier = tmp_path / "earlier.txt"  # something written before, beside the directory the run would use
    earlier.write_text("keep me")
    status, stderr = train_in_process(*overrides, "logger=wandb", f"hydra.run.dir={run_dir}", monkeypatch=monkeypatch,
                                      capfd=capfd)
    assert status == 2
    one_line_error(stderr, messages)
    assert not run_dir.exists() and earlier.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["earlier.txt"] + ["a_file"] * (case == "unwritable output directory"))


# (train.py arguments without TINY's, what stderr must say): recipes and instruction data
RECIPE_CASES = {
    "recipe whose starting run is not given": (["experiment=stories260k_dpo"],
                                               ["finetune.init_from is required by this recipe", "add finetune.init_from=<the run to start from>"]),
    "a starting run that is not a run": (["finetune=full", f"finetune.init_from={ROOT / 'conf'}"],
                                         [f"finetune.init_from={ROOT / 'conf'} is none of the formats",
                                          "pass a run directory (checkpoints/best.ckpt or last.ckpt)"]),
    "unknown template": (["model=llama2_260k", "data=stories_instruct", "data.template=chatml"],
                         ["template='chatml' is not a template; choose one of"]),
}


@pytest.mark.parametrize("case", RECIPE_CASES)
def test_recipes_refuse_bad_input_cleanly(case, tmp_path, monkeypatch, capfd):
    arguments, messages = RECIPE_CASES[case]
    status, stderr = in_process("train.py", [*arguments, "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"],
                                monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, messages)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"caf\xe9 au lait", "is not UTF-8 text (byte 0xe9 at offset 3)")])
def test_bad_text_files(content, message, tmp_path, monkeypatch, capfd):
    (tmp_path / "text.txt").write_bytes(content)
    status, stderr = train_in_process("data=text", f"data.path={tmp_path / 'text.txt'}",
                                      f"hydra.run.dir={tmp_path / 'run' / 'nested'}", monkeypatch=monkeypatch, capfd=capfd)
    assert status == 2
    one_line_error(stderr, [message])
    assert not (tmp_path / "run").exists()  # nor the parent Hydra made for it


def test_a_checkpoint_of_another_architecture_names_the_tensor(run_dir, tmp_path):
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    result = train(f"ckpt_path={run_dir}", "model.n_layer=2", run_dir=tmp_path / "run")
    assert result.returncode == 2
    assert "holds another architecture: tensor model.transformer.h.1.ln_1.weight is missing" in result.stderr
    assert "resume with the model.* and finetune settings of the run that wrote it" in result.stderr
    assert not (tmp_path / "run").exists()
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before  # the earlier run is untouched


def tiny_gpt2():
    return pretrained.build({"arch": "gpt2", "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 8}, 20)


@pytest.mark.parametrize("call, error, message", [
    (lambda: tiny_gpt2().generate(torch.zeros(1, 9, dtype=torch.long), 1), ValueError,
     "prompt has 9 tokens but the model's context is 8"),
    (lambda: tiny_gpt2().generate(torch.zeros(1, 2, dtype=torch.long), 1, temperature=-0.5), ValueError,
     "temperature must be >= 0 (0 means greedy), got -0.5"),
    (lambda: tiny_gpt2().generate(torch.zeros(1, 2, dtype=torch.long), 1, top_k=0), ValueError,
     "top_k must be >= 1 or None (no limit), got 0"),
    (lambda: tiny_gpt2().generate(torch.zeros(1, 2, dtype=torch.long), 1, top_p=0.0), ValueError,
     "top_p must be in (0, 1] or None (no limit), got 0.0"),
    (lambda: pretrained.build({"arch": "llama", "dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 3,
                           "max_seq_len": 16, "hidden_dim": 128}, 100), ConfigError, "n_kv_heads"),
    (lambda: apply_finetune(tiny_gpt2(), {"method": "lora", "target_modules": ["nope"]}), ConfigError,
     "match no linear layer of the model"),
])
def test_api_refuses_bad_input(call, error, message):
    with pytest.raises(error) as caught:
        call()
    assert message in str(caught.value)


def test_an_llmc_file_with_a_bad_magic(tmp_path):
    (tmp_path / "model.bin").write_bytes((12345).to_bytes(4, "little") + bytes(1020))
    with pytest.raises(LlmcFormatError, match="bad magic 12345, expected 20240326 for an llm.c model file"):
        read_model(tmp_path / "model.bin")


# (python -m gptexp.<command>, arguments, what stderr must say); each runs in an empty directory, which must stay empty
COMMAND_CASES = {
    "export: no source": ("export", [], ["source is required: add source=<value>"]),
    "export: missing source": ("export", ["source=/no/such", "output=x.bin"],
                               ["source=/no/such does not exist; pass a run directory", "hub id"]),
    "export: a file of another kind": ("export", [f"source={ROOT / 'README.md'}", "output=x.bin"],
                                       ["README.md is none of the formats"]),
    "export: missing checkpoint": ("export", ["source=/no/such.ckpt", "output=x.bin"],
                                   ["source=/no/such.ckpt does not exist"]),
    "export: not a GPT-2": ("export", [f"source={asset_path('stories260K/stories260K.bin')}", "output=x.bin"],
                            ["holds a Llama; only GPT-2 exports to these formats"]),
    "export: unknown format": ("export", ["format=onnx", "source=x", "output=y"], ["format='onnx': choose llmc, hf, quantized or gguf"]),
    "export: unknown key": ("export", ["sorce=x"], ["Could not override 'sorce'", "Key 'sorce' is not in struct"]),
    "verify: no model": ("verify", [], ["model is required: add model=<value>"]),
    "verify: missing files": ("verify", ["model=/no/model.bin", "state=/no/state.bin"],
                              ["model=/no/model.bin is not a file", "python -m gptexp export writes both"]),
    "verify: not an llm.c file": ("verify", [f"model={ROOT / 'README.md'}", f"state={ROOT / 'README.md'}"],
                                  ["README.md: bad magic", "expected 20240326 for an llm.c model file"]),
    "prepare: unknown dataset": ("prepare", ["data=nope"], ["Could not find 'data/nope'", "shakespeare, "]),
    "prepare: text without a path": ("prepare", ["data=text"], ["data=text reads a local file: set data.path="]),
    "prepare: missing text file": ("prepare", ["data=text", "data.path=/no/such.txt"],
                                   ["data.path=/no/such.txt does not exist"]),
    "bench: unknown preset": ("bench", ["preset=nope"], ["Could not find 'preset/nope'", "cpu, decode, gpu, smoke"]),
    "bench: unknown implementation": ("bench", ["impls=[gptexp,vllm]"], ["impls=['gptexp', 'vllm']: choose from"]),
    "bench: unknown device": ("bench", ["device=tpu"], ["device='tpu': choose auto, cpu or cuda"]),
    "bench: unknown precision": ("bench", ["precision=fp8"], ["precision=['fp8']: choose fp32 and/or bf16"]),
    "bench: no repeats": ("bench", ["repeats=0"], ["repeats must be an integer >= 1, got 0"]),
    "sample: no source": ("sample", [], ["source is required: add source=<value>"]),
    "sample: missing source": ("sample", ["source=/no/such"], ["source=/no/such does not exist; pass a run directory",
                                                               "a llama2.c .bin or an llm.c model .bin"]),
    "sample: a file of another kind": ("sample", [f"source={ROOT / 'README.md'}"], ["README.md is none of the formats"]),
    "sample: not a model .bin": ("sample", [f"source={ROOT / 'src/gptexp/assets/gpt2.tiktoken'}"],
                                 ["gpt2.tiktoken is none of the formats"]),
    "sample: prompt longer than the context": ("sample", [f"source={asset_path('stories260K/stories260K.bin')}",
                                                          f"prompt=FILE:{ROOT / 'README.md'}"],
                                               ["longer than the model's context (512)", "crop=true"]),
    "sample: missing prompts file": ("sample", [f"source={asset_path('stories260K/stories260K.bin')}",
                                                "prompts=/no/prompts.txt"],
                                     ["prompts=/no/prompts.txt is not a file"]),
    "sample: negative temperature": ("sample", ["source=x", "temperature=-1"], ["temperature must be >= 0"]),
    "sample: unknown precision": ("sample", ["source=x", "precision=fp16"], ["precision='fp16': choose fp32 or bf16"]),
    "sample: unknown checkpoint": ("sample", [f"source={asset_path('stories260K/stories260K.bin')}", "checkpoint=first"],
                                   ["checkpoint='first': choose best or last"]),
}


@pytest.mark.parametrize("case", COMMAND_CASES)
def test_every_command_refuses_bad_input_cleanly(case, tmp_path, monkeypatch, capfd):
    command, arguments, messages = COMMAND_CASES[case]
    monkeypatch.chdir(tmp_path)
    status, stderr = in_process(command, arguments, monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, messages)
    assert list(tmp_path.iterdir()) == []  # no output directory, no partial file


@pytest.mark.parametrize("command, arguments, fix", [
    ("sample", ["source={junk}"], "use another checkpoint of the run (its best.ckpt or last.ckpt) or another model"),
    ("train.py", [*TINY, "finetune=full", "finetune.init_from={junk}"], "use another checkpoint of the run"),
    ("train.py", [*TINY, "ckpt_path={junk}"], "resume from an earlier checkpoint (checkpoints/best.ckpt beside it) or "
                                              "leave ckpt_path unset"),
])
def test_a_ckpt_that_is_not_one_gets_the_fix_of_the_option_that_named_it(command, arguments, fix, tmp_path,
                                                                         monkeypatch, capfd):
    """Only train.py has ckpt_path: a model to read (source=, finetune.init_from=) is not told to unset it."""
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a zip archive")
    arguments = [a.format(junk=junk) for a in arguments] + [f"hydra.run.dir={tmp_path / 'run'}"]
    status, stderr = in_process(command, arguments, monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, [f"{junk} is truncated or not a checkpoint (File is not a zip file); {fix}"])
    assert ("ckpt_path" in stderr) == ("ckpt_path" in fix)
    assert not (tmp_path / "run").exists()


REPORT_CASES = {
    "no path": ([], ["the following arguments are required: path"]),
    "missing directory": (["/no/such/run"], ["/no/such/run is not a directory; pass a run directory"]),
    "a directory without runs": (["{tmp}"], ["no runs under", "expected metrics.csv in it"]),
    "an empty metrics.csv": (["{tmp}/run"], ["No columns to parse from file"]),
}


@pytest.mark.parametrize("case", REPORT_CASES)
def test_report_refuses_bad_input_cleanly(case, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("")
    arguments, messages = REPORT_CASES[case]
    if case == "a directory without runs":
        (tmp_path / "run" / "metrics.csv").unlink()
    result = subprocess.run([sys.executable, str(ROOT / "analysis" / "report.py"),
                             *(a.format(tmp=tmp_path) for a in arguments)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    one_line_error(result.stderr, messages)
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and not (tmp_path / "run" / "report").exists()


@pytest.mark.parametrize("command", [["train.py", *TINY, "seed=abc"], ["-m", "gptexp", "export", "source=/no/such.ckpt"]])
def test_commands_answer_in_one_line_from_the_command_line(command, tmp_path):
    """The real `python <command>` path (run_command in __main__), in a fresh process."""
    result = subprocess.run([sys.executable, *command, f"hydra.run.dir={tmp_path / 'run'}"] if command[0] == "train.py"
                            else [sys.executable, *command], cwd=ROOT if command[0] == "train.py" else tmp_path,
                            capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    one_line_error(result.stderr, ["seed must be an integer" if command[0] == "train.py" else "does not exist"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["train.py"], ["-m", "gptexp", "sample", "source=x"],
                                     ["-m", "gptexp.commands.evaluate"], ["analysis/report.py", "."]])
def test_ctrl_c_while_a_command_starts_is_one_line(command):
    """Ctrl-C a tenth of a second after the entry point's first lines ran (python -X importtime reports each import
    as it ends), while torch and Lightning (or pandas and plotnine) still import: one line, the shell's 130."""
    process = subprocess.Popen([sys.executable, "-X", "importtime", *command], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if line.rstrip().endswith("gptexp.core.interrupt"):
            break
    time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130
    assert [line for line in rest.splitlines() if not line.startswith("import time:")] == [
        "error: interrupted (Ctrl-C) while starting; nothing was written"]


def test_an_unknown_command_is_named_with_the_choices(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptexp", "smaple", "source=x"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    one_line_error(result.stderr, ["unknown command 'smaple': choose train, sample, evaluate, bench"])
    listing = execute("-m", "gptexp", "--help", timeout=120)
    assert listing.returncode == 0 and "evaluate" in listing.stderr and list(tmp_path.iterdir()) == []
