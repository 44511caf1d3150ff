"""RMSNorm: parameter-free by default, learnable weights with norm_weights (as DeepSeek has)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, weight: bool = False) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the weight in x's dtype: under autocast a bf16 x (e.g. MLA's latent) would miss the fused kernel
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, (self.dim,), weight, self.eps)
