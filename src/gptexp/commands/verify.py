"""Check a GPT-2 against llm.c's files, as llm.c's test_gpt2 does, with strict tolerances.

    python -m gptexp verify model=<llm.c model .bin> state=<llm.c debug state .bin>

Loads the model into gptexp, runs the state's batch forward and backward, and compares the logits,
the loss and all 16 gradient tensors with the state: a tensor passes when
max |computed - expected| <= atol + rtol * max |expected| (NaN or infinity anywhere fails).
Then runs 10 AdamW steps with test_gpt2's settings (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay
0.01 on every parameter) on the same batch; their losses must be finite and fall (and, given
expected_losses, match them within 1e-2 as test_gpt2 does). Prints a per-tensor table and the step
losses; exits 0 only if every check passes, 1 if one fails, 2 if a file cannot be read.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gptexp.commands.cli import answered_errors, run_command
from gptexp.core.config import CONF_DIR
from gptexp.weights.llmc import LLMC_TENSORS, llmc_tensors, padded_vocab_of, read_model, read_state


@dataclass
class Check:
    name: str
    shape: tuple[int, ...]
    max_diff: float
    tolerance: float
    nonfinite: str = ""  # "expected" or "computed" when that side holds NaN or infinity

    @property
    def ok(self) -> bool:
        return not self.nonfinite and self.max_diff <= self.tolerance

    @property
    def failure(self) -> str:
        if self.nonfinite:
            return f"{self.name}: the {self.nonfinite} tensor holds NaN or infinity"
        return f"{self.name}: max |diff| {self.max_diff:.3g} > tolerance {self.tolerance:.3g}"


def compare(name: str, computed: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> Check:
    computed, expected = computed.double(), expected.double()
    if not torch.isfinite(expected).all() or not torch.isfinite(computed).all():
        side = "expected" if not torch.isfinite(expected).all() else "computed"
        return Check(name, tuple(expected.shape), math.nan, math.nan, side)
    tolerance = atol + rtol * expected.abs().max().item()
    return Check(name, tuple(expected.shape), (computed - expected).abs().max().item(), tolerance)


def verify(model_path: str | Path, state_path: str | Path, rtol_logits: float = 1e-4, rtol_grads: float = 1e-3,
           atol: float = 1e-6, steps: int = 10, expected_losses: list[float] | None = None
           ) -> tuple[list[Check], list[float], list[str]]:
    """(tensor checks, step losses, failure messages); no failures means the pair verifies."""
    model = read_model(model_path).float()
    padded = padded_vocab_of(model_path)
    state = read_state(state_path, model.config, padded)
    x, y = state["x"], state["y"]
    params = dict(model.named_parameters())
    logits, loss = model(x, y)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    grads["lm_head.weight"] = grads["transformer.wte.weight"]
    computed = llmc_tensors(grads, model.config, padded)
    checks = [compare("logits", logits.detach(), state["logits"], rtol_logits, atol),
              compare("loss", loss.detach().reshape(1), state["loss"], rtol_logits / 10, atol)]
    checks += [compare(f"d{name}", computed[name], state[f"d{name}"], rtol_grads, atol) for name in LLMC_TENSORS]
    failures = [c.failure for c in checks if not c.ok]
    if state["dwte"][model.config.vocab_size:].any():
        failures.append(f"dwte: the padded rows {model.config.vocab_size}.. of the expected gradient are not zero")
    losses = adamw_losses(model, x, y, steps)
    if not all(math.isfinite(v) for v in losses):
        failures.append(f"step losses are not all finite: {losses}")
    elif len(losses) > 1 and not losses[-1] < losses[0]:
        failures.append(f"step losses do not fall: {losses[0]:.6f} -> {losses[-1]:.6f}")
    if expected_losses is not None:
        for step, (got, want) in enumerate(zip(losses, expected_losses)):
            if not abs(got - want) < 1e-2:
                failures.append(f"step {step}: loss {got:.6f}, expected {want:.6f}")
    return checks, losses, failures


def adamw_losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """test_gpt2's training: `steps` AdamW updates on one batch; each loss is taken before its update."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def report(checks: list[Check], losses: list[float], failures: list[str]) -> str:
    lines = [f"{'tensor':<12}{'shape':<22}{'max |diff|':>12}{'tolerance':>12}  result"]
    for c in checks:
        lines.append(f"{c.name:<12}{str(c.shape):<22}{c.max_diff:>12.3e}{c.tolerance:>12.3e}  {'OK' if c.ok else 'FAIL'}")
    lines += [f"step {i}: loss {v:.6f}" for i, v in enumerate(losses)]
    lines += [f"FAIL {f}" for f in failures] or ["all checks passed"]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=f"{CONF_DIR}/tools", config_name="verify")
def main(cfg: DictConfig) -> None:
    with answered_errors():
        for key in ("model", "state"):
            if not Path(cfg[key]).is_file():
                raise FileNotFoundError(f"{key}={cfg[key]} is not a file; pass llm.c's model .bin as model= and its "
                                        f"debug state .bin as state= (python -m gptexp export writes both)")
        checks, losses, failures = verify(cfg.model, cfg.state, cfg.rtol_logits, cfg.rtol_grads, cfg.atol, cfg.steps,
                                          list(cfg.expected_losses) if cfg.expected_losses else None)
    print(report(checks, losses, failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    run_command(main)
