"""task=lm_eval scores a model exactly as EleutherAI's harness scores it with its own HF backend: the same HF
directories (a small GPT-2 with GPT-2's BPE, and stories260K as an HF LLaMA with its SentencePiece tokenizer)
go through `lm_eval --model hf` and through `python -m gptexp evaluate task=lm_eval`, on local-file tasks of
every request type; every metric and every request's log-likelihood and text must agree (1e-5)."""

import json
import runpy
import shutil
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from gptexp.commands.cli import OUR_FULL_ERROR
from gptexp.core.config import asset_path
from gptexp.data.tokenizers import GPT2_EOT
from gptexp.inference.quantize import QuantizedLinear
from gptexp.weights import load_model, load_source, save_hf

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
from lm_eval.tasks import TaskManager  # noqa: E402

from gptexp.eval.lm_eval_adapter import GptexpLM  # noqa: E402

STORY = resources.files("gptexp.assets").joinpath("tinystories_sample.txt").read_text()[:4000]
MC = [{"ctx": "Once upon a time, there was a little girl named", "endings": ["Lily.", "the table of carbon.", "Tom"],
       "label": 0},
      {"ctx": "She loved to play outside in the ", "endings": ["quantum", "park.", "sun and the big tree"], "label": 1},
      {"ctx": "First Citizen:", "endings": ["Before we proceed any further, hear me speak.", "The king is dead."],
       "label": 0}]
LL = [{"ctx": "", "target": "The king is dead."}, {"ctx": "The king", "target": "is dead."},
      {"ctx": "First Citizen:", "target": "Before we proceed"}]
DOCS = [{"text": "Once upon a time, there was a big dog. The dog liked to run."},
        {"text": "Tom had a red ball. He threw it to his friend Sue, and she laughed."},
        {"text": STORY}]  # longer than either model's context: several rolling windows
PROMPTS = ["Once upon a time", "The cat", "Lily and Tom went to the park. " * 12]  # the last one is truncated
GEN_TOKENS = 16


def task_yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {data}\n"
            f"validation_split: validation\n{body}")


