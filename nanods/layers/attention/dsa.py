"""DeepSeek Sparse Attention (DeepSeek-V3.2): MLA that reads only the positions a lightning indexer picks.

The MLA part keeps MLA's weights and names, so an `mla` checkpoint initialises it. Per query, the
indexer (`indexer.py`) scores every visible position and the attention reads the index_topk best
ones: O(L x k) instead of O(L^2) once the context is longer than index_topk, and exactly MLA
while it is not. The selected latent rows are gathered and attended in MLA's absorbed latent
space, a chunk of queries at a time, for prefill, training and decoding alike; the cache holds
the indexer's key beside each latent row.

The top-k choice has no gradient, so the indexer learns by its own objective (the V3.2 report's):
in training, KL(p || softmax(I)) where p is the main attention's distribution, summed over heads
and renormalised, and I the indexer's scores, with p and the indexer's inputs detached, so that
this loss trains the indexer alone and the language-model loss everything else. With `dense`
set (the warm-up stage) the attention is MLA's over every position and the KL covers them all;
in the sparse stage it covers the selected positions. `indexer_loss` holds the last training
forward's value for the model to collect.
"""

from __future__ import annotations

import torch

from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.layers.attention.cache import LayerCache
from nanods.layers.attention.indexer import LightningIndexer
from nanods.layers.attention.mla import MultiHeadLatentAttention, per_head

GATHER_ELEMENTS = 1 << 24  # gathered latent values per chunk of queries: 64 MiB in float32
# Up to this many (query, position) pairs, e.g. a 2K training sequence, masking every score but the picks is
# cheaper than gathering the picked rows, whose backward scatters them back: small's 8 x 256 training step in
# the sparse stage went from 750 to 2,300 tokens/s on a 2-core Xeon
MASKED_SCORES = 1 << 22


