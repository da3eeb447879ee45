"""data=hf: any dataset the `datasets` library reads, tokenized once in parallel into llm.c shards, resumably."""

import json
import os
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from gptexp import data
from gptexp.core.config import ConfigError
from gptexp.data import sharding, tinystories
from gptexp.data.llmc_shards import read_shard
from gptexp.data.tokenizers import BPETokenizer, SentencePieceTokenizer, gpt2_tokenizer
from gptexp.data.windows import EpochBatches, SequentialBatches
from training import ROOT, execute

STORIES = tinystories.stories((resources.files("gptexp.assets") / "tinystories_sample.txt").read_text())


def parquet_files(directory, parts=2, stories=STORIES):
    directory.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(stories)), parts)):
        pq.write_table(pa.table({"story": [stories[i] for i in part], "id": part}), directory / f"part-{k}.parquet")
    return str(directory / "*.parquet")


def hf_config(tmp_path, **overrides):
    return {"name": "stories", "loader": "hf", "cache_dir": str(tmp_path / "cache"), "column": "story",
            "val_fraction": 0.1, "shard_tokens": 100_000, "num_proc": 1, "seq_len": 64} | overrides


def prepared(cfg, tokenizer="gpt2"):
    module = data.build(data.load(cfg, tokenizer), context_length=1024)
    module.prepare_data()
    module.setup("fit")
    return module


def expected_stream(documents, tokenizer):
    lead = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
    return np.array([t for d in documents for t in [lead, *tokenizer.encode(d)]])


def test_local_parquet_becomes_llmc_shards_with_a_held_out_split(tmp_path):
    files = parquet_files(tmp_path / "parquet")
    module = prepared(hf_config(tmp_path, files=files))
    tok = gpt2_tokenizer()
    val = [s for i, s in enumerate(STORIES) if i % 10 == 0]  # the stated rule: every 10th document, from the first
    train = [s for i, s in enumerate(STORIES) if i % 10]
    assert np.array_equal(np.asarray(module.tokens["val"][np.arange(len(module.tokens["val"]))]),
                          expected_stream(val, tok))
    assert np.array_equal(module.tokens["train"][np.arange(len(module.tokens["train"]))], expected_stream(train, tok))
    directory = module.source.directory
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["complete"] and not list(directory.glob("*.pending*"))
    shards = sorted(p.name for p in directory.glob("*.bin"))
    # shards end at a block's end (1,024 documents, here about 200K tokens: more than shard_tokens=100K)
    assert shards == [f"stories_train_{k:06d}.bin" for k in range(3)] + ["stories_val_000000.bin"]
    for shard in shards:  # llm.c's GPT-2 format: magic 20240520, version 1, uint16
        header = np.fromfile(directory / shard, dtype="<i4", count=3)
        assert header[:2].tolist() == [20240520, 1] and read_shard(directory / shard).dtype == np.uint16
    assert {s["documents"] for s in manifest["splits"]["train"]["shards"]} and \
        sum(s["documents"] for s in manifest["splits"]["train"]["shards"]) == len(train)


def test_the_shards_are_the_same_whatever_the_number_of_processes(tmp_path):
    files = parquet_files(tmp_path / "parquet")
    one = prepared(hf_config(tmp_path / "one", files=files, num_proc=1)).source.directory
    two = prepared(hf_config(tmp_path / "two", files=files, num_proc=2)).source.directory
    assert one.name == two.name  # the cache key does not depend on num_proc
    assert {p.name: p.read_bytes() for p in one.glob("*.bin")} == {p.name: p.read_bytes() for p in two.glob("*.bin")}


def test_json_lines_and_text_files_with_their_own_validation_files(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in STORIES[:50]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in STORIES[50:60]))
    module = prepared(hf_config(tmp_path, files=str(tmp_path / "train.jsonl"), val_files=str(tmp_path / "val.jsonl"),
                                column="text"))
    assert np.array_equal(module.tokens["val"][np.arange(len(module.tokens["val"]))],
                          expected_stream(STORIES[50:60], gpt2_tokenizer()))
    (tmp_path / "texts").mkdir()
    for k in range(3):  # a .txt file is one document
        (tmp_path / "texts" / f"{k}.txt").write_text(f"line one of {k}\nline two\n")
    module = prepared(hf_config(tmp_path, files=str(tmp_path / "texts" / "*.txt"), val_fraction=0.5, seq_len=2))
    assert gpt2_tokenizer().decode(module.tokens["val"][np.arange(len(module.tokens["val"]))].tolist()) == \
        "<|endoftext|>line one of 0\nline two\n<|endoftext|>line one of 2\nline two\n"


