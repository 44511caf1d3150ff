"""Self-speculative decoding: the MTP modules draft, the main model verifies.

One round, with the next token x_n chosen and the main cache holding positions 0..n-1:
1. draft: MTP depth k turns (h_{k-1}(n-1), x_{n+k-1}) into a guess d_k for x_{n+k}, for
   k = 1..mtp_depth (d_0 = x_n; the guesses feed the deeper depths);
2. verify: one forward of the main model over [x_n, d_1, ..., d_D] on its cache gives its own
   distribution p_j at each of those positions;
3. accept d_1, d_2, ... while they pass the check (greedy: d_j is p_{j-1}'s argmax; sampling:
   d_j is kept with probability min(1, p(d_j) / q(d_j)), q the drafting distribution), then take
   one more token from p: the first rejected position's residual max(0, p - q) renormalised, or
   p_D after all D were accepted;
4. roll back: every cache is truncated past what the accepted tokens justify (no copy).

The emitted tokens follow the main model's distribution exactly (greedy: the same tokens as plain
decoding), whatever the drafts were; good drafts only make rounds emit more. Rows of a batch
share one cache length, so a round keeps the fewest tokens any unfinished row accepted; a row
that accepted more emits its accepted draft there, which is still a draw from p.

Every depth keeps a cache of its own block. Depth k's entry at position p reads token p+k, so
after a round that ends at position m (the last token with a cached main entry) depth k keeps
the entries p <= m - k: the later ones read drafts that are not yet, or no longer, the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nanods.compiling import compiled
from nanods.layers.ffn.dispatch import FEW_TOKENS
from nanods.sampling import sampling_probs

if TYPE_CHECKING:  # model.py imports generate, which imports this module
    from nanods.model import NanoDeepSeek


@dataclass
class SpeculationStats:
    """Drafts checked and accepted at each depth (depth j counts only rounds whose drafts 1..j-1 passed)."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rounds: int = 0  # verify forwards of the main model
    tokens: int = 0  # tokens those rounds produced, one row's worth (rows of a batch emit together)

    def acceptance(self) -> list[float]:
        """The share of checked drafts accepted, per depth."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]


class SelfSpeculation:
    """Speculative decoding of one batch: its token buffer, every cache, the hidden states between depths.

    `start(idx)` runs the prompt and returns the main model's logits for the first new token;
    each `round(token, finished)` takes the token just chosen and returns the tokens that follow
    it (accepted drafts, then one token of the main model's own) as (B,) tensors.
    """

    def __init__(self, model: NanoDeepSeek, batch: int, max_len: int, temperature: float, top_k: int | None,
                 top_p: float | None, generator: torch.Generator, limit: int, stats: SpeculationStats,
                 compile: bool = False) -> None:
        if not model.mtp:
            raise ValueError("speculative decoding drafts with the MTP modules, and this model has mtp_depth = 0")
        w = model.lm_head.weight
        self.model, self.max_len, self.limit, self.stats = model, max_len, limit, stats
        self.sampling = (temperature, top_k, top_p) if temperature > 0 else None  # None: greedy
        self.generator = generator
        self.depth = len(model.mtp)
        # the main model's and each depth's forward, through torch.compile with compile=True (one sequence):
        # only for the few tokens of a round, which the experts take without a host sync; prompts run eagerly
        self.trunk, self.drafters = model.hidden, list(model.mtp)
        if compile:
            if batch != 1:
                raise ValueError("compiled speculative decoding runs one sequence: use one prompt row")
            self.trunk = compiled(model.hidden, "the speculative verify step")
            self.drafters = [compiled(m, f"MTP depth {k}'s draft step") for k, m in enumerate(model.mtp, start=1)]
        self.tokens = torch.zeros(batch, max_len, dtype=torch.long, device=w.device)
        self.cache = model.init_cache(batch, max_len)
        self.mtp_caches = [m.block.attn.init_cache(batch, max_len, w.device, w.dtype) for m in model.mtp]
        for cache in [*self.cache, *self.mtp_caches]:
            if not callable(getattr(cache, "truncate", None)):
                raise ValueError(f"speculative decoding rolls caches back, and {type(cache).__name__} has no "
                                 "truncate(length)")
        # hidden[k][:, p]: depth k's output at position p (k = 0: the main model's), depth k+1's input
        self.hidden = [w.new_zeros(batch, max_len, model.config.n_embd) for _ in range(self.depth)]
        self.cached = [0] * self.depth  # positions each depth's cache holds
        self.n = 0  # position of the token chosen last
        if len(stats.drafted) != self.depth:  # a fresh stats object (one passed again keeps adding up)
            stats.drafted, stats.accepted = [0] * self.depth, [0] * self.depth

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(logits[..., :self.limit], *self.sampling)

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def _main(self, idx: torch.Tensor, start: int) -> torch.Tensor:
        """The main model over idx (B, T) at positions start.. on its cache -> logits (B, T, V)."""
        trunk = self.trunk if idx.size(1) <= FEW_TOKENS else self.model.hidden
        h, _ = trunk(idx, self.cache, start)
        self.hidden[0][:, start:start + idx.size(1)] = h
        return self.model.lm_head(self.model.norm(h))

    def start(self, idx: torch.Tensor) -> torch.Tensor:
        """Prefill the prompt idx (B, T) -> the logits (B, V) of the token after it."""
        self.tokens[:, :idx.size(1)] = idx
        self.n = idx.size(1)
        return self._main(idx, 0)[:, -1]

    def _draft(self, count: int) -> list[torch.Tensor]:
        """Write drafts d_1..d_count after x_n into the token buffer -> their drafting distributions
        (empty when greedy)."""
        model, n, qs = self.model, self.n, []
        rows = self.tokens.size(0)
        for k, (module, draft) in enumerate(zip(model.mtp[:count], self.drafters), start=1):
            first = self.cached[k - 1]  # each depth catches up from where its cache stops
            pos = torch.arange(first, n, device=self.tokens.device).expand(rows, -1)
            draft = draft if n - first <= FEW_TOKENS else module
            h, _ = draft(self.hidden[k - 1][:, first:n], model.embed(self.tokens[:, first + k:n + k]), pos,
                         self.mtp_caches[k - 1])
            self.cached[k - 1] = n
            if k < self.depth:
                self.hidden[k][:, first:n] = h
            logits = model.lm_head(module.norm(h[:, -1]))
            if self.sampling is None:
                self.tokens[:, n + k] = logits[:, :self.limit].argmax(-1)
            else:
                qs.append(self._probs(logits))
                self.tokens[:, n + k] = self._draw(qs[-1])
        return qs

    def round(self, token: torch.Tensor, finished: torch.Tensor) -> list[torch.Tensor]:
        """The tokens after `token` (x_n, (B,)); rows `finished` (B,) have ended and limit nothing."""
        n = self.n
        self.tokens[:, n] = token
        count = min(self.depth, self.max_len - 1 - n)  # never past the preallocated length
        qs = self._draft(count)
        drafts = self.tokens[:, n + 1:n + 1 + count]
        logits = self._main(self.tokens[:, n:n + 1 + count], n)  # the main model at x_n and every draft
        if self.sampling is None:
            best = logits[..., :self.limit].argmax(-1)  # (B, count + 1)
            passed = best[:, :count] == drafts
        else:
            p, q = self._probs(logits), torch.stack(qs, dim=1) if qs else None
            if count:  # keep d_j with probability min(1, p(d_j) / q(d_j))
                p_d = p[:, :count].gather(-1, drafts[..., None]).squeeze(-1)
                q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
                u = torch.rand(p_d.shape, generator=self.generator, device=p_d.device)
                passed = u * q_d < p_d
            else:
                passed = drafts.new_zeros(drafts.shape, dtype=torch.bool)
        run = passed.long().cumprod(dim=1)  # 1 while every draft so far passed
        accepted = int(run.sum(1).masked_fill(finished, count).min()) if count else 0
        self._count(passed, run, finished)
        if self.sampling is None:  # a row that passed draft accepted+1 has that draft as its argmax too
            last = best[:, accepted]
        elif accepted == count:  # every draft passed: one more token from p after the last
            last = self._draw(p[:, count])
        else:  # a row that passed draft accepted+1 emits it, the others draw from max(0, p - q)
            residual = (p[:, accepted] - q[:, accepted]).clamp_min(0)
            total = residual.sum(-1, keepdim=True)
            residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p[:, accepted])  # p == q: never rejected
            last = torch.where(run[:, accepted].bool(), drafts[:, accepted], self._draw(residual))
        self._roll_back(n + accepted + 1)
        self.stats.rounds += 1
        self.stats.tokens += accepted + 1
        return [*drafts[:, :accepted].unbind(1), last]

    def _roll_back(self, kept: int) -> None:
        """Keep the main cache up to the last accepted token (kept positions), depth k's up to kept - k."""
        for cache in self.cache:
            cache.truncate(kept)
        for k, cache in enumerate(self.mtp_caches, start=1):
            self.cached[k - 1] = max(0, min(self.cached[k - 1], kept - k))  # a prompt shorter than the depth: 0
            cache.truncate(self.cached[k - 1])
        self.n = kept

    def _count(self, passed: torch.Tensor, run: torch.Tensor, finished: torch.Tensor) -> None:
        """Add this round's drafts to the stats: depth j counts the live rows whose drafts before j passed."""
        reached = torch.cat([torch.ones_like(run[:, :1]), run[:, :-1]], dim=1).bool() & ~finished[:, None]
        for j in range(passed.size(1)):
            self.stats.drafted[j] += int(reached[:, j].sum())
            self.stats.accepted[j] += int((reached[:, j] & passed[:, j]).sum())
