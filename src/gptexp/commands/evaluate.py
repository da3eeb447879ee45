"""Score any model: python -m gptexp evaluate source=<...> [task=perplexity|multiple_choice] [key=value ...]

task=perplexity scores a dataset's split (data=shakespeare, data=tinystories, data=text data.path=...; data=hf
and its presets from their token shards, the first data.val_tokens tokens when that is set) or any text file
(text=<path>) in windows of the model's context starting `stride` tokens apart (by default one less than the
window), every token after the first scored once: mean nats per token, perplexity, bits per byte and the tokens
scored; an instruction dataset (data=instruct, data=stories_instruct, ...) has its answers scored in the run's
template, each after its whole prompt: nats per answer token, perplexity and the answer tokens scored. task=multiple_choice
scores a HellaSwag-format JSON-lines file: acc (the ending with the highest summed log-probability) and
acc_norm (the highest mean per ending token, as llm.c's hellaswag.py scores it). Results go to results.json
in the output directory, to stdout and (logger=wandb, the default) to a wandb run of job type eval.
task=lm_eval runs EleutherAI's harness tasks (tasks=[...], your own with include_path=) on the model, scored as the
harness's own HF backend scores the same weights (gptexp.eval.lm_eval_adapter); results.json records the settings that
change a score (the start-token rule, few-shot counts, limit).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gptexp.commands.cli import answered_errors, run_command
from gptexp.core.config import CONF_DIR, ConfigError, build_dataclass
from gptexp.core.writing import write_atomically, writing
from gptexp.data import DATASETS, DataConfig, HFTokens
from gptexp.data.text_file import read_utf8
from gptexp.data.token_files import encode_documents
from gptexp.data.tokenizers import token_text
from gptexp.eval.scoring import ending_logprobs, perplexity, summary
from gptexp.inference import quantize as quantization
from gptexp.training.loggers import (
    RunPlace,
    quiet_event_writers,
    require,
    run_place,
    sqlite_file,
    tensorboard_directory,
    writable_folder,
)
from gptexp.weights import load_source

log = logging.getLogger(__name__)
TASKS = ("perplexity", "multiple_choice", "lm_eval")
WITHOUT = "evaluate without it (logger=none)"  # what to do when a logger cannot write where it would
EXAMPLE = '{"ctx": text, "endings": [two or more texts], "label": the right ending\'s index}'


def documents(cfg: DictConfig) -> tuple[list[str], str]:
    """The documents to score and what they are."""
    if cfg.text is not None:
        path = Path(str(cfg.text)).expanduser()
        if not path.is_file():
            raise ConfigError(f"text={cfg.text} is not a file; pass a UTF-8 text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"text={cfg.text} is not UTF-8 text ({error.reason} at byte {error.start})") from error
        if not text:
            raise ConfigError(f"text={cfg.text} is empty")
        return [text], str(path)
    if cfg.split not in ("train", "val"):
        raise ConfigError(f"split={cfg.split!r}: choose train or val")
    if cfg.data.name not in DATASETS:
        raise ConfigError(f"data.name={cfg.data.name!r} is not a known dataset; choose one of {', '.join(DATASETS)}")
    path = {"path": cfg.data.path} if cfg.data.get("path") is not None else {}
    try:
        splits = DATASETS[cfg.data.name](cfg.data.val_fraction, source=cfg.data.source, **path)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error
    return splits[cfg.split], f"data={cfg.data.name} split={cfg.split}"


def shard_tokens(cfg: DictConfig, tokenizer) -> tuple[torch.Tensor, str]:
    """A data=hf split from its token shards (made first if they are not there), cut to data.val_tokens."""
    if cfg.split not in ("train", "val"):
        raise ConfigError(f"split={cfg.split!r}: choose train or val")
    tokens = HFTokens(build_dataclass(DataConfig, cfg.data, "data"), tokenizer)
    tokens.prepare()
    split = tokens.load()[cfg.split]
    budget = cfg.data.val_tokens
    n = len(split) if budget is None else min(len(split), budget + 1)
    ids = torch.from_numpy(split[np.arange(n)].astype("int64"))
    return ids, f"data={cfg.data.name} split={cfg.split}" + (f" (first {n:,} tokens)" if n < len(split) else "")


@torch.inference_mode()
def evaluate_answers(model, tokenizer, cfg: DictConfig, template: str | None, system: str | None) -> dict:
    """An instruction dataset's split (data=instruct and its presets), written in the run's template (else
    data.template) with the run's system prompt (unless data.system gives one): the answers' tokens scored, each from
    its whole prompt; the prompts' tokens are not."""
    from gptexp.data.example_batches import ExampleRows, fitted
    from gptexp.data.instruct import InstructExamples

    if cfg.split not in ("train", "val"):
        raise ConfigError(f"split={cfg.split!r}: choose train or val")
    config = build_dataclass(DataConfig, cfg.data, "data")
    config.system = system if config.system is None else config.system
    source = InstructExamples(config, template).use(tokenizer)
    if source.pairs:
        raise ConfigError(f"data={cfg.data.name} holds preference pairs; evaluate scores instruction data's answers")
    inputs, targets, dropped = fitted(source.load()[cfg.split], model.context_length, train_on_prompt=False)
    kept = [[i] for i, x in enumerate(inputs) if x is not None]
    rows = ExampleRows(inputs, targets)  # padded to the longest of each batch, as in validation
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    for start in tqdm(range(0, len(kept), cfg.batch_size), desc="examples", unit="batch", leave=False):
        batch = rows[{"rows": kept[start:start + cfg.batch_size]}]
        x, y = batch["x"], batch["y"]
        _, loss = model(x.to(device), y.to(device), return_logits=False)
        count = int((y >= 0).sum())
        nll, tokens = nll + loss.item() * count, tokens + count
    return {"task": "answers", "on": f"data={cfg.data.name} split={cfg.split}", "template": source.template.name,
            "examples": len(kept), "dropped": dropped, "nats_per_answer_token": nll / tokens,
            "perplexity": math.exp(nll / tokens), "answer_tokens": tokens}


