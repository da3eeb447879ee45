"""LoRA through peft: only adapters train, the adapter loads into HF's LlamaForCausalLM with
peft.PeftModel and gives the same logits, and merging changes nothing within 1e-5."""

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_llama_parity import VOCAB, batch, gptexp_copy, hf_reference

from gptexp import finetune
from gptexp.core.config import ConfigError
from gptexp.models import GPT2, GPT2Config, Llama
from gptexp.training.optim import OptimConfig, build_optimizer
from gptexp.weights.hf import write_lora

LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture
def adapted():
    """(HF base, gptexp LoRA model) with the adapters' B matrices made non-zero, so they matter."""
    hf = hf_reference()
    model = finetune.apply(gptexp_copy(hf), LORA)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return hf, model.eval()


def test_only_adapters_train_and_reach_the_optimizer(adapted):
    _, model = adapted
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = build_optimizer(model, OptimConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(trainable) == 2 * 3 * 2  # A and B, for 3 targets, in 2 layers


def test_adapter_loads_into_hf_with_peft(adapted, tmp_path):
    hf, model = adapted
    x, _ = batch()
    ours = model(x)[0]
    write_lora(model, tmp_path)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                         "adapter_model.safetensors"]
    assert any(k.startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_A")
               for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    reference = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    diff = (reference(x).logits - ours).abs().max().item()
    assert diff <= 1e-5 and (ours - hf_reference()(x).logits).abs().max().item() > 1e-2  # the adapter matters


def test_merged_checkpoint_equals_the_adapter_model(adapted, tmp_path):
    _, model = adapted
    x, _ = batch()
    merged = finetune.merge(model)
    assert isinstance(merged, Llama) and not any("lora" in n for n, _ in merged.named_parameters())
    assert (merged(x)[0] - model(x)[0]).abs().max().item() <= 1e-5
    write_lora(model, tmp_path, merged=True)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (reloaded(x).logits - model(x)[0]).abs().max().item() <= 1e-5


def test_lora_on_gpt2_adapts_the_fused_attention():
    model = finetune.apply(GPT2(GPT2Config(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)),
                           {"method": "lora"})
    assert {n.split(".lora_")[0].split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {"c_attn"}
    x = torch.randint(0, VOCAB, (2, 16))
    model(x, x)[1].backward()


def test_unknown_target_module_lists_the_real_ones():
    with pytest.raises(ConfigError, match=r"\['qkv'\] match no linear layer of the model; its linear layers are "
                                          r"\['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj'"):
        finetune.apply(gptexp_copy(hf_reference()), {"method": "lora", "target_modules": ["qkv"]})
