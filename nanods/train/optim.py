"""Optimizers: AdamW with decay on matrices only (Muon has its own issue)."""

from __future__ import annotations

import torch
from torch import nn

from nanods.config import TrainSettings
from nanods.errors import NanodsError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (and stacked expert matrices) decay; norms, biases, embeddings and the gate vectors do not."""
    decay, no_decay = [], []
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embedding else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, settings: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    if settings.optimizer != "adamw":
        raise NanodsError("optimizer 'muon' is not available yet in this version; use optimizer = \"adamw\"")
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95),
                             eps=1e-8, fused=fused)
