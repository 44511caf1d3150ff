"""A preallocated per-layer KV cache: fixed buffers written in place, never grown by concatenation."""

from __future__ import annotations

import torch


class LayerCache:
    """Named buffers that share one sequence dimension and one fill length.

    `append(**new)` writes the new positions after the current length and returns views of
    everything cached so far; `truncate(length)` drops the positions past length.
    """

    def __init__(self, seq_dim: int, **buffers: torch.Tensor) -> None:
        self.seq_dim = seq_dim
        self.buffers = buffers
        self.length = 0

    @property
    def max_len(self) -> int:
        return next(iter(self.buffers.values())).size(self.seq_dim)

    def append(self, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        t = next(iter(new.values())).size(self.seq_dim)
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len} preallocated")
        views = []
        for name, value in new.items():
            buf = self.buffers[name]
            buf.narrow(self.seq_dim, self.length, t).copy_(value)
            views.append(buf.narrow(self.seq_dim, 0, end))
        self.length = end
        return tuple(views)

    def truncate(self, length: int) -> None:
        """Forget the positions from `length` on (speculative decoding's rollback); the buffers stay."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def nbytes(self) -> int:
        """Bytes the buffers hold (the whole preallocation)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
