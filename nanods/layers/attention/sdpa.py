"""Causal scaled-dot-product attention for a chunk of new queries after `past` cached positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, past: int) -> torch.Tensor:
    """q (B, H, T, D), k (B, Hk, S, D), v (B, Hk, S, Dv) with S = past + T; Hk divides H (GQA/MQA)."""
    t, s = q.size(2), k.size(2)
    gqa = k.size(1) != q.size(1)
    if past == 0:
        # SDPA's fused kernels want one head width; values narrower than keys (MLA: 64 vs 96 in `small`)
        # would send it down the unfused path that stores the T x T attention matrix. Pad, then cut.
        dv = v.size(-1)
        v = F.pad(v, (0, q.size(-1) - dv)) if dv < q.size(-1) else v
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)[..., :dv]
    if t == 1:  # one new token sees everything cached
        return _decode_attention(q, k, v, scale)
    # query i sits at position past + i and sees keys 0..past + i
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per head: the heads sharing a KV head become the rows of one matmul.

    Two batched matmuls and a softmax, with no copy of k or v per head. Measured on CPU, where
    SDPA takes its unfused path here (GQA, or MLA's latent keys wider than its values) at several
    times the cost; on CUDA it has not been measured against SDPA's kernels.
    """
    B, H, _, D = q.shape
    Hk = k.size(1)
    rows = q.reshape(B, Hk, H // Hk, D)  # T == 1: the query heads of each KV group, stacked
    scores = (rows @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale  # softmax in >= fp32
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return (weights @ v).reshape(B, H, 1, v.size(-1))
