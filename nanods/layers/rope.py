"""Rotary position embedding, shared by every attention (each passes its own rotary width)."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def _rope_table(dim: int, length: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float, max_len: int) -> torch.Tensor:
    """Rotate x (B, T, H, D) by positions pos (B, T) < max_len; pairs are (i, i + D/2), in float32."""
    cos, sin = _rope_table(x.size(-1), max_len, float(theta), pos.device)
    cos, sin = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)  # (B, T, 1, D/2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
