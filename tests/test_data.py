import numpy as np
import pytest
import torch

from gptexp import data
from gptexp.core.config import ConfigError
from gptexp.data.token_files import load_tokens, tokenize_once
from gptexp.data.tokenizers import gpt2_tokenizer
from gptexp.data.windows import RandomBatches, SequentialBatches, TokenWindows


def prepared(overrides: dict, model_tokenizer: str = "gpt2", tmp_path=None):
    cfg = {"name": "shakespeare", "seq_len": 64, "batch_size": 4} | overrides
    if tmp_path is not None:
        cfg["cache_dir"] = str(tmp_path)
    module = data.build(data.load(cfg, model_tokenizer), context_length=1_000_000)
    module.setup("fit")
    return module


@pytest.mark.parametrize("tokenizer, train, val", [("model", 301_966, 36_059), ("char", 1_003_854, 111_540)])
def test_shakespeare_token_counts_match_nanogpt(tokenizer, train, val):
    module = prepared({"tokenizer": tokenizer})
    assert len(module.tokens["train"]) == train and len(module.tokens["val"]) == val
    assert module.tokens["train"].dtype == np.uint16
    assert isinstance(module.tokens["train"], np.memmap)


def test_bpe_tokens_are_the_gpt2_encoding_of_the_text():
    module = prepared({})
    tok = gpt2_tokenizer()
    assert module.tokens["train"][:4].tolist() == [5962, 22307, 25, 198]  # "First Citizen:\n"
    for split in ("train", "val"):
        assert tok.decode(module.tokens[split].tolist()) == module.source.splits[split][0]


def test_token_files_are_made_once(tmp_path):
    module = prepared({"tokenizer": "char"}, tmp_path=tmp_path)
    files = sorted(module.source.directory.iterdir())
    assert [f.name for f in files] == ["meta.json", "train.npy", "val.npy"]
    stamps = [f.stat().st_mtime_ns for f in files]
    prepared({"tokenizer": "char"}, tmp_path=tmp_path)
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_an_interrupted_cache_is_rebuilt(tmp_path):
    tok = gpt2_tokenizer()
    paths = tokenize_once(tmp_path, {"train": ["a b c"], "val": ["d e"]}, tok)
    (tmp_path / "meta.json").unlink()  # as if killed before the end
    paths["train"].write_bytes(b"garbage")
    paths = tokenize_once(tmp_path, {"train": ["a b c"], "val": ["d e"]}, tok)
    assert load_tokens(paths["train"]).tolist() == tok.encode("a b c")


def test_documents_are_separated_by_end_of_text(tmp_path):
    tok = gpt2_tokenizer()
    paths = tokenize_once(tmp_path, {"train": ["one", "two"]}, tok)
    assert load_tokens(paths["train"]).tolist() == tok.encode("one") + [50256] + tok.encode("two")


def test_windows_are_shifted_by_one():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = TokenWindows(tokens, 8)[np.array([0, 50, 91])]
    assert x.dtype == torch.int64 and x.shape == (3, 8)
    assert torch.equal(y, x + 1)
    assert x[2, -1] == 98 and y[2, -1] == 99


def test_random_batches_are_reproducible_per_step_and_in_range():
    full = list(RandomBatches(1000, 16, 4, num_batches=10, seed=(7, 0)))
    resumed = list(RandomBatches(1000, 16, 4, num_batches=10, seed=(7, 0), start=6))
    assert len(full) == 10 and len(resumed) == 4
    assert all(np.array_equal(a, b) for a, b in zip(full[6:], resumed))
    other_seed = list(RandomBatches(1000, 16, 4, num_batches=10, seed=(7, 1)))
    assert not np.array_equal(full[0], other_seed[0])
    offsets = np.concatenate(list(RandomBatches(40, 16, 64, num_batches=50, seed=(0,))))
    assert offsets.min() == 0 and offsets.max() == 40 - 16 - 1


def test_ranks_split_the_global_batch_of_one_process():
    """Two processes with batch 4 see, step by step, the windows of one process with batch 8."""
    one = list(RandomBatches(1000, 16, 8, num_batches=5, seed=(7, 0)))
    ranks = [list(RandomBatches(1000, 16, 4, num_batches=5, seed=(7, 0), rank=r, world_size=2)) for r in (0, 1)]
    for k in range(5):
        assert np.array_equal(np.concatenate([ranks[0][k], ranks[1][k]]), one[k])
    val = [np.concatenate(list(SequentialBatches(1001, 10, 32, rank=r, world_size=2))) for r in (0, 1)]
    assert np.array_equal(np.sort(np.concatenate(val)), np.arange(0, 1000, 10))  # each window once, in all


def test_validation_windows_cover_the_split_once():
    sampler = SequentialBatches(n_tokens=1001, seq_len=10, batch_size=32)
    offsets = np.concatenate(list(sampler))
    assert len(sampler) == 4 and len(offsets) == 100
    assert np.array_equal(offsets, np.arange(0, 1000, 10))  # targets 1..1000: every token but the first


def test_seq_len_longer_than_the_data_is_refused():
    with pytest.raises(ConfigError, match="data.seq_len=200000 tokens needs at least 200001 tokens"):
        prepared({"seq_len": 200_000})


@pytest.mark.parametrize("overrides, message", [
    ({"name": "nope"}, "data.name='nope' is not a known dataset; choose one of shakespeare, tinystories"),
    ({"source": "hub"}, "Tiny Shakespeare is bundled only"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": "8x"}, "data.batch_size must be an int, got '8x'"),
    ({"colour": 1}, "unknown key data.colour; valid keys of data: name, loader, tokenizer"),
    ({"tokenizer": "bpe"}, "tokenizer must be 'model' or 'char'"),
])
def test_bad_data_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepared(overrides)


def test_tinystories_bundled_sample_holds_whole_stories():
    from gptexp.data import tinystories

    splits = tinystories.load_splits(0.05, source="bundled")
    assert len(splits["train"]) + len(splits["val"]) == 2316 and len(splits["val"]) == 116
    assert splits["train"][0].startswith("One day, a little girl named Lily found a needle in her room.")
    assert splits["val"][-1].endswith("She hoped to see the dolphin again.")  # the cut-off story is gone
    assert not any("<|endoftext|>" in s for s in splits["train"])


def test_tinystories_documents_are_framed_per_tokenizer():
    """GPT-2: <|endoftext|> between stories; LLaMA (SentencePiece): BOS before every story."""
    from gptexp.core.config import asset_path

    gpt2 = data.build(data.load({"name": "tinystories", "source": "bundled"}, "gpt2"), context_length=256)
    gpt2.setup()
    n_stories = len(gpt2.source.splits["train"])
    assert (gpt2.tokens["train"] == 50256).sum() == n_stories - 1
    llama = data.build(data.load({"name": "tinystories", "source": "bundled"},
                                 asset_path("stories260K/tok512.model")), context_length=512)
    llama.setup()
    assert llama.tokens["train"][0] == 1 and (llama.tokens["train"] == 1).sum() == n_stories
    assert llama.tokenizer.decode(llama.tokens["train"][1:12].tolist()).startswith("One day, a little girl")


def test_shakespeare_with_a_llama_tokenizer():
    from gptexp.core.config import asset_path

    module = data.build(data.load({"name": "shakespeare"}, asset_path("stories260K/tok512.model")), context_length=64)
    module.setup()
    assert module.tokens["train"][0] == 1 and module.tokenizer.vocab_size == 512
    x, y = next(iter(module.val_dataloader()))
    assert x.shape[1] == 64 and x.max() < 512
