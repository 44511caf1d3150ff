"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2): which past positions each query reads.

A few small heads score every (query t, key s) pair cheaply:

    I(t, s) = sum_j w(t, j) * ReLU(q(t, j) . k(s))

q(t, j) comes from the query latent (MLA's compressed query), k(s) is one key per position from
the hidden state through a LayerNorm, and w(t, j) a per-head weight from the hidden state. The
first qk_rope_head_dim dimensions of q and k carry the rotary embedding, rotated as halves
(pairs (i, i + d/2)), not as MLA's interleaved pairs. The attention then reads only the
index_topk best-scoring positions of each query.
"""

from __future__ import annotations

import torch
from torch import nn

from nanods.config import NanoDeepSeekConfig
from nanods.layers.rope import Rope, apply_rope

SCORE_ELEMENTS = 1 << 24  # scores computed per chunk of queries (heads x queries x keys): 64 MiB in float32
FEW_ROWS = 32  # (query, head) pairs up to which the scores are computed position-major


class LightningIndexer(nn.Module):
    def __init__(self, config: NanoDeepSeekConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.rope = config.index_n_heads, config.index_head_dim, config.qk_rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.n_embd, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.n_embd, self.n_heads, bias=False)
        self.rotary = Rope.from_config(config)
        # transformers' DeepseekV32: q.k scaled by head_dim^-0.5 inside the ReLU, weights by n_heads^-0.5
        self.scale = self.head_dim ** -0.5 * self.n_heads ** -0.5

    def _rotate(self, t: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rope on the first `rope` dimensions of t (B, T, heads, head_dim), the rest untouched."""
        rot, rest = t.split([self.rope, self.head_dim - self.rope], dim=-1)
        return torch.cat([apply_rope(rot, pos, self.rotary), rest], dim=-1)

    def keys(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One key per position (B, T, head_dim): what the cache keeps beside MLA's latent."""
        return self._rotate(self.k_norm(self.wk(x)).unsqueeze(2), pos).squeeze(2)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
               rows: slice = slice(None)) -> torch.Tensor:
        """I(t, s) (B, T', S) in float32 for the queries `rows` of x (B, T, C) / q_latent at positions pos,
        against every key (B, S, head_dim)."""
        x, q_latent, pos = x[:, rows], q_latent[:, rows], pos[:, rows]
        B, T, _ = x.shape
        q = self._rotate(self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim), pos)
        w = self.weights_proj(x)  # (B, T, heads)
        with torch.autocast(x.device.type, enabled=False):
            # q.k in the model's dtype: bf16 weights decode with no float32 copy of every cached key per step (as
            # transformers computes it), a float32 model under bf16 autocast trains in float32; the weighted sum
            # over heads in float32
            dtype = torch.promote_types(keys.dtype, x.dtype)
            q, keys = q.to(dtype).flatten(1, 2), keys.to(dtype)  # (B, T x heads, D), (B, S, D)
            w = w.float() * self.scale  # (B, T, heads)
            if T * self.n_heads <= FEW_ROWS:  # decoding: keys @ q^T, 4x faster on CPU for 4 rows and 16K keys
                dots = (keys @ q.transpose(1, 2)).float().relu().view(B, -1, T, self.n_heads)  # (B, S, T, heads)
                return (dots.transpose(1, 2) @ w.unsqueeze(-1)).squeeze(-1)
            dots = (q @ keys.transpose(1, 2)).view(B, T, self.n_heads, -1).float().relu()  # (B, T, heads, S)
            return (w.unsqueeze(2) @ dots).squeeze(2)

    def select(self, x: torch.Tensor, q_latent: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, past: int,
               topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The topk best positions of each query (B, T, topk) among those it may see (s <= past + t), and
        whether each pick is such a position (False where fewer than topk exist yet).

        Scores are computed a chunk of queries at a time, so a long prefill never holds a dense
        (heads, T, S) score tensor; selection carries no gradient.
        """
        B, T, _ = x.shape
        S = keys.size(1)
        per_query = self.n_heads * S * B
        # one chunk when all fit (always when decoding): a compiled decode step then has no loop bound on S
        chunk = T if T * per_query <= SCORE_ELEMENTS else max(1, SCORE_ELEMENTS // per_query)
        picks, valid = [], []
        with torch.no_grad():
            for start in range(0, T, chunk):
                rows = slice(start, min(T, start + chunk))
                top, real = pick(self.scores(x, q_latent, pos, keys, rows), past + start, topk)
                picks.append(top)
                valid.append(real)
        return torch.cat(picks, dim=1), torch.cat(valid, dim=1)


def pick(scores: torch.Tensor, first: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The topk best positions (B, T, topk) by scores (B, T, S) of queries at positions first, first + 1, ...
    among those each may see (s <= its position), and whether each pick is such a position (False where
    fewer than topk exist yet)."""
    T, S = scores.shape[-2:]
    query = torch.arange(first, first + T, device=scores.device)
    if first + 1 < S:  # some query may not see every key (not so when decoding)
        scores = scores.masked_fill(torch.arange(S, device=scores.device) > query[:, None], float("-inf"))
    top = top_positions(scores, min(topk, S))
    return top, top <= query[:, None]


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best positions of each row of scores (..., S), equal scores going to the earlier position
    (the stable sort's choice), so that a cached decode step picks what the full forward picks.

    A float topk decides alone unless a score equal to its k-th best was left out (for example ReLU's
    zeros, when fewer than k scores are positive): which of equal scores topk keeps depends on the
    row's length, so then the positions are ranked exactly (as they always are compiled or on a GPU).
    """
    # compiled, or on a GPU (where the check would wait for the device in every layer), always rank exactly
    if scores.device.type == "cpu" and not torch.compiler.is_compiling():
        values, picks = scores.topk(k, dim=-1, sorted=False)
        kth = values.amin(-1, keepdim=True)
        straddles = (scores == kth).sum(-1) > (values == kth).sum(-1)
        # a k-th score of -inf (a query seeing fewer than k positions) keeps every visible one whatever the tie
        if not bool((straddles & (kth.squeeze(-1) > float("-inf"))).any()):
            return picks
    return ranks(scores).topk(k, dim=-1, sorted=False).indices


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys (..., S) that order float32 scores (..., S) as numbers do, equal scores (ReLU's zeros
    are common) ranked by position, earlier first.

    Every key is distinct, so the top k are one set whatever the row length: a cached decode step
    picks what the full forward picks, where a plain topk breaks ties differently per shape. One
    O(S) topk on these keys replaces a stable sort of every row.
    """
    bits = (scores + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into 0.0, the same number
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats' bits count the wrong way
    position = torch.arange(scores.size(-1), device=scores.device)
    return ordered * 2**32 + (2**32 - 1 - position)  # fits: -2^31 <= ordered < 2^31
