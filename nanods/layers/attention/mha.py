"""Multi-head attention with grouped KV heads (GQA), per-head QK RMSNorm and rotary positions."""

from __future__ import annotations

import torch
from torch import nn

from nanods.config import NanoDeepSeekConfig
from nanods.layers.attention.cache import LayerCache
from nanods.layers.attention.sdpa import causal_attention
from nanods.layers.norm import RMSNorm
from nanods.layers.rope import Rope, apply_rope


class MultiHeadAttention(nn.Module):
    """Standard attention; caches full keys and values: 2 * n_kv_head * head_dim values per token."""

    attend = staticmethod(causal_attention)  # the attention kernel (nanods.fast_paths may swap in a faster one)

    def __init__(self, config: NanoDeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.wq = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.wkv = nn.Linear(config.n_embd, 2 * self.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_weights) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_weights) if config.qk_norm else None
        self.rotary = Rope.from_config(config)  # YaRN's frequencies and cos/sin scale too, not MLA's softmax scale

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim)
        k, v = self.wkv(x).view(B, T, 2, self.n_kv_head, self.head_dim).unbind(2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, pos, self.rotary)
        k = apply_rope(k, pos, self.rotary)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k=k, v=v)
        y = self.attend(q, k, v, self.head_dim ** -0.5, past)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    def init_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> LayerCache:
        shape = (batch, self.n_kv_head, max_len, self.head_dim)
        return LayerCache(2, k=torch.zeros(shape, device=device, dtype=dtype),
                          v=torch.zeros(shape, device=device, dtype=dtype))

    @classmethod
    def kv_cache_bytes_per_token(cls, config: NanoDeepSeekConfig, dtype: torch.dtype) -> int:
        """Bytes one layer caches per token."""
        return 2 * config.n_kv_head * config.head_dim * dtype.itemsize

    @classmethod
    def attention_flops_per_token(cls, config: NanoDeepSeekConfig, context: int, decode: bool) -> int:
        """Score and value FLOPs of one layer for one query over `context` keys (matmuls by weights excluded)."""
        return 2 * config.n_head * 2 * config.head_dim * context
