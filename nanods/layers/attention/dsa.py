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
import torch.nn.functional as F

from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.layers.attention.cache import LayerCache
from nanods.layers.attention.indexer import LightningIndexer, pick
from nanods.layers.attention.mla import MultiHeadLatentAttention, per_head

GATHER_ELEMENTS = 1 << 24  # gathered latent values per chunk of queries: 64 MiB in float32
# In training, up to this many (query, position) pairs (a 2K sequence), masking every score but the picks is
# cheaper than gathering the picked rows, whose backward scatters them back: small's 8 x 256 training step in
# the sparse stage went from 750 to 2,300 tokens/s on a 2-core Xeon. Without a backward, gathering wins.
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
        self.indexer_uniform: torch.Tensor | None = None  # the KL a uniform indexer would have (for the logs)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        q_nope, q_pe, q_latent = self.queries(x, pos)
        latent, keys = self.latent(x, pos), self.indexer.keys(x, pos)
        past = 0
        if cache is not None:
            past = cache.length
            latent, keys = cache.append(latent=latent, index_key=keys)
        learn = self.training and torch.is_grad_enabled()
        T, S = x.size(1), latent.size(1)
        if self.dense or S <= self.topk:  # every visible position is kept: this is MLA
            if not learn:
                return self.output(self.attend_latent(q_nope, q_pe, latent, past))
            causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril().expand(x.size(0), T, S)
            y, target = self.attend_masked(q_nope, q_pe, latent, causal)  # training: no cache, query t at t
            self.indexer_loss = self._kl(self._learned_scores(x, q_latent, pos), target, causal)
            return self.output(y)
        if not learn:
            picks, valid = self.indexer.select(x, q_latent, pos, keys, past, self.topk)
            return self.output(self.attend_selected(q_nope, q_pe, latent, picks, valid, with_target=False)[0])
        scores = self._learned_scores(x, q_latent, pos)  # scored once: the picks and the KL both read them
        picks, valid = pick(scores.detach(), 0, self.topk)  # training: no cache, query t at position t
        if T * S <= MASKED_SCORES:
            allowed = torch.zeros(x.size(0), T, S, dtype=torch.bool, device=x.device).scatter(-1, picks, valid)
            y, weights = self.attend_masked(q_nope, q_pe, latent, allowed)
            target = _renormalised(weights.gather(-1, picks))
        else:
            y, target = self.attend_selected(q_nope, q_pe, latent, picks, valid)
        self.indexer_loss = self._kl(scores.gather(-1, picks), target, valid)
        return self.output(y)

    def _learned_scores(self, x: torch.Tensor, q_latent: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The indexer's scores (B, T, T) of a training forward (no cache), from detached inputs: their
        gradient, through the KL, reaches the indexer alone."""
        x, q_latent = x.detach(), q_latent.detach()
        return self.indexer.scores(x, q_latent, pos, self.indexer.keys(x, pos))

    def _kl(self, scores: torch.Tensor, target: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Mean over queries of KL(target || softmax of the indexer's scores) over the `visible` positions
        (all three (B, T, S), or (B, T, k) over each query's picks)."""
        log_q = torch.log_softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        neg_entropy = torch.xlogy(target, target).sum(-1)
        # what an indexer that learned nothing (uniform over the same positions) would score: the scale to read
        # the KL against, as the attention it follows sharpens from uniform when training starts from scratch
        self.indexer_uniform = (neg_entropy + visible.sum(-1).to(target.dtype).log()).mean().detach()
        return (neg_entropy - (target * log_q.masked_fill(~visible, 0.0)).sum(-1)).mean()

    def attend_selected(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, picks: torch.Tensor,
                        valid: torch.Tensor, with_target: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each query attends to its picked latent rows (B, T, k) only (`valid` False: no row), absorbed
        as in MLA's decoding: scores q_nope.W_UK.c_kv + q_pe.k_pe, values c_kv.W_UV.

        Returns (B, T, H, v_dim) and, with_target, the attention over the picks summed over heads and
        renormalised (B, T, k), detached: the indexer's target. Without it the weights are never
        written out: each query is its own sequence of k rows for the fused SDPA kernel.
        """
        B, T, k = picks.shape
        width = latent.size(-1)
        q, w_uv = self.absorbed_queries(q_nope, q_pe)
        chunk = max(1, GATHER_ELEMENTS // (B * k * width))
        outputs, targets = [], []
        for start in range(0, T, chunk):
            end = min(T, start + chunk)
            # only the picked rows; index_select per sequence: a cached latent is a view that rows of one
            # sequence can index without a copy, and it runs 2x faster than advanced indexing on CPU
            rows = [seq.index_select(0, p.flatten()) for seq, p in zip(latent, picks[:, start:end])]
            kv = (rows[0][None] if B == 1 else torch.stack(rows)).view(B, end - start, k, width).to(q.dtype)
            if with_target:
                scores = torch.einsum("bhtw,btkw->bhtk", q[:, :, start:end], kv) * self.softmax_scale
                weights = torch.softmax(scores.float().masked_fill(~valid[:, None, start:end], float("-inf")), dim=-1)
                outputs.append(torch.einsum("bhtk,btkr->bhtr", weights.to(q.dtype), kv[..., : self.rank]))
                targets.append(_renormalised(weights.detach().sum(1)))
            else:  # per query: its H heads are the query rows, its k picks the keys and values
                n = B * (end - start)
                heads = q[:, :, start:end].transpose(1, 2).reshape(n, 1, self.n_head, width)
                kv = kv.view(n, 1, k, width)
                o = F.scaled_dot_product_attention(heads, kv, kv, attn_mask=valid[:, start:end].reshape(n, 1, 1, k),
                                                   scale=self.softmax_scale)
                outputs.append(o.view(B, end - start, self.n_head, width)[..., : self.rank].transpose(1, 2))
        o_latent = torch.cat(outputs, dim=2)  # (B, H, T, rank)
        y = per_head(o_latent, w_uv.transpose(1, 2)).transpose(1, 2)
        return y, torch.cat(targets, dim=1) if with_target else None

    def attend_masked(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, allowed: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Absorbed attention over every latent row (B, S, ...) with the scores where `allowed` (B, T, S) is
        False masked: short contexts, and the dense stage in training. Returns (B, T, H, v_dim) and the
        attention summed over heads and renormalised (B, T, S), detached: the indexer's target."""
        q, w_uv = self.absorbed_queries(q_nope, q_pe)
        scores = torch.einsum("bhtw,bsw->bhts", q, latent.to(q.dtype)) * self.softmax_scale
        weights = torch.softmax(scores.float().masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        o_latent = torch.einsum("bhts,bsr->bhtr", weights.to(q.dtype), latent[..., : self.rank].to(q.dtype))
        return per_head(o_latent, w_uv.transpose(1, 2)).transpose(1, 2), _renormalised(weights.detach().sum(1))

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


def _renormalised(weights: torch.Tensor) -> torch.Tensor:
    """Rows (over the last dim) scaled to sum to 1."""
    return weights / weights.sum(-1, keepdim=True)
