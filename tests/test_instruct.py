"""data=instruct: every record format and source (presets included, offline on local files of their schema), the
answers as the only targets, truncation that keeps the EOS, packing, and the loss of a whole optimizer step
divided by its answer tokens however the step is split (batch 8, 2 x 4 accumulated, 2 processes x 4)."""

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gptexp import data
from gptexp.core.config import asset_path
from gptexp.data.example_batches import ExampleDataModule, ExampleRows, fitted
from gptexp.data.instruct import Examples
from gptexp.data.templates import Encoded
from gptexp.weights import load_model, load_source
from training import ROOT, execute

STORIES = asset_path("stories260K/stories260K.bin")
SP = asset_path("stories260K/tok512.model")
ANSWERS = ["Yes.", "The cat sat on the mat and then it slept for a long time in the sun.", "No, it did not.",
           "Tom and Lily went to the park. They played on the swings until the sun went down.", "It is red.",
           "A big dog ran to the ball.", "Mom made a cake for Tom. He was very happy and ate it all up.", "Blue."]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int = 16) -> list[dict]:
    return [{"instruction": f"Question {i}: tell me something.", "input": "about a cat" if i % 3 == 0 else "",
             "output": ANSWERS[i % len(ANSWERS)]} for i in range(n)]


def load(tmp_path, **overrides) -> data.DataSource:
    config = {"name": "test", "loader": "instruct", "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.25,
              "batch_size": 4} | overrides
    return data.load(config, SP)


def example_text(source, split: str, i: int) -> tuple[str, str]:
    """(whole text, trained text) of example i."""
    examples = source.tokens.load()[split]
    ids, trained = examples.example(i)
    tok = source.tokenizer
    return tok.decode(list(ids)), tok.decode([t for t, m in zip(ids, trained) if m])


@pytest.mark.parametrize("fmt", ["alpaca", "completion", "messages", "sharegpt"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_every_record_format_from_every_kind_of_file(fmt, suffix, tmp_path):
    answer = "Once upon a time there was a dog."
    row = {"alpaca": {"instruction": "Write a story.", "output": answer},
           "completion": {"prompt": "Write a story.", "completion": answer},
           "messages": {"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Write a story."},
                                     {"role": "assistant", "content": answer}]},
           "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."},
                                          {"from": "human", "value": "Write a story."},
                                          {"from": "gpt", "value": answer}]}}[fmt]
    rows = [row] * 4
    path = tmp_path / f"records{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        write_jsonl(path, rows)
    source = load(tmp_path, files=str(path))
    assert source.kind == "examples" and source.tokens.kind == fmt and source.template == "llama2_chat"
    whole, trained = example_text(source, "train", 0)
    assert trained.strip() == answer  # the answer, then EOS (which decodes to nothing)
    assert "[INST]" in whole and ("<<SYS>>\nBe brief." in whole) == (fmt in ("messages", "sharegpt"))


