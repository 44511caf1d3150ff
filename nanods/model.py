"""NanoDeepSeek: token embedding -> n_layer x [norm -> attention, norm -> FFN] -> norm -> head.

Attention, FFN and router are components looked up in the registry, so this file reads the same
for MHA or MLA, dense or MoE, and for any plugin.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from nanods import registry
from nanods.config import NanoDeepSeekConfig
from nanods.layers.cross_entropy import linear_cross_entropy
from nanods.layers.norm import RMSNorm


class LossTerms(NamedTuple):
    total: torch.Tensor  # what the optimizer minimises
    ce: torch.Tensor  # mean next-token cross-entropy
    aux: torch.Tensor  # sum of the layers' auxiliary (balance) losses, already weighted


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, config: NanoDeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_weights)
        self.attn = registry.build("attention", config.attention, config, layer_idx)
        self.ffn_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_weights)
        ffn = "dense" if layer_idx < config.first_k_dense else config.ffn  # DeepSeek keeps the first layers dense
        self.ffn = registry.build("ffn", ffn, config, layer_idx)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attn(self.attn_norm(x), pos, cache)
        out = self.ffn(self.ffn_norm(x))
        y, aux = out if isinstance(out, tuple) else (out, None)
        return x + y, aux


class NanoDeepSeek(nn.Module):
    def __init__(self, config: NanoDeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_weights)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Linear and embedding weights ~ N(0, 0.02); other parameters keep their component's own init."""
        if isinstance(module, (nn.Linear, nn.Embedding)):  # no projection has a bias
            nn.init.normal_(module.weight, std=0.02)

    def hidden(self, idx: torch.Tensor, cache: list | None = None, start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final hidden states (B, T, C) before the last norm, and the summed auxiliary loss (or None)."""
        B, T = idx.shape
        if start_pos + T > self.config.sequence_len:
            raise ValueError(f"positions up to {start_pos + T} exceed sequence_len={self.config.sequence_len}")
        pos = torch.arange(start_pos, start_pos + T, device=idx.device).expand(B, T)
        x = self.embed(idx)
        aux = None
        for i, block in enumerate(self.blocks):
            x, layer_aux = block(x, pos, cache[i] if cache is not None else None)
            if layer_aux is not None:
                aux = layer_aux if aux is None else aux + layer_aux
        return x, aux

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: list | None = None,
                start_pos: int = 0, return_terms: bool = False) -> torch.Tensor | LossTerms:
        """idx (B, T) -> logits (B, T, vocab_size); with targets, the scalar training loss instead
        (all its LossTerms with return_terms=True, e.g. through a DDP wrapper)."""
        if targets is not None:
            terms = self.loss_terms(idx, targets)
            return terms if return_terms else terms.total
        h, _ = self.hidden(idx, cache, start_pos)
        return self.lm_head(self.norm(h))

    def loss_terms(self, idx: torch.Tensor, targets: torch.Tensor) -> LossTerms:
        """Cross-entropy (targets of -1 are ignored) plus the layers' auxiliary losses, kept apart for logging."""
        h, aux = self.hidden(idx)
        ce = linear_cross_entropy(self.norm(h).flatten(0, 1), self.lm_head.weight, targets.flatten(), ignore_index=-1)
        aux = aux if aux is not None else ce.new_zeros(())
        return LossTerms(ce + aux, ce, aux)

    def init_cache(self, batch: int, max_len: int, device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> list:
        """One preallocated cache per layer, from each attention's own init_cache."""
        p = self.lm_head.weight
        return [b.attn.init_cache(batch, max_len, device or p.device, dtype or p.dtype) for b in self.blocks]

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Cache bytes per token over all layers, from the attention component's own formula."""
        return sum(type(b.attn).kv_cache_bytes_per_token(self.config, dtype) for b in self.blocks)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, eos_id: int | None = None,
                 compile: bool = False, fast: bool = False) -> torch.Tensor:
        """Extend idx (B, T) by up to max_new_tokens with the KV cache -> (B, T + new); see nanods.generate."""
        from nanods.generate import stream

        new = list(stream(self, idx, max_new_tokens, temperature, top_k, top_p, seed, eos_id, compile=compile,
                          fast=fast))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
