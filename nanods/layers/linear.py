"""The model's linear layer: nn.Linear without bias, with a thread-split path for a few rows on CPU.

Decoding multiplies one row per sequence by each weight matrix. Some CPU BLAS builds run such a
matrix-vector product on one thread (MKL on the AMD EPYC machines nanods is also developed on:
about 9 GB/s of ~40); cutting the weight's output rows into one block per thread and handing
the blocks to a batched matmul streams them in parallel, 2-3x faster there. Where BLAS already
threads it (MKL on Intel Xeon: 22 GB/s from memory, more from cache, in float32), the split is
2-4x *slower*. So the first product of each weight shape and dtype times both paths once, and
the split is kept only where it clearly wins. The results are equal up to float rounding. A
compiled decode step (`nanods.generate.compiled_decode_step`) keeps the choice made when it
was traced.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanods.device import compute_dtype

FEW_ROWS = 8  # up to this many rows, the thread split can beat F.linear on CPU


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T -> (..., out)."""
    rows = x.numel() // x.size(-1)
    if x.device.type != "cpu" or not 0 < rows <= FEW_ROWS:
        return F.linear(x, weight)
    blocks = math.gcd(_threads(), weight.size(0))  # as many equal blocks as threads allow
    if blocks < 2 or not split_is_faster(*weight.shape, compute_dtype(x), blocks):
        return F.linear(x, weight)
    return _split(x, weight, blocks).view(*x.shape[:-1], weight.size(0))


def _split(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """x @ weight^T as one batched matmul over `blocks` row blocks of weight -> (rows, out)."""
    rows = x.numel() // x.size(-1)
    per_block = weight.view(blocks, -1, weight.size(1))  # (blocks, out / blocks, in): one block per thread
    columns = x.reshape(rows, -1).t()  # (in, rows) with stride (1, in): MKL's fast path (a (1, 1) stride is 5x slower)
    y = torch.bmm(per_block, columns.expand(blocks, -1, -1))  # (blocks, out / blocks, rows)
    return y.view(weight.size(0), rows).t().contiguous()  # row-major like F.linear's (at most 8 rows: cheap)


_SPLIT_IS_FASTER: dict[tuple[int, int, torch.dtype, int], bool] = {}


@torch.compiler.assume_constant_result
def split_is_faster(out_features: int, in_features: int, dtype: torch.dtype, blocks: int) -> bool:
    """Whether the thread split clearly beats F.linear for one row times an (out, in) weight, timed once here.

    Only a clear win (1.5x; 2-3x where BLAS runs it on one thread) takes the split, so that a
    close call cannot flip between runs: the two paths round differently.
    """
    key = (out_features, in_features, dtype, blocks)
    if key not in _SPLIT_IS_FASTER:
        weight, x = torch.ones(out_features, in_features, dtype=dtype), torch.ones(1, in_features, dtype=dtype)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            split, plain = _fastest(lambda: _split(x, weight, blocks)), _fastest(lambda: F.linear(x, weight))
        _SPLIT_IS_FASTER[key] = split * 1.5 < plain
    return _SPLIT_IS_FASTER[key]


def _fastest(fn: Callable[[], object], repeats: int = 5, calls: int = 4) -> float:
    """Best seconds per call of fn over a few short runs, after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


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