def evaluate_perplexity(model, tokenizer, cfg: DictConfig) -> dict:
    if cfg.text is None and cfg.data.get("loader") == "hf":
        ids, what = shard_tokens(cfg, tokenizer)
    else:
        docs, what = documents(cfg)
        try:
            ids = torch.from_numpy(encode_documents(docs, tokenizer).astype("int64"))
        except ValueError as error:  # a character-level model meets a character it never saw
            raise ConfigError(f"{what}: {error}; score a text the model's vocabulary covers") from error
    window = cfg.window or model.context_length
    if not 1 < window <= model.context_length:
        raise ConfigError(f"window={window}: choose 2 to the model's context ({model.context_length})")
    stride = cfg.stride or window - 1
    if not 0 < stride < window:
        raise ConfigError(f"stride={stride}: choose 1 to window - 1 ({window - 1}); a window's first token is "
                          f"scored only from the window before it")
    if ids.numel() < 2:
        raise ConfigError(f"{what} has {ids.numel()} token: nothing to predict")
    nll, tokens = perplexity(model, ids, window, stride, cfg.batch_size)
    n_bytes = len(tokenizer.decode(ids[1:].tolist()).encode("utf-8"))  # the text of the tokens scored
    return {"task": "perplexity", "on": what, "window": window, "stride": stride, **summary(nll, tokens, n_bytes)}


def read_examples(cfg: DictConfig) -> list[dict]:
    if cfg.examples is None:
        raise ConfigError(f"task=multiple_choice needs examples=<JSON-lines file>, one {EXAMPLE} a line")
    path = Path(str(cfg.examples)).expanduser()
    if not path.is_file():
        raise ConfigError(f"examples={cfg.examples} is not a file")
    examples = []
    for number, line in enumerate(read_utf8(path).splitlines(), 1):
        if line.strip():
            examples.append(read_example(line, f"{path}, line {number}"))
        if cfg.limit and len(examples) == cfg.limit:
            break
    if not examples:
        raise ConfigError(f"examples={cfg.examples} holds no example")
    return examples


