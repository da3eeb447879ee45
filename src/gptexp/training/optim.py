"""Optimizers: AdamW, or Muon for the hidden weight matrices with AdamW for the rest; one warm-up + cosine
schedule for every learning rate."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps", "xpu")
OPTIMIZERS = ("adamw", "muon")
MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | muon: torch.optim.Muon for the hidden 2-D matrices, AdamW for the rest
    lr: float = 1e-3  # peak learning rate (AdamW's), reached after warmup_steps
    min_lr: float = 1e-4  # the cosine decays to this, and stays there
    weight_decay: float = 0.1  # on matrices and embeddings only, never on biases or norms
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    warmup_steps: int = 100
    decay_steps: int | None = None  # end of the cosine, in optimizer steps; null: trainer.max_steps
    fused: bool | None = None  # torch's fused AdamW kernel; null: used where torch has it (CPU, CUDA, ...)
    muon_lr: float = 0.02  # Muon's peak learning rate; the schedule scales it as it scales lr
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_adjust_lr: str = "original"  # torch.optim.Muon's adjust_lr_fn: original (Keller Jordan's) | match_rms_adamw

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"name must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}; set both, "
                             f"e.g. optim.lr={self.lr:g} optim.min_lr={self.lr / 10:g}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("warmup_steps, weight_decay must be >= 0 and eps > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.muon_lr <= 0 or self.muon_weight_decay < 0 or not 0 <= self.muon_momentum < 1:
            raise ValueError("muon_lr must be > 0, muon_weight_decay >= 0 and muon_momentum in [0, 1)")
        if self.muon_adjust_lr not in MUON_LR_ADJUSTMENTS:
            raise ValueError(f"muon_adjust_lr must be one of {', '.join(MUON_LR_ADJUSTMENTS)}, got {self.muon_adjust_lr!r}")


def adamw(params: list[torch.Tensor], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW as `optim` says, weight decay on matrices and embeddings only."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = optim.fused
    if fused is None:  # the fused kernel: one pass per step, 3-4x faster than the per-tensor loop on a CPU
        fused = all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             fused=fused)


def hidden_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The trainable weights of the model's linear layers but its output head (and LoRA's adapters):
    the matrices Muon is for. Embeddings, the head, norms and biases are not among them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "lm_head", None)
    return [module.weight for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head and "lora_" not in name
            and module.weight.requires_grad and module.weight is not getattr(head, "weight", None)]


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over the hidden matrices and AdamW over the rest, stepped as one optimizer, so that
    Lightning's automatic optimization, gradient clipping and one LR schedule drive both: its param_groups
    are the two optimizers' own groups, its state_dict holds both."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], {})

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value) -> None:
        """Optimizer.__init__ sets an empty state: the state is the two optimizers'."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]  # loading made new group dicts


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `optim` names, over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = hidden_matrices(model)
    if optim.name == "adamw" or not matrices:  # LoRA trains no hidden matrix: AdamW for the adapters
        return adamw(params, optim)
    chosen = {id(p) for p in matrices}
    muon = torch.optim.Muon(matrices, lr=optim.muon_lr, weight_decay=optim.muon_weight_decay,
                            momentum=optim.muon_momentum, adjust_lr_fn=optim.muon_adjust_lr)
    return MuonWithAdamW(muon, adamw([p for p in params if id(p) not in chosen], optim))


def unscales_inside(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer takes a gradient scaler's unscaling into its own step (torch's fused kernels)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def lr_at(step: int, optim: OptimConfig, decay_steps: int) -> float:
    """Linear warm-up from lr/warmup_steps to lr, cosine decay to min_lr at decay_steps, then min_lr."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if step >= decay_steps:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay_steps - optim.warmup_steps)
    return optim.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (optim.lr - optim.min_lr)
