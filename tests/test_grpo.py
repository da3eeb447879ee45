"""finetune=grpo: each loss type is its formula, worked by hand; a group of equal rewards teaches nothing; β = 0 runs
no reference; the ratio is exactly 1 on-policy; a step's gradient is the same however it is split (batch, accumulated,
DDP); rollouts read each prompt once; a faulty reward is one line; a run resumes exactly, mid-round too."""

import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gptexp.core.config import asset_path, build_dataclass
from gptexp.data import templates
from gptexp.finetune import FinetuneConfig, build_objective, grpo, rewards
from gptexp.inference.generation import decode
from gptexp.weights import load_source
from training import ROOT, column, execute, metrics

STORIES = asset_path("stories260K/stories260K.bin")
TESTS = {"PYTHONPATH": str(ROOT / "tests")}  # the rewards below, for train.py


# rewards for the runs below (finetune.rewards.<name>._target_=test_grpo.<function>)
def length_reward(completions, **_):
    return [len(text) / 100 for text in completions]


def constant_reward(completions, **_):
    return [1.0] * len(completions)


def raising_reward(completions, **_):
    raise KeyError("score")


def nan_reward(completions, **_):
    return [math.nan] * len(completions)


def short_reward(completions, **_):
    return [0.0] * (len(completions) - 1)


def config(**overrides) -> FinetuneConfig:
    values = {"objective": "grpo", "beta": 0.0, "num_generations": 2, "max_new_tokens": 8,
              "rewards": {"length": {"_target_": "test_grpo.length_reward"}}} | overrides
    return build_dataclass(FinetuneConfig, values, "finetune")


@pytest.fixture(scope="module")
def stories():
    return load_source(STORIES)


def objective_for(source, model=None, **overrides) -> grpo.GRPO:
    return build_objective(config(**overrides), model or source.model, "examples", source.tokenizer)


def test_each_loss_type_is_its_formula_worked_by_hand(stories):
    """Two answers (3 and 1 tokens) of advantages +1 and -2, log-probabilities away from π_old's so that the clip
    bites: ρ = e^0.5 = 1.65 > 1 + 0.2 on a token of positive advantage (clipped), ρ = e^-0.5 on one of negative
    advantage (clipped below: min keeps the clipped, larger loss); β = 0.1 adds k3 = e^d - d - 1 per token."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, 0.0, 0.0]])
    old = torch.tensor([[-1.5, -2.0, -0.4], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.2, -2.5, -0.5], [-1.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    advantages = torch.tensor([1.0, -2.0])
    e = 0.2
    by_hand = []
    for row, A in enumerate([1.0, -2.0]):
        for t in range(3 if row == 0 else 1):
            rho = math.exp(logp[row, t] - old[row, t])
            term = -min(rho * A, min(max(rho, 1 - e), 1 + e) * A)
            d = ref[row, t].item() - logp[row, t].item()
            by_hand.append((row, term + 0.1 * (math.exp(d) - d - 1)))
    assert by_hand[0][1] == pytest.approx(-(1 + e) * 1.0 + 0.1 * (math.exp(-0.2) + 0.2 - 1))  # clipped above
    assert by_hand[3][1] == pytest.approx(-(1 - e) * -2.0)  # clipped below, the larger loss kept
    rows = [sum(v for r, v in by_hand if r == i) for i in range(2)]
    expected = {"dapo": sum(rows) / 4,  # every token alike: the 4 answer tokens
                "dr_grpo": sum(rows) / (2 * 8),  # 2 answers x max_new_tokens
                "grpo": (rows[0] / 3 + rows[1] / 1) / 2}  # each answer's mean, then their mean
    for loss_type, value in expected.items():
        objective = objective_for(stories, loss_type=loss_type, beta=0.1, num_iterations=2)
        per_token, metrics = objective.losses(logp, old, ref, advantages, mask)
        assert objective.aggregate(per_token, mask, rows=2, tokens=4).item() == pytest.approx(value, rel=1e-6)
        assert metrics["clip_ratio"].item() == pytest.approx(2 / 4)  # tokens 0 and 3
    with pytest.raises(ValueError, match="loss_type must be one of dapo, dr_grpo, grpo"):
        config(loss_type="ppo")


def test_advantages_scale_as_asked_and_equal_rewards_teach_nothing(stories):
    """Group means subtracted; divided by the group's std (group), the step's (batch) or not at all (none). A group
    whose rewards are all equal gets advantage 0 and, on-policy with β = 0, no gradient at all; dropped
    (drop_zero_std_groups), its tokens leave the step's count."""
    tok = stories.tokenizer
    prompt = templates.prompt_ids(templates.get("llama2_chat"), tok, [], "Write a story.")
    batch = {"round": 0, "micro": 0, "micro_batches": 1, "prompts": [prompt, prompt], "requests": ["a", "b"],
             "references": ["", ""]}
    texts = ["Tom ran.", "Lily sat down in the sun.", "Hi.", "Hi."]  # group 1: two equal answers
    answers = [(tok.encode(t) + [tok.eos_id], True) for t in texts]
    rewards_ = torch.tensor([len(t) / 100 for t in texts], dtype=torch.float64)
    centred = rewards_ - rewards_.view(2, 2).mean(-1).repeat_interleave(2)
    for scale, divisor in {"none": torch.ones(4), "group": rewards_.view(2, 2).std(-1).repeat_interleave(2) + 1e-4,
                           "batch": torch.full((4,), rewards_.std().item() + 1e-4)}.items():
        rollouts = objective_for(stories, scale_rewards=scale).scored(stories.model, batch, answers)
        assert torch.allclose(rollouts.advantages.double(), centred / divisor, atol=1e-6), scale
        assert rollouts.advantages[2:].abs().max() == 0
        assert rollouts.metrics["frac_reward_zero_std"] == 0.5
    model = stories.model
    equal = objective_for(stories, rewards={"c": {"_target_": "test_grpo.constant_reward"}})
    equal.rollouts = equal.scored(model, batch, answers)
    model.zero_grad()
    equal.train(model, batch, 1.0).loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    kept = objective_for(stories, drop_zero_std_groups=True).scored(model, batch, answers)
    assert kept.kept.tolist() == [True, True, False, False]
    assert kept.step_tokens == sum(len(a) for a, _ in answers[:2]) and kept.step_rows == 2


