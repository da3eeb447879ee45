"""python -m gptexp sample, run as a user runs it: every source format, the sampling options, the stream on
stdout, the statistics on stderr and the samples.jsonl it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_llama_real import LLAMA2C_EXPECTED

from gptexp.data.tokenizers import TextStream
from gptexp.core.config import asset_path
from gptexp.data.tokenizers import gpt2_tokenizer
from gptexp.weights import load_source
from training import ROOT, execute, train

STORIES = asset_path("stories260K/stories260K.bin")


def sample(*args: str, out: Path) -> subprocess.CompletedProcess:
    result = execute("-m", "gptexp", "sample", *args, f"hydra.run.dir={out}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_stories260k_greedy_from_bos_writes_llama2cs_text(tmp_path):
    """The bundled llama2.c model through the command: exactly the text llama2.c's own test expects."""
    result = sample(f"source={STORIES}", "prompt=''", "temperature=0", "max_new_tokens=200", out=tmp_path)
    assert result.stdout == LLAMA2C_EXPECTED + "\n"
    assert "[1 x 1 prompt tokens, 200 new tokens, first token after" in result.stderr and "tokens/s]" in result.stderr
    [record] = records(tmp_path)
    assert record == {"prompt": "", "completion": LLAMA2C_EXPECTED, "prompt_tokens": 1, "new_tokens": 200,
                      "ended_by": "max_new_tokens"}


def test_a_stop_string_ends_the_sample_before_it(tmp_path):
    sample(f"source={STORIES}", "prompt='Once upon a time'", "temperature=0", "stop=[Lily,park]", out=tmp_path)
    [record] = records(tmp_path)
    assert record["completion"] == ", there was a little girl named " and record["ended_by"] == "'Lily'"
    sample(f"source={STORIES}", "prompt=''", "temperature=0", r"stop=['\n']", out=tmp_path / "escaped")
    [record] = records(tmp_path / "escaped")  # '\n' on the command line is a newline
    assert record["completion"] == LLAMA2C_EXPECTED.split("\n")[0] and record["ended_by"] == repr("\n")


def test_the_end_of_a_story_ends_the_sample_unless_told_otherwise(tmp_path):
    """At seed 4 (temperature 1) stories260K starts a new story (BOS) after 103 tokens."""
    args = [f"source={STORIES}", "prompt=''", "temperature=1.0", "top_k=null", "seed=4", "max_new_tokens=200"]
    sample(*args, out=tmp_path / "a")
    sample(*args, "ignore_eos=true", out=tmp_path / "b")
    [ended], [went_on] = records(tmp_path / "a"), records(tmp_path / "b")
    assert (ended["ended_by"], ended["new_tokens"]) == ("eos", 103)
    assert (went_on["ended_by"], went_on["new_tokens"]) == ("max_new_tokens", 200)
    assert went_on["completion"].startswith(ended["completion"])


