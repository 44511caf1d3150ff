"""Rotary position embedding, shared by every attention (each passes its own rotary width), with
YaRN context extension as DeepSeek-V3 and transformers' DeepseekV3 apply it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nanods.config import NanoDeepSeekConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when the context is not extended)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class Rope:
    """The rotary settings of a model; YaRN is on when factor > 1 (see NanoDeepSeekConfig.rope_*)."""

    theta: float = 10000.0
    factor: float = 1.0
    original_len: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    @classmethod
    def from_config(cls, config: NanoDeepSeekConfig) -> Rope:
        return cls(config.rope_theta, config.rope_factor, config.rope_original_len, config.rope_beta_fast,
                   config.rope_beta_slow, config.rope_mscale, config.rope_mscale_all_dim)

    def inv_freq(self, dim: int, device: torch.device | None = None) -> torch.Tensor:
        """The dim/2 frequencies: theta^(-2i/dim), or YaRN's blend of them and them / factor."""
        i = torch.arange(0, dim, 2, dtype=torch.float32, device=device)
        if self.factor == 1:
            return self.theta ** (-i / dim)
        # transformers' _compute_yarn_parameters (DeepSeek's precompute_freqs_cis, the same formula)
        pos_freqs = self.theta ** (i / dim)
        low, high = self._correction_range(dim)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1 for the fast-rotating pairs (kept), 0 for the slow ones (divided by factor)
        return 1.0 / (self.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation

    def _correction_range(self, dim: int) -> tuple[float, float]:
        """The pairs that turn beta_fast and beta_slow times over original_len: where the ramp starts and ends."""
        def pair(turns: float) -> float:
            return dim * math.log(self.original_len / (turns * 2 * math.pi)) / (2 * math.log(self.theta))

        low, high = max(math.floor(pair(self.beta_fast)), 0), min(math.ceil(pair(self.beta_slow)), dim - 1)
        return low, high + 0.001 if low == high else high  # no division by zero

    @property
    def attention_factor(self) -> float:
        """The scale of cos and sin: m(mscale) / m(mscale_all_dim); m(1) when either is 0 (transformers' rule)."""
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def softmax_factor(self) -> float:
        """MLA's extra score scale m(mscale_all_dim)^2 (DeepSeek's softmax_scale; MHA does not take it)."""
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


def apply_rope(x: torch.Tensor, pos: torch.Tensor, rope: Rope | float) -> torch.Tensor:
    """Rotate x (B, T, H, D) by positions pos (B, T); pairs are (i, i + D/2), in float32.

    `rope` is the model's Rope (Rope.from_config(config)) or a bare theta for plain RoPE.
    With x = [x1 ; x2], frequencies f = rope.inv_freq(D) and angles a = pos * f:
    [x1 cos a - x2 sin a ; x2 cos a + x1 sin a] = x * cos([-a ; a]) + [x2 ; x1] * sin([-a ; a]),
    times YaRN's rope.attention_factor (transformers scales cos and sin by it).
    """
    rope = rope if isinstance(rope, Rope) else Rope(theta=rope)
    D = x.size(-1)
    f = rope.inv_freq(D, pos.device)
    angles = pos.unsqueeze(-1).unsqueeze(-1).float() * torch.cat([-f, f])  # (B, T, 1, D)
    xf = x.float()
    y = torch.addcmul(xf * angles.cos(), xf.roll(D // 2, dims=-1), angles.sin())
    scale = rope.attention_factor
    return (y * scale if scale != 1 else y).to(x.dtype)
