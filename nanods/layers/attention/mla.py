"""Multi-head latent attention (DeepSeek-V2/V3).

Keys and values are compressed into one latent c_kv (kv_lora_rank wide); positions ride on a
separate, decoupled rope key k_pe shared by all heads. The cache holds only [c_kv ; k_pe].
Training and prefill decompress the latent (W_UK, W_UV = the halves of wkv_b); decoding
absorbs W_UK into the query and W_UV into the output, so attention runs in latent space and
the cache is never decompressed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.layers.attention.cache import LayerCache
from nanods.layers.attention.sdpa import causal_attention
from nanods.layers.norm import RMSNorm
from nanods.layers.rope import Rope, apply_rope

LATENT_NORM_EPS = 1e-6  # DeepSeek fixes the latent norms' eps (its RMSNorm default), whatever norm_eps is


class MultiHeadLatentAttention(nn.Module):
    attend = staticmethod(causal_attention)  # the attention kernel (nanods.fast_paths may swap in a faster one)

    @dataclass
    class Config:
        absorb: str = "auto"  # "auto": absorbed when new tokens follow a cached prefix; "always"; "never"

    def __init__(self, config: NanoDeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        opts = self.Config(**config.attention_options)  # keys and types checked by the registry before building
        if opts.absorb not in ("auto", "always", "never"):
            raise NanodsError(f"attention_options.absorb must be auto, always or never, got '{opts.absorb}'")
        self.absorb = opts.absorb
        C, H = config.n_embd, config.n_head
        self.n_head, self.rank = H, config.kv_lora_rank
        self.nope, self.rope, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        qk_dim = self.nope + self.rope
        if config.q_lora_rank:  # query compression: x -> c_q -> norm -> per-head queries
            self.wq_a = nn.Linear(C, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS, config.norm_weights)
            self.wq_b = nn.Linear(config.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.wq = nn.Linear(C, H * qk_dim, bias=False)
        self.wkv_a = nn.Linear(C, self.rank + self.rope, bias=False)  # -> [c_kv ; k_pe]
        self.kv_norm = RMSNorm(self.rank, LATENT_NORM_EPS, config.norm_weights)  # MLA's QK-norm
        self.wkv_b = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)  # [W_UK ; W_UV] per head
        self.wo = nn.Linear(H * self.v_dim, C, bias=False)
        self.rotary = Rope.from_config(config)
        # the score scale of the decompressed head width, also on the absorbed path (not SDPA's default), and YaRN's
        self.softmax_scale = qk_dim ** -0.5 * self.rotary.softmax_factor

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        q_nope, q_pe, _ = self.queries(x, pos)
        latent = self.latent(x, pos)  # (B, T, rank + rope): all that is cached
        past = 0
        if cache is not None:
            past = cache.length
            (latent,) = cache.append(latent=latent)
        return self.output(self.attend_latent(q_nope, q_pe, latent, past))

    def queries(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q_nope, q_pe) per head, (B, T, H, nope / rope), rope applied; and the query latent (None without)."""
        B, T, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x)) if self.config.q_lora_rank else None
        q = self.wq_b(q_latent) if q_latent is not None else self.wq(x)
        q_nope, q_pe = q.view(B, T, self.n_head, -1).split([self.nope, self.rope], dim=-1)
        return q_nope, apply_rope(q_pe, pos, self.rotary), q_latent

    def latent(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The cached rows [kv_norm(c_kv) ; k_pe] (B, T, rank + rope), rope applied to k_pe."""
        c_kv, k_pe = self.wkv_a(x).split([self.rank, self.rope], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), pos, self.rotary).squeeze(2)
        return torch.cat([self.kv_norm(c_kv), k_pe], dim=-1)

    def attend_latent(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, past: int) -> torch.Tensor:
        """Causal attention of the queries over every latent row -> (B, T, H, v_dim): absorbed or naive."""
        absorbed = self.absorb == "always" or (self.absorb == "auto" and past > 0)
        return self._attend_absorbed(q_nope, q_pe, latent, past) if absorbed else self._attend_naive(q_nope, q_pe, latent, past)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """(B, T, H, v_dim) -> (B, T, C) through wo."""
        B, T = y.shape[:2]
        return self.wo(y.reshape(B, T, self.n_head * self.v_dim))

    def _attend_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, past: int) -> torch.Tensor:
        """Decompress every latent into per-head keys and values, then ordinary attention."""
        B, S, _ = latent.shape
        c_kv, k_pe = latent.split([self.rank, self.rope], dim=-1)
        k_nope, v = self.wkv_b(c_kv).view(B, S, self.n_head, -1).split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, S, self.n_head, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        y = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale, past)
        return y.transpose(1, 2)  # (B, T, H, v_dim)

    def _attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, past: int) -> torch.Tensor:
        """q_nope·W_UK^T·c_kv == q_nope·k_nope; attention in latent space is MQA over the cache itself."""
        q, w_uv = self.absorbed_queries(q_nope, q_pe)
        kv = latent.unsqueeze(1).to(q.dtype)  # one shared "head": keys [c_kv ; k_pe], values c_kv
        # values = keys = the cached rows, so SDPA sees one head width; the k_pe columns of the output are cut
        o_latent = self.attend(q, kv, kv, self.softmax_scale, past)[..., : self.rank]  # (B, H, T, rank)
        return per_head(o_latent, w_uv.transpose(1, 2)).transpose(1, 2)  # (B, T, H, v_dim)

    def absorbed_queries(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries in latent space [q_nope·W_UK ; q_pe] (B, H, T, rank + rope), and W_UV (H, v_dim, rank)."""
        w_kv = self.wkv_b.weight.view(self.n_head, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w_kv[:, : self.nope], w_kv[:, self.nope :]
        q_latent = per_head(q_nope.transpose(1, 2), w_uk)  # (B, H, T, rank)
        return torch.cat([q_latent, q_pe.transpose(1, 2).to(q_latent.dtype)], dim=-1), w_uv

    def init_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> LayerCache:
        return LayerCache(1, latent=torch.zeros(batch, max_len, self.rank + self.rope, device=device, dtype=dtype))

    @classmethod
    def kv_cache_bytes_per_token(cls, config: NanoDeepSeekConfig, dtype: torch.dtype) -> int:
        """Bytes one layer caches per token: the latent plus the shared rope key."""
        return (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize

    @classmethod
    def attention_flops_per_token(cls, config: NanoDeepSeekConfig, context: int, decode: bool) -> int:
        """Score and value FLOPs of one layer for one query over `context` keys; absorbed when decoding."""
        H, r, rope = config.n_head, config.kv_lora_rank, config.qk_rope_head_dim
        if decode:
            return 2 * H * (r + rope + r) * context
        return 2 * H * (config.qk_nope_head_dim + rope + config.v_head_dim) * context


def per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, i) times each head's own matrix w (H, i, o) -> (B, H, T, o).

    One bmm over heads with batch and time folded into rows: `x @ w` would broadcast w to
    (B, H, i, o) and copy it once per sequence (a fifth of a batch-8 decode step on CPU).
    """
    B, H, T, _ = x.shape
    rows = x.transpose(0, 1).reshape(H, B * T, -1)
    return (rows @ w.to(x.dtype)).view(H, B, T, -1).transpose(0, 1)