def test_a_sentencepiece_tokenizer_leads_each_document_with_bos(tmp_path):
    from gptexp.core.config import asset_path

    spec = asset_path("stories260K/tok512.model")
    module = prepared(hf_config(tmp_path, files=parquet_files(tmp_path / "parquet")), tokenizer=spec)
    tok = SentencePieceTokenizer(spec)
    val = [s for i, s in enumerate(STORIES) if i % 10 == 0]
    assert np.array_equal(module.tokens["val"][np.arange(len(module.tokens["val"]))], expected_stream(val, tok))


def test_a_vocabulary_beyond_65536_writes_uint32_shards(tmp_path):
    gpt2 = gpt2_tokenizer().encoding
    big = BPETokenizer(tiktoken.Encoding(name="gpt2-big", pat_str=gpt2._pat_str, mergeable_ranks=gpt2._mergeable_ranks,
                                         special_tokens={"<|endoftext|>": 70_000}))
    cfg = data.DataConfig(**hf_config(tmp_path, files=parquet_files(tmp_path / "parquet")))
    tokens = data.HFTokens(cfg, big)
    tokens.prepare()
    loaded = tokens.load()
    shard = next(tokens.directory.glob("*_val_*.bin"))
    assert np.fromfile(shard, dtype="<i4", count=2).tolist() == [20240801, 7]
    assert loaded["val"].dtype == np.uint32 and int(loaded["val"][0]) == 70_000


def test_a_changed_file_or_tokenizer_makes_new_shards(tmp_path):
    files = parquet_files(tmp_path / "parquet")
    first = prepared(hf_config(tmp_path, files=files)).source.directory
    assert prepared(hf_config(tmp_path, files=files)).source.directory == first  # reused
    time.sleep(0.01)
    parquet_files(tmp_path / "parquet", stories=[s.upper() for s in STORIES])
    changed = prepared(hf_config(tmp_path, files=files)).source.directory
    assert changed != first
    assert prepared(hf_config(tmp_path, files=files, val_fraction=0.2)).source.directory.parent != changed.parent
    from gptexp.core.config import asset_path

    llama = prepared(hf_config(tmp_path, files=files), tokenizer=asset_path("stories260K/tok512.model"))
    assert llama.source.directory != changed


def test_an_interrupted_preparation_resumes_where_it_stopped(tmp_path):
    """SIGKILL in the middle: every shard on disk is whole; the next preparation starts at the first block
    not in a shard or a saved pending file, and ends with the bytes an uninterrupted preparation writes."""
    many = [f"{s} ({k})" for k in range(6) for s in STORIES]  # 13,896 documents: 14 blocks
    files = parquet_files(tmp_path / "parquet", parts=3, stories=many)
    cfg = hf_config(tmp_path / "killed", files=files, shard_tokens=200_000)
    script = (f"from gptexp import data; s = data.load({cfg!r}, 'gpt2'); print(s.tokens.directory, flush=True); "
              f"s.tokens.prepare()")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    directory = Path(child.stdout.readline().strip())
    deadline = time.time() + 120
    while (sharding.read_manifest(directory) or {}).get("next_block", 0) < 3 and time.time() < deadline:
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    manifest = sharding.read_manifest(directory)
    assert manifest and not manifest["complete"] and 3 <= manifest["next_block"] < 14, manifest
    for shard in directory.glob("*.bin"):
        read_shard(shard)  # whole, or the reader would refuse it
    source = data.load(cfg, "gpt2")
    done = source.tokens.prepare()
    assert (done.resumed_at, done.blocks) == (manifest["next_block"], 14)
    reference = prepared(hf_config(tmp_path / "reference", files=files, shard_tokens=200_000)).source.directory
    assert source.tokens.directory.name == reference.name
    written = {p.name: p.read_bytes() for p in directory.glob("*.bin")}
    assert written == {p.name: p.read_bytes() for p in reference.glob("*.bin")} and len(written) > 3


