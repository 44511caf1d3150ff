"""Rotary position embedding, shared by every attention (each passes its own rotary width)."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def _rope_table(dim: int, length: int, theta: float, device: torch.device) -> torch.Tensor:
    """(length, 2, dim): per position, [cos ; cos] and [-sin ; sin] of its dim/2 angles."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)], dim=1)


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float, max_len: int) -> torch.Tensor:
    """Rotate x (B, T, H, D) by positions pos (B, T) < max_len; pairs are (i, i + D/2), in float32.

    With x = [x1 ; x2]: [x1 cos - x2 sin ; x2 cos + x1 sin] = x * [cos ; cos] + [x2 ; x1] * [-sin ; sin],
    four tensor ops (decoding runs this twice per layer per token, so op count matters).
    """
    cos, sin = _rope_table(x.size(-1), max_len, float(theta), pos.device)[pos].unsqueeze(3).unbind(2)  # (B, T, 1, D)
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.size(-1) // 2, dims=-1), sin).to(x.dtype)
