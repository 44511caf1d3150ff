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

Under torch.compile (`nanods.generate.compiled_decode_step`) a one-row product is written as
a multiply and a sum instead, which Inductor turns into one vectorised reduction that streams
the weight: 1.7x the compiled bf16 decode step (oneDNN's bf16 matrix-vector product reads 5-14
GB/s on the CPUs measured), about even with the split in float32. A compiled graph gives a few
rows to F.linear: it cannot time the paths, and the reduction is written for one row.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence

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
    if torch.compiler.is_compiling():  # no timing in a graph; one row: a reduction that streams the weight
        dtype = compute_dtype(x)
        return (x.to(dtype).unsqueeze(-2) * weight.to(dtype)).sum(-1) if rows == 1 else F.linear(x, weight)
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
STREAM_BYTES = 96 << 20  # weights timed from a buffer this large: past the last-level cache of most CPUs


def split_is_faster(out_features: int, in_features: int, dtype: torch.dtype, blocks: int) -> bool:
    """Whether the thread split clearly beats F.linear for one row times an (out, in) weight, timed once here.

    The two paths take turns, each call on the next of many equal weights in one large buffer, so
    that every weight comes from memory as in decoding and neither path reads what the other just
    read. Only a clear win (1.25x; 1.6-3x where BLAS runs it on one thread) takes the split, so
    that a close call cannot flip between runs: the paths round differently.
    """
    key = (out_features, in_features, dtype, blocks)
    if key not in _SPLIT_IS_FASTER:
        count = max(1, STREAM_BYTES // (out_features * in_features * dtype.itemsize))  # one: larger than the buffer
        buffer = torch.ones(count, out_features, in_features, dtype=dtype)  # written: no shared zero page
        x = torch.ones(1, in_features, dtype=dtype)
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            split, plain = _fastest([lambda w: _split(x, w, blocks), lambda w: F.linear(x, w)],
                                    (buffer[i] for i in itertools.cycle(range(count))))
        _SPLIT_IS_FASTER[key] = split * SPLIT_MARGIN < plain
    return _SPLIT_IS_FASTER[key]


def _fastest(paths: Sequence[Callable[[torch.Tensor], object]], weights: Iterator[torch.Tensor],
             runs: int = 5, calls: int = 4) -> list[float]:
    """Best seconds per call of each path over a few short runs that alternate between the paths,
    each call on the next weight, after one warm-up call each."""
    for fn in paths:
        fn(next(weights))
    best = [math.inf] * len(paths)
    for _ in range(runs):
        for i, fn in enumerate(paths):
            start = time.perf_counter()
            for _ in range(calls):
                fn(next(weights))
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return best


class Linear(nn.Linear):
    """y = x W^T (no bias: none of the model's projections has one)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