def write_tasks(directory: Path, generations: list[dict]) -> None:
    """Local-file tasks of each request type; the generation targets are the HF model's own greedy text."""
    directory.mkdir()
    for name, rows in (("mc", MC), ("ll", LL), ("docs", DOCS), ("gen", generations)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "toy_mc.yaml").write_text(task_yaml("toy_mc", directory / "mc.jsonl", (
        'output_type: multiple_choice\ndoc_to_text: "{{ctx}}"\ndoc_to_choice: "{{endings}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    (directory / "toy_ll.yaml").write_text(task_yaml("toy_ll", directory / "ll.jsonl", (
        'output_type: loglikelihood\ndoc_to_text: "{{ctx}}"\ndoc_to_target: "{{target}}"\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n")))
    (directory / "toy_ppl.yaml").write_text(task_yaml("toy_ppl", directory / "docs.jsonl", (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")))
    (directory / "toy_gen.yaml").write_text(task_yaml("toy_gen", directory / "gen.jsonl", (
        'output_type: generate_until\ndoc_to_text: "{{ctx}}"\ndoc_to_target: "{{target}}"\n'
        f'generation_kwargs:\n  until: ["."]\n  max_gen_toks: {GEN_TOKENS}\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")))


def hf_greedy(directory: Path, prompt: str) -> str:
    """What HF's own greedy decoding writes after `prompt` (its last context - GEN_TOKENS tokens), up to '.'."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -(model.config.max_position_embeddings - GEN_TOKENS):]
    out = model.generate(ids, max_new_tokens=GEN_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(".")[0]


def write_gpt2(directory: Path) -> None:
    """A random 2-layer GPT-2 (weights drawn wide, so that its greedy choices are clear ones) with GPT-2's BPE as
    an HF tokenizer, made offline from the bundled ranks."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = asset_path("gpt2.tiktoken")
    vocab, merges = TikTokenConverter(vocab_file=ranks).extract_vocab_merges_from_model(ranks)
    transformers.GPT2Tokenizer(vocab=vocab | {GPT2_EOT: len(vocab)}, merges=merges).save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, initializer_range=0.5)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)


def write_llama(directory: Path) -> None:
    """stories260K as an HF LLaMA, its SentencePiece model converted by transformers to add BOS by default, as
    LLaMA-2's HF tokenizer does."""
    save_hf(load_model(asset_path("stories260K/stories260K.bin")), directory)
    shutil.copyfile(asset_path("stories260K/tok512.model"), directory / "tokenizer.model")
    transformers.AutoTokenizer.from_pretrained(directory, add_bos_token=True).save_pretrained(directory)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tmp_path_factory) -> tuple[Path, Path, TaskManager]:
    """(an HF directory, a directory of tasks for it, the harness's index of tasks with them: 5 s to make)."""
    root = tmp_path_factory.mktemp(request.param)
    directory = root / "hf"
    directory.mkdir()
    (write_gpt2 if request.param == "gpt2" else write_llama)(directory)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    ours = GptexpLM(load_source(str(directory)))
    for text in [*PROMPTS, STORY, *(m["ctx"] + " " + e for m in MC for e in m["endings"])]:
        assert ours.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False), text  # one tokenizer
    write_tasks(root / "tasks", [{"ctx": p, "target": hf_greedy(directory, p)} for p in PROMPTS])
    return directory, root / "tasks", TaskManager(include_path=str(root / "tasks"))


TASKS = ["toy_mc", "toy_ll", "toy_ppl", "toy_gen"]


def harness(lm, manager: TaskManager, **kwargs) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, bootstrap_iters=0, log_samples=True,
                                   **kwargs)


@pytest.fixture(scope="module")
def reference(model) -> dict:
    """`lm_eval --model hf` on the model, as it comes."""
    directory, _, manager = model
    return harness("hf", manager, model_args={"pretrained": str(directory), "device": "cpu", "batch_size": 1})


def metrics(output: dict) -> dict:
    return {task: {k.split(",")[0]: v for k, v in values.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for task, values in output["results"].items()}


def responses(output: dict) -> dict:
    """Each request's answer, by task and document: (log-likelihood, is greedy) pairs, floats or texts."""
    return {task: {s["doc_id"]: s["resps"] for s in samples} for task, samples in output["samples"].items()}


def assert_same(ours, reference, where: str = "") -> None:
    if isinstance(reference, (list, tuple)):
        assert len(ours) == len(reference), where
        for i, (a, b) in enumerate(zip(ours, reference)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(reference, dict):
        assert ours.keys() == reference.keys(), where
        for key in reference:
            assert_same(ours[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, float) and not isinstance(reference, bool):
        assert ours == pytest.approx(reference, rel=1e-5, abs=1e-5), where
    else:
        assert ours == reference, where


@pytest.mark.parametrize("start_token", ["as the tokenizer does", "the other way"])
def test_every_request_is_answered_as_the_harness_hf_backend_answers_it(model, reference, start_token):
    """add_bos_token left to the tokenizer (GPT-2: none; LLaMA: BOS), then the other way: GPT-2's <|endoftext|>
    before every string, a LLaMA without BOS."""
    directory, _, manager = model
    add_bos_token = None
    if start_token == "the other way":
        add_bos_token = not directory.parent.name.startswith("llama")
        reference = harness("hf", manager, model_args={"pretrained": str(directory), "device": "cpu", "batch_size": 1,
                                                       "add_bos_token": add_bos_token})
    ours = harness(GptexpLM(load_source(str(directory)), add_bos_token=add_bos_token), manager)
    assert_same(responses(ours), responses(reference), "resps")
    assert_same(metrics(ours), metrics(reference), "metrics")
    if add_bos_token is None:
        assert metrics(reference)["toy_gen"]["exact_match"] == 1.0  # HF's own greedy text, written again


def test_a_quantized_source_is_scored_within_its_quantization_error(model, reference):
    """quantize=int8 through the adapter: the same requests answered, the perplexity task within 1% of the float
    model's, and the products read int8 weights."""
    directory, _, manager = model
    source = load_source(str(directory))
    source.place("cpu", "fp32", "int8")
    assert any(isinstance(m, QuantizedLinear) for m in source.model.modules())
    ours = metrics(harness(GptexpLM(source), manager))
    assert ours.keys() == metrics(reference).keys()
    for name, value in metrics(reference)["toy_ppl"].items():
        assert ours["toy_ppl"][name] == pytest.approx(value, rel=0.01), name


def test_the_command_reports_the_harness_numbers_and_its_settings(model, reference, tmp_path, monkeypatch):
    directory, tasks, _ = model
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # as run_command sets them; restored after the test
    monkeypatch.setenv(OUR_FULL_ERROR, "1")
    monkeypatch.setattr(sys, "argv", ["evaluate", f"source={directory}", "task=lm_eval", f"tasks=[{','.join(TASKS)}]",
                                      f"include_path={tasks}", "logger=none", f"hydra.run.dir={tmp_path / 'out'}"])
    runpy.run_module("gptexp.commands.evaluate", run_name="__main__")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert_same(results["tasks"], metrics(reference), "results.json")
    llama = directory.parent.name.startswith("llama")
    assert results["settings"] == {"harness": lm_eval.__version__, "add_bos_token": llama,
                                   "start_token": "<s>" if llama else None, "max_length": 512 if llama else 64,
                                   "num_fewshot": dict.fromkeys(TASKS, 0), "limit": None, "chat_template": None,
                                   "fewshot_as_multiturn": False, "system_instruction": None}


def test_unknown_harness_tasks_and_start_tokens_are_refused(tmp_path, monkeypatch, capfd):
    from test_bad_input import in_process, one_line_error

    monkeypatch.chdir(tmp_path)
    stories = f"source={asset_path('stories260K/stories260K.bin')}"
    for arguments, message in [(["tasks=[no_such_task]"], "tasks=['no_such_task']: not tasks the harness knows; your "
                                                          "own task YAMLs go in include_path=<dir>"),
                               (["tasks=[toy]", "add_bos_token=maybe"], "add_bos_token must be null, true or false")]:
        status, stderr = in_process("evaluate", [stories, "task=lm_eval", *arguments, "logger=none"], monkeypatch, capfd)
        assert status == 2
        one_line_error(stderr, [message])
    assert list(tmp_path.iterdir()) == []


def test_chat_requests_are_written_in_the_sources_template_as_hf_writes_its_chat_template(model, tmp_path):
    """apply_chat_template, fewshot_as_multiturn and system_instruction: gptexp's adapter writes each request in the
    source's template (LLaMA-2's chat; plain for GPT-2), and scores it as the harness's HF backend scores the same
    weights whose tokenizer carries that template as its Jinja chat template."""
    directory, _, manager = model
    ours = GptexpLM(load_source(str(directory)))
    hf = tmp_path / "hf"
    shutil.copytree(directory, hf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    tokenizer.chat_template = ours.chat_template(True)
    tokenizer.save_pretrained(hf)
    chat = {"apply_chat_template": True, "fewshot_as_multiturn": True, "system_instruction": "Answer well.",
            "num_fewshot": 1}
    tasks = ["toy_mc", "toy_ll"]
    reference = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(hf), "device": "cpu",
                                                                "batch_size": 1}, tasks=tasks, task_manager=manager, bootstrap_iters=0, log_samples=True, **chat)
    output = lm_eval.simple_evaluate(model=ours, tasks=tasks, task_manager=manager, bootstrap_iters=0,
                                     log_samples=True, **chat)
    assert_same(responses(output), responses(reference), "resps")
    context = output["samples"]["toy_mc"][0]["arguments"][0][0]
    assert context.count("Answer well.") == 1
    assert ours.template.name == "plain" or context.startswith("<s>[INST] <<SYS>>")
