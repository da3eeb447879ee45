"""Every config option composes and builds (models on the meta device: no memory, no weights)."""

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from gptexp import data
from gptexp.commands.train import build_trainer
from gptexp.core.config import ConfigError, build_dataclass
from gptexp.training.optim import OptimConfig
from gptexp.weights import pretrained

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str, output_dir: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"output_dir={output_dir}", *overrides])


def test_every_group_has_options():
    for group in ("model", "data", "finetune", "optim", "trainer", "logger", "callbacks"):
        assert options(group), group


@pytest.mark.parametrize("model", options("model"))
def test_every_model_builds(model, tmp_path):
    """Architectures from their YAML (weights off: nothing to download), on the meta device."""
    cfg = composed(f"model={model}", output_dir=tmp_path)
    spec = {k: v for k, v in cfg.model.items() if k not in pretrained.WEIGHTS_KEYS}
    with torch.device("meta"):
        built = pretrained.build(spec, vocab_size=512 if "llama" in model else 50257)
    expected = {"gpt2": 124.4e6, "gpt2-medium": 354.8e6, "gpt2-large": 774.0e6, "gpt2-xl": 1557.6e6,
                "llama2": 6.738e9, "llama2-13b": 13.016e9, "llama2-70b": 68.977e9, "llama2_260k": 260_032}
    if model in expected:  # the published sizes, a tied head counted once
        assert built.num_parameters() == pytest.approx(expected[model], rel=1e-3)


HUB_PRESETS = {"fineweb_edu": "HuggingFaceFW/fineweb-edu", "openwebtext": "Skylion007/openwebtext",
               "tinystories_hub": "roneneldan/TinyStories", "alpaca_cleaned": "yahma/alpaca-cleaned",
               "dolly": "databricks/databricks-dolly-15k", "ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized"}


@pytest.mark.parametrize("dataset", options("data"))
def test_every_dataset_builds(dataset, tmp_path):
    """Every data option loads (data=hf from a local JSON lines file; the hub presets, offline, say how to
    use local copies)."""
    (tmp_path / "text.txt").write_text("To be, or not to be: that is the question.\n" * 20)
    (tmp_path / "docs.jsonl").write_text('{"text": "To be, or not to be."}\n' * 20)
    (tmp_path / "qa.jsonl").write_text('{"instruction": "Say yes.", "output": "Yes."}\n' * 20)
    extra = {"text": [f"data.path={tmp_path / 'text.txt'}"], "hf": [f"data.files={tmp_path / 'docs.jsonl'}"],
             "instruct": [f"data.files={tmp_path / 'qa.jsonl'}"]}
    cfg = composed(f"data={dataset}", *extra.get(dataset, []), output_dir=tmp_path)
    tokenizer = "gpt2" if cfg.data.get("loader") == "hf" else pretrained.tokenizer(cfg.model, pretrained.weights_location(cfg.model))
    if dataset in HUB_PRESETS:
        with pytest.raises(ConfigError, match=f"data.path={HUB_PRESETS[dataset]}.*: .* data.files="):
            data.load(cfg.data, tokenizer)
        return
    source = data.load(cfg.data, tokenizer)
    assert source.tokenizer.vocab_size > 0
    if source.kind != "windows":  # instruction and preference records, every split
        assert all(source.tokens.parsed.values())
    else:
        assert all(source.splits.values()) if source.splits is not None else source.tokens.reads


