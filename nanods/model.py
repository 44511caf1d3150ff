"""NanoDeepSeek: token embedding -> n_layer x [norm -> attention, norm -> FFN] -> norm -> head,
plus `mtp_depth` multi-token prediction modules that each guess one token further ahead.

Attention, FFN and router are components looked up in the registry, so this file reads the same
for MHA or MLA, dense or MoE, and for any plugin (the MTP modules' blocks included).
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
    mtp: torch.Tensor  # (mtp_depth,) mean cross-entropy of each MTP depth; empty without MTP or in eval mode
    indexer: torch.Tensor  # mean over layers of the sparse-attention indexers' KL losses (0 without an indexer)


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


class MTPModule(nn.Module):
    """Multi-token prediction depth k (DeepSeek-V3): from the previous depth's hidden state at t and
    the embedding of token t+k, one block computes the hidden state that predicts token t+k+1.

    h_k = block(eh_proj([enorm(emb(x_{t+k})); hnorm(h_{k-1}(t))])), logits = head(norm(h_k)), with
    the model's embedding and head. The embedding comes first in the concatenation, as in
    DeepSeek's released weights (the paper's figure draws the other order).
    """

    def __init__(self, config: NanoDeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        self.enorm = RMSNorm(config.n_embd, config.norm_eps, config.norm_weights)
        self.hnorm = RMSNorm(config.n_embd, config.norm_eps, config.norm_weights)
        self.eh_proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.block = Block(config, layer_idx)
        self.norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_weights)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, pos: torch.Tensor, cache: Any = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h (B, T, C) of depth k-1 at positions pos, emb (B, T, C) of the tokens k further -> (h_k, aux)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, pos, cache)


class NanoDeepSeek(nn.Module):
    def __init__(self, config: NanoDeepSeekConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_weights)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config, config.n_layer + k) for k in range(config.mtp_depth))
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
        """Cross-entropy (targets of -1 are ignored) plus the layers' auxiliary losses and, in training,
        mtp_loss_weight x the mean of the MTP depths' cross-entropies; each kept apart for logging.

        MTP depth k predicts targets[t + k] from position t, so it covers the first T - k positions:
        it never predicts past the batch's last target.
        """
        B, T = idx.shape
        h, aux = self.hidden(idx)
        ce = linear_cross_entropy(self.norm(h).flatten(0, 1), self.lm_head.weight, targets.flatten(), ignore_index=-1)
        aux = aux if aux is not None else ce.new_zeros(())
        mtp = []
        if self.training and self.mtp:
            if T <= len(self.mtp):
                raise ValueError(f"mtp_depth={len(self.mtp)} needs sequences longer than {len(self.mtp)} tokens, got {T}")
            pos = torch.arange(T, device=idx.device).expand(B, T)
            for k, module in enumerate(self.mtp, start=1):
                h, layer_aux = module(h[:, :-1], self.embed(idx[:, k:]), pos[:, :T - k])
                aux = aux + layer_aux if layer_aux is not None else aux
                mtp.append(linear_cross_entropy(module.norm(h).flatten(0, 1), self.lm_head.weight,
                                                targets[:, k:].flatten(), ignore_index=-1))
        mtp = torch.stack(mtp) if mtp else ce.new_zeros(0)
        indexer = self._indexer_loss() if self.training else None
        total = ce + aux + (self.config.mtp_loss_weight * mtp.mean() if mtp.numel() else 0) \
            + (indexer if indexer is not None else 0)
        return LossTerms(total, ce, aux, mtp, indexer if indexer is not None else ce.new_zeros(()))

    def _indexer_loss(self) -> torch.Tensor | None:
        """The mean of the losses that attentions with a learned indexer (DSA) left in their last training
        forward; it trains the indexers alone (their inputs are detached)."""
        losses = []
        for block in [*self.blocks, *(m.block for m in self.mtp)]:
            loss = getattr(block.attn, "indexer_loss", None)
            if loss is not None:
                losses.append(loss)
                block.attn.indexer_loss = None
        return torch.stack(losses).mean() if losses else None

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
                 compile: bool = False, fast: bool = False, speculative: bool = False) -> torch.Tensor:
        """Extend idx (B, T) by up to max_new_tokens with the KV cache -> (B, T + new); see nanods.generate
        (speculative=True drafts with the MTP modules: nanods.speculative)."""
        from nanods.generate import stream

        new = list(stream(self, idx, max_new_tokens, temperature, top_k, top_p, seed, eos_id, compile=compile,
                          fast=fast, speculative=speculative))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
