"""Speculative decoding gives what plain decoding gives: greedy, the same tokens; sampling, the same distribution
(a chi-square test on a small vocabulary); and it says how often the proposals were kept."""

import copy
import itertools
import math

import pytest
import torch
from test_bad_input import in_process, one_line_error

from gptexp.core.config import asset_path
from gptexp.inference.generation import decode, distribution
from gptexp.inference.speculative import DraftModel, NgramProposer, SpeculationStats, _latest_continuation, verify
from gptexp.models import GPT2, GPT2Config, Llama, LlamaConfig

STORIES = str(asset_path("stories260K/stories260K.bin"))


def gpt2(vocab_size=100, seed=0, block_size=48):
    torch.manual_seed(seed)
    return GPT2(GPT2Config(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32)).eval()


def llama(vocab_size=100, seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, max_seq_len=48,
                             hidden_dim=64)).eval()


def perturbed(model, scale=0.3):
    """A draft that agrees with the model often, not always."""
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn_like(p))
    return draft


def tokens(model, idx, n, pad=None, proposer=None, temperature=0.0, seed=0, stats=None):
    generator = torch.Generator().manual_seed(seed)
    return torch.cat(list(decode(model, idx, n, temperature, generator=generator, pad=pad, proposer=proposer,
                                 stats=stats)), dim=1)


def repetitive_prompts(batch):
    """Prompts that repeat themselves, so that prompt lookup finds something."""
    base = torch.randint(0, 100, (batch, 6))
    return torch.cat([base, base, base[:, :3]], dim=1)


@pytest.mark.parametrize("build", [gpt2, llama])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("proposer", ["draft", "same model", "ngram"])
def test_greedy_speculative_tokens_equal_plain_greedy_tokens(build, batch, proposer):
    model = build()
    idx = repetitive_prompts(batch)
    pad = None if batch == 1 else torch.tensor([0, 4, 2])  # left-padded rows of different lengths
    if pad is not None:
        idx[1, :4], idx[2, :2] = 0, 0
    plain = tokens(model, idx, 30, pad)
    make = {"draft": lambda: DraftModel(perturbed(model), 4), "same model": lambda: DraftModel(copy.deepcopy(model), 4),
            "ngram": lambda: NgramProposer(3, 4)}[proposer]
    stats = SpeculationStats()
    assert torch.equal(tokens(model, idx, 30, pad, make(), stats=stats), plain)
    assert stats.proposed > 0 and stats.tokens == 30
    if proposer == "same model":  # every proposal kept: k + 1 tokens a forward pass, but for the last step
        assert stats.acceptance == 1 and stats.tokens_per_forward == 5


def test_greedy_speculation_past_the_context_continues_as_plain_decoding_does():
    model = gpt2(block_size=24)
    idx = torch.randint(0, 100, (1, 10))
    plain = tokens(model, idx, 30)  # 40 tokens in a context of 24: the window slides for the last 16
    assert torch.equal(tokens(model, idx, 30, proposer=DraftModel(perturbed(model), 3)), plain)


def test_a_draft_with_a_larger_padded_vocabulary_is_checked_over_the_same_tokens():
    model, draft = gpt2(vocab_size=100), gpt2(vocab_size=128, seed=1)
    idx = torch.randint(0, 100, (2, 5))
    assert torch.equal(tokens(model, idx, 20, proposer=DraftModel(draft, 3)), tokens(model, idx, 20))
    sampled = tokens(model, idx, 20, proposer=DraftModel(draft, 3), temperature=1.0)
    assert sampled.max() < 100  # never a token the model cannot write


def test_prompt_lookup_proposes_what_followed_the_latest_occurrence_of_the_longest_tail():
    row = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert _latest_continuation(row, 3, 2) == [7, 8]  # "2 3" last seen before 7 8 (no earlier "5 2 3")
    assert _latest_continuation([4, 5, 6], 3, 4) == []
    assert _latest_continuation([4, 5, 4], 2, 4) == [5, 4]  # a unigram found, proposals run to the end
    # in a run of one token the latest occurrence has one token after it; an earlier one has k
    assert _latest_continuation([1, 9, 9, 9, 9, 9, 9], 2, 3) == [9, 9, 9]


def test_the_accept_resample_rule_draws_from_the_models_distribution():
    """One position, 200,000 rows: a draft from q, kept with probability min(1, p/q), else a draw from the
    normalised max(0, p - q): the tokens follow p, and not q."""
    generator = torch.Generator().manual_seed(0)
    rows, vocab = 200_000, 5
    p = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.3, 0.1])
    drafts = torch.multinomial(q.expand(rows, vocab), 1, replacement=True, generator=generator)
    _, out, _ = verify(p.expand(rows, 2, vocab), drafts, q.expand(rows, 1, vocab), None, False, generator)
    counts = torch.bincount(out[:, 0], minlength=vocab).double()
    assert chi_square_p_value(counts, p) > 1e-3
    assert chi_square_p_value(torch.bincount(drafts[:, 0], minlength=vocab).double(), p) < 1e-10  # the test can fail


def chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    from scipy.stats import chi2

    expected = counts.sum() * probabilities.double()
    statistic = ((counts - expected) ** 2 / expected).sum().item()
    return float(chi2.sf(statistic, len(counts) - 1))