@pytest.mark.parametrize("overrides, message", [
    ({}, "set data.path=<hub id>"),
    ({"files": "/nowhere/*.parquet"}, r"data.files=/nowhere/\*.parquet matches no files"),
    ({"files": "MIXED"}, "matches files ending .json, .parquet"),
    ({"files": "PARQUET", "column": "body"}, "data.column='body' is not a column .* its columns: story, id"),
    ({"files": "PARQUET", "column": "id"}, r"data.column='id' .* holds int64, not text; its columns: story \(string\)"),
    ({"files": "PARQUET", "path": "some/dataset"}, "both name the text"),
    ({"files": "PARQUET", "tokenizer": "char"}, "tokenizes with the model's tokenizer, not characters"),
    ({"files": "PARQUET", "val_tokens": 10}, "data.val_tokens=10 is less than one window"),
    ({"files": "PARQUET", "num_proc": 0}, "num_proc must be a positive integer or null"),
])
def test_bad_hf_config_names_the_key_and_the_fix(tmp_path, overrides, message):
    parquet = parquet_files(tmp_path / "parquet")
    (tmp_path / "parquet" / "x.json").write_text("{}")
    files = {"PARQUET": parquet, "MIXED": str(tmp_path / "parquet" / "*")}
    cfg = hf_config(tmp_path, **overrides)
    cfg["files"] = files.get(cfg.get("files"), cfg.get("files"))
    with pytest.raises(ConfigError, match=message):
        prepared(cfg)


@pytest.mark.parametrize("preset, dataset", [("fineweb_edu", "HuggingFaceFW/fineweb-edu"),
                                             ("openwebtext", "Skylion007/openwebtext"),
                                             ("tinystories_hub", "roneneldan/TinyStories")])
