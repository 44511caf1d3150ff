"""The optimised dispatch of routed experts: the same sum as `RoutedExperts.reference`, faster.

Both kernels sort the (token, slot) pairs by expert (a stable sort: deterministic, dropless) so
each expert reads one contiguous block of rows:
- `sorted_loop` runs each expert's FFN on its block (CPU, and any device);
- `grouped` runs every expert in two F.grouped_mm calls (CUDA, bf16).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from nanods.device import compute_dtype
from nanods.layers.ffn.dense import activate

if TYPE_CHECKING:  # experts.py calls these kernels
    from nanods.layers.ffn.experts import RoutedExperts

ROW_MULTIPLE = 64
# Up to this many tokens without gradients (decoding one sequence, or verifying its drafts), each token
# runs its own k experts: no sort, and under torch.compile the expert ids become values in the graph.
FEW_TOKENS = 4


def sorted_loop(experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                counts: torch.Tensor) -> torch.Tensor:
    """x (N, C); weights, indices (N, K); counts (E,) -> (N, C), one expert block at a time."""
    N, K = indices.shape
    if N <= FEW_TOKENS and not torch.is_grad_enabled():  # a decode step, or a speculative verify: no sorting
        return torch.cat([sum(weights[i, k].to(x.dtype) * experts.expert(x[i:i + 1], experts.w_in[e], experts.w_out[e])
                              for k, e in enumerate(ids)) for i, ids in enumerate(indices.tolist())])
    dtype = compute_dtype(x)
    splits = counts.tolist()  # the loop's one host sync per layer
    sizes = [padded_rows(n, x, dtype) for n in splits]
    gather, scatter = _layout(indices, counts, splits, sizes)
    # each expert's whole FFN on its rows, then one cat of C-wide outputs (not of the wider hidden)
    w_in, w_out = experts.w_in.to(dtype).unbind(0), experts.w_out.to(dtype).unbind(0)  # one cast, one grad each
    blocks = _pairs(x, K, dtype).index_select(0, gather).split(sizes)
    ys = torch.cat([experts.expert(rows, w_in[e], w_out[e]) for e, rows in enumerate(blocks) if sizes[e]])
    return _combine(ys, scatter, weights)


def grouped(experts: RoutedExperts, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
            counts: torch.Tensor) -> torch.Tensor:
    """As sorted_loop, with every expert's FFN in two F.grouped_mm calls (no host sync)."""
    dtype = compute_dtype(x)
    gather, scatter = _layout(indices, counts)
    offsets = counts.cumsum(0).to(torch.int32)
    xs = _pairs(x, indices.size(1), dtype).index_select(0, gather)
    h = F.grouped_mm(xs, experts.w_in.to(dtype).transpose(-2, -1), offs=offsets)
    ys = F.grouped_mm(activate(h, experts.activation), experts.w_out.to(dtype).transpose(-2, -1), offs=offsets)
    return _combine(ys, scatter, weights)


def _pairs(x: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    """(N*K, C): one row per (token, slot), not a gather by token id (its backward would scatter-add duplicates)."""
    N, C = x.shape
    return x.to(dtype).unsqueeze(1).expand(N, K, C).reshape(N * K, C)


def _combine(ys: torch.Tensor, scatter: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs back in (token, slot) order, then sum_k w_k y_k as one batched matmul -> (N, C)."""
    # index_select, not indexing: its backward (index_add) is 2-4x faster on CPU than index_put
    ys = ys.index_select(0, scatter).view(*weights.shape, -1)
    return (weights.to(ys.dtype).unsqueeze(1) @ ys).squeeze(1)


def padded_rows(n: int, x: torch.Tensor, dtype: torch.dtype) -> int:
    """n rounded up to a multiple of ROW_MULTIPLE for bf16/fp16 matmuls on CPU, past ROW_MULTIPLE rows.

    oneDNN, which runs those, builds a kernel for each new row count (about 2 ms each, 10x the
    matmul), and each expert's row count changes every step; padded, a step reuses a few dozen.
    """
    if x.device.type != "cpu" or dtype.itemsize > 2 or n <= ROW_MULTIPLE:
        return n
    return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE


def _layout(indices: torch.Tensor, counts: torch.Tensor, splits: list[int] | None = None,
            sizes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each (token, slot) pair sits when expert e gets a block of sizes[e] >= splits[e] rows
    (without sizes: exactly its splits[e] = counts[e] rows).

    Returns gather (sum(sizes),): the pair each block row reads (padding rows read pair 0, and their
    outputs are dropped, so their gradient is zero), and scatter (N*K,): the block row of each pair.
    """
    order = indices.reshape(-1).argsort(stable=True)  # pairs grouped by expert
    pos = torch.arange(order.numel(), device=order.device)
    if sizes != splits:
        shift = [p - n for p, n in zip(itertools.accumulate(sizes, initial=0), itertools.accumulate(splits, initial=0))]
        pos = pos + torch.tensor(shift[:-1], device=order.device).repeat_interleave(counts)
        gather = torch.zeros(sum(sizes), dtype=order.dtype, device=order.device).index_copy_(0, pos, order)
    else:
        gather = order
    return gather, torch.empty_like(order).index_copy_(0, order, pos)
