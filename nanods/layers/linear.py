"""The model's linear layer: nn.Linear without bias, with a matrix-vector path that uses every CPU thread.

Decoding multiplies one row per sequence by each weight matrix. CPU BLAS runs such a
matrix-vector product on one thread, reading the weight at a fraction of memory bandwidth
(about 9 GB/s of ~40 on the 2-core machine nanods is developed on). Cutting the weight's
output rows into one block per thread and handing the blocks to a batched matmul streams them
in parallel: 2-3x faster for the large matrices of `small`, same parameters, results equal up
to float rounding. A compiled decode step (`nanods.generate.compiled_decode_step`) traces the
same split, and Inductor turns it into its own fused kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 8  # up to this many rows, batched matmul over weight blocks beats F.linear on CPU


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T -> (..., out)."""
    if x.device.type != "cpu":
        return F.linear(x, weight)
    blocks = math.gcd(_threads(), weight.size(0))  # as many equal blocks as threads allow
    rows = x.numel() // x.size(-1)
    if not 0 < rows <= FEW_ROWS or blocks < 2:
        return F.linear(x, weight)
    per_block = weight.view(blocks, -1, weight.size(1))  # (blocks, out / blocks, in): one block per thread
    columns = x.reshape(rows, -1).t()  # (in, rows) with stride (1, in): MKL's fast path (a (1, 1) stride is 5x slower)
    y = torch.bmm(per_block, columns.expand(blocks, -1, -1))  # (blocks, out / blocks, rows)
    if rows > 1:
        y = y.view(weight.size(0), rows).t().contiguous()  # row-major like F.linear's (at most 8 rows: cheap)
    return y.view(*x.shape[:-1], weight.size(0))


@torch.compiler.assume_constant_result
def _threads() -> int:
    """torch's thread count; a compiled graph keeps the value it was traced with (later changes: speed only)."""
    return torch.get_num_threads()


class Linear(nn.Linear):
    """y = x W^T (no bias: none of the model's projections has one)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