def test_the_same_seed_writes_the_same_text(run_dir, tmp_path):
    """A character-level run (its vocabulary from the checkpoint): samples separated, seeds reproducible."""
    args = [f"source={run_dir}", "prompt=ROMEO:", "num_samples=2", "max_new_tokens=30"]
    first, again = sample(*args, "seed=7", out=tmp_path / "a"), sample(*args, "seed=7", out=tmp_path / "b")
    other = sample(*args, "seed=8", out=tmp_path / "c")
    assert first.stdout == again.stdout != other.stdout
    samples = first.stdout.split("-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("ROMEO:") for s in samples)
    assert [r["completion"] for r in records(tmp_path / "a")] == [s.removeprefix("ROMEO:").removesuffix("\n")
                                                                  for s in samples]
    assert first.stderr.count("new tokens") == 2


def test_a_file_of_prompts_is_decoded_as_one_batch_and_written_as_json_lines(tmp_path):
    prompts = ["Once upon a time", "The cat", "Once upon a dog", "A big red ball"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    result = sample(f"source={STORIES}", f"prompts={tmp_path / 'prompts.txt'}", "temperature=0", "max_new_tokens=20",
                    out=tmp_path / "out")
    assert result.stderr.count("new tokens") == 1 and "[4 x 4-8 prompt tokens" in result.stderr  # one padded batch (BOS included)
    rows = records(tmp_path / "out")
    assert [r["prompt"] for r in rows] == prompts
    model = load_source(STORIES).model  # each completion is the prompt's own greedy continuation
    tokenizer = load_source(STORIES).tokenizer
    for row in rows:
        ids = [tokenizer.bos_id] + tokenizer.encode(row["prompt"])
        out = model.generate(torch.tensor([ids]), row["new_tokens"], temperature=0)[0].tolist()
        assert row["prompt"] + row["completion"] == tokenizer.decode(out)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """A tiny GPT-2 on GPT-2's BPE, and its llm.c and HF exports."""
    run = tmp_path_factory.mktemp("bpe_run")
    result = train("model.tokenizer=gpt2", "trainer.max_steps=10", "trainer.val_check_interval=10", "logger=csv",
                   run_dir=run)
    assert result.returncode == 0, result.stderr[-3000:]
    for fmt, output in (("llmc", run / "model.bin"), ("hf", run / "hf")):
        export = execute("-m", "gptexp", "export", f"format={fmt}", f"source={run}",
                         f"output={output}", timeout=300)
        assert export.returncode == 0, export.stderr[-2000:]
    return run


def test_every_format_of_the_same_weights_writes_the_same_text(bpe_run, tmp_path):
    sources = {"run": bpe_run, "ckpt": bpe_run / "checkpoints" / "last.ckpt", "llm.c": bpe_run / "model.bin",
               "hf": bpe_run / "hf"}
    texts = {name: sample(f"source={source}", "checkpoint=last", "prompt='To be, or not'", "temperature=0",
                          "max_new_tokens=24", "ignore_eos=true", out=tmp_path / name).stdout
             for name, source in sources.items()}
    assert len(set(texts.values())) == 1, texts
    assert texts["run"].startswith("To be, or not") and len(texts["run"]) > len("To be, or not\n")


def test_bf16_weights_write_text_too(bpe_run, tmp_path):
    result = sample(f"source={bpe_run}", "precision=bf16", "max_new_tokens=10", out=tmp_path)
    assert "bf16 on cpu" in result.stderr and records(tmp_path)[0]["new_tokens"] <= 10


def test_the_stream_is_whole_characters_while_bytes_arrive():
    """GPT-2's byte-level BPE splits these characters across tokens: no piece of the stream is a partial one."""
    tokenizer = gpt2_tokenizer()
    text = "naïve café — 😀 日本語 ok"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode(ids[:n]) for n in range(1, len(ids)))  # the split really happens
    stream, pieces = TextStream(), []
    for n in range(1, len(ids) + 1):
        pieces.append(stream.new_text(tokenizer.decode(ids[:n])))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("case", ["a character the vocabulary lacks", "an empty prompts file",
                                  "a prompts file in Latin-1", "chat without an end-of-sequence token"])
def test_bad_prompts_get_one_line_and_leave_nothing(case, run_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "latin.txt").write_bytes(b"First\nCaf\xe9\n")
    argument, message = {"a character the vocabulary lacks": ("prompt='café'", "character 'é' is not in this"),
                         "an empty prompts file": (f"prompts={tmp_path / 'empty.txt'}", "holds no prompt"),
                         "a prompts file in Latin-1": (f"prompts={tmp_path / 'latin.txt'}",
                                                       "latin.txt, line 2: not UTF-8 text (byte 0xe9 at offset 9); "
                                                       "save it as UTF-8"),
                         "chat without an end-of-sequence token": (
                             "mode=chat", "template=plain closes every answer with an end-of-sequence token, which the "
                                          "tokenizer char-")}[case]
    result = execute("-m", "gptexp", "sample", f"source={run_dir}", argument,
                     f"hydra.run.dir={tmp_path / 'out'}", timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_an_unknown_architecture_gets_one_line(run_dir, tmp_path):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    state["gptexp_model"]["class"] = "Mamba"
    torch.save(state, tmp_path / "mamba.ckpt")
    result = execute("-m", "gptexp", "sample", f"source={tmp_path / 'mamba.ckpt'}", f"hydra.run.dir={tmp_path / 'out'}",
                     timeout=300)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'mamba.ckpt'} records a model of class 'Mamba'"), line
    assert not (tmp_path / "out").exists()


def test_a_lora_runs_adapter_is_applied(tmp_path):
    """stories260K after a few LoRA steps on Shakespeare: the command's greedy text is the adapter model's own
    (peft, unmerged), and not the base model's."""
    run = tmp_path / "lora"
    result = execute("train.py", "model=llama2_260k", "finetune=lora", "data=shakespeare",
                     "optim.lr=3e-2", "optim.warmup_steps=0", "trainer.max_steps=12",
                     "trainer.val_check_interval=12", "data.seq_len=64", "data.batch_size=8",
                     "data.eval_batch_size=64", "trainer.limit_val_batches=2", "validate_first=false",
                     "logger=csv", "trainer.precision=32-true", f"hydra.run.dir={run}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    args = ["prompt='Once upon a time'", "temperature=0", "max_new_tokens=40", "ignore_eos=true"]
    tuned = sample(f"source={run}", "checkpoint=last", *args, out=tmp_path / "tuned").stdout
    base = sample(f"source={STORIES}", *args, out=tmp_path / "base").stdout
    assert tuned != base

    from gptexp import finetune
    from gptexp.models import Llama, LlamaConfig
    from gptexp.weights.checkpoints import load

    state = load(run / "checkpoints" / "last.ckpt")
    lora = state["gptexp_lora"]
    model = finetune.apply(Llama(LlamaConfig(**state["gptexp_model"]["config"])),
                           {"method": "lora", "r": lora["r"], "alpha": lora["alpha"], "dropout": 0.0})
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()})
    tokenizer = load_source(STORIES).tokenizer
    ids = [tokenizer.bos_id] + tokenizer.encode("Once upon a time")
    out = model.eval().generate(torch.tensor([ids]), 40, temperature=0)[0].tolist()
    assert tuned == tokenizer.decode(out) + "\n"


