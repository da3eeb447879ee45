"""llm.c's token shards (dev/data/data_common.py's format), written and read, and trained on."""

import struct

import numpy as np
import pytest

from gptexp import data
from gptexp.core.config import ConfigError
from gptexp.data import shakespeare
from gptexp.data.llmc_shards import ShardedTokens, ShardError, read_shard, read_split, write_shard
from gptexp.data.tokenizers import gpt2_tokenizer
from training import ROOT, execute, metrics, train


def reference_shard(path, tokens, magic=20240520, version=1, count=None):
    """The format as llm.c's write_datafile writes it, independently of gptexp."""
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", magic, version, len(tokens) if count is None else count, *[0] * 253))
        f.write(struct.pack(f"<{len(tokens)}H", *tokens))


def test_write_and_read_match_the_reference(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000).astype(np.uint16)
    reference_shard(tmp_path / "reference.bin", tokens.tolist())
    write_shard(tmp_path / "ours.bin", tokens)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "reference.bin").read_bytes()
    read = read_shard(tmp_path / "reference.bin")
    assert isinstance(read, np.memmap) and np.array_equal(read, tokens)


@pytest.mark.parametrize("kwargs, message", [
    ({"magic": 20240326}, "bad magic 20240326, expected 20240520"),
    ({"magic": 20240326}, r"expected 20240520 \(uint16\) or 20240801 \(uint32\)"),
    ({"version": 7}, "shard version 7, expected 1"),
    ({"magic": 20240801, "version": 1}, "shard version 1, expected 7"),
    ({"count": 11}, "the header says 11 tokens .* the file has 1044 bytes"),
])
def test_bad_shards_are_named(tmp_path, kwargs, message):
    reference_shard(tmp_path / "bad.bin", list(range(10)), **kwargs)
    with pytest.raises(ShardError, match=message):
        read_shard(tmp_path / "bad.bin")


def test_uint32_shards_are_llmcs_llama3_format(tmp_path):
    tokens = np.array([0, 65535, 65536, 128255], dtype=np.uint32)
    write_shard(tmp_path / "big.bin", tokens, dtype="<u4")
    raw = (tmp_path / "big.bin").read_bytes()
    assert struct.unpack("<3i", raw[:12]) == (20240801, 7, 4)  # llm.c's data_common.py, "llama-3"
    assert struct.unpack("<4I", raw[1024:]) == tuple(tokens.tolist())
    read = read_shard(tmp_path / "big.bin")
    assert read.dtype == np.uint32 and np.array_equal(read, tokens)
    with pytest.raises(ShardError, match=r"uint16 shards hold token ids in \[0, 65536\)"):
        write_shard(tmp_path / "x.bin", tokens)


def test_a_truncated_shard_is_caught(tmp_path):
    write_shard(tmp_path / "s.bin", np.arange(100, dtype=np.uint16))
    (tmp_path / "s.bin").write_bytes((tmp_path / "s.bin").read_bytes()[:-3])
    with pytest.raises(ShardError, match="truncated"):
        read_shard(tmp_path / "s.bin")
    with pytest.raises(ShardError, match="token ids in"):
        write_shard(tmp_path / "big.bin", np.array([70000]))


def test_several_shards_read_as_one_array(tmp_path):
    parts = [np.arange(start, start + n, dtype=np.uint16) for start, n in ((0, 7), (7, 1), (8, 20))]
    for k, part in enumerate(parts):
        write_shard(tmp_path / f"d_train_{k:06d}.bin", part)
    tokens = read_split(tmp_path / "d", "train")
    assert isinstance(tokens, ShardedTokens) and len(tokens) == 28
    index = np.random.default_rng(0).integers(0, 28, (5, 9))
    assert np.array_equal(tokens[index], np.concatenate(parts)[index])
    with pytest.raises(ShardError, match=r"no llm.c token shards match .*d_val_\*.bin; write them with"):
        read_split(tmp_path / "d", "val")


def test_prepare_writes_llmc_shards_and_training_reads_them(tmp_path):
    result = execute("-m", "gptexp", "prepare", "data=shakespeare", f"output={tmp_path}",
                     "shard_tokens=100000", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shakespeare_train_{k:06d}.bin" for k in range(4)] + [
        "shakespeare_val_000000.bin"]
    tokenizer, text = gpt2_tokenizer(), shakespeare.load_splits(0.1)
    for split in ("train", "val"):  # llm.c's stream: <|endoftext|> before the document
        tokens = read_split(tmp_path / "shakespeare", split)
        assert tokens[np.arange(len(tokens))].tolist() == [50256, *tokenizer.encode(text[split][0])]

    run = tmp_path / "run"
    result = train("model=gpt2", f"data.shards={tmp_path}/shakespeare", "trainer.max_steps=10",
                   "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "data.eval_batch_size=16",
                   "logger=csv", run_dir=run)  # TINY's 512 rows x 50,257 logits would be 3.3 GB a batch
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(row.get("val/loss") for row in metrics(run))


def test_shards_need_a_gpt2_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="llm.c's GPT-2 tokens, not characters"):
        data.load({"name": "shakespeare", "shards": str(tmp_path / "x")}, "char")
    write_shard(tmp_path / "x_train_000000.bin", np.array([50256, 300, 2], dtype=np.uint16))
    write_shard(tmp_path / "x_val_000000.bin", np.array([50256, 3, 4], dtype=np.uint16))
    source = data.load({"name": "shakespeare", "shards": str(tmp_path / "x"), "seq_len": 2},
                       str(ROOT / "src/gptexp/assets/stories260K/tok512.model"))  # a vocabulary of 512
    with pytest.raises(ConfigError, match="token id 50256, beyond the .* 512"):
        data.build(source, context_length=2).setup("fit")
