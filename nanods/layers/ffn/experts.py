"""Routed experts as stacked 3-D weights, run on tokens sorted by expert (dropless, deterministic).

Each expert's matrices are laid out like nn.Linear's, (out, in): the layout CUDA's grouped matmul
wants for its second operand, and the one `nanods.layers.linear` splits across CPU threads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanods.layers.ffn.dense import activate
from nanods.layers.linear import linear

KERNELS = ("auto", "grouped_mm", "loop")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's when it is on for x's device, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def pick_kernel(kernel: str, x: torch.Tensor) -> str:
    """`auto`: F.grouped_mm on CUDA GPUs with bf16 tensor cores (SM80+) in bf16; a per-expert loop elsewhere.

    On CPU (torch 2.13) grouped_mm is no faster than the loop in float32 and has no float64 kernel.
    """
    if kernel != "auto":
        return kernel
    if x.is_cuda and compute_dtype(x) == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0):
        return "grouped_mm"
    return "loop"


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
            return sum(weights[0, k].to(x.dtype) * self._expert(x, e) for k, e in enumerate(indices[0].tolist()))
        order = indices.reshape(-1).argsort(stable=True)  # (token, slot) pairs grouped by expert
        # expand instead of gathering x by token id, so the backward has no duplicate-index scatter-add
        xs = x.unsqueeze(1).expand(N, K, x.size(-1)).reshape(N * K, -1)[order]
        if kernel == "loop":
            splits = counts.tolist()  # the loop's one host sync per layer
            # each expert's whole FFN on its rows, then one cat of C-wide outputs (not of the wider hidden)
            ys = torch.cat([self._expert(rows, e) for e, rows in enumerate(xs.split(splits)) if splits[e]])
        else:
            ys = self._grouped(xs, counts)
        ys = ys * weights.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
        out = ys.new_empty(ys.shape).index_copy(0, order, ys)  # unsort: a permutation, no accumulation
        return out.view(N, K, -1).sum(dim=1)

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's FFN on rows x."""
        return linear(activate(linear(x, self.w_in[e]), self.activation), self.w_out[e])

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert's FFN in two F.grouped_mm calls on rows sorted by expert, counts[e] rows each."""
        dtype = compute_dtype(xs)
        offsets = counts.cumsum(0).to(torch.int32)
        h = F.grouped_mm(xs.to(dtype), self.w_in.to(dtype).transpose(-2, -1), offs=offsets)
        return F.grouped_mm(activate(h, self.activation), self.w_out.to(dtype).transpose(-2, -1), offs=offsets)
