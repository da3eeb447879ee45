"""llm.c's model file and debug state, checked against an independent writer.

The reference files here are written by this test from HF transformers' GPT2LMHeadModel, following
llm.c's train_gpt2.py (Conv1D weights transposed, per-layer tensors stacked by kind, wte and dwte
padded with zero rows, dwte = the gradient of the tied weight), sharing no code with gptexp.weights.llmc.
Tolerances are gptexp.commands.verify's defaults: |diff| <= 1e-6 + rtol * max |expected| with rtol 1e-4 for the
logits (1e-5 for the loss) and 1e-3 for every gradient tensor.
"""

import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from gptexp.commands.verify import verify
from gptexp.models import GPT2, GPT2Config
from gptexp.weights.llmc import LlmcFormatError, padded_vocab, read_model, read_state, write_model, write_state
from training import execute

ROOT = Path(__file__).resolve().parents[1]
V, VP, C, L, NH, MAXT, B, T = 300, 384, 32, 2, 4, 16, 3, 16
KINDS = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
         "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
         "mlp.c_proj.weight", "mlp.c_proj.bias"]
CONV1D = {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=MAXT, n_embd=C, n_layer=L, n_head=NH,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1,
                                     attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # move biases and LayerNorms away from 0 / 1 so that every tensor matters
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def batch():
    tokens = torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def reference_tensors(named: dict[str, torch.Tensor], transpose: bool = True) -> list[np.ndarray]:
    """HF-named tensors (weights or gradients) in llm.c's order and layout."""
    pad = torch.zeros(VP, C)
    pad[:V] = named["transformer.wte.weight"]
    out = [pad, named["transformer.wpe.weight"]]
    for kind in KINDS:
        layers = [named[f"transformer.h.{i}.{kind}"] for i in range(L)]
        out.append(torch.stack([t.t() if kind in CONV1D and transpose else t for t in layers]))
    out += [named["transformer.ln_f.weight"], named["transformer.ln_f.bias"]]
    return [t.detach().float().numpy() for t in out]


def write_file(path, header: list[int], arrays: list[np.ndarray]) -> None:
    """floats as float32, token ids as int32, bf16 bit patterns (uint16) as they are"""
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header, *[0] * (256 - len(header))))
        for array in arrays:
            f.write(array.astype({"f": "<f4", "i": "<i4", "u": "<u2"}[array.dtype.kind]).tobytes())


def reference_model(hf, path, edit=lambda tensors: None, version: int = 3) -> None:
    tensors = reference_tensors(hf.state_dict())
    edit(tensors)
    if version == 5:  # bf16, rounded to nearest even
        tensors = [torch.from_numpy(t).bfloat16().view(torch.int16).numpy().view("<u2") for t in tensors]
    write_file(path, [20240326, version, MAXT, V, L, NH, C, VP], tensors)


def reference_state(hf, batch, path, edit=lambda tensors: None, untied: bool = False) -> None:
    x, y = batch
    params = dict(hf.named_parameters())  # the tied wte/lm_head appears once
    logits = hf(input_ids=x).logits
    loss = F.cross_entropy(logits.view(-1, V), y.reshape(-1))  # y is already shifted: not labels=
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    if untied:  # the embedding lookup's gradient alone, as an untied lm_head would leave it
        embeds = hf.transformer.wte(x).detach().requires_grad_()
        out = hf(inputs_embeds=embeds).logits
        d_embeds, = torch.autograd.grad(F.cross_entropy(out.view(-1, V), y.reshape(-1)), embeds)
        grads["transformer.wte.weight"] = F.one_hot(x.reshape(-1), V).float().t() @ d_embeds.reshape(-1, C)
    tensors = reference_tensors(grads)
    edit(tensors)
    write_file(path, [20240327, 2, B, T], [x.numpy(), y.numpy(), logits.detach().numpy(),
                                           np.array([loss.item()], dtype="<f4"), *tensors])


