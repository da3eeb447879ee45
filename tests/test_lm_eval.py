"""task=lm_eval: EleutherAI's harness drives a gptexp model through its three request types, on local-file
tasks the test writes (offline), and each result is checked against the same numbers computed here."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from training import ROOT

from gptexp.config import asset_path
from gptexp.sources import load_source

pytest.importorskip("lm_eval")
STORIES = asset_path("stories260K/stories260K.bin")
MC = [{"ctx": "Once upon a time, there was a little girl named", "endings": ["Lily.", "the table of carbon.", "Tom"],
       "label": 0},
      {"ctx": "She loved to play outside in the", "endings": ["quantum", "park.", "sun and the big tree"], "label": 1}]
DOCS = [{"text": "Once upon a time, there was a big dog. The dog liked to run."},
        {"text": "Tom had a red ball. He threw it to his friend Sue, and she laughed."}]


def task_yaml(name: str, data: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
            f"validation_split: validation\n{body}")


def test_the_harness_scores_a_gptexp_model_on_local_tasks(tmp_path):
    source = load_source(STORIES)
    tokenizer, model = source.tokenizer, source.model
    prompt = "Once upon a time"
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    greedy = tokenizer.decode(model.generate(torch.tensor([ids]), 32, temperature=0)[0].tolist())
    continuation = greedy[len(prompt):].split(".")[0]
    gen = [{"ctx": prompt, "target": continuation}, {"ctx": "The cat", "target": " is not what it writes"}]
    for name, rows in (("mc", MC), ("docs", DOCS), ("gen", gen)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy_mc.yaml").write_text(task_yaml("toy_mc", tmp_path / "mc.jsonl", (
        'output_type: multiple_choice\ndoc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")))
    (tmp_path / "toy_ppl.yaml").write_text(task_yaml("toy_ppl", tmp_path / "docs.jsonl", (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n")))
    (tmp_path / "toy_gen.yaml").write_text(task_yaml("toy_gen", tmp_path / "gen.jsonl", (
        'output_type: generate_until\ndoc_to_text: "{{ctx}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["."]\n  max_gen_toks: 32\n'
        "metric_list:\n  - metric: exact_match\n")))
    result = subprocess.run([sys.executable, "-m", "gptexp", "evaluate", f"source={STORIES}", "task=lm_eval",
                             "tasks=[toy_mc,toy_ppl,toy_gen]", f"include_path={tmp_path}", "logger=none",
                             f"hydra.run.dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    tasks = json.loads((tmp_path / "out" / "results.json").read_text())["tasks"]

    hits = 0
    for example in MC:  # loglikelihood: the ending with the highest summed log-probability
        context = [tokenizer.bos_id] + tokenizer.encode(example["ctx"])
        scores = []
        for ending in example["endings"]:
            tokens = tokenizer.encode(" " + ending)
            logits, _ = model(torch.tensor([context + tokens]))
            scores.append(logits[0, len(context) - 1:-1].log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).sum())
        hits += int(torch.stack(scores).argmax()) == example["label"]
    assert tasks["toy_mc"]["acc"] == hits / len(MC)

    nll = n_bytes = 0.0  # loglikelihood_rolling: every token of each document after BOS
    for doc in DOCS:
        tokens = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(doc["text"])])
        logits, _ = model(tokens[:, :-1])
        nll += torch.nn.functional.cross_entropy(logits[0], tokens[0, 1:], reduction="sum").item()
        n_bytes += len(doc["text"].encode())
    assert tasks["toy_ppl"]["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)

    assert tasks["toy_gen"]["exact_match"] == 0.5  # generate_until: greedy up to "." matches the first target only


def test_unknown_harness_tasks_are_named(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gptexp", "evaluate", f"source={STORIES}", "task=lm_eval",
                             "tasks=[no_such_task]", "logger=none", f"hydra.run.dir={tmp_path / 'out'}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "tasks=['no_such_task']: not tasks the harness knows; your own task YAMLs go in include_path=<dir>" in \
        result.stderr
    assert not (tmp_path / "out").exists()
