"""The dense feed-forward network (also the shape of every expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanods.config import NanoDeepSeekConfig


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """relu2: relu(h)^2 (the default, as in nanochat); swiglu: silu(gate) * up on the two halves of h."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.relu(h).square()


class MLP(nn.Module):
    """w_out(act(w_in x)); for swiglu, w_in produces gate and up side by side."""

    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(dim, hidden * (2 if activation == "swiglu" else 1), bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(activate(self.w_in(x), self.activation))


class DenseFFN(MLP):
    """The `dense` FFN component: one MLP of width ffn_hidden."""

    def __init__(self, config: NanoDeepSeekConfig, layer_idx: int) -> None:
        super().__init__(config.n_embd, config.ffn_hidden, config.activation)
