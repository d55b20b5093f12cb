"""Optimiser and gradient clipping shared by the stages (reference §5.6: AdamW, betas (0, 0.999), wd 0.01)."""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy


def adamw(params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float):
    """AdamW over the parameters that require gradients (frozen and LoRA-base weights are left out)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("no trainable parameters for the optimiser")
    return torch.optim.AdamW(trainable, lr=lr, betas=betas, weight_decay=weight_decay)


def clip_gradients(module: L.LightningModule, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the gradient norm to `max_norm`, also under FSDP.

    Lightning's FSDP precision plugin refuses norm clipping, so there the FSDP root's `clip_grad_norm_` is
    called (it reduces the norm across shards). It sees every parameter that holds a gradient, so stages
    with two optimisers clear gradients after each step (`set_to_none`).
    """
    strategy = module.trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        strategy.model.clip_grad_norm_(max_norm)
    else:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
