"""The model's linear layer: nn.Linear without bias, with faster paths for a few rows on CPU.

Decoding multiplies one row per sequence by each weight matrix. Some CPU BLAS builds run such a
matrix-vector product on one thread (MKL on the AMD EPYC machines nanods is also developed on:
8-15 GB/s of 35-60); cutting the weight's output rows into one block per thread and handing the
blocks to a batched matmul streams them in parallel, 2-3x faster there. Where BLAS already
threads it (MKL on Intel Xeon: 22 GB/s from memory in float32), the split is 2-4x *slower*. So
the first product of each weight shape and dtype times both paths once, on weights streamed
from memory as in decoding (a weight hot in cache hides the difference: on a Zen 4 EPYC both
tie there, while from memory the split is 1.6-2.9x faster), and takes the split only where it
clearly wins. The results are equal up to float rounding.

Under torch.compile (`nanods.generate.compiled_decode_step`) the product is written as a
multiply and a sum instead, which Inductor turns into one vectorised reduction that streams the
weight: 1.7x the compiled bf16 decode step (oneDNN's bf16 matrix-vector product reads 5-14 GB/s
on the CPUs measured), about even with the split in float32.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence

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
    if torch.compiler.is_compiling():  # Inductor makes this one vectorised reduction that streams the weight
        return (x.unsqueeze(-2) * weight).sum(-1)
    blocks = math.gcd(torch.get_num_threads(), weight.size(0))  # as many equal blocks as threads allow
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
SPLIT_MARGIN = 1.25  # how much faster the split must time to be taken
STREAM_BYTES = 96 << 20  # weights timed from a buffer this large, past the last-level cache of common CPUs


def split_is_faster(out_features: int, in_features: int, dtype: torch.dtype, blocks: int) -> bool:
    """Whether the thread split clearly beats F.linear for one row times an (out, in) weight, timed once here.

    Each timed call reads the next of many equal weights in one large buffer, so the weights come
    from memory as they do in decoding. Only a clear win (1.25x; 1.6-3x where BLAS runs it on one
    thread) takes the split, so that a close call cannot flip between runs: the paths round differently.
    """
    key = (out_features, in_features, dtype, blocks)
    if key not in _SPLIT_IS_FASTER:
        numel = out_features * in_features
        count = max(2, STREAM_BYTES // (numel * dtype.itemsize))
        weights = torch.ones(count, out_features, in_features, dtype=dtype).unbind(0)  # written: no shared zero page
        x = torch.ones(1, in_features, dtype=dtype)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            split = _fastest(lambda weight: _split(x, weight, blocks), weights)
            plain = _fastest(lambda weight: F.linear(x, weight), weights)
        _SPLIT_IS_FASTER[key] = split * SPLIT_MARGIN < plain
    return _SPLIT_IS_FASTER[key]


def _fastest(fn: Callable[[torch.Tensor], object], weights: Sequence[torch.Tensor], runs: int = 5, calls: int = 4) -> float:
    """Best seconds per call of fn over a few short runs, each call on the next weight in turn, after one warm-up call."""
    fn(weights[-1])  # the last weight written is the one most likely still in cache
    best, turn = math.inf, itertools.cycle(weights)
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn(next(turn))
        best = min(best, (time.perf_counter() - start) / calls)
    return best


class Linear(nn.Linear):
    """y = x W^T (no bias: none of the model's projections has one)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
