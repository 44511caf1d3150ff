"""Routed experts: E feed-forward networks, and the plain loop that defines what they compute.

`reference` is the definition: for each expert, pick the tokens routed to it, run the expert on
them, add its output back weighted by the router. The other kernels (`nanods.layers.ffn.dispatch`)
compute the same sum faster; the tests compare each of them against this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanods.device import compute_dtype
from nanods.layers.ffn import dispatch
from nanods.layers.ffn.dense import activate

KERNELS = ("auto", "reference", "loop", "grouped_mm")


class RoutedExperts(nn.Module):
    """num_experts FFNs as stacked weights w_in (E, H or 2H for swiglu, C), w_out (E, C, H).

    Each expert's matrices are laid out like nn.Linear's, (out, in): F.linear takes them as they are,
    and so does CUDA's grouped matmul as its second operand, transposed as a view.
    """

    linear = staticmethod(F.linear)  # every expert projection (nanods.fast_paths may swap in a faster one)

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str, kernel: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.activation, self.kernel = num_experts, activation, kernel
        width = hidden * (2 if activation == "swiglu" else 1)
        self.w_in = nn.Parameter(torch.empty(num_experts, width, dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, dim, hidden))
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)

    def expert(self, x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """One expert's FFN, given its two matrices, on rows x."""
        return self.linear(activate(self.linear(x, w_in), self.activation), w_out)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, C); weights, indices (N, K); counts (E,) tokens per expert -> (N, C): sum_k w_k expert_{i_k}(x)."""
        kernel = pick_kernel(self.kernel, x)
        if kernel == "reference":
            return self.reference(x, weights, indices)
        if kernel == "grouped_mm":
            return dispatch.grouped(self, x, weights, indices, counts)
        return dispatch.sorted_loop(self, x, weights, indices, counts)

    def reference(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The definition, one expert at a time (summed in float32 at least, returned in the compute dtype)."""
        y = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for e in indices.unique().tolist():
            token, slot = torch.where(indices == e)  # the tokens that chose expert e, and in which of their k slots
            out = self.expert(x[token], self.w_in[e], self.w_out[e])
            y = y.index_add(0, token, (weights[token, slot].unsqueeze(-1) * out).to(y.dtype))
        return y.to(compute_dtype(x))


def pick_kernel(kernel: str, x: torch.Tensor) -> str:
    """`auto`: F.grouped_mm on CUDA GPUs with bf16 tensor cores (SM80+) in bf16; the sorted loop elsewhere.

    On CPU (torch 2.13) grouped_mm is no faster than the loop in float32 and has no float64 kernel.
    """
    if kernel != "auto":
        return kernel
    if x.is_cuda and compute_dtype(x) == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0):
        return "grouped_mm"
    return "loop"
