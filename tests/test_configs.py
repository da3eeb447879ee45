"""Every config option composes and builds (models on the meta device: no memory, no weights)."""

from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from gptexp import data, models
from gptexp.config import build_dataclass
from gptexp.optim import OptimConfig
from gptexp.commands.train import build_trainer

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
    spec = {k: v for k, v in cfg.model.items() if k not in models.WEIGHTS_KEYS}
    with torch.device("meta"):
        built = models.build(spec, vocab_size=512 if "llama" in model else 50257)
    expected = {"gpt2": 124.4e6, "gpt2-medium": 354.8e6, "gpt2-large": 774.0e6, "gpt2-xl": 1557.6e6,
                "llama2": 6.738e9, "llama2-13b": 13.016e9, "llama2-70b": 68.977e9, "llama2_260k": 260_032}
    if model in expected:  # the published sizes, a tied head counted once
        assert built.num_parameters() == pytest.approx(expected[model], rel=1e-3)


@pytest.mark.parametrize("dataset", options("data"))
def test_every_dataset_builds(dataset, tmp_path):
    (tmp_path / "text.txt").write_text("To be, or not to be: that is the question.\n" * 20)
    path = [f"data.path={tmp_path / 'text.txt'}"] if dataset == "text" else []
    cfg = composed(f"data={dataset}", *path, output_dir=tmp_path)
    source = data.load(cfg.data, models.tokenizer_spec(cfg.model))
    assert source.tokenizer.vocab_size > 0 and all(source.splits.values())


@pytest.mark.parametrize("logger", options("logger"))
@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_every_trainer_setup_builds(logger, callbacks, tmp_path):
    cfg = composed(f"logger={logger}", f"callbacks={callbacks}", output_dir=tmp_path)
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
