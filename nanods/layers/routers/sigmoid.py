"""DeepSeek-V3's router: sigmoid affinities, a bias that balances load without an auxiliary loss."""

from __future__ import annotations

import torch

from nanods.config import NanoDeepSeekConfig
from nanods.layers.routers.common import (
    Gate,
    balance_loss,
    finish_weights,
    limited_topk,
)


class SigmoidRouter(Gate):
    """s = sigmoid(x W_g); experts chosen by top-k of s + expert_bias; weights from s alone.

    expert_bias only steers the choice, never the weights: update_bias nudges it by
    bias_update_speed towards under-loaded experts after each optimizer step.
    """

    def __init__(self, config: NanoDeepSeekConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scores = torch.sigmoid(self.logits(x))  # (B, T, E)
        indices = limited_topk(scores + self.expert_bias.to(scores.dtype), self.config)
        weights = finish_weights(scores.gather(-1, indices), self.config)
        if self.training and self.config.aux_loss_alpha > 0:
            probs = scores / scores.sum(-1, keepdim=True)
            return weights, indices, self.config.aux_loss_alpha * balance_loss(probs, indices, per_sequence=True)
        return weights, indices

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """bias_i += speed * sign(mean load - load_i)."""
        load = tokens_per_expert.to(self.expert_bias)
        self.expert_bias += self.config.bias_update_speed * torch.sign(load.mean() - load)