def test_presets_offline_stop_at_once_with_one_line(tmp_path, preset, dataset):
    began = time.time()
    result = execute("train.py", "model=gpt2", f"data={preset}", f"hydra.run.dir={tmp_path}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert dataset in lines[0] and "data.files=" in lines[0], lines[0]
    assert time.time() - began < 30


def test_epoch_batches_read_every_window_once_per_epoch_and_split_across_ranks():
    n_tokens, seq_len, batch = 1001, 10, 8  # 100 windows
    one = list(EpochBatches(n_tokens, seq_len, 2 * batch, num_batches=13, seed=(1, 0)))
    first_epoch = np.concatenate(one)[:100]
    assert np.array_equal(np.sort(first_epoch), np.arange(0, 1000, 10))  # each window once
    ranks = [list(EpochBatches(n_tokens, seq_len, batch, num_batches=13, seed=(1, 0), rank=r, world_size=2))
             for r in (0, 1)]
    for k in range(13):
        assert np.array_equal(np.concatenate([ranks[0][k], ranks[1][k]]), one[k])  # the global batch, halved
        if k < 6:  # within the first epoch the two processes never read the same window
            assert not set(ranks[0][k]) & set(np.concatenate([b for b in ranks[1][:6]]))
    resumed = list(EpochBatches(n_tokens, seq_len, 2 * batch, num_batches=13, seed=(1, 0), start=7))
    assert all(np.array_equal(a, b) for a, b in zip(resumed, one[7:]))
    assert not np.array_equal(np.concatenate(one)[100:200], first_epoch)  # a new order in the second epoch


def test_a_validation_token_budget_reads_the_first_windows():
    batches = list(SequentialBatches(n_tokens=100_001, seq_len=100, batch_size=16, max_tokens=2_550))
    assert np.array_equal(np.concatenate(batches), np.arange(25) * 100)
    ranks = [list(SequentialBatches(1001, 100, batch_size=64, rank=r, world_size=2)) for r in (0, 1)]
    assert all(ranks) and np.array_equal(np.sort(np.concatenate([*ranks[0], *ranks[1]])), np.arange(10) * 100)


SCALED_DOWN = ["experiment=gpt2_124m_fineweb", "data.path=null", "data.column=story", "model.n_layer=1",
               "model.n_head=2", "model.n_embd=32", "model.block_size=64", "model.compile=false", "data.seq_len=64",
               "data.num_workers=0", "data.val_tokens=8192", "data.eval_batch_size=16", "trainer.accelerator=cpu",
               "trainer.precision=32-true", "trainer.accumulate_grad_batches=2", "optim.warmup_steps=2",
               "optim.decay_steps=8", "trainer.val_check_interval=8", "trainer.log_every_n_steps=1", "logger=csv",
               "callbacks.samples.at_steps=[]", "callbacks.samples.max_new_tokens=8",
               "callbacks.resume_point.every_n_steps=4"]


def recipe(tmp_path, name, *overrides):
    command = [sys.executable, "train.py", *SCALED_DOWN, f"data.files={tmp_path / 'parquet' / '*.parquet'}",
               *overrides, f"hydra.run.dir={tmp_path / name}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_reproduction_recipe_scaled_down_on_two_ddp_processes(tmp_path):
    """experiment=gpt2_124m_fineweb with a tiny model on local Parquet, 2 CPU processes x 4 windows x 2
    accumulated: the losses equal one process reading the global batch of 8 (the ranks read the two halves
    of each batch, never the same window), and a run stopped at step 4 and resumed ends with the same losses."""
    from training import column, metrics

    parquet_files(tmp_path / "parquet")
    one = recipe(tmp_path, "one", "trainer.devices=1", "trainer.strategy=auto", "data.batch_size=8",
                 "trainer.max_steps=8")
    assert "8 windows x 64 tokens x 1 processes x 2 accumulated = 1,024 tokens per optimizer step" in \
        one.stdout + one.stderr
    recipe(tmp_path, "half", "trainer.devices=2", "data.batch_size=4", "trainer.max_steps=4")
    resumed = recipe(tmp_path, "resumed", "trainer.devices=2", "data.batch_size=4", "trainer.max_steps=8",
                     f"ckpt_path={tmp_path / 'half'}")
    assert "=== resumed at step 4" in resumed.stderr + resumed.stdout
    expected = dict(column(metrics(tmp_path / "one"), "train/loss"))
    for run in ("half", "resumed"):  # steps 1-4 in both (the resumed run's copied from the first), 5-8 resumed
        got = dict(column(metrics(tmp_path / run), "train/loss"))
        assert sorted(got) == list(range(4 if run == "half" else 8)), run
        for step, loss in got.items():
            assert loss == pytest.approx(expected[step], abs=1e-5), (run, step)
        val, expected_val = (dict(column(metrics(tmp_path / r), "val/loss")) for r in (run, "one"))
        assert sorted(val) == [3, 7][:1 if run == "half" else 2], run  # validations after steps 4 and 8
        assert all(val[step] == pytest.approx(expected_val[step], abs=1e-5) for step in val), run


def test_prepare_writes_the_shards_train_py_then_reads(tmp_path):
    files = parquet_files(tmp_path / "parquet")
    common = ["data=hf", f"data.files={files}", "data.column=story", "data.val_fraction=0.1"]
    result = execute("-m", "gptexp", "prepare", *common, f"output={tmp_path / 'shards'}",
                     "data.num_proc=2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("val: 232 documents, ") and lines[1].startswith("train: 2,084 documents, ")
    assert lines[2].startswith(f"-> {tmp_path / 'shards'}/hf-") and "tokens/s" in lines[2]
    again = execute("-m", "gptexp", "prepare", *common, f"output={tmp_path / 'shards'}", timeout=300)
    assert again.returncode == 0 and again.stdout.splitlines()[:2] == lines[:2] and "(there already)" in again.stdout
    run = execute("train.py", "model=gpt2", "model.n_layer=1", "model.n_head=2",
                  "model.n_embd=32", "model.block_size=64", *common, f"data.cache_dir={tmp_path / 'shards'}",
                  "trainer.max_steps=2", "trainer.val_check_interval=2", "data.val_tokens=2048", "logger=csv",
                  "callbacks.samples.max_new_tokens=8", f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "tokenizing" not in run.stderr and "prepared" not in run.stderr  # read, not made again
    scored = execute("-m", "gptexp", "evaluate", f"source={tmp_path / 'run'}", *common,
                     f"data.cache_dir={tmp_path / 'shards'}", "data.val_tokens=2048", "logger=none",
                     f"hydra.run.dir={tmp_path / 'eval'}", timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["tokens"] == 2048 and results["on"] == "data=hf split=val (first 2,049 tokens)"


def saved_progress(cache: Path) -> bool:
    """Whether a preparation under `cache` has recorded a block consumed in its manifest."""
    manifests = (sharding.read_manifest(path.parent) or {} for path in cache.glob("*/*/manifest.json"))
    return any(manifest.get("next_block", 0) > 0 for manifest in manifests)


def test_ctrl_c_during_a_parallel_preparation_ends_in_one_line_and_resumes(tmp_path):
    many = [f"{s} ({k})" for k in range(24) for s in STORIES]  # 55,584 documents: 55 blocks
    files = parquet_files(tmp_path / "parquet", parts=4, stories=many)
    args = [sys.executable, "-m", "gptexp", "prepare", "data=hf", f"data.files={files}", "data.column=story",
            "data.num_proc=2", "data.shard_tokens=300000", f"output={tmp_path / 'cache'}"]
    child = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.time() + 120
    while not saved_progress(tmp_path / "cache") and time.time() < deadline:
        time.sleep(0.01)  # a shard's file appears just before the manifest records it: wait for the record
    os.killpg(child.pid, signal.SIGINT)  # a terminal's Ctrl-C: the command and its workers
    _, stderr = child.communicate(timeout=60)
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "Generating" not in line]
    assert child.returncode == 130 and lines == ["error: interrupted (Ctrl-C); what was written before stays, "
                                                 "nothing is half-written"], stderr[-2000:]
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "(resumed at block" in again.stdout, again.stderr[-2000:]
