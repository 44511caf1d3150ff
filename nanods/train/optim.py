"""Optimizers: AdamW (decay on matrices only), or Muon for hidden matrices with AdamW for the rest."""

from __future__ import annotations

import torch
from torch import nn

from nanods.project import TrainSettings
from nanods.train.muon import Muon

# parameters that stay on AdamW under Muon: embeddings, the output head and router gates
ADAMW_ONLY = ("embed.", "lm_head.", ".router.")


def split_parameters(model: nn.Module) -> tuple[list, list, list]:
    """(Muon matrices, AdamW matrices with decay, AdamW vectors and embeddings without decay)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    muon, decay, no_decay, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or id(p) in embeddings:
            no_decay.append(p)
        elif any(part in f".{name}" for part in ADAMW_ONLY):
            decay.append(p)
        else:
            muon.append(p)
    return muon, decay, no_decay


def fused_adamw(device: torch.device) -> bool:
    """Whether AdamW's fused kernel exists here: one pass per tensor, 4-5x the per-op loop on CPU."""
    return device.type in ("cpu", "cuda")


def build_optimizers(model: nn.Module, settings: TrainSettings, device: torch.device) -> list[torch.optim.Optimizer]:
    """[AdamW] on everything, or (optimizer = "muon") [AdamW, Muon]: Muon on hidden matrices.

    Every param group records its `base_lr`; the schedule multiplies it.
    """
    muon, decay, no_decay = split_parameters(model)
    if settings.optimizer == "adamw":
        decay, muon = decay + muon, []
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizers = [torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused_adamw(device))]
    if muon:
        optimizers.append(Muon(muon, lr=settings.muon_lr or settings.lr, weight_decay=settings.weight_decay))
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def describe_split(model: nn.Module, settings: TrainSettings) -> str:
    muon, decay, no_decay = split_parameters(model)
    count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    if settings.optimizer == "adamw":
        return f"AdamW: {count(muon + decay):,} decayed, {count(no_decay):,} not decayed (norms, embeddings)"
    return (f"Muon: {count(muon):,} in hidden matrices (experts orthogonalised per slice); "
            f"AdamW: {count(decay):,} embeddings-head-gates, {count(no_decay):,} vectors/embeddings")
