"""Routed experts as stacked 3-D weights, run on tokens sorted by expert (dropless, deterministic).

Each expert's matrices are laid out like nn.Linear's, (out, in): the layout CUDA's grouped matmul
wants for its second operand, and the one `nanods.layers.linear` takes.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from nanods.device import compute_dtype
from nanods.layers.ffn.dense import activate
from nanods.layers.linear import linear

KERNELS = ("auto", "grouped_mm", "loop")
ROW_MULTIPLE = 64


def pick_kernel(kernel: str, x: torch.Tensor) -> str:
    """`auto`: F.grouped_mm on CUDA GPUs with bf16 tensor cores (SM80+) in bf16; a per-expert loop elsewhere.

    On CPU (torch 2.13) grouped_mm is no faster than the loop in float32 and has no float64 kernel.
    """
    if kernel != "auto":
        return kernel
    if x.is_cuda and compute_dtype(x) == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0):
        return "grouped_mm"
    return "loop"


def padded_rows(n: int, x: torch.Tensor, dtype: torch.dtype) -> int:
    """n rounded up to a multiple of ROW_MULTIPLE for bf16/fp16 matmuls on CPU, past ROW_MULTIPLE rows.

    oneDNN, which runs those, builds a kernel for each new row count (about 2 ms each, 10x the
    matmul), and each expert's row count changes every step; padded, a step reuses a few dozen.
    """
    if x.device.type != "cpu" or dtype.itemsize > 2 or n <= ROW_MULTIPLE:
        return n
    return -(-n // ROW_MULTIPLE) * ROW_MULTIPLE


class RoutedExperts(nn.Module):
    """num_experts FFNs: w_in (E, H or 2H for swiglu, C), w_out (E, C, H). Every expert is in every graph."""

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str, kernel: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.activation, self.kernel = num_experts, activation, kernel
        width = hidden * (2 if activation == "swiglu" else 1)
        self.w_in = nn.Parameter(torch.empty(num_experts, width, dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, C); weights, indices (N, K); counts (E,) tokens per expert -> (N, C)."""
        N, K = indices.shape
        kernel = pick_kernel(self.kernel, x)
        # decoding one sequence: no sorting (loop kernel only: .tolist() would add a host sync to grouped_mm's path)
        if kernel == "loop" and N == 1 and not torch.is_grad_enabled():
            return sum(weights[0, k].to(x.dtype) * self._expert(x, self.w_in[e], self.w_out[e])
                       for k, e in enumerate(indices[0].tolist()))
        dtype = compute_dtype(x)
        # one row per (token, slot), not a gather by token id: its backward would scatter-add duplicates
        pairs = x.to(dtype).unsqueeze(1).expand(N, K, x.size(-1)).reshape(N * K, -1)
        order = indices.reshape(-1).argsort(stable=True)  # pairs grouped by expert
        if kernel == "loop":
            splits = counts.tolist()  # the loop's one host sync per layer
            sizes = [padded_rows(n, x, dtype) for n in splits]
            gather, scatter = _layout(order, counts, splits, sizes)
            # each expert's whole FFN on its rows, then one cat of C-wide outputs (not of the wider hidden)
            w_in, w_out = self.w_in.to(dtype).unbind(0), self.w_out.to(dtype).unbind(0)  # one cast, one grad each
            blocks = pairs.index_select(0, gather).split(sizes)
            ys = torch.cat([self._expert(rows, w_in[e], w_out[e]) for e, rows in enumerate(blocks) if sizes[e]])
        else:
            gather, scatter = _layout(order, counts)
            ys = self._grouped(pairs.index_select(0, gather), counts)
        # index_select, not indexing: its backward (index_add) is 2-4x faster on CPU than index_put
        ys = ys.index_select(0, scatter).view(N, K, -1)  # back to (token, slot) order
        return (weights.to(ys.dtype).unsqueeze(1) @ ys).squeeze(1)  # sum_k w_k y_k as one batched matmul

    def _expert(self, x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """One expert's FFN, given its two matrices, on rows x."""
        return linear(activate(linear(x, w_in), self.activation), w_out)

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert's FFN in two F.grouped_mm calls on rows sorted by expert, counts[e] rows each."""
        dtype = compute_dtype(xs)
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.grouped_mm(xs, self.w_in.to(dtype).transpose(-2, -1), offs=offsets)
        return F.grouped_mm(activate(h, self.activation), self.w_out.to(dtype).transpose(-2, -1), offs=offsets)


def _layout(order: torch.Tensor, counts: torch.Tensor, splits: list[int] | None = None,
            sizes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each (token, slot) pair sits when expert e gets a block of sizes[e] >= splits[e] rows
    (without sizes: exactly its splits[e] = counts[e] rows).

    Returns gather (sum(sizes),): the pair each block row reads (padding rows read pair 0, and their
    outputs are dropped, so their gradient is zero), and scatter (N*K,): the block row of each pair.
    """
    pos = torch.arange(order.numel(), device=order.device)
    if sizes != splits:
        shift = [p - n for p, n in zip(itertools.accumulate(sizes, initial=0), itertools.accumulate(splits, initial=0))]
        pos = pos + torch.tensor(shift[:-1], device=order.device).repeat_interleave(counts)
        gather = torch.zeros(sum(sizes), dtype=order.dtype, device=order.device).index_copy_(0, pos, order)
    else:
        gather = order
    return gather, torch.empty_like(order).index_copy_(0, order, pos)
