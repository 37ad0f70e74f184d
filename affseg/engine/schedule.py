"""Optimiser and learning-rate schedule: AdamW, linear warm-up, then poly decay (SPEC §3)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from affseg.config import OptimConfig


def lr_factor(iteration: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at `iteration`: poly decay (1 − t/T)^p, times a linear warm-up
    from `warmup_ratio` to 1 over the first `warmup_iters` iterations."""
    poly = max(0.0, 1.0 - iteration / total) ** cfg.poly_power
    if iteration < cfg.warmup_iters:
        poly *= cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * iteration / cfg.warmup_iters
    return poly


def build_optimiser(parameters: Iterable[torch.nn.Parameter], cfg: OptimConfig,
                    capturable: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; `capturable` keeps its step count on the parameters' device."""
    trainable = [p for p in parameters if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                             capturable=capturable)


def build_scheduler(optimiser: torch.optim.Optimizer, cfg: OptimConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration (optimiser step) for `total` iterations."""
    return torch.optim.lr_scheduler.LambdaLR(optimiser, lambda t: lr_factor(t, total, cfg))