class DeepSeekSparseAttention(MultiHeadLatentAttention):
    def __init__(self, config: NanoDeepSeekConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        if not config.q_lora_rank:
            raise NanodsError("attention 'dsa' needs query compression: its indexer reads the query latent; "
                              "set q_lora_rank > 0")
        self.indexer = LightningIndexer(config)
        self.topk = config.index_topk
        self.dense = False  # the dense warm-up stage: attend to every position (set by the trainer)
        self.indexer_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        q_nope, q_pe, q_latent = self.queries(x, pos)
        latent, keys = self.latent(x, pos), self.indexer.keys(x, pos)
        past = 0
        if cache is not None:
            past = cache.length
            latent, keys = cache.append(latent=latent, index_key=keys)
        learn = self.training and torch.is_grad_enabled()
        if self.dense or latent.size(1) <= self.topk:  # every visible position is kept: this is MLA
            if learn:
                self.indexer_loss = self._kl(x, q_latent, pos, self._dense_target(q_nope, q_pe, latent))
            return self.output(self.attend_latent(q_nope, q_pe, latent, past))
        picks, valid = self.indexer.select(x, q_latent, pos, keys, past, self.topk)
        attend = self.attend_masked if x.size(1) * latent.size(1) <= MASKED_SCORES else self.attend_selected
        y, target = attend(q_nope, q_pe, latent, picks, valid)
        if learn:
            self.indexer_loss = self._kl(x, q_latent, pos, target, picks, valid)
        return self.output(y)

    def _absorbed_queries(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries in latent space (B, H, T, rank + rope) and W_UV (H, v_dim, rank)."""
        w_kv = self.wkv_b.weight.view(self.n_head, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w_kv[:, : self.nope], w_kv[:, self.nope :]
        q_latent = per_head(q_nope.transpose(1, 2), w_uk)  # (B, H, T, rank)
        return torch.cat([q_latent, q_pe.transpose(1, 2).to(q_latent.dtype)], dim=-1), w_uv

    def _dense_target(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The main attention's distribution over every position (B, T, S), summed over heads and
        renormalised (training: no cache, so query t sits at position t)."""
        with torch.no_grad(), torch.autocast(latent.device.type, enabled=False):
            q, _ = self._absorbed_queries(q_nope.float(), q_pe.float())
            scores = torch.einsum("bhtw,bsw->bhts", q, latent.float()) * self.softmax_scale
            T, S = scores.shape[-2:]
            causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
            weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).sum(1)
            return weights / weights.sum(-1, keepdim=True)

    def _kl(self, x: torch.Tensor, q_latent: torch.Tensor, pos: torch.Tensor, target: torch.Tensor,
            picks: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over queries of KL(target || softmax of the indexer's scores), over every visible
        position (picks None) or over each query's picks; the indexer's inputs detached."""
        x, q_latent = x.detach(), q_latent.detach()
        scores = self.indexer.scores(x, q_latent, pos, self.indexer.keys(x, pos))  # (B, T, S), with gradients
        if picks is None:
            T, S = scores.shape[-2:]
            visible = torch.ones(T, S, dtype=torch.bool, device=x.device).tril()
        else:
            scores, visible = scores.gather(-1, picks), valid
        log_q = torch.log_softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        kl = torch.xlogy(target, target) - target * log_q.masked_fill(~visible, 0.0)
        return kl.sum(-1).mean()

    def attend_selected(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, picks: torch.Tensor,
                        valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query attends to its picked latent rows (B, T, k) only (`valid` False: no row), absorbed
        as in MLA's decoding: scores q_nope.W_UK.c_kv + q_pe.k_pe, values c_kv.W_UV.

        Returns (B, T, H, v_dim) and the attention over the picks summed over heads and renormalised
        (B, T, k), detached: the indexer's target.
        """
        B, T, k = picks.shape
        q, w_uv = self._absorbed_queries(q_nope, q_pe)
        batch = torch.arange(B, device=picks.device)[:, None, None]
        chunk = max(1, GATHER_ELEMENTS // (B * k * latent.size(-1)))
        outputs, targets = [], []
        for start in range(0, T, chunk):
            rows = slice(start, min(T, start + chunk))
            kv = latent[batch, picks[:, rows]].to(q.dtype)  # (B, T', k, rank + rope): only the picked rows
            scores = torch.einsum("bhtw,btkw->bhtk", q[:, :, rows], kv) * self.softmax_scale
            weights = torch.softmax(scores.float().masked_fill(~valid[:, None, rows], float("-inf")), dim=-1)
            outputs.append(torch.einsum("bhtk,btkr->bhtr", weights.to(q.dtype), kv[..., : self.rank]))
            summed = weights.detach().sum(1)
            targets.append(summed / summed.sum(-1, keepdim=True))
        o_latent = torch.cat(outputs, dim=2)  # (B, H, T, rank)
        return per_head(o_latent, w_uv.transpose(1, 2)).transpose(1, 2), torch.cat(targets, dim=1)

    def attend_masked(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, picks: torch.Tensor,
                      valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same result as attend_selected for short contexts: every score computed, all but the
        picks masked (the queries are the last T of S positions)."""
        B, T, _ = picks.shape
        S = latent.size(1)
        q, w_uv = self._absorbed_queries(q_nope, q_pe)
        allowed = torch.zeros(B, T, S, dtype=torch.bool, device=picks.device).scatter(-1, picks, valid)
        scores = torch.einsum("bhtw,bsw->bhts", q, latent.to(q.dtype)) * self.softmax_scale
        weights = torch.softmax(scores.float().masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        o_latent = torch.einsum("bhts,bsr->bhtr", weights.to(q.dtype), latent[..., : self.rank].to(q.dtype))
        summed = weights.detach().sum(1).gather(-1, picks)
        return per_head(o_latent, w_uv.transpose(1, 2)).transpose(1, 2), summed / summed.sum(-1, keepdim=True)

    def init_cache(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> LayerCache:
        return LayerCache(1, latent=torch.zeros(batch, max_len, self.rank + self.rope, device=device, dtype=dtype),
                          index_key=torch.zeros(batch, max_len, self.indexer.head_dim, device=device, dtype=dtype))

    @classmethod
    def kv_cache_bytes_per_token(cls, config: NanoDeepSeekConfig, dtype: torch.dtype) -> int:
        """Bytes one layer caches per token: MLA's latent and rope key, and the indexer's key."""
        return (config.kv_lora_rank + config.qk_rope_head_dim + config.index_head_dim) * dtype.itemsize

    @classmethod
    def attention_flops_per_token(cls, config: NanoDeepSeekConfig, context: int, decode: bool) -> int:
        """MLA's while the context fits index_topk; past it, the indexer's scores over the whole context and
        absorbed attention over the index_topk kept."""
        if context <= config.index_topk:
            return MultiHeadLatentAttention.attention_flops_per_token(config, context, decode)
        H, D = config.index_n_heads, config.index_head_dim
        return 2 * H * (D + 1) * context + MultiHeadLatentAttention.attention_flops_per_token(config, config.index_topk, True)
