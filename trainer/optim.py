"""Optimisers (LARS, SGD, AdamW) and every per-step schedule: warmup + cosine (LR, and BYOL's EMA tau), poly
(segmentation, depth), warmup + multistep (detection)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as BYOL uses it: SGD with momentum on the trust-ratio-scaled update.

    For parameters in a group with `lars_exclude=True` (biases and BatchNorm), weight decay and
    the trust ratio are both skipped. Vectorised with foreach ops; no host synchronisation.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3):
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                        "trust_coefficient": trust_coefficient, "lars_exclude": False, "lr_scale": 1.0}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(params))
                g_norm = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((p_norm > 0) & (g_norm > 0),
                                    group["trust_coefficient"] * p_norm / g_norm, torch.ones_like(p_norm))
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            bufs = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def parameter_groups(modules: list[nn.Module], weight_decay: float, lr_scale: float = 1.0) -> list[dict]:
    """Two groups: weights (decayed, adapted) and biases + normalisation parameters (neither).

    One-dimensional parameters are exactly the biases and the BatchNorm scales and shifts.
    `lr_scale` multiplies the scheduled LR for these groups (the training loop applies it).
    """
    regular, excluded = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (excluded if p.ndim <= 1 else regular).append(p)
    return [{"params": regular, "weight_decay": weight_decay, "lars_exclude": False, "lr_scale": lr_scale},
            {"params": excluded, "weight_decay": 0.0, "lars_exclude": True, "lr_scale": lr_scale}]


def build_optimizer(name: str, groups: list[dict], lr: float, momentum: float, weight_decay: float,
                    trust_coefficient: float) -> torch.optim.Optimizer:
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    trust_coefficient=trust_coefficient)
    plain = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups]  # lr_scale rides along
    if name == "sgd":
        return torch.optim.SGD(plain, lr=lr, momentum=momentum, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(plain, lr=lr, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}; choose lars, sgd or adamw")


# ============================================================================================
# Schedules: per-step values precomputed as arrays (DINO's style), indexed by the optimiser step
# ============================================================================================
def cosine_scheduler(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                     inclusive: bool = False) -> np.ndarray:
    """Linear warmup from base / warmup_steps to `base` over `warmup_steps`, then a cosine from `base`
    to `final` over the rest: `total_steps` values, or one more (ending exactly at `final`) when
    `inclusive`. The one cosine of the trainer: LR schedules, BYOL's tau, fine-tuning."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = base * np.arange(1, warmup_steps + 1) / max(1, warmup_steps)
    decay_len = total_steps - warmup_steps
    k = np.arange(decay_len + 1 if inclusive else decay_len)
    cos = final + (base - final) * 0.5 * (1 + np.cos(np.pi * k / max(1, decay_len)))
    return np.concatenate([warm, cos])


def warmup_cosine(base: float, total_steps: int, warmup_steps: int, final: float = 0.0) -> np.ndarray:
    """Per-step LR: linear warmup from 0 to `base`, then cosine decay to `final` (`total_steps` values)."""
    return cosine_scheduler(base, final, total_steps, warmup_steps)


def tau_schedule(tau_base: float, total_steps: int) -> np.ndarray:
    """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 for k = 0..K (the paper, sec. 3.2)."""
    return cosine_scheduler(tau_base, 1.0, total_steps, inclusive=True)


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9) -> np.ndarray:
    """torchvision reference's poly decay, lr * (1 - step / total) ** 0.9, for steps 0..total."""
    return base_lr * (1 - np.arange(total_steps + 1) / total_steps) ** power


def warmup_multistep(base_lr: float, total_steps: int, warmup_steps: int,
                     milestones=(2 / 3, 8 / 9), gamma: float = 0.1, warmup_factor: float = 1e-3) -> np.ndarray:
    """Per-step LR of the detection references: linear warmup, then x0.1 at 2/3 and 8/9 of training."""
    steps = np.arange(total_steps + 1, dtype=np.float64)
    lr = np.full_like(steps, base_lr)
    for m in milestones:
        lr[steps >= int(m * total_steps)] *= gamma
    if warmup_steps > 0:
        ramp = warmup_factor + (1 - warmup_factor) * np.minimum(steps / warmup_steps, 1.0)
        lr *= ramp
    return lr
