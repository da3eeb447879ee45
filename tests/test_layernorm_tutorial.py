"""docs/layernorm: the hand-written LayerNorm against PyTorch and finite differences, in float64."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

PATH = Path(__file__).resolve().parents[1] / "docs" / "layernorm" / "layernorm.py"
spec = importlib.util.spec_from_file_location("layernorm_tutorial", PATH)
layernorm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(layernorm)


def inputs(shape=(3, 5, 7)):
    torch.manual_seed(0)
    return [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in (shape, shape[-1:], shape[-1:])]


def test_gradcheck_passes_in_float64():
    assert torch.autograd.gradcheck(layernorm.LayerNorm.apply, inputs())
    assert torch.autograd.gradcheck(layernorm.LayerNorm.apply, inputs((4, 16)))


def test_both_passes_match_pytorch():
    x, w, b = inputs()
    dy = torch.randn_like(x)
    y, cache = layernorm.forward(x.detach(), w.detach(), b.detach())
    grads = layernorm.backward(dy, cache)
    reference = F.layer_norm(x, (7,), w, b, eps=1e-5)
    reference.backward(dy)
    torch.testing.assert_close(y, reference.detach(), rtol=0, atol=1e-12)
    for ours, theirs in zip(grads, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dropped", ["mean", "projection"])
def test_gradcheck_catches_a_wrong_backward(monkeypatch, dropped):
    """The check bites: leaving out either reduction of the derived formula fails gradcheck."""
    def wrong_backward(dy, cache):
        xhat, rstd, w = cache
        dxhat = dy * w
        mean = 0 if dropped == "mean" else dxhat.mean(-1, keepdim=True)
        projection = 0 if dropped == "projection" else xhat * (dxhat * xhat).mean(-1, keepdim=True)
        return rstd * (dxhat - mean - projection), (dy * xhat).sum((0, 1)), dy.sum((0, 1))

    monkeypatch.setattr(layernorm, "backward", wrong_backward)
    assert not torch.autograd.gradcheck(layernorm.LayerNorm.apply, inputs(), raise_exception=False)
