"""Optimiser and learning-rate schedule of the official recipe.

The paper's schedule is timm <= 0.6 `CosineLRScheduler(t_initial=E, lr_min=min_lr, warmup_t=W,
warmup_lr_init=warmup_lr, t_in_epochs=True)`, stepped at the start of every epoch (VMRNN_SPEC 2.1):

    lr(e) = warmup_lr + e * (lr - warmup_lr) / W                  for e < W
    lr(e) = min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * e / E))  otherwise (not shifted by the warm-up)

`cosine_step` evaluates the same formula at the fractional epoch e + step / steps_per_epoch, updated every
optimiser step; `constant` keeps lr (the standalone Moving MNIST code has no scheduler).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vmrnn.train.config import TrainConfig


def cosine_lr(t: float, *, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float, min_lr: float) -> float:
    """The timm <= 0.6 cosine-with-warm-up value at (possibly fractional) epoch t."""
    if t < warmup_epochs:
        return warmup_lr + t * (lr - warmup_lr) / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t / epochs))


class LRSchedule:
    """Sets the optimiser's learning rate from (epoch, step); its state is only where it is."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.optimizer = optimizer
        self.kind = cfg.schedule
        self.lr = float(cfg.lr)
        self.epochs = int(cfg.epochs)
        self.warmup_epochs = int(cfg.warmup_epochs)
        self.warmup_lr = float(cfg.warmup_lr)
        self.min_lr = float(cfg.min_lr)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.last_epoch = -1
        self.last_step = 0

    def value(self, epoch: int, step: int = 0) -> float:
        if self.kind == "constant":
            return self.lr
        t = float(epoch) if self.kind == "cosine" else epoch + step / self.steps_per_epoch
        return cosine_lr(
            t,
            lr=self.lr,
            epochs=self.epochs,
            warmup_epochs=self.warmup_epochs,
            warmup_lr=self.warmup_lr,
            min_lr=self.min_lr,
        )

    def _set(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def start_epoch(self, epoch: int) -> float:
        """Call at the start of each epoch (timm's `scheduler.step(epoch)`); returns the lr set."""
        self.last_epoch, self.last_step = epoch, 0
        lr = self.value(epoch, 0)
        self._set(lr)
        return lr

    def before_step(self, epoch: int, step: int) -> None:
        """Call before each optimiser step; only the per-step schedule changes anything."""
        self.last_epoch, self.last_step = epoch, step
        if self.kind == "cosine_step":
            self._set(self.value(epoch, step))

    @property
    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lr": self.lr,
            "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs,
            "warmup_lr": self.warmup_lr,
            "min_lr": self.min_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "last_epoch": self.last_epoch,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state.get("last_epoch", -1))
        self.last_step = int(state.get("last_step", 0))


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # ndim <= 1: norm weights and ordinary biases; "*bias": also SS2D's (4, inner) dt_bias.
    return getattr(p, "_no_weight_decay", False) or p.ndim <= 1 or name.rsplit(".", 1)[-1].endswith("bias")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the official: one group, L2 weight_decay on everything, 0 by default) or AdamW with
    decoupled decay on the weight matrices only: parameters marked `_no_weight_decay` (the SSM A_log and
    D skips), norms and biases (tensors of <= 1 dimension, and any `*bias` such as dt_bias) get none."""
    lr = float(cfg.lr)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)