@pytest.fixture(scope="module")
def files(hf, batch, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llmc")
    reference_model(hf, directory / "model.bin")
    reference_state(hf, batch, directory / "state.bin")
    return directory


def _copy(hf) -> GPT2:
    from gptexp.weights.hf import gpt2_state_from_hf

    model = GPT2(GPT2Config(block_size=MAXT, vocab_size=V, n_layer=L, n_head=NH, n_embd=C))
    model.load_state_dict(gpt2_state_from_hf(hf.state_dict()))
    return model.eval()


def test_write_model_matches_the_reference_byte_for_byte(hf, files, tmp_path):
    write_model(_copy(hf), tmp_path / "ours.bin")
    assert (tmp_path / "ours.bin").read_bytes() == (files / "model.bin").read_bytes()
    assert padded_vocab(50257) == 50304 and padded_vocab(65) == 128


def test_read_model_round_trips_exactly(hf, files, tmp_path):
    ours = _copy(hf)
    model = read_model(files / "model.bin")
    assert model.config == ours.config
    for name, value in ours.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as llm.c has it
    write_model(model, tmp_path / "again.bin")
    assert (tmp_path / "again.bin").read_bytes() == (files / "model.bin").read_bytes()


def test_read_model_reads_bf16_version_5(hf, tmp_path):
    reference_model(hf, tmp_path / "bf16.bin", version=5)
    model = read_model(tmp_path / "bf16.bin")
    for name, value in _copy(hf).state_dict().items():
        assert torch.equal(model.state_dict()[name], value.bfloat16().float()), name


def test_write_state_matches_the_reference(hf, batch, files, tmp_path):
    """gptexp's state for the same batch agrees with HF's, tensor by tensor; and HF's verifies gptexp."""
    write_state(_copy(hf), *batch, tmp_path / "ours.bin")
    config = GPT2Config(block_size=MAXT, vocab_size=V, n_layer=L, n_head=NH, n_embd=C)
    ours, reference = read_state(tmp_path / "ours.bin", config, VP), read_state(files / "state.bin", config, VP)
    for name, value in reference.items():
        scale = value.abs().max().item() if value.is_floating_point() else 0
        assert torch.allclose(ours[name].double(), value.double(), rtol=0, atol=1e-6 + 1e-4 * scale), name
    checks, losses, failures = verify(files / "model.bin", files / "state.bin")
    assert not failures, failures
    assert len(checks) == 18 and all(c.ok for c in checks)
    assert len(losses) == 10 and losses == sorted(losses, reverse=True)


def failures_for(files, tmp_path, hf, batch, model_edit=None, state_edit=None, **state_kwargs) -> list[str]:
    model, state = files / "model.bin", files / "state.bin"
    if model_edit:
        model = tmp_path / "broken_model.bin"
        reference_model(hf, model, model_edit)
    if state_edit or state_kwargs:
        state = tmp_path / "broken_state.bin"
        reference_state(hf, batch, state, state_edit or (lambda t: None), **state_kwargs)
    return verify(model, state)[2]


def untranspose(index: int):
    def edit(tensors):
        tensors[index] = np.ascontiguousarray(tensors[index].transpose(0, 2, 1))
    return edit


def swap_q_k(tensors):
    for index in (4, 5):  # qkvw, qkvb: rows [q | k | v]
        q = tensors[index][:, :C].copy()
        tensors[index][:, :C] = tensors[index][:, C:2 * C]
        tensors[index][:, C:2 * C] = q


def set_nan(index: int):
    def edit(tensors):
        tensors[index].reshape(-1)[7] = np.nan
    return edit


def names(failures: list[str]) -> set[str]:
    return {f.split(":")[0] for f in failures}


@pytest.mark.parametrize("edit, failing", [
    (untranspose(6), {"dattprojw"}),  # the square attention projection: no size error to give it away
    (untranspose(12), {"dfcprojw"}),
    (swap_q_k, {"dqkvw", "dqkvb"}),
    (set_nan(10), {"dfcw"}),
])
def test_a_broken_state_fails_on_the_named_tensor(hf, batch, files, tmp_path, edit, failing):
    assert names(failures_for(files, tmp_path, hf, batch, state_edit=edit)) == failing


def test_a_nan_in_the_state_logits_is_named(hf, batch, files, tmp_path):
    path = tmp_path / "nan_logits.bin"
    reference_state(hf, batch, path)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<f", raw, 1024 + 2 * 4 * B * T + 4 * 5, float("nan"))  # logits[0, 0, 5]
    path.write_bytes(bytes(raw))
    failures = verify(files / "model.bin", path)[2]
    assert failures == ["logits: the expected tensor holds NaN or infinity"]


def test_dwte_without_the_tied_heads_gradient_fails(hf, batch, files, tmp_path):
    """llm.c's test_gpt2 passes this (values < 2e-2); the relative tolerance catches it."""
    assert names(failures_for(files, tmp_path, hf, batch, untied=True)) == {"dwte"}


@pytest.mark.parametrize("edit", [untranspose(6), swap_q_k])
def test_a_broken_model_file_fails_the_logits(hf, batch, files, tmp_path, edit):
    failures = failures_for(files, tmp_path, hf, batch, model_edit=edit)
    assert "logits" in names(failures) and "loss" in names(failures)


def test_a_nan_in_the_model_file_names_the_tensor(hf, tmp_path):
    reference_model(hf, tmp_path / "nan.bin", set_nan(4))
    with pytest.raises(LlmcFormatError, match="tensor qkvw holds NaN"):
        read_model(tmp_path / "nan.bin")


def test_an_unpadded_vocabulary_is_named(hf, batch, files, tmp_path):
    def unpad(tensors):
        tensors[0] = tensors[0][:V]
    reference_model(hf, tmp_path / "unpadded.bin", unpad)
    with pytest.raises(LlmcFormatError, match="tensor wte has 300 rows, not the header's padded 384"):
        read_model(tmp_path / "unpadded.bin")
    path = tmp_path / "unpadded_state.bin"
    reference_state(hf, batch, path, unpad)
    with pytest.raises(LlmcFormatError, match="tensor dwte has 300 rows"):
        verify(files / "model.bin", path)


def test_a_truncated_file_names_the_tensor(files, tmp_path):
    raw = (files / "model.bin").read_bytes()
    # cut inside fcw: header, wte, wpe, then ln1w..ln2b of both layers
    fcw_start = 1024 + 4 * (VP * C + MAXT * C + L * (2 * C + 3 * C * C + 3 * C + C * C + C + 2 * C))
    (tmp_path / "short.bin").write_bytes(raw[:fcw_start + 100])
    with pytest.raises(LlmcFormatError, match="truncated in tensor fcw"):
        read_model(tmp_path / "short.bin")
    (tmp_path / "long.bin").write_bytes(raw + b"\0" * 8)
    with pytest.raises(LlmcFormatError, match="8 bytes after the last tensor"):
        read_model(tmp_path / "long.bin")


def test_bad_headers_are_named(files, tmp_path):
    raw = bytearray((files / "model.bin").read_bytes())
    struct.pack_into("<i", raw, 0, 20240327)
    (tmp_path / "magic.bin").write_bytes(bytes(raw))
    with pytest.raises(LlmcFormatError, match="bad magic 20240327, expected 20240326"):
        read_model(tmp_path / "magic.bin")
    struct.pack_into("<ii", raw, 0, 20240326, 1)
    (tmp_path / "version.bin").write_bytes(bytes(raw))
    with pytest.raises(LlmcFormatError, match="version 1 is not supported"):
        read_model(tmp_path / "version.bin")
    struct.pack_into("<i", raw, 4, 3)
    struct.pack_into("<i", raw, 5 * 4, 5)  # NH=5 does not divide C=32
    (tmp_path / "heads.bin").write_bytes(bytes(raw))
    with pytest.raises(LlmcFormatError, match="n_embd"):
        read_model(tmp_path / "heads.bin")


def test_write_rejects_what_llmc_cannot_hold(batch):
    model = GPT2(GPT2Config(block_size=MAXT, vocab_size=V, n_layer=1, n_head=2, n_embd=8, bias=False))
    with pytest.raises(ValueError, match="biases"):
        write_model(model, "/nonexistent/x.bin")
    model = GPT2(GPT2Config(block_size=MAXT, vocab_size=V, n_layer=1, n_head=2, n_embd=8))
    x, y = batch
    with pytest.raises(ValueError, match="ignore index"):
        write_state(model, x, torch.full_like(y, -100), "/nonexistent/x.bin")


def cli(command: str, *args: str) -> subprocess.CompletedProcess:
    return execute("-m", "gptexp", command, *args, timeout=300)


def test_export_and_verify_commands(run_dir, hf, files, tmp_path):
    """A training run's checkpoint and an HF directory export; verify exits 0, 1 or 2 as it should."""
    result = cli("export", "format=llmc", f"source={run_dir}", f"output={tmp_path}/run.bin",
                 f"state={tmp_path}/run_state.bin")
    assert result.returncode == 0, result.stderr[-2000:]
    result = cli("verify", f"model={tmp_path}/run.bin", f"state={tmp_path}/run_state.bin")
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "all checks passed" in result.stdout and result.stdout.count(" OK") == 18
    assert "step 9: loss" in result.stdout

    hf.save_pretrained(tmp_path / "hf")
    result = cli("export", f"source={tmp_path}/hf", f"output={tmp_path}/hf.bin")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "hf.bin").read_bytes() == (files / "model.bin").read_bytes()

    result = cli("verify", f"model={tmp_path}/hf.bin", f"state={tmp_path}/run_state.bin")
    assert result.returncode == 2 and "T=32" in result.stderr, result.stderr  # a state of another model
    reference_state(hf, (torch.zeros(B, T, dtype=torch.long), torch.ones(B, T, dtype=torch.long)),
                    tmp_path / "other_batch.bin")
    raw = bytearray((tmp_path / "other_batch.bin").read_bytes())
    struct.pack_into("<i", raw, 1024, 5)  # x[0, 0] no longer matches the logits and gradients
    (tmp_path / "other_batch.bin").write_bytes(bytes(raw))
    result = cli("verify", f"model={tmp_path}/hf.bin", f"state={tmp_path}/other_batch.bin")
    assert result.returncode == 1 and "FAIL logits" in result.stdout