def test_the_ratio_is_exactly_one_on_policy_and_beta_zero_runs_no_reference(stories):
    """μ = 1: π_old is the training pass itself (detached), so ρ = 1 exactly and nothing clips. β = 0 keeps no
    frozen copy and calls none; β > 0 runs the copy once per micro-batch of a round, at the rollout."""
    tok = stories.tokenizer
    prompt = templates.prompt_ids(templates.get("llama2_chat"), tok, [], "Write a story.")
    batch = {"round": 0, "micro": 0, "micro_batches": 1, "prompts": [prompt], "requests": ["a"], "references": [""],
             "rollout_seed": 7}
    objective = objective_for(stories)
    assert objective.reference is None
    ratios = []
    original = objective.losses
    objective.losses = lambda logp, old, *rest: ratios.append(torch.exp(logp - old)) or original(logp, old, *rest)
    objective.train(stories.model, batch, 1.0)
    assert ratios and torch.equal(ratios[0], torch.ones_like(ratios[0]))
    calls = []
    penalised = objective_for(stories, beta=0.1)
    penalised.reference.register_forward_hook(lambda *_: calls.append(1))
    penalised.train(stories.model, batch, 1.0)
    penalised.train(stories.model, batch, 1.0)  # the same round: the reference's log-probabilities are kept
    assert len(calls) == 1
    assert "kl" in penalised.train(stories.model, batch | {"round": 1, "rollout_seed": 8}, 1.0).metrics


