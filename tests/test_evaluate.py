"""python -m gptexp evaluate, run as a user runs it: perplexity against HF's own sliding-window procedure,
bits per byte, multiple choice, and its bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from gptexp.core.config import asset_path
from gptexp.data.tokenizers import gpt2_tokenizer
from gptexp.eval.scoring import windows
from gptexp.weights import load_source
from training import ROOT, execute

STORIES = asset_path("stories260K/stories260K.bin")


def evaluate(*args: str, out, status: int = 0, logger: str = "none") -> subprocess.CompletedProcess:
    result = execute("-m", "gptexp", "evaluate", *args, f"logger={logger}",
                     f"hydra.run.dir={out}", timeout=300)
    assert result.returncode == status, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("n, window, stride", [(10, 4, 3), (10, 4, 1), (100, 32, 16), (33, 32, 31), (2, 8, 3)])
def test_every_token_after_the_first_is_scored_exactly_once(n, window, stride):
    scored = [t for begin, end, first in windows(n, window, stride) for t in range(max(first, begin + 1), end)]
    assert sorted(scored) == list(range(1, n))
    assert all(end - begin <= window for begin, end, _ in windows(n, window, stride))


def hf_sliding_window_nll(model, ids: torch.Tensor, window: int, stride: int) -> float:
    """HF's "perplexity of fixed-length models" loop, counting the tokens each window's loss averages."""
    nll_sum, n_tokens, previous_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        target_length = end - previous_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())  # HF shifts the labels by one inside
        nll_sum += loss.item() * scored
        n_tokens += scored
        previous_end = end
        if end == ids.size(1):
            break
    return nll_sum / n_tokens


@pytest.mark.parametrize("stride", [63, 24])
def test_perplexity_of_a_gpt2_equals_hfs_procedure(stride, tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     initializer_range=0.2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    text = (ROOT / "src/gptexp/assets/tinyshakespeare.txt").read_text()[:6000]
    (tmp_path / "text.txt").write_text(text)
    evaluate(f"source={tmp_path / 'hf'}", f"text={tmp_path / 'text.txt'}", f"stride={stride}", out=tmp_path / "out")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    ids = torch.tensor([gpt2_tokenizer().encode(text)])
    expected = hf_sliding_window_nll(hf, ids, window=64, stride=stride)
    assert abs(results["nats_per_token"] - expected) <= 1e-5
    assert results["tokens"] == ids.size(1) - 1 and results["window"] == 64 and results["stride"] == stride
    assert results["perplexity"] == pytest.approx(math.exp(results["nats_per_token"]))


def test_bits_per_byte_of_a_character_level_run(run_dir, tmp_path):
    result = evaluate(f"source={run_dir}", out=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert json.loads(result.stdout) == results
    assert results["on"] == "data=shakespeare split=val" and results["tokens"] == 111_539  # the whole split, less one
    assert results["bytes"] == results["tokens"]  # one ASCII character a token
    assert results["bits_per_byte"] == pytest.approx(results["nats_per_token"] / math.log(2))


def test_stories260k_on_the_bundled_tinystories(tmp_path):
    evaluate(f"source={STORIES}", "data=tinystories", "data.source=bundled", out=tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tokens"] > 50_000 and 1.0 < results["nats_per_token"] < 2.0  # a real model of this text
    assert 0.5 < results["bits_per_byte"] < 1.5


def test_multiple_choice_scores_sum_and_mean_log_probabilities(tmp_path):
    examples = [
        {"ctx": "Once upon a time, there was a little girl named", "endings": ["Lily.", "the table of carbon.", "Tom"],
         "label": 0},
        {"ctx": "She loved to play outside in the", "endings": ["quantum", "park.", "sun and the big tree"], "label": 1},
        {"ctx": "One day, she saw a big, red", "endings": ["ball.", "bureaucracy.", "dog"], "label": 0},
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    evaluate(f"source={STORIES}", "task=multiple_choice", f"examples={tmp_path / 'mc.jsonl'}", out=tmp_path / "out")
    results = json.loads((tmp_path / "out" / "results.json").read_text())

    source = load_source(STORIES)  # the same scores computed here, one ending at a time
    hits = hits_norm = 0
    for example in examples:
        context = [source.tokenizer.bos_id] + source.tokenizer.encode(example["ctx"])
        scores = []
        for ending in example["endings"]:
            tokens = source.tokenizer.encode(" " + ending)
            logits, _ = source.model(torch.tensor([context + tokens]))
            logprobs = logits[0, len(context) - 1:-1].log_softmax(-1).gather(1, torch.tensor(tokens)[:, None])
            scores.append((logprobs.sum().item(), len(tokens)))
        hits += max(range(3), key=lambda i: scores[i][0]) == example["label"]
        hits_norm += max(range(3), key=lambda i: scores[i][0] / scores[i][1]) == example["label"]
    assert results["examples"] == 3
    assert (results["acc"], results["acc_norm"]) == (hits / 3, hits_norm / 3)
    assert results["acc_norm"] >= 2 / 3  # the model knows its stories


@pytest.mark.parametrize("case", ["malformed line", "examples in Latin-1", "a line that is a string",
                                  "label out of range", "no examples file", "unknown task",
                                  "stride as long as the window"])
def test_bad_input_gets_one_line(case, tmp_path):
    good = '{"ctx": "a", "endings": ["b", "c"], "label": 0}\n'
    (tmp_path / "mc.jsonl").write_text(good + '{"ctx": "a", "endings"\n')
    (tmp_path / "latin.jsonl").write_bytes(good.encode() + b'{"ctx": "caf\xe9", "endings": ["b", "c"], "label": 0}\n')
    (tmp_path / "string.jsonl").write_text(good + '"hello"\n')
    (tmp_path / "label.jsonl").write_text('{"ctx": "a", "endings": ["b", "c"], "label": 2}\n')
    arguments, message = {
        "malformed line": (["task=multiple_choice", f"examples={tmp_path / 'mc.jsonl'}"], "mc.jsonl, line 2: not an example"),
        "examples in Latin-1": (["task=multiple_choice", f"examples={tmp_path / 'latin.jsonl'}"],
                                "latin.jsonl, line 2: not UTF-8 text (byte 0xe9 at offset 60); save it as UTF-8"),
        "a line that is a string": (["task=multiple_choice", f"examples={tmp_path / 'string.jsonl'}"],
                                    'string.jsonl, line 2: not an example {"ctx": text, "endings": [two or more '
                                    'texts], "label": the right ending\'s index}; found "hello"'),
        "label out of range": (["task=multiple_choice", f"examples={tmp_path / 'label.jsonl'}"],
                               "label.jsonl, line 1: needs two or more endings and a label indexing them"),
        "no examples file": (["task=multiple_choice"], "task=multiple_choice needs examples=<JSON-lines file>"),
        "unknown task": (["task=rouge"], "task='rouge': choose perplexity, multiple_choice or lm_eval"),
        "stride as long as the window": (["window=16", "stride=16"], "stride=16: choose 1 to window - 1 (15)"),
    }[case]
    result = evaluate(f"source={STORIES}", *arguments, out=tmp_path / "out", status=2)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_results_go_to_a_wandb_run_of_job_type_eval(tmp_path):
    evaluate(f"source={STORIES}", f"text={ROOT / 'src/gptexp/assets/tinystories_sample.txt'}", "window=128",
             "stride=127", out=tmp_path, logger="wandb")
    results = json.loads((tmp_path / "results.json").read_text())
    (record,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    wandb_cli = Path(sys.executable).parent / "wandb"
    lines = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(record)], capture_output=True, text=True,
                           check=True, timeout=300).stdout.splitlines()
    items = [json.loads(line) for line in lines]
    assert any(item.get("run", {}).get("job_type") == "eval" for item in items)
    logged = [item["history"]["item"] for item in items if "history" in item]
    assert logged and logged[-1]["eval/perplexity"] == pytest.approx(results["perplexity"], rel=1e-12)
    assert logged[-1]["eval/tokens"] == results["tokens"]


def test_a_character_model_refuses_a_text_with_characters_it_never_saw(run_dir, tmp_path):
    result = evaluate(f"source={run_dir}", f"text={ROOT / 'src/gptexp/assets/tinystories_sample.txt'}",
                      out=tmp_path / "out", status=2)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "character '\"' is not in this 65-character vocabulary" in errors[0], result.stderr
    assert "score a text the model's vocabulary covers" in errors[0] and not (tmp_path / "out").exists()