def read_example(line: str, where: str) -> dict:
    """A multiple-choice example from its JSON line: a context, two or more endings and the right one's index."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where}: not an example {EXAMPLE} (not JSON: {error})") from None
    if not (isinstance(example, dict) and isinstance(example.get("ctx"), str)
            and isinstance(example.get("endings"), list) and all(isinstance(e, str) for e in example["endings"])
            and str(example.get("label")).isdigit()):
        raise ConfigError(f"{where}: not an example {EXAMPLE}; found {json.dumps(example)[:60]}")
    endings, label = example["endings"], int(example["label"])
    if len(endings) < 2 or label >= len(endings):
        raise ConfigError(f"{where}: needs two or more endings and a label indexing them")
    return {"ctx": example["ctx"], "endings": endings, "label": label}


def evaluate_multiple_choice(model, tokenizer, cfg: DictConfig) -> dict:
    examples = read_examples(cfg)
    correct = correct_norm = 0
    for example in tqdm(examples, desc="examples", unit="example", leave=False):
        context = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(example["ctx"])
        endings = [tokenizer.encode(" " + ending) for ending in example["endings"]]
        room = model.context_length - max(map(len, endings))
        if room < 1:
            raise ConfigError(f"an ending of {max(map(len, endings))} tokens does not fit the model's context "
                              f"({model.context_length})")
        scores = ending_logprobs(model, context[-room:], endings)
        correct += max(range(len(scores)), key=lambda i: scores[i][0]) == example["label"]
        correct_norm += max(range(len(scores)), key=lambda i: scores[i][0] / scores[i][1]) == example["label"]
    return {"task": "multiple_choice", "on": str(cfg.examples), "acc": correct / len(examples),
            "acc_norm": correct_norm / len(examples), "examples": len(examples)}


def evaluate_lm_eval(source, cfg: DictConfig) -> dict:
    """The harness's tasks on the source's model, through gptexp.eval.lm_eval_adapter; its per-task metrics."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ConfigError('task=lm_eval needs EleutherAI\'s harness: pip install -e ".[eval]"') from error
    from gptexp.eval.lm_eval_adapter import GptexpLM

    for key, allowed in (("add_bos_token", "null, true or false"), ("apply_chat_template", "true or false"),
                         ("fewshot_as_multiturn", "null, true or false")):
        if cfg[key] not in ((None, True, False) if "null" in allowed else (True, False)):
            raise ConfigError(f"{key} must be {allowed}, got {cfg[key]!r}")
    tasks = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    if not tasks:
        raise ConfigError("task=lm_eval needs tasks=[...]: the harness's task names, e.g. tasks=[hellaswag]")
    manager = TaskManager(include_path=str(cfg.include_path) if cfg.include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"tasks={unknown}: not tasks the harness knows"
                          + ("" if cfg.include_path else "; your own task YAMLs go in include_path=<dir>"))
    try:
        lm = GptexpLM(source, add_bos_token=cfg.add_bos_token, batch_size=cfg.batch_size)
        lm.chat_template(cfg.apply_chat_template)  # a template the tokenizer cannot write is refused now
    except ValueError as error:
        raise ConfigError(str(error)) from error
    multiturn = cfg.apply_chat_template if cfg.fewshot_as_multiturn is None else cfg.fewshot_as_multiturn
    if multiturn and not cfg.apply_chat_template:
        raise ConfigError("fewshot_as_multiturn=true writes the examples as chat turns: add apply_chat_template=true")
    output = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=cfg.num_fewshot,
                                     limit=cfg.limit, log_samples=False, apply_chat_template=cfg.apply_chat_template,
                                     fewshot_as_multiturn=multiturn, system_instruction=cfg.system_instruction)
    metrics = {task: {k.split(",")[0]: v for k, v in values.items() if isinstance(v, (int, float)) and "stderr" not in k}
               for task, values in output["results"].items()}
    # what changes a score, so that two results are read side by side only when they agree on it
    settings = {"harness": lm_eval.__version__, "add_bos_token": lm.add_bos_token,
                "start_token": token_text(lm.tokenizer, lm.bos) if lm.add_bos_token else None, "max_length": lm.max_length,
                "num_fewshot": dict(output.get("n-shot", {})), "limit": cfg.limit,
                "chat_template": lm.template.name if cfg.apply_chat_template else None,
                "fewshot_as_multiturn": multiturn, "system_instruction": cfg.system_instruction}
    return {"task": "lm_eval", "on": ", ".join(tasks), "tasks": metrics, "settings": settings}


def evaluate(cfg: DictConfig) -> dict:
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r}: choose {', '.join(TASKS[:-1])} or {TASKS[-1]}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {cfg.batch_size!r}")
    quantization.check(cfg.quantize, cfg.quantize_group_size, quantization.LOADING_SCHEMES)
    loggers = cfg.get("logger") or {}
    place = training_run_place(Path(str(cfg.source)))  # the evaluation of a training run joins it
    check_loggers(cfg, place)
    source = load_source(str(cfg.source), cfg.checkpoint, cfg.trust_checkpoint)
    source.place(cfg.device, cfg.precision, cfg.quantize, cfg.quantize_group_size)
    model = source.model
    if cfg.task == "perplexity" and cfg.text is None and cfg.data.get("loader") == "instruct":
        results = evaluate_answers(model, source.tokenizer, cfg, source.template, source.system)  # as the run
    elif cfg.task == "lm_eval":
        results = evaluate_lm_eval(source, cfg)
    else:
        task = {"perplexity": evaluate_perplexity, "multiple_choice": evaluate_multiple_choice}[cfg.task]
        results = task(model, source.tokenizer, cfg)
    held = getattr(model, "quantization", None)
    results = {"source": str(cfg.source), "model": source.description, "precision": cfg.precision,
               "quantize": held and held["scheme"], "quantize_group_size": held and held["group_size"], **results}
    text = json.dumps(results, indent=2) + "\n"
    write_atomically(Path(cfg.output_dir) / "results.json", lambda f: f.write(text.encode()))
    for name, log_results in (("wandb", log_to_wandb), ("tensorboard", log_to_tensorboard),
                              ("mlflow", log_to_mlflow)):
        if loggers.get(name):
            log_results(cfg, results, place)
    print(text, end="")
    return results


