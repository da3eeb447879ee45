"""finetune=dpo: the loss and rewards are the published formula's, log-probabilities are summed over the answers
only, the reference is the starting point (LoRA: the adapters disabled; full: a frozen copy), so the loss starts at
ln 2 with zero margins, and a run starts from an earlier instruction run with finetune.init_from."""

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from gptexp.finetune.objectives import Preference
from training import ROOT, execute

FAST = ["model=llama2_260k", "data.seq_len=160", "data.batch_size=4", "data.eval_batch_size=8",
        "trainer.precision=32-true", "logger=csv", "trainer.log_every_n_steps=1", "callbacks.samples.max_new_tokens=8"]


def test_the_loss_and_rewards_are_the_published_formulas():
    """Rafailov et al. (2023), eq. 7, with cDPO's label smoothing: loss = -(1 - e) log s(b h) - e log s(-b h),
    h = (log pi_c - log ref_c) - (log pi_r - log ref_r); rewards b (log pi - log ref); RPO (Pang et al. 2024) adds
    a (-log pi_c / |y_c|)."""
    policy = torch.tensor([-10.0, -20.0, -14.0, -18.0])  # chosen: pairs 0 and 1; rejected: then
    reference = torch.tensor([-11.0, -19.0, -12.0, -18.5])
    tokens = torch.tensor([4, 5, 3, 6])  # each answer's tokens
    beta, smoothing = 0.5, 0.1
    losses, metrics = Preference(beta, smoothing).losses(policy, reference, tokens)
    rpo_losses, _ = Preference(beta, smoothing, rpo_alpha=0.5).losses(policy, reference, tokens)
    for pair, (pc, pr, rc, rr, n) in enumerate([(-10, -14, -11, -12, 4), (-20, -18, -19, -18.5, 5)]):
        h = beta * ((pc - rc) - (pr - rr))
        log_sigmoid = lambda z: -math.log1p(math.exp(-z))  # noqa: E731
        expected = -(1 - smoothing) * log_sigmoid(h) - smoothing * log_sigmoid(-h)
        assert losses[pair].item() == pytest.approx(expected, rel=1e-6)
        assert rpo_losses[pair].item() == pytest.approx(expected + 0.5 * -pc / n, rel=1e-6)  # RPO: + a NLL per token
        assert metrics["nll/chosen"][pair].item() == pytest.approx(-pc / n)
        assert metrics["rewards/chosen"][pair].item() == pytest.approx(beta * (pc - rc))
        assert metrics["rewards/rejected"][pair].item() == pytest.approx(beta * (pr - rr))
        assert metrics["rewards/margins"][pair].item() == pytest.approx(h)
        assert metrics["rewards/accuracies"][pair].item() == float(h > 0)


def test_log_probabilities_are_summed_over_the_answer_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    model = lambda x: (logits, None)  # noqa: E731
    y = torch.tensor([[-1, -1, 3, 4, -1], [-1, 2, 2, 2, 6]])
    expected = [logits[0].log_softmax(-1)[2, 3] + logits[0].log_softmax(-1)[3, 4],
                sum(logits[1].log_softmax(-1)[t, y[1, t]] for t in range(1, 5))]
    assert torch.allclose(Preference.logps(model, torch.zeros(2, 5, dtype=torch.long), y), torch.stack(expected))


