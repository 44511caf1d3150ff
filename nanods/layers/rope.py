"""Rotary position embedding, shared by every attention (each passes its own rotary width)."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=32)
def _signed_frequencies(dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """(dim,): [-f ; f] for the dim/2 rotation frequencies f_i = theta^(-2i/dim)."""
    f = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    return torch.cat([-f, f])


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float, max_len: int) -> torch.Tensor:
    """Rotate x (B, T, H, D) by positions pos (B, T) < max_len; pairs are (i, i + D/2), in float32.

    (The model checks positions against its context; max_len stays in the signature plugins call.)

    With x = [x1 ; x2] and angles a = pos * f: [x1 cos a - x2 sin a ; x2 cos a + x1 sin a]
    = x * cos([-a ; a]) + [x2 ; x1] * sin([-a ; a]). The angles come from the positions
    directly (no table), so a compiled decode step computes D of them, not a whole table.
    """
    # a compiled graph computes the frequencies itself (Dynamo would trace through the cache, with a warning)
    frequencies = _signed_frequencies.__wrapped__ if torch.compiler.is_compiling() else _signed_frequencies
    angles = pos.unsqueeze(-1).unsqueeze(-1).float() * frequencies(x.size(-1), float(theta), pos.device)
    xf = x.float()
    return torch.addcmul(xf * angles.cos(), xf.roll(x.size(-1) // 2, dims=-1), angles.sin()).to(x.dtype)