def test_rollouts_read_each_prompt_once_and_fan_out(stories):
    """decode(fan_out=3): one prefill of the prompts (2 rows), then 6 rows a token at a time; greedy, each row
    continues its own prompt as decoding that prompt alone does."""
    tok, model = stories.tokenizer, stories.model
    prompts = [tok.encode("Once upon a time"), tok.encode("Tom had a big red")]
    width = max(map(len, prompts))
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    pad = torch.tensor([width - len(p) for p in prompts])
    shapes = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(tuple(args[0].shape)),
                                           with_kwargs=True)
    try:
        out = torch.cat(list(decode(model, idx, 6, temperature=0, pad=pad, fan_out=3)), dim=1)
    finally:
        hook.remove()
    assert shapes[0] == (2, width) and set(shapes[1:]) == {(6, 1)}
    for b, p in enumerate(prompts):
        alone = torch.cat(list(decode(model, torch.tensor([p]), 6, temperature=0)), dim=1)
        assert all(torch.equal(out[3 * b + k], alone[0]) for k in range(3))
    with pytest.raises(ValueError, match="fan_out"):
        decode(model, idx, 6, fan_out=2, use_cache=False)


def test_rows_leave_the_batch_at_their_end_token(stories):
    """decode(ends=...): a row that chooses an end token leaves the batch (the forward passes shrink), its later
    columns repeat that token, and the rows that go on choose what they would have beside it."""
    tok, model = stories.tokenizer, stories.model
    prompts = [tok.encode("Once upon a time"), tok.encode("Tom had a big red"), tok.encode("The sun")]
    width = max(map(len, prompts))
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    pad = torch.tensor([width - len(p) for p in prompts])
    plain = torch.cat(list(decode(model, idx, 16, temperature=0, pad=pad)), dim=1)
    end = plain[0, 3].item()  # row 0 ends by its 4th token; each other row where it chooses that token, if it does
    cuts = [(r == end).nonzero()[0].item() + 1 if (r == end).any() else r.numel() for r in plain]
    rows = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: rows.append(args[0].size(0)), with_kwargs=True)
    try:
        ended = torch.cat(list(decode(model, idx, 16, temperature=0, pad=pad, ends={end})), dim=1)
    finally:
        hook.remove()
    assert rows[0] == 3 and min(rows) < 3
    assert ended.size(1) == max(cuts)  # decoding stops once every row has ended
    for row, cut in enumerate(cuts):
        assert torch.equal(ended[row, :cut], plain[row, :cut])
        assert (ended[row, cut:] == end).all()
    with pytest.raises(ValueError, match="end token"):
        decode(model, idx, 16, pad=None, use_cache=False, ends={end})


def test_the_rollout_benchmark_checks_the_greedy_answers_and_times_both_ways():
    """benchmarks/rollouts.py on the bundled stories260K: both ways timed, the greedy answers the same tokens."""
    result = execute("benchmarks/rollouts.py", "--max-new-tokens", "24", "--rounds", "1", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"greedy, 32 requests: answers of \d+ tokens on average \(longest \d+\): [\d.]+ s every row to "
                     r"the end, [\d.]+ s with rows leaving, [\d.]+x; the same tokens", result.stdout), result.stdout
    assert re.search(r"T 0.7, 4 x 8: .* [\d.]+x\n", result.stdout), result.stdout