def meta_dialog_tokens(tokenizer, dialog: list[dict]) -> list[int]:
    """Meta's llama/generation.py chat_completion formatting, written out independently of gptexp.chat."""
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n"
                   + dialog[1]["content"]}] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += [1] + tokenizer.encode(f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} ") + [2]
    return tokens + [1] + tokenizer.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")


def test_chat_builds_llama2s_template_turn_by_turn(tmp_path):
    turns = ["Tell me a story.", "  What happened next? ", "And then?"]
    result = execute("-m", "gptexp", "sample", f"source={STORIES}", "mode=chat",
                     "system='Be kind.'", "max_new_tokens=24", "temperature=0", f"hydra.run.dir={tmp_path}",
                     input="\n".join(turns) + "\n\nnot read\n", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = records(tmp_path)
    assert [r["prompt"] for r in rows] == turns  # the empty line ended the chat
    tokenizer = load_source(STORIES).tokenizer
    dialog = [{"role": "system", "content": "Be kind."}]
    for row in rows:
        dialog.append({"role": "user", "content": row["prompt"]})
        assert row["prompt_ids"] == meta_dialog_tokens(tokenizer, dialog)
        dialog.append({"role": "assistant", "content": row["completion"]})
    assert result.stdout == "".join(r["completion"] + "\n" for r in rows)


def test_chat_drops_the_oldest_exchanges_when_the_context_is_full(tmp_path):
    turns = [f"Turn {i}: " + "tell me about the big red ball and the park " * 3 for i in range(4)]
    result = execute("-m", "gptexp", "sample", f"source={STORIES}", "mode=chat",
                     "max_new_tokens=380", "temperature=0", f"hydra.run.dir={tmp_path}",
                     input="\n".join(turns) + "\n", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the history no longer fits the context: the oldest" in result.stderr
    rows = records(tmp_path)
    assert len(rows) == 4 and all(len(r["prompt_ids"]) <= 512 - 380 for r in rows)
    tokenizer = load_source(STORIES).tokenizer
    last = meta_dialog_tokens(tokenizer, [{"role": "user", "content": turns[-1]}])
    assert rows[-1]["prompt_ids"][-len(last):] == last  # the newest message is always whole


def test_ctrl_c_ends_in_one_line(run_dir, tmp_path):
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "gptexp", "sample", f"source={run_dir}", "max_new_tokens=1000000",
                                f"hydra.run.dir={tmp_path / 'out'}"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONWARNINGS": "ignore"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (tmp_path / "out" / "sample.log").exists() or "parameters" not in (tmp_path / "out" / "sample.log").read_text():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.2)
    time.sleep(1)  # decoding by now
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    errors = [line for line in stderr.splitlines() if "Traceback" in line or line.startswith("error:")]
    assert errors == ["error: interrupted (Ctrl-C); what was written before stays, nothing is half-written"]