@pytest.mark.parametrize("proposer", ["draft", "ngram"])
def test_speculative_sampling_keeps_the_models_distribution(proposer):
    """A 6-token vocabulary, 3 new tokens after a fixed prompt: the 216 sequences' frequencies over 12,000
    speculative samples against their exact probabilities under the model (chain rule over its own logits)."""
    vocab, new = 6, 3
    model = gpt2(vocab_size=vocab)
    prompt = torch.tensor([[1, 2, 3, 1, 2]])
    exact = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=new):
            idx = torch.cat([prompt, torch.tensor([seq])], dim=1)
            logp = distribution(model(idx)[0][0], 1.0).log()
            exact[seq] = math.exp(sum(logp[prompt.size(1) - 1 + i, t].item() for i, t in enumerate(seq)))
    batch, calls = 24, 500
    make = (lambda: DraftModel(perturbed(model, 1.0), 2)) if proposer == "draft" else (lambda: NgramProposer(2, 2))
    draft = make()
    counts = dict.fromkeys(exact, 0)
    stats = SpeculationStats()
    for i in range(calls):
        out = tokens(model, prompt.repeat(batch, 1), new, proposer=draft, temperature=1.0, seed=i, stats=stats)
        for seq in map(tuple, out.tolist()):
            counts[seq] += 1
    assert 0 < stats.acceptance < 1  # proposals were both kept and refused
    observed = torch.tensor([counts[s] for s in exact], dtype=torch.float64)
    assert chi_square_p_value(observed, torch.tensor(list(exact.values()))) > 1e-3


def test_sample_reports_the_acceptance_rate_on_stderr(tmp_path, monkeypatch, capfd):
    import runpy
    import sys

    for draft in ("ngram", STORIES):
        monkeypatch.setattr(sys, "argv", ["sample", f"source={STORIES}", f"draft={draft}", "temperature=0",
                                          "max_new_tokens=30", "prompt=Once upon a time",
                                          f"hydra.run.dir={tmp_path / 'run'}"])
        runpy.run_module("gptexp.commands.sample", run_name="__main__")
        err = capfd.readouterr().err
        assert "30 new tokens" in err and "proposed tokens accepted" in err and "tokens a forward pass" in err
        if draft == STORIES:  # the model as its own draft: every proposal kept
            assert "draft: 100% of" in err and "5.00 tokens a forward pass" in err


@pytest.mark.parametrize("arguments, messages", [
    (["draft=<gpt2 run>"], ["draft=", "its tokenizer (gpt2, 50257 tokens) differs from the model's",
                            "a draft must share the model's tokenizer, or use draft=ngram"]),
    (["draft=ngram", "draft_tokens=0"], ["draft_tokens must be an integer >= 1, got 0"]),
    (["draft=/no/such/run"], ["draft=/no/such/run does not exist"]),
])
def test_bad_drafts_are_one_line(arguments, messages, tmp_path, monkeypatch, capfd):
    from gptexp.data.tokenizers import gpt2_tokenizer
    from gptexp.weights import Source, quantized

    other = tmp_path / "gpt2.int8.safetensors"
    source = Source(gpt2(vocab_size=50257), gpt2_tokenizer(), "a GPT-2")
    source.place("cpu", "fp32", "int8")
    quantized.write(source, other)
    arguments = [a.replace("<gpt2 run>", str(other)) for a in arguments]
    status, stderr = in_process("sample", [f"source={STORIES}", *arguments, f"hydra.run.dir={tmp_path / 'run'}"],
                                monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, messages)
    assert not (tmp_path / "run").exists()


def test_the_models_own_q8_0_gguf_is_taken_as_its_draft(tmp_path, monkeypatch, capfd):
    """The SentencePiece model rebuilt from the GGUF is other bytes with the same pieces: the same vocabulary."""
    import runpy
    import sys

    gguf = tmp_path / "stories.q8_0.gguf"
    for command, arguments in [("export", ["format=gguf", "dtype=q8_0", f"source={STORIES}", f"output={gguf}"]),
                               ("sample", [f"source={STORIES}", f"draft={gguf}", "temperature=0", "max_new_tokens=20",
                                           "prompt=Once upon a time", f"hydra.run.dir={tmp_path / 'run'}"])]:
        monkeypatch.setattr(sys, "argv", [command, *arguments])
        runpy.run_module(f"gptexp.commands.{command}", run_name="__main__")
    stats = capfd.readouterr().err.splitlines()[-1]
    assert "20 new tokens" in stats and "proposed tokens accepted" in stats, stats


@pytest.mark.parametrize("arguments, said", [
    (["max_new_tokens=0"], "[1 x 5 prompt tokens, 0 new tokens; draft: no tokens proposed]"),
    (["temperature=1", "max_new_tokens=1"], "; draft: no tokens proposed, 1.00 tokens a forward pass]"),
])
def test_a_sample_without_proposals_says_so(arguments, said, tmp_path, monkeypatch, capfd):
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["sample", f"source={STORIES}", "draft=ngram", *arguments,
                                      "prompt=Once upon a time", f"hydra.run.dir={tmp_path / 'run'}"])
    runpy.run_module("gptexp.commands.sample", run_name="__main__")
    stats = capfd.readouterr().err.splitlines()[-1]
    assert stats.endswith(said) and "nan" not in stats and "after -" not in stats, stats
