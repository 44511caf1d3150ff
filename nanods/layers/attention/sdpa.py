"""Causal scaled-dot-product attention for a chunk of new queries after `past` cached positions."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, past: int) -> torch.Tensor:
    """q (B, H, T, D), k (B, Hk, S, D), v (B, Hk, S, Dv) with S = past + T; Hk divides H (GQA/MQA)."""
    t, s = q.size(2), k.size(2)
    gqa = k.size(1) != q.size(1)
    if past == 0:
        return _padded(v, q.size(-1), lambda v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                             enable_gqa=gqa))
    if t == 1:  # one new token sees everything cached
        return _decode_attention(q, k, v, scale)
    # query i sits at position past + i and sees keys 0..past + i
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per head: the heads sharing a KV head become the rows of one matmul.

    Two batched matmuls and a softmax, with no copy of k or v per head; on CPU, SDPA takes its
    unfused path here (GQA, or MLA's latent keys wider than its values) at several times the cost.
    """
    B, H, _, D = q.shape
    Hk = k.size(1)
    rows = q.reshape(B, Hk, H // Hk, D)  # T == 1: the query heads of each KV group, stacked
    scores = (rows @ k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scale  # softmax in >= fp32
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return (weights @ v).reshape(B, H, 1, v.size(-1))


def _padded(v: torch.Tensor, width: int, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """attend(v) with v zero-padded to the query/key head width, then cut back.

    Fused SDPA kernels want one head width; MLA's values are narrower than its keys (64 vs 96 in
    `small`), which sends SDPA down its unfused path that stores the full T x T attention matrix.
    """
    dv = v.size(-1)
    if dv >= width:
        return attend(v)
    return attend(F.pad(v, (0, width - dv)))[..., :dv]
