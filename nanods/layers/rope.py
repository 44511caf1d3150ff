"""Rotary position embedding, shared by every attention (each passes its own rotary width)."""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate x (B, T, H, D) by positions pos (B, T); pairs are (i, i + D/2), in float32.

    With x = [x1 ; x2], frequencies f_i = theta^(-2i/D) and angles a = pos * f:
    [x1 cos a - x2 sin a ; x2 cos a + x1 sin a] = x * cos([-a ; a]) + [x2 ; x1] * sin([-a ; a]).
    """
    D = x.size(-1)
    f = theta ** (-torch.arange(0, D, 2, dtype=torch.float32, device=pos.device) / D)
    angles = pos.unsqueeze(-1).unsqueeze(-1).float() * torch.cat([-f, f])  # (B, T, 1, D)
    xf = x.float()
    return torch.addcmul(xf * angles.cos(), xf.roll(D // 2, dims=-1), angles.sin()).to(x.dtype)
