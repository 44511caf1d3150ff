"""Causal scaled-dot-product attention for a chunk of new queries after `past` cached positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# bf16 attention from scratch on CPU runs as explicit matmuls (below) up to this many positions,
# and while the scores it keeps for the backward (B x H x T x T) stay this small (16 MiB a layer).
EXPLICIT_MAX_LEN = 512
EXPLICIT_MAX_SCORES = 1 << 23


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, past: int) -> torch.Tensor:
    """q (B, H, T, D), k (B, Hk, S, D), v (B, Hk, S, Dv) with S = past + T; Hk divides H (GQA/MQA)."""
    t, s = q.size(2), k.size(2)
    if (past == 0 and q.device.type == "cpu" and q.dtype == torch.bfloat16 and s <= EXPLICIT_MAX_LEN
            and q.size(0) * q.size(1) * t * s <= EXPLICIT_MAX_SCORES):
        return explicit_causal_attention(q, k, v, scale)
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


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * Q K^T + causal mask) V with every T x T score in memory, shapes as causal_attention's (past 0).

    SDPA's CPU flash kernel runs bf16 at float32 speed (no bf16 dot products); on short sequences
    one bf16 batched matmul of all scores, a softmax and one more matmul is 1.7-2x faster for
    forward and backward (Zen 4 EPYC; a similar version: 1.16x on a Xeon), though it computes
    the masked half too, which loses past 512 positions. The scores are rounded to bf16 before
    the softmax, as in Megatron's unfused attention; the softmax itself accumulates in float32.
    (Not for fp16: CPUs without fp16 matmul units run its bmm many times slower, and fp16 scores
    can overflow.)
    """
    B, H, T, D = q.shape
    Hk = k.size(1)
    group = H // Hk  # the query heads sharing a KV head become one block of rows: no K/V expansion
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1).repeat(group, 1)
    k, v = k.to(q.dtype).reshape(B * Hk, T, D), v.to(q.dtype).reshape(B * Hk, T, -1)  # autocast may mix dtypes
    scores = torch.baddbmm(future, q.reshape(B * Hk, group * T, D), k.transpose(1, 2), alpha=scale)
    return (scores.softmax(dim=-1) @ v).view(B, H, T, -1)
