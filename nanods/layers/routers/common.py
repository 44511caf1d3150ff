"""Pieces both built-in routers share: the gate, group-limited top-k, and the balance loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanods.config import NanoDeepSeekConfig


class Gate(nn.Module):
    """x -> expert logits in x's dtype; subclasses score them.

    The MoE calls routers with autocast off on float32 input (float64 in a float64 model) and keeps
    this weight float32, so nothing here needs to cast or turn autocast off.
    """

    def __init__(self, config: NanoDeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.n_embd, dtype=torch.float32))
        nn.init.normal_(self.weight, std=0.02)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def limited_topk(choice: torch.Tensor, config: NanoDeepSeekConfig) -> torch.Tensor:
    """Top-k expert ids per token; with n_group > 1 only experts in the best topk_group groups compete.

    A group's score is the sum of its two best choice scores (DeepSeek-V3).
    """
    if config.n_group > 1:
        groups = choice.unflatten(-1, (config.n_group, -1))
        group_score = groups.topk(min(2, groups.size(-1)), dim=-1).values.sum(-1)
        keep = group_score.topk(config.topk_group, dim=-1).indices
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter(-1, keep, False)
        choice = groups.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(-2)
    return choice.topk(config.top_k, dim=-1).indices


def finish_weights(chosen: torch.Tensor, config: NanoDeepSeekConfig) -> torch.Tensor:
    """Normalise the chosen scores to sum 1 when route_norm, then scale by route_scale."""
    if config.route_norm:
        chosen = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-20)
    return chosen * config.route_scale


def balance_loss(probs: torch.Tensor, indices: torch.Tensor, per_sequence: bool) -> torch.Tensor:
    """E * sum_i f_i P_i, with f_i the share of routed slots and P_i the mean probability of expert i.

    per_sequence=True is DeepSeek-V3's sequence-wise loss (averaged over sequences); False
    pools the whole batch (the classic switch/GShard loss). probs (B, T, E), indices (B, T, K).
    """
    E = probs.size(-1)
    if not per_sequence:
        probs, indices = probs.flatten(0, 1).unsqueeze(0), indices.flatten(0, 1).unsqueeze(0)
    counts = torch.zeros(probs.shape[0], E, device=probs.device).scatter_add_(
        1, indices.flatten(1), torch.ones(indices.flatten(1).shape, device=probs.device))
    f = counts / indices[0].numel()
    p = probs.mean(dim=1)
    return E * (f * p).sum(-1).mean()