def train(*overrides: str, run_dir: Path) -> subprocess.CompletedProcess:
    result = execute("train.py", *FAST, *overrides, f"hydra.run.dir={run_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


SYSTEM = "Storyteller"  # the instruction run's data.system


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A few instruction-finetuning steps of stories260K (full weights), in the Alpaca template (not the LLaMA
    tokenizer's default, llama2_chat) with a system prompt: what comes after it must use the run's own."""
    root = tmp_path_factory.mktemp("sft")
    records = [{"instruction": f"Write about a {thing}.", "output": f"The {thing} was red and it was happy."}
               for thing in ("cat", "dog", "ball", "tree", "car", "bird", "fish", "cake") * 3]
    path = write_jsonl(root / "sft.jsonl", records)
    train("finetune=full", "data=instruct", f"data.files={path}", "data.template=alpaca", f"data.system={SYSTEM}",
          "trainer.max_steps=6",
          "trainer.val_check_interval=6", run_dir=root / "run")
    return root / "run"


def test_sample_and_evaluate_use_the_runs_template(sft_run, tmp_path):
    """sample mode=chat answers in the run's template (Alpaca here) with the run's system prompt, stopping at its
    EOS; evaluate on the run's instruction data scores the answers only, in that template and with that system
    prompt: its nats per answer token are the run's last val/loss."""
    from gptexp.data import templates
    from gptexp.data.tokenizers import load_tokenizer

    chat = execute("-m", "gptexp", "sample", f"source={sft_run}", "mode=chat", "temperature=0",
                   "max_new_tokens=40", f"hydra.run.dir={tmp_path / 'chat'}", input="Write about a cat.\n", timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "chat in template alpaca (the run's), with the run's system prompt" in chat.stderr
    record = json.loads((tmp_path / "chat" / "samples.jsonl").read_text().splitlines()[0])
    tokenizer = load_tokenizer(str(ROOT / "src/gptexp/assets/stories260K/tok512.model"))
    assert record["prompt_ids"] == templates.prompt_ids(templates.get("alpaca"), tokenizer, [], "Write about a cat.",
                                                        SYSTEM)
    evaluated = execute("-m", "gptexp", "evaluate", f"source={sft_run}", "checkpoint=last",
                        "data=instruct", f"data.files={sft_run.parent / 'sft.jsonl'}", "logger=none",
                        f"hydra.run.dir={tmp_path / 'eval'}", timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert (results["task"], results["template"], results["dropped"]) == ("answers", "alpaca", 0)
    last = [r for r in rows(sft_run) if r["val/loss"]][-1]
    assert results["nats_per_answer_token"] == pytest.approx(float(last["val/loss"]), rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(results["nats_per_answer_token"]))
    assert 0 < results["answer_tokens"] < results["examples"] * 64


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_starts_at_ln2_from_an_instruction_run_and_logs_its_rewards(method, sft_run, tmp_path):
    """UltraFeedback's schema (conversations as chosen and rejected) for LoRA, (prompt, chosen, rejected) texts for
    full weights; both from the instruction run, in its template."""
    if method == "lora":
        pairs = [{"prompt": f"Write about a {t}.", "chosen": [{"role": "user", "content": f"Write about a {t}."},
                                                             {"role": "assistant", "content": f"The {t} was red."}],
                  "rejected": [{"role": "user", "content": f"Write about a {t}."},
                               {"role": "assistant", "content": "No."}]} for t in ("cat", "dog", "ball", "tree") * 4]
        data = ["data=ultrafeedback", "data.path=null", f"data.files={write_jsonl(tmp_path / 'train.jsonl', pairs)}",
                f"data.val_files={write_jsonl(tmp_path / 'test.jsonl', pairs[:4])}"]
    else:
        pairs = [{"prompt": f"Write about a {t}.", "chosen": f"The {t} was red.", "rejected": "No."}
                 for t in ("cat", "dog", "ball", "tree") * 4]
        data = ["data=instruct", f"data.files={write_jsonl(tmp_path / 'pairs.jsonl', pairs)}"]
    result = train("finetune=dpo", f"finetune.method={method}", f"finetune.init_from={sft_run}", *data,
                   "trainer.max_steps=6", "trainer.val_check_interval=3", "optim.lr=1e-2", "optim.warmup_steps=0",
                   run_dir=tmp_path / "dpo")
    log = result.stdout + result.stderr
    assert f"starting from {sft_run}/checkpoints/best.ckpt" in log
    assert "objective: preference, on preference data in template alpaca" in log  # the instruction run's
    validations = [r for r in rows(tmp_path / "dpo") if r["val/loss"]]
    first = validations[0]
    assert float(first["steps"]) == 0 and float(first["val/loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(first["val/rewards/margins"]) == pytest.approx(0, abs=1e-6)
    assert float(first["val/rewards/chosen"]) == pytest.approx(0, abs=1e-6)
    assert float(validations[-1]["val/rewards/margins"]) > 0 and float(validations[-1]["val/loss"]) < math.log(2)
    trained = [r for r in rows(tmp_path / "dpo") if r.get("train/rewards/accuracies")]
    assert trained and all(r["train/rewards/chosen"] and r["train/rewards/margins"] for r in trained)
    assert (tmp_path / "dpo" / "adapter" / "adapter_config.json").exists() == (method == "lora")


def test_a_typed_template_that_disagrees_with_the_starting_runs_is_refused(sft_run, tmp_path, monkeypatch, capfd):
    """The run was trained in Alpaca: data.template=llama2_chat on the command line is refused in one line (a data
    preset's template gives way to the run's, logged); the run's own template typed again is no disagreement."""
    from test_bad_input import in_process, one_line_error

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Write about a {t}.", "chosen": f"The {t} was red.",
                                                    "rejected": "No."} for t in ("cat", "dog", "ball", "tree") * 4])
    common = [*FAST, "finetune=dpo", f"finetune.init_from={sft_run}", "data=instruct", f"data.files={pairs}"]
    status, stderr = in_process("train.py", [*common, "data.template=llama2_chat", f"hydra.run.dir={tmp_path / 'run'}"],
                                monkeypatch, capfd)
    assert status == 2
    one_line_error(stderr, [f"data.template=llama2_chat disagrees with finetune.init_from={sft_run}, trained in "
                            f"template alpaca: leave data.template unset to go on in alpaca"])
    assert not (tmp_path / "run").exists()
    result = train(*common[len(FAST):], "data.template=alpaca", "trainer.max_steps=1", "trainer.val_check_interval=1",
                   run_dir=tmp_path / "agreeing")
    assert "on preference data in template alpaca" in result.stdout + result.stderr


def tiny_gpt2(dropout: float):
    from gptexp.models import GPT2, GPT2Config

    torch.manual_seed(0)
    return GPT2(GPT2Config(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=dropout))


def answer_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two pairs of rows (chosen first) whose last 8 tokens are the answers."""
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, dims=1)
    y[:, :4] = -1
    return x, y


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("disable_dropout", [True, False])
def test_the_reference_and_by_default_the_policy_run_without_dropout(method, disable_dropout):
    """With dropout everywhere (the model's and LoRA's), in train mode: the reference's log-probabilities are the
    same call after call, and so are the policy's unless finetune.disable_dropout=false."""
    from gptexp import finetune

    settings = {"method": method, "r": 4, "alpha": 8, "dropout": 0.3}
    model = finetune.apply(tiny_gpt2(dropout=0.3), settings)
    config = finetune.FinetuneConfig(**settings, objective="preference", disable_dropout=disable_dropout,
                                     rpo_alpha=0.25)
    objective = finetune.build_objective(config, model, "pairs")
    assert objective.rpo_alpha == 0.25
    x, y = answer_batch()
    model.train()
    assert torch.equal(objective.reference_logps(model, x, y), objective.reference_logps(model, x, y))
    assert model.training  # the policy goes back to train mode after its reference pass
    assert torch.equal(objective.logps(model, x, y), objective.logps(model, x, y)) == disable_dropout


def test_under_bf16_true_the_frozen_reference_takes_the_policys_dtype():
    """trainer.precision=bf16-true makes the policy bf16 after the objective copied it: the reference follows, so
    at step 0 every margin is exactly 0 and the loss ln 2, and the copy holds half the bytes."""
    from gptexp import finetune

    model = tiny_gpt2(dropout=0.0)
    objective = finetune.build_objective(finetune.FinetuneConfig(objective="preference"), model, "pairs")
    model.to(torch.bfloat16).eval()  # what Lightning's bf16-true does to the module; validation's mode
    x, y = answer_batch()
    with torch.no_grad():  # the first validation (validate_first), step 0
        losses, metrics = objective.losses(objective.logps(model, x, y), objective.reference_logps(model, x, y),
                                           (y != -1).sum(-1))
    assert torch.equal(metrics["rewards/margins"], torch.zeros(2))
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    assert {p.dtype for p in objective.reference.parameters()} == {torch.bfloat16}
