"""The classic router: softmax over all experts, top-k probabilities, a balance loss in training."""

from __future__ import annotations

import torch

from nanods.layers.routers.common import (
    Gate,
    balance_loss,
    finish_weights,
    limited_topk,
)


class SoftmaxRouter(Gate):
    """p = softmax(x W_g); weights = top-k p (renormalised only with route_norm) * route_scale."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        probs = torch.softmax(self.logits(x), dim=-1)
        indices = limited_topk(probs, self.config)
        weights = finish_weights(probs.gather(-1, indices), self.config)
        if self.training and self.config.aux_loss_alpha > 0:
            return weights, indices, self.config.aux_loss_alpha * balance_loss(probs, indices, per_sequence=False)
        return weights, indices
