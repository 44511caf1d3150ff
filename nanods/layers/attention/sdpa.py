"""Causal scaled-dot-product attention for a chunk of new queries after `past` cached positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, past: int) -> torch.Tensor:
    """q (B, H, T, D), k (B, Hk, S, D), v (B, Hk, S, Dv) with S = past + T; Hk divides H (GQA/MQA)."""
    t, s = q.size(2), k.size(2)
    # SDPA's fused kernels want one head width; values narrower than keys (MLA's, without the rope part)
    # would send it down the unfused path that stores the T x S attention matrix. Pad, then cut.
    dv = v.size(-1)
    v = F.pad(v, (0, q.size(-1) - dv)) if dv < q.size(-1) else v
    gqa = k.size(1) != q.size(1)
    if past == 0:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    elif t == 1:  # one new token sees everything cached: the query heads sharing a KV head are its query rows
        B, H, _, D = q.shape
        rows = q.reshape(B, k.size(1), H // k.size(1), D)  # no GQA expansion, no per-head copy of the cache
        y = F.scaled_dot_product_attention(rows, k, v, scale=scale).reshape(B, H, 1, -1)
    else:  # query i sits at position past + i and sees keys 0..past + i
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return y[..., :dv]

