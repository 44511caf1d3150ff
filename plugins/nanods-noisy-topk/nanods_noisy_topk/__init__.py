"""Noisy top-k gating (Shazeer et al., 2017, "Outrageously Large Neural Networks").

H(x)_i = (x W_g)_i + noise_std * N(0, 1) * softplus((x W_noise)_i)   (noise only in training)
indices = top-k of H;  weights = softmax of H over the k chosen experts.

The noise makes training explore experts; its learned, per-expert scale lets the model turn it
down where it hurts. A token's choice depends only on that token, so decoding with a KV cache
equals the full forward. In training the router also returns the paper's importance loss
(balance_alpha * CV(importance)^2), which nanods adds to the training loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class NoisyTopKRouter(nn.Module):
    @dataclass
    class Config:
        noise_std: float = 1.0  # scale of the gating noise in training (0 turns it off)
        balance_alpha: float = 0.01  # weight of the importance loss (0 turns it off)

    def __init__(self, config, layer_idx: int) -> None:  # noqa: ANN001 - a NanoDeepSeekConfig
        super().__init__()
        self.options = self.Config(**config.router_options)
        self.top_k = config.top_k
        self.w_gate = nn.Parameter(torch.zeros(config.num_experts, config.n_embd))  # zero: uniform at start
        # the learned noise scale exists only when there is noise to scale
        self.w_noise = nn.Parameter(torch.zeros(config.num_experts, config.n_embd)) if self.options.noise_std else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # nanods calls routers on float32 input with autocast off and keeps their weights float32
        logits = F.linear(x, self.w_gate)
        if self.training and self.w_noise is not None:
            scale = F.softplus(F.linear(x, self.w_noise))
            logits = logits + self.options.noise_std * torch.randn_like(logits) * scale
        top, indices = logits.topk(self.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1)
        if self.training and self.options.balance_alpha > 0:
            gates = torch.zeros_like(logits).scatter(-1, indices, weights)
            importance = gates.flatten(0, 1).sum(0)
            cv2 = importance.var() / (importance.mean() ** 2 + 1e-10)
            return weights, indices, self.options.balance_alpha * cv2
        return weights, indices