def check_loggers(cfg: DictConfig, place: RunPlace | None) -> None:
    """ConfigError, before the work, when a logger cfg.logger names cannot write where it would."""
    loggers = cfg.get("logger") or {}
    if loggers.get("wandb"):
        writable_folder(Path(place.directory if place else cfg.output_dir) / "wandb", "logger=wandb", WITHOUT)
    if loggers.get("tensorboard"):
        tensorboard_folder(cfg, place)
    if loggers.get("mlflow"):
        sqlite_file(cfg.logger.mlflow.tracking_uri)


def log_to_wandb(cfg: DictConfig, results: dict, place: RunPlace | None) -> None:
    """The results as a wandb run of job type eval, in the training runs' project, its numbers in the summary. The
    evaluation of a training run (`place`) joins that run: its wandb directory (a sweep's, for a sweep's job) and
    its group, named after it."""
    where = {"save_dir": place.directory, "group": place.group, "name": f"eval: {place.label}"} if place else {}
    logger = hydra.utils.instantiate(cfg.logger.wandb, job_type="eval", **where)
    logger.experiment.config.update({k: v for k, v in results.items() if isinstance(v, str)})
    logger.log_metrics(numbers(results))
    logger.experiment.summary.update(numbers(results))
    logger.experiment.finish()


def log_to_tensorboard(cfg: DictConfig, results: dict, place: RunPlace | None) -> None:
    """The results as TensorBoard scalars and a text, in the run `eval` beside the training run's events (the
    evaluation's own directory for a source that is not a run)."""
    from torch.utils.tensorboard import SummaryWriter

    folder = tensorboard_folder(cfg, place)
    quiet_event_writers()
    with writing(folder), SummaryWriter(str(folder)) as writer:
        for key, value in numbers(results).items():
            writer.add_scalar(key, value, 0)
        writer.add_text("eval", f"```json\n{json.dumps(results, indent=2)}\n```")


def tensorboard_folder(cfg: DictConfig, place: RunPlace | None) -> Path:
    """Where the results go as TensorBoard events: the run `eval` beside the training run's events (the evaluation's
    own directory for a source that is not a run); ConfigError when it cannot be made and written."""
    require("tensorboard", "logger=tensorboard")
    root, run = tensorboard_directory(place or RunPlace(cfg.output_dir, cfg.output_dir))
    return writable_folder(Path(root) / run / "eval", "logger=tensorboard", WITHOUT)


def log_to_mlflow(cfg: DictConfig, results: dict, place: RunPlace | None) -> None:
    """The results as an MLflow run (tag job_type=eval) in the training run's experiment, named after it, its
    numbers as metrics and results.json as an artifact."""
    where = {"experiment_name": place.experiment, "run_name": f"eval: {place.label}"} if place else {}
    logger = hydra.utils.instantiate(cfg.logger.mlflow, tags={"job_type": "eval"}, **where)
    logger.log_metrics(numbers(results), step=0)
    logger.experiment.log_dict(logger.run_id, results, "results.json")
    logger.finalize("success")


def numbers(results: dict) -> dict:
    """The results' numbers as metrics: eval/<key>, and eval/<task>/<metric> for lm_eval's tasks."""
    found = {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return found | {f"eval/{task}/{k}": v for task, values in results.get("tasks", {}).items() for k, v in values.items()}


def training_run_place(source: Path) -> RunPlace | None:
    """Where the training run `source` names (its directory, or a checkpoint in it) logged, or None."""
    run = source.parent.parent if source.suffix == ".ckpt" else source
    hydra_yaml = run / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        return None
    return run_place(OmegaConf.load(hydra_yaml).hydra)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with answered_errors(cfg.output_dir):
        OmegaConf.set_struct(cfg, False)
        evaluate(cfg)


if __name__ == "__main__":
    run_command(main)