def test_the_gpt2_reproduction_recipes_compose(tmp_path):
    """experiment=gpt2_124m_fineweb: 524,288-token batches on 8 GPUs; its multi-node form keeps them on 2 x 8
    under the SLURM launcher."""
    for experiment, nodes, accumulate in (("gpt2_124m_fineweb", 1, 4), ("gpt2_124m_fineweb_multinode", 2, 2)):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=[f"output_dir={tmp_path}", f"experiment={experiment}"],
                          return_hydra_config=True)
        t, d, o = cfg.trainer, cfg.data, cfg.optim
        assert (t.num_nodes, t.devices, t.accumulate_grad_batches) == (nodes, 8, accumulate)
        assert d.batch_size * d.seq_len * t.devices * t.num_nodes * t.accumulate_grad_batches == 2**19
        assert t.max_steps * 2**19 == pytest.approx(10e9, rel=1e-4)
        assert (o.name, o.lr, o.min_lr, o.weight_decay, list(o.betas), o.warmup_steps) == (
            "adamw", 6e-4, 6e-5, 0.1, [0.9, 0.95], 715)
        assert (t.precision, cfg.model.compile, t.strategy, cfg.data.name) == ("bf16-mixed", True, "ddp", "fineweb_edu")
        assert t.val_check_interval == 250 * accumulate
        if nodes > 1:
            launcher = cfg.hydra.launcher
            assert launcher._target_.endswith("SlurmLauncher") and (launcher.nodes, launcher.tasks_per_node) == (2, 8)
        trainer = build_trainer(cfg)
        assert trainer.num_nodes == nodes and trainer.accumulate_grad_batches == accumulate


@pytest.mark.parametrize("logger", options("logger"))
@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_every_trainer_setup_builds(logger, callbacks, tmp_path):
    store = [f"logger.mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if logger in ("mlflow", "all") else []
    cfg = composed(f"logger={logger}", f"callbacks={callbacks}", *store, output_dir=tmp_path)
    build_dataclass(OptimConfig, cfg.optim, "optim")
    trainer = build_trainer(cfg)
    assert trainer.max_steps == cfg.trainer.max_steps


def test_distributed_trainers_compose(tmp_path):
    """trainer=ddp (here on CPU processes) and trainer=fsdp, multi-node: the Trainer gets the strategy and the
    topology (launching needs the processes: see tests/test_reliability.py for DDP on CPU)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    cfg = composed("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=2",
                   output_dir=tmp_path)
    trainer = build_trainer(cfg)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_nodes == 2 and trainer.num_devices == 2
    cfg = composed("trainer=fsdp", "trainer.num_nodes=4", output_dir=tmp_path)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.num_nodes == 4
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)


def test_experiments_compose(tmp_path):
    for experiment in sorted(p.stem for p in (CONF.parent / "experiments").glob("*.yaml")):
        cfg = composed(f"experiment={experiment}", output_dir=tmp_path)
        assert cfg.trainer.max_steps > 0


def test_a_model_brings_its_recipe_and_everything_else_overrides_it(tmp_path):
    """conf/recipe/<model>.yaml follows the model choice; a finetuning method, an experiment, the command
    line and `~recipe` all win over it; a model without a recipe keeps the shared defaults."""
    default = composed(output_dir=tmp_path)
    assert (default.model.n_layer, default.data.batch_size, default.optim.lr, default.trainer.max_steps) == (
        4, 32, 2e-3, 600)
    assert (default.optim.name, default.optim.muon_lr, default.trainer.precision) == ("muon", 0.02, "auto")
    assert default.trainer.val_check_interval == default.trainer.max_steps  # one validation, at the end
    shared = composed("~recipe", output_dir=tmp_path)
    assert (shared.optim.name, shared.optim.lr, shared.trainer.max_steps) == ("adamw", 1e-3, 2000)
    gpt2 = composed("model=gpt2", output_dir=tmp_path)
    assert (gpt2.optim.lr, gpt2.trainer.max_steps) == (shared.optim.lr, shared.trainer.max_steps)
    lora = composed("finetune=lora", output_dir=tmp_path)
    assert (lora.optim.name, lora.optim.lr, lora.trainer.max_steps) == ("adamw", 1e-3, 200)
    pinned = composed("experiment=minigpt_shakespeare", output_dir=tmp_path)
    assert (pinned.optim.name, pinned.optim.lr, pinned.trainer.max_steps) == ("adamw", 1e-3, 2000)
    assert pinned.trainer.val_check_interval == 500
    assert (pinned.model.n_layer, pinned.data.batch_size) == (4, 12)  # nanoGPT's shape and batch
    told = composed("optim.lr=5e-4", "trainer.max_steps=10", output_dir=tmp_path)
    assert (told.optim.lr, told.trainer.max_steps, told.trainer.val_check_interval) == (5e-4, 10, 10)