def split_step(rank: int, world: int, port: int, path: str, answers, batch, loss_types) -> None:
    """One process of a DDP step: its half of the prompts' fixed answers, the gradient DDP averages, saved by rank 0."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        source = load_source(STORIES)
        model = DistributedDataParallel(source.model)
        n = len(batch["prompts"]) // world
        mine = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items() if isinstance(v, list)}
        answers_mine = answers[rank * n * 2:(rank + 1) * n * 2]
        grads = {}
        for loss_type in loss_types:
            objective = objective_for(source, source.model, loss_type=loss_type)
            step = mine | {"round": 0, "micro": 0, "micro_batches": 1}
            objective.rollouts = objective.scored(source.model, step, answers_mine)
            model.zero_grad()
            objective.train(model, step, float(world)).loss.backward()
            grads[loss_type] = {n: p.grad.clone() for n, p in source.model.named_parameters()}
        if rank == 0:
            torch.save(grads, path)
    finally:
        dist.destroy_process_group()


def test_a_steps_gradient_is_the_same_however_it_is_split(stories, tmp_path):
    """Fixed answers of unequal lengths to 4 prompts (2 each); one step as a batch of 8 answers, as 2 x 4
    accumulated (Lightning divides each micro-batch's loss by 2) and as 2 DDP processes x 4 (gloo; DDP averages):
    the same gradient, within 1e-6 of its largest entry (float32 sums over micro-batches of other widths), for
    every loss type (step totals and the batch std over all)."""
    tok = stories.tokenizer
    template = templates.get("llama2_chat")
    requests = [f"Write about a {w}." for w in ("cat", "dog", "ball", "tree")]
    texts = ["Tom ran far.", "The cat sat on the mat all day.", "A dog.", "The dog ran to the park and played.",
             "Hi.", "The ball was red and big and round.", "Lily saw a tree.", "It was tall."]
    answers = [(tok.encode(t) + [tok.eos_id], True) for t in texts]
    batch = {"prompts": [templates.prompt_ids(template, tok, [], r) for r in requests], "requests": requests,
             "references": [""] * 4}
    loss_types = grpo.LOSS_TYPES
    grads = {"batch 8": {}, "2 x 4 accumulated": {}}
    model = stories.model
    for loss_type in loss_types:
        whole = objective_for(stories, loss_type=loss_type)
        step = batch | {"round": 0, "micro": 0, "micro_batches": 1}
        whole.rollouts = whole.scored(model, step, answers)
        model.zero_grad()
        whole.train(model, step, 1.0).loss.backward()
        grads["batch 8"][loss_type] = {n: p.grad.clone() for n, p in model.named_parameters()}
        accumulated = objective_for(stories, loss_type=loss_type)
        step = batch | {"round": 0, "micro_batches": 2}
        accumulated.rollouts = accumulated.scored(model, step | {"micro": 0}, answers)
        model.zero_grad()
        for micro in range(2):
            (accumulated.train(model, step | {"micro": micro}, 2.0).loss / 2).backward()
        grads["2 x 4 accumulated"][loss_type] = {n: p.grad.clone() for n, p in model.named_parameters()}
    path = tmp_path / "ddp.pt"
    port = 29500 + os.getpid() % 1000
    mp.start_processes(split_step, args=(2, port, str(path), answers, batch, loss_types), nprocs=2, join=True,
                       start_method="spawn")
    grads["2 processes x 4"] = torch.load(path)
    for loss_type in loss_types:
        reference = grads["batch 8"][loss_type]
        largest = max(g.abs().max() for g in reference.values())
        assert largest > 0
        for name, got in grads.items():
            differences = {key: (got[loss_type][key] - grad).abs().max() for key, grad in reference.items()}
            assert max(differences.values()) <= 1e-6 * largest, (name, loss_type, max(differences.items(),
                                                                                       key=lambda kv: kv[1]))


def test_the_bundled_rewards_score_by_hand():
    requests = ["Write a story that uses the words: dog, ball, happy.", "Tell me a joke."]
    assert rewards.requested_words(requests, ["The Dog had a ball-shaped hat.", "dog"]) == [2 / 3, None]
    assert rewards.ends_with_eos(ended=[True, False]) == [1.0, 0.0]
    # 8 word 4-grams, 4 of them repeats ("a b c d" and its shifts, seen before); under 4 words: nothing repeats
    assert rewards.fresh_ngrams(["a b c d a b c d a b c", "a b c", "The cat sat on the mat."]) == [4 / 8, 1.0, 1.0]
    assert rewards.fresh_ngrams(["x y x y x y"], n=2) == [2 / 5]


@pytest.mark.parametrize("function,message", [
    ("raising_reward", "raised KeyError: 'score'; fix it, or remove it from finetune.rewards"),
    ("nan_reward", "returned nan for completion 1; a reward is a finite number, or None to abstain"),
    ("short_reward", "returned 1 values for 2 completions; it must return one per completion (None to abstain)")])
def test_a_faulty_reward_is_named_in_one_line(function, message):
    reward = rewards.build({"bad": {"_target_": f"test_grpo.{function}"}}, None)[0]
    with pytest.raises(rewards.RewardError) as raised:
        rewards.score(reward, 2, prompts=["a", "b"], completions=["x", "y"])
    assert str(raised.value) == f"reward bad (test_grpo.{function}) {message}"
    with pytest.raises(rewards.RewardError, match="None to abstain"):
        rewards.score(reward.__class__("ok", lambda **_: [1.0, None, True], "ok", 1.0), 3)
    assert rewards.score(reward.__class__("ok", lambda **_: [1, None], "ok", 1.0), 2) == [1.0, None]


TINY = ["experiment=stories260k_grpo", "finetune.init_from=null", "finetune.num_generations=2",
        "finetune.max_new_tokens=12", "data.batch_size=2", "data.eval_batch_size=64", "data.val_fraction=0.02",
        "logger=csv", "trainer.log_every_n_steps=1", "callbacks.samples.max_new_tokens=4",
        "+finetune.rewards.length._target_=test_grpo.length_reward"]


def grpo_run(run_dir: Path, *overrides: str, status: int = 0):
    result = execute("train.py", *TINY, *overrides, f"hydra.run.dir={run_dir}", env=os.environ | TESTS, timeout=600)
    assert result.returncode == status, result.stderr[-3000:]
    return result


def test_a_run_logs_its_rollouts_and_resumes_exactly_mid_round(tmp_path):
    """μ = 2: stopped after 3 steps (inside round 1) and resumed, a run trains on the round's saved rollouts and
    then samples round 2 as the whole run did: the same losses and rewards. It logs the rollouts' measures and times
    the rollout apart from the update."""
    common = ["finetune.num_iterations=2", "trainer.val_check_interval=3", "optim.warmup_steps=1",
              "optim.decay_steps=5"]
    grpo_run(tmp_path / "whole", *common, "trainer.max_steps=5")
    grpo_run(tmp_path / "first", *common, "trainer.max_steps=3")
    result = grpo_run(tmp_path / "resumed", *common, "trainer.max_steps=5", f"ckpt_path={tmp_path / 'first'}")
    rows = {name: metrics(tmp_path / name) for name in ("whole", "resumed")}
    for name in ("train/loss", "train/reward", "train/rewards/length/mean", "train/completions/mean_length"):
        whole, resumed = column(rows["whole"], name), column(rows["resumed"], name)
        assert [s for s, _ in whole] == [s for s, _ in resumed] == list(range(5)), name
        assert [v for _, v in resumed] == pytest.approx([v for _, v in whole], abs=1e-6), name
    logged = set(rows["whole"][0])
    for name in ("train/frac_reward_zero_std", "train/rewards/words/std", "train/completions/max_length",
                 "train/completions/clipped_ratio", "train/clip_ratio", "train/entropy", "train/rollout/tokens_per_sec",
                 "time/rollout_ms", "val/reward", "val/rewards/words", "val/loss"):
        assert name in logged, name
    assert re.search(r"rollout +\d+ +[\d.]+ +[\d.]+ +[\d.]+%", result.stdout + result.stderr)
    assert "batch: 2 prompts x 2 answers x 1 processes x 1 accumulated = 4 answers of at most 12 tokens" in \
        (tmp_path / "whole" / "train.log").read_text()


def test_a_faulty_reward_ends_the_run_in_one_line_and_keeps_its_checkpoints(tmp_path):
    """A reward that raises: one line naming it, exit 2. A new run directory goes; a run with checkpoints keeps
    them as they were."""
    bad = "+finetune.rewards.bad._target_=test_grpo.raising_reward"
    result = grpo_run(tmp_path / "new", bad, "trainer.max_steps=2", status=2)
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "error" in line.lower()] == [
        "error: reward bad (test_grpo.raising_reward) raised KeyError: 'score'; fix it, or remove it from "
        "finetune.rewards"]  # Lightning's own start-up lines (GPU available: ...) aside
    assert not (tmp_path / "new").exists()
    grpo_run(tmp_path / "kept", "trainer.max_steps=2")
    saved = {p: p.read_bytes() for p in (tmp_path / "kept" / "checkpoints").glob("*.ckpt")}
    result = grpo_run(tmp_path / "kept", bad, "trainer.max_steps=4", status=2)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: reward bad (test_grpo.raising_reward) raised")
    assert saved and {p: p.read_bytes() for p in saved} == saved
    shutil.rmtree(tmp_path / "kept")