def test_presets_read_local_files_of_their_hubs_schemas(tmp_path):
    """alpaca_cleaned (instruction, input, output), dolly (instruction, context, response: the context is the input)
    and ultrafeedback (prompt, chosen and rejected conversations, test_prefs to validate), offline."""
    from hydra import compose, initialize_config_dir

    from gptexp.core.config import CONF_DIR

    dolly = [{"instruction": f"Summarise {i}.", "context": "Cats sleep a lot." if i % 2 else "",
              "response": "They sleep.", "category": "summarization"} for i in range(8)]
    prefs = [{"prompt": f"Say hi {i}.", "prompt_id": str(i), "score_chosen": 8.0, "score_rejected": 2.0,
              "chosen": [{"role": "user", "content": f"Say hi {i}."}, {"role": "assistant", "content": "Hi!"}],
              "rejected": [{"role": "user", "content": f"Say hi {i}."}, {"role": "assistant", "content": "Go away."}],
              "messages": []} for i in range(6)]
    files = {"alpaca_cleaned": [write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows())],
             "dolly": [write_jsonl(tmp_path / "dolly.jsonl", dolly)],
             "ultrafeedback": [write_jsonl(tmp_path / "train_prefs.jsonl", prefs),
                               write_jsonl(tmp_path / "test_prefs.jsonl", prefs[:2])]}
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for preset, paths in files.items():
            overrides = [f"data={preset}", "data.path=null", f"data.files={paths[0]}",
                         f"data.cache_dir={tmp_path / 'cache'}"] + [f"data.val_files={p}" for p in paths[1:]]
            cfg = compose("train", overrides=overrides)
            source = data.load(cfg.data, SP)
            if preset == "ultrafeedback":
                assert source.kind == "pairs"
                examples = source.tokens.load()
                assert len(examples["train"]) == 2 * 6 and len(examples["val"]) == 2 * 2  # chosen, then rejected
                chosen = source.tokenizer.decode([t for t, m in zip(*examples["train"].example(0)) if m])
                rejected = source.tokenizer.decode([t for t, m in zip(*examples["train"].example(6)) if m])
                assert (chosen.strip(), rejected.strip()) == ("Hi!", "Go away.")
            else:
                whole, trained = example_text(source, "train", 0)
                assert trained.strip() == ("They sleep." if preset == "dolly" else ANSWERS[1])
            if preset == "dolly":
                whole, _ = example_text(source, "train", 0)
                assert "### Instruction:\nSummarise 1.\n\n### Input:\nCats sleep a lot." in whole  # context: input


def test_columns_rename_fields_and_the_validation_split_is_held_out_or_its_own(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"A{i}."} for i in range(20)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    held = load(tmp_path, files=str(path), columns={"question": "prompt", "answer": "completion"})
    assert held.tokens.kind == "completion"
    val = [c.exchanges[0].user for c in held.tokens.parsed["val"]]
    assert val == [f"Q{i}?" for i in range(0, 20, 4)]  # every 4th record, counting from the first (val_fraction 0.25)
    own = load(tmp_path, files=str(path), val_files=str(write_jsonl(tmp_path / "v.jsonl", rows[:3])),
               columns={"question": "prompt", "answer": "completion"})
    assert len(own.tokens.parsed["train"]) == 20 and len(own.tokens.parsed["val"]) == 3


def test_examples_are_tokenized_once_per_records_tokenizer_and_template(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    first = load(tmp_path, files=str(path))
    first.tokens.prepare()
    stamp = (first.tokens.directory / "meta.json").stat().st_mtime_ns
    again = load(tmp_path, files=str(path))
    again.tokens.prepare()
    assert again.tokens.directory == first.tokens.directory
    assert (again.tokens.directory / "meta.json").stat().st_mtime_ns == stamp  # not tokenized again
    assert load(tmp_path, files=str(path), template="alpaca").tokens.directory != first.tokens.directory
    write_jsonl(path, alpaca_rows(17))
    assert load(tmp_path, files=str(path)).tokens.directory != first.tokens.directory


def datamodule(tmp_path, rows, seq_len=64, **overrides) -> ExampleDataModule:
    tmp_path.mkdir(exist_ok=True)
    source = load(tmp_path, files=str(write_jsonl(tmp_path / "d.jsonl", rows)), seq_len=seq_len, **overrides)
    module = data.build(source, 512)
    module.setup()
    return module


def test_only_answers_train_unless_the_prompt_should_and_eos_always_does(tmp_path):
    module = datamodule(tmp_path, alpaca_rows())
    inputs, targets = module.splits["train"]
    eos = module.tokenizer.eos_id
    for x, y in zip(inputs, targets):
        trained = y[y >= 0]
        assert trained[-1] == eos and len(trained) < len(y)  # the answer ends with EOS; the prompt is not trained
    prompt_too = datamodule(tmp_path / "p", alpaca_rows(), train_on_prompt=True)
    for x, y in zip(*prompt_too.splits["train"]):
        assert (y >= 0).all()  # every token after the first


def test_long_examples_keep_their_eos_and_prompts_that_fill_the_window_are_dropped(tmp_path, caplog):
    rows = alpaca_rows(8) + [{"instruction": "Tell me everything. " * 40, "output": "Fine."}] * 4
    with caplog.at_level(logging.WARNING):
        module = datamodule(tmp_path, rows, seq_len=40)
    inputs, targets = module.splits["train"]
    examples = module.source.load()["train"]
    prompts = [int(np.argmax(examples.example(i)[1])) for i in range(len(examples))]
    assert [x is None for x in inputs] == [p >= 40 for p in prompts]  # dropped: the prompt fills the window
    assert f"train: {sum(p >= 40 for p in prompts)} examples whose prompt alone fills the 40-token window " \
           f"dropped" in caplog.text
    lengths = [len(examples.example(i)[0]) for i in range(len(examples))]
    cut = [i for i, x in enumerate(inputs) if x is not None and lengths[i] > 41]
    assert cut and all(len(inputs[i]) == 40 and targets[i][-1] == module.tokenizer.eos_id for i in cut)  # EOS kept
    assert 3 <= sum(x is None for x in inputs) < len(inputs)


@pytest.mark.parametrize("window, kept, last_inputs", [
    (12, 8, [21, 22]),  # the cut falls in the second user turn: the first exchange is kept whole
    (9, 8, [21, 22]),  # right after the first answer's EOS: no second EOS is appended to it
    (17, 17, [40, 41]),  # inside the second answer: it is cut short and closed by an EOS
])
def test_a_cut_never_trains_an_eos_after_half_a_user_turn(window, kept, last_inputs):
    """Two exchanges, prompt 5 + answer 4 (its EOS, 2, last) + prompt 6 + answer 5, cut to `window` positions."""
    encoded = Encoded()
    for prompt, answer in ((list(range(10, 15)), [20, 21, 22, 2]), (list(range(30, 36)), [40, 41, 42, 43, 2])):
        encoded.add(prompt, False)
        encoded.add(answer, True)
    for train_on_prompt in (False, True):
        (x,), (y,), dropped = fitted(Examples.of([encoded]), window, train_on_prompt)
        assert dropped == 0 and len(x) == kept and y[-1] == 2 and list(x[-2:]) == last_inputs
        assert all(encoded.trained[j] for j in range(len(y)) if y[j] == 2)  # every trained EOS follows an answer


def test_a_packed_batch_gives_each_example_its_loss_alone(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        module = datamodule(tmp_path, alpaca_rows(24), seq_len=256, packing=True)
    assert "training batches: packed," in caplog.text and "% of positions are padding" in caplog.text
    sampler = module.sampler(num_batches=1)
    rows = sampler.global_batch(0)
    assert max(map(len, rows)) > 1  # examples share rows
    inputs, targets = module.splits["train"]
    batch = ExampleRows(inputs, targets, width=256)[{"rows": rows}]
    model = load_model(STORIES).float().eval()
    with torch.no_grad():
        logits, _ = model(batch["x"], documents=batch["documents"])
        packed = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["y"].flatten(), ignore_index=-1,
                                                   reduction="none").view_as(batch["y"])
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(inputs[i])
                alone_logits, _ = model(torch.from_numpy(inputs[i])[None])
                alone = torch.nn.functional.cross_entropy(alone_logits[0], torch.from_numpy(targets[i]),
                                                          ignore_index=-1, reduction="sum")
                assert packed[r, at:at + n].sum().item() == pytest.approx(alone.item(), rel=1e-5)
                at += n


def test_a_steps_gradient_is_the_same_however_the_step_is_split(tmp_path):
    """Answers of unequal lengths; one optimizer step of batch 8, of 2 x 4 accumulated, and of 2 processes x 4
    (DDP, gloo): the same gradients (1e-6 of the largest), and those of the summed loss over the step's 8 examples
    divided by their answer tokens, computed here one example at a time (1e-5: float32 sums in another order)."""
    rows = [{"instruction": f"Question {i}?", "output": ANSWERS[i % len(ANSWERS)] * (1 + i % 3)} for i in range(40)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    common = ["model=llama2_260k", "finetune=full", "data=instruct", f"data.files={path}", "data.seq_len=96",
              "data.val_fraction=0.1", f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=1",
              "trainer.precision=32-true", "trainer.accelerator=cpu", "validate_first=false", "logger=none",
              "callbacks=none", "+callbacks.grads._target_=training.GradientDump"]
    splits = {"batch 8": ["data.batch_size=8"], "2 x 4 accumulated": ["data.batch_size=2",
                                                                      "trainer.accumulate_grad_batches=4"],
              "2 processes x 4": ["data.batch_size=4", "trainer.strategy=ddp", "trainer.devices=2"]}
    env = os.environ | {"PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT / "tests")}
    grads = {}
    for name, overrides in splits.items():
        dump = tmp_path / f"{name.replace(' ', '_')}.pt"
        result = execute("train.py", *common, *overrides, f"+callbacks.grads.path={dump}",
                         f"hydra.run.dir={tmp_path / name.replace(' ', '_')}", env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        grads[name] = torch.load(dump)

    source = load(tmp_path, files=str(path), seq_len=96, val_fraction=0.1, batch_size=8)
    module = data.build(source, 512, seed=1337)
    module.setup()
    inputs, targets = module.splits["train"]
    step = module.sampler(num_batches=1).global_batch(0)
    assert len({len(targets[i]) for row in step for i in row}) > 2  # answers of unequal lengths
    model = load_model(STORIES)
    total = sum(torch.nn.functional.cross_entropy(model(torch.from_numpy(inputs[i])[None])[0][0],
                                                  torch.from_numpy(targets[i]), ignore_index=-1, reduction="sum")
                for row in step for i in row)
    (total / sum(int((targets[i] >= 0).sum()) for row in step for i in row)).backward()
    direct = {"model." + n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name, got in grads.items():
        assert got.keys() == direct.keys(), name
        for key, grad in direct.items():
            assert (got[key] - grads["batch 8"][key]).abs().max() <= 1e-6 * grad.abs().max(), (name, key)
            assert (got[key] - grad).abs().max() <= 1e-5 * grad.abs().max(), (name, key)


def bad_files(tmp_path: Path) -> dict[str, Path]:
    rows = alpaca_rows(8)
    rows[2] = {"instruction": "Say yes."}
    pairs = [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No."} for i in range(8)]
    pairs[1]["rejected"] = "Yes."
    (tmp_path / "latin.jsonl").write_bytes(b'{"instruction": "Hi.", "output": "Yes."}\n'
                                           b'{"instruction": "Caf\xe9?", "output": "Yes."}\n')  # Latin-1
    (tmp_path / "string.jsonl").write_text('{"instruction": "Hi.", "output": "Yes."}\n"hello"\n')
    (tmp_path / "numbers.json").write_text("[1, 2, 3]")
    return {"latin": tmp_path / "latin.jsonl", "string": tmp_path / "string.jsonl",
            "numbers": tmp_path / "numbers.json", "missing": write_jsonl(tmp_path / "missing.jsonl", rows),
            "same": write_jsonl(tmp_path / "same.jsonl", pairs),
            "good": write_jsonl(tmp_path / "good.jsonl", alpaca_rows(8))}


# (overrides, what the one line must say); {latin}, {string}, ...: the files bad_files writes
NOT_AN_OBJECT = "a record must be a JSON object with the fields of one format, alpaca (instruction, output), "
BAD_INPUT = {
    "records in Latin-1": (["data.files={latin}"], ["latin.jsonl, line 2: not UTF-8 text (byte 0xe9 at offset 61)",
                                                    "save it as UTF-8, e.g. iconv -f latin1 -t utf-8"]),
    "a JSON lines record that is a string": (["data.files={string}"],
                                             ["string.jsonl, line 2: " + NOT_AN_OBJECT, 'found str "hello"']),
    "a preference record that is a string": (["finetune=dpo", "data.files={string}"],
                                             ["string.jsonl, line 2: " + NOT_AN_OBJECT, 'found str "hello"']),
    "a .json list of numbers": (["data.files={numbers}"], ["numbers.json, record 1: " + NOT_AN_OBJECT, "found int 1"]),
    "a record without its format's fields": (["data.files={missing}"],
                                             ["missing.jsonl, line 3: no field 'output', which alpaca records need"]),
    "a preference whose chosen is its rejected": (["finetune=dpo", "data.files={same}"],
                                                  ["same.jsonl, line 2: chosen and rejected are the same answer"]),
    "nothing left after filtering": (["data.files={good}", "data.seq_len=8"],
                                     ["good.jsonl: no train example is left once the", "fills the 8-token window",
                                      "raise data.seq_len"]),
    "a template the tokenizer cannot serve": (["model=gpt2_mini", "data.files={good}", "data.template=llama2_chat"],
                                              ["template=llama2_chat starts every exchange with BOS, which the "
                                               "tokenizer char-"]),
    "dpo on data without pairs": (["finetune=dpo", "data.files={good}"],
                                  ["finetune.objective=preference needs preference pairs", "the data holds "
                                                                                           "instruction examples"]),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_instruction_data_is_refused_in_one_line(case, tmp_path, monkeypatch, capfd):
    from test_bad_input import in_process, one_line_error

    files = bad_files(tmp_path)
    overrides, messages = BAD_INPUT[case]
    arguments = ["model=llama2_260k", "data=instruct", f"data.cache_dir={tmp_path / 'cache'}", "logger=csv",
                 *(o.format(**files) for o in overrides), f"hydra.run.dir={tmp_path / 'run'}"]
    status, stderr = in_process("train.py", arguments, monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, messages)
    assert not (tmp_path / "run").exists()


def test_llama2_lora_on_alpaca_composes_and_runs_on_a_tiny_llama(tmp_path):
    """python train.py model=llama2 finetune=lora data=alpaca_cleaned composes for LLaMA-2 7B; the same command on a
    tiny HF LLaMA (LLaMA-2's layout, stories260K's tokenizer) and local Alpaca records trains, and its adapter loads
    into transformers with peft to the same logits."""
    import shutil

    import peft
    import transformers
    from hydra import compose, initialize_config_dir

    from gptexp.core.config import CONF_DIR
    from gptexp.weights import load_source

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["model=llama2", "finetune=lora", "data=alpaca_cleaned",
                                          "finetune.quantize=4bit"])
    assert (cfg.model.dim, cfg.model.n_layers, cfg.finetune.method, cfg.data.template) == (4096, 32, "lora", "alpaca")
    assert cfg.data.path == "yahma/alpaca-cleaned" and cfg.finetune.quantize == "4bit"  # QLoRA: on CUDA

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base = tmp_path / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    shutil.copyfile(SP, base / "tokenizer.model")
    records = write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(24))
    result = execute("train.py", "model=llama2", f"model.checkpoint={base}", "finetune=lora",
                     "data=alpaca_cleaned", "data.path=null", f"data.files={records}", "data.batch_size=4",
                     f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=4", "trainer.val_check_interval=4",
                     "optim.lr=1e-2", "trainer.precision=32-true", "logger=csv",
                     "callbacks.samples.max_new_tokens=8", f"hydra.run.dir={tmp_path / 'run'}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "objective: instruction, on alpaca data in template alpaca" in result.stdout + result.stderr
    ours = load_source(str(tmp_path / "run"), "last")
    assert ours.template == "alpaca"
    hf = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), tmp_path / "run" / "adapter")
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert (hf.eval()(x).logits - ours.model(x)[0]).abs().max() <= 1e-5
        assert (transformers.LlamaForCausalLM.from_pretrained(base)(x).logits - ours.model(x)[0]).abs().max() > 1e-4


def test_grouping_by_length_pads_less(tmp_path, caplog):
    rows = [{"instruction": f"Q{i}?", "output": "word " * (1 + (i * 7) % 40)} for i in range(64)]
    shares = []
    for group in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            datamodule(tmp_path / str(group), rows, seq_len=256, group_by_length=group)
        shares.append(float(caplog.text.split("padded to the longest")[1].split(", ")[1].split("%")[0]))
    assert shares[1] < shares[0] / 2, shares


def test_the_story_requests_follow_their_rule():
    """Three content words (4+ letters, in at most 5% of the stories) of a story's first two sentences, in the order
    it uses them; its preference pair differs from it only where those words stood."""
    import re

    from gptexp.data.instruct import story_request_words, story_word_pairs, story_words

    requests, pairs = story_words(), story_word_pairs()
    assert len(requests) == len(pairs) > 1000
    for (_, request), (_, pair) in zip(requests[:50], pairs[:50]):
        words, story = story_request_words(request["instruction"]), request["output"]
        opening = " ".join(re.split(r"(?<=[.!?])\s+", story)[:2]).lower()
        positions = [re.search(rf"\b{w}\b", opening).start() for w in words]
        assert len(words) == 3 and positions == sorted(positions) and all(len(w) >= 4 for w in words)
        assert pair["prompt"] == request["instruction"] and pair["chosen"] == story
        rejected = pair["rejected"]
        assert not any(re.search(rf"\b{w}\b", rejected, re.IGNORECASE) for w in words)
        kept = [a == b for a, b in zip(re.findall(r"\w+", story), re.findall(r"\w+", rejected))]
        assert sum(not k for k in kept) == sum(len(re.findall(rf"\b{w}\b", story, re.IGNORECASE)) for w in words)


def test_an_instruction_run_resumes_exactly(tmp_path):
    """Stopped after 4 of 8 steps and resumed from its checkpoint, an instruction run trains the batches it would
    have, with the same losses (data position, RNG and optimizer state restored)."""
    from training import column, metrics

    path = write_jsonl(tmp_path / "qa.jsonl", alpaca_rows(40))
    common = ["model=llama2_260k", "finetune=full", "data=instruct", f"data.files={path}", "data.seq_len=96",
              "data.batch_size=4", "data.group_by_length=true", f"data.cache_dir={tmp_path / 'cache'}",
              "trainer.precision=32-true", "trainer.log_every_n_steps=1", "validate_first=false", "logger=csv",
              "callbacks.samples.max_new_tokens=4", "optim.warmup_steps=2", "optim.decay_steps=8"]

    def run(*overrides: str, name: str) -> list:
        result = execute("train.py", *common, *overrides, f"hydra.run.dir={tmp_path / name}", timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return column(metrics(tmp_path / name), "train/loss")

    whole = run("trainer.max_steps=8", "trainer.val_check_interval=4", name="whole")
    run("trainer.max_steps=4", "trainer.val_check_interval=4", name="first")
    resumed = run("trainer.max_steps=8", "trainer.val_check_interval=4", f"ckpt_path={tmp_path / 'first'}",
                  name="resumed")
    assert [s for s, _ in resumed] == [s for s, _ in whole] == list(range(8))
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in whole], abs=1e-6)


def test_the_instruction_benchmark_measures_fluency_beside_behaviour():
    """benchmarks/instruction_following.py: repetition is the share of repeated word 4-grams within an answer, pooled;
    perplexity is the bundled stories260K's on the answers' tokens; a run prints both columns for each source."""
    import math
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from instruction_following import perplexity, repetition

    assert repetition(["a b c d a b c d", "One two three four five."]) == pytest.approx(1 / 7)  # 1 of 5, 0 of 2
    assert repetition(["too short", ""]) == 0.0
    judge = load_source(asset_path("stories260K/stories260K.bin"))
    story = "Once upon a time, there was a little girl named Lily. She liked to play in the park."
    ids = [judge.tokenizer.bos_id] + judge.tokenizer.encode(story)
    with torch.inference_mode():
        _, loss = judge.model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    assert perplexity(judge, [story, ""]) == pytest.approx(math.exp(loss.item()), rel=1e-6)
    assert perplexity(judge, ["Lily park the upon girl once, named a there little"]) > 2 * perplexity(judge, [story])
    result = execute("benchmarks/instruction_following.py", asset_path("stories260K/stories260K.bin"), "--limit", "4",
                     "--max-new-tokens", "16", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"stories260K.bin: template llama2_chat, word rate [\d.]+ \(\d+ of \d+ words\), EOS rate [\d.]+, "
                     r"perplexity [\d.]+, repetition [\d.]+, 4 requests in", result.stdout), result.stdout
