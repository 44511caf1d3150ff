"""Opt-in CPU fast paths: the plain model's results (up to float rounding), sooner on some CPUs.

The model itself is plain: `nn.Linear` projections, `F.linear` for the routed experts, SDPA for
attention. `enabled(model)` swaps three of those calls on that model's modules for the paths
below, and puts the plain ones back on exit (one user of a model at a time: a block entered
inside another changes nothing). `nanods train`, `sample` and `bench` switch them on
(`fast_paths = false` in `[train]`/`[sample]`, or `--plain`, keeps them off); the Python API
leaves them off unless asked. Each path is chosen by a rule, so a run's output does not depend
on how busy the machine was:

- split: a projection of at most FEW_ROWS rows (decoding) on CPU runs as one batched matmul over
  one block of weight rows per thread. Some BLAS builds run a matrix-vector product on one thread
  (MKL on AMD EPYC: 2-3x faster split); others thread it already (MKL on Intel Xeon: split 2-4x
  slower). So it is taken for a weight shape only where this machine's record says it timed
  SPLIT_MARGIN faster. The first run that meets a shape times it once per CPU model, thread
  count, torch version, shape and dtype, and keeps the answer in $NANODS_CACHE/fast-paths.json;
  later runs read it. Where the record cannot be kept, no split.
- reduction: under torch.compile, a one-row projection is written as a multiply and a sum, which
  Inductor turns into one vectorised reduction that streams the weight (oneDNN's bf16
  matrix-vector product is slow on the CPUs measured).
- explicit attention: bf16 causal attention from position 0 on CPU with autograd recording (a
  training step), up to EXPLICIT_MAX_LEN positions and EXPLICIT_MAX_SCORES scores, runs as two
  batched matmuls and a softmax (SDPA's CPU kernel runs bf16 at float32 speed, forward and backward).

docs/performance.md has what each path gains, and where.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanods.atomic import atomic_write
from nanods.data import cache_dir
from nanods.device import compute_dtype
from nanods.errors import NanodsError
from nanods.layers.attention.sdpa import causal_attention
from nanods.layers.ffn.experts import RoutedExperts

FEW_ROWS = 8  # up to this many rows, the split can beat F.linear on CPU
SPLIT_MARGIN = 1.25  # how much faster the split must time to be recorded as taken
STREAM_BYTES = 96 << 20  # weights timed from a buffer this large: past the last-level cache of most CPUs
EXPLICIT_MAX_LEN = 512  # explicit attention computes the masked half too: it loses past this
EXPLICIT_MAX_SCORES = 1 << 23  # and keeps B x H x T x T scores for the backward: 16 MiB a layer in bf16
RECORD_FILE = "fast-paths.json"


@contextmanager
def enabled(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Within the block, `model` runs the fast paths (on=False: plainly); on exit, its plain calls again."""
    swapped = []
    try:
        for module in model.modules() if on else ():
            swap = _fast_call(module)
            if swap is None or swap[0] in vars(module):  # not ours to swap, or swapped by an enclosing block
                continue
            setattr(module, *swap)
            swapped.append((module, swap[0]))
        yield
    finally:
        for module, name in swapped:
            delattr(module, name)  # the class's plain one shows again


def _fast_call(module: nn.Module) -> tuple[str, Callable[..., torch.Tensor]] | None:
    """The attribute `enabled` swaps on module and its fast replacement: the same object every time,
    so that a graph torch.compile made in one block still holds in the next."""
    kind = type(module)  # subclasses that compute otherwise (LoRA, float8, ...) are left alone
    if isinstance(module, nn.Linear) and kind.forward is nn.Linear.forward and module.bias is None:
        if "_fast_forward" not in vars(module):
            module._fast_forward = functools.partial(_project_module, module)
        return "forward", module._fast_forward
    if isinstance(module, RoutedExperts) and getattr(kind, "linear", None) is F.linear:
        return "linear", project
    if getattr(type(module), "attend", None) is causal_attention:  # an attention that attends through it
        return "attend", attend
    return None


def _project_module(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return project(x, module.weight)


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), split across threads where this machine's record says so, a reduction under
    torch.compile."""
    rows = x.numel() // x.size(-1)
    if x.device.type != "cpu" or not 0 < rows <= FEW_ROWS or not weight.is_contiguous():
        return F.linear(x, weight)
    if torch.compiler.is_compiling():  # a graph: one row as a reduction that streams the weight
        dtype = compute_dtype(x)
        return (x.to(dtype).unsqueeze(-2) * weight.to(dtype)).sum(-1) if rows == 1 else F.linear(x, weight)
    blocks = split_blocks(weight.size(0))
    if blocks < 2 or not RECORD.takes_split(*weight.shape, compute_dtype(x)):
        return F.linear(x, weight)
    return split(x, weight, blocks).view(*x.shape[:-1], weight.size(0))


def split_blocks(out_features: int) -> int:
    """As many equal blocks of weight rows as the threads allow (1: no split)."""
    return math.gcd(torch.get_num_threads(), out_features)


def split(x: torch.Tensor, weight: torch.Tensor, blocks: int) -> torch.Tensor:
    """x @ weight^T as one batched matmul over `blocks` row blocks of weight -> (rows, out)."""
    rows = x.numel() // x.size(-1)
    per_block = weight.view(blocks, -1, weight.size(1))  # (blocks, out / blocks, in): one block per thread
    columns = x.reshape(rows, -1).t()  # (in, rows) with stride (1, in): MKL's fast path (a (1, 1) stride is 5x slower)
    y = torch.bmm(per_block, columns.expand(blocks, -1, -1))  # (blocks, out / blocks, rows)
    return y.view(weight.size(0), rows).t().contiguous()  # row-major like F.linear's (at most 8 rows: cheap)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, past: int) -> torch.Tensor:
    """causal_attention, explicitly for short bf16 sequences from position 0 on CPU in a training step."""
    t, s = q.size(2), k.size(2)
    if (past == 0 and q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
            and s <= EXPLICIT_MAX_LEN and q.size(0) * q.size(1) * t * s <= EXPLICIT_MAX_SCORES):
        return explicit_causal_attention(q, k, v, scale)
    return causal_attention(q, k, v, scale, past)


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * Q K^T + causal mask) V with every T x T score in memory (past 0; shapes as causal_attention's).

    The scores are rounded to bf16 before the softmax, as in Megatron's unfused attention; the
    softmax accumulates in float32. Not for fp16: CPUs without fp16 matmul units run its bmm many
    times slower, and fp16 scores can overflow.
    """
    B, H, T, D = q.shape
    Hk = k.size(1)
    group = H // Hk  # the query heads sharing a KV head become one block of rows: no K/V expansion
    future = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1).repeat(group, 1)
    k, v = k.to(q.dtype).reshape(B * Hk, T, D), v.to(q.dtype).reshape(B * Hk, T, -1)  # autocast may mix dtypes
    scores = torch.baddbmm(future, q.reshape(B * Hk, group * T, D), k.transpose(1, 2), alpha=scale)
    return (scores.softmax(dim=-1) @ v).view(B, H, T, -1)


class SplitRecord:
    """Whether to split each weight shape: decided once per process from this machine's record in the cache."""

    def __init__(self) -> None:
        self.decided: dict[tuple[int, int, torch.dtype, int], bool] = {}

    def takes_split(self, out_features: int, in_features: int, dtype: torch.dtype) -> bool:
        key = (out_features, in_features, dtype, torch.get_num_threads())
        if key not in self.decided:
            self.decided[key] = recorded_choice(out_features, in_features, dtype)
        return self.decided[key]


RECORD = SplitRecord()  # this process's decisions


def recorded_choice(out_features: int, in_features: int, dtype: torch.dtype) -> bool:
    """The split's choice for this shape from $NANODS_CACHE/fast-paths.json; timed and added when not there.
    No split where the record cannot be kept: every run would time afresh, and could choose otherwise."""
    key = f"{_machine()} | {torch.get_num_threads()} threads | {out_features}x{in_features} {dtype}"
    try:
        path = cache_dir() / RECORD_FILE
    except NanodsError:  # $NANODS_CACHE is not a folder
        return False
    record = _read_record(path)
    if key not in record:
        record[key] = time_split(out_features, in_features, dtype, split_blocks(out_features))
        try:
            atomic_write(path, json.dumps(record, indent=1, sort_keys=True).encode())
        except OSError:  # a read-only cache
            return False
    return record[key]


@functools.cache  # the CPU does not change within a process
def _machine() -> str:
    """The CPU model (the processor's name where the OS gives it) and torch's version."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} | torch {torch.__version__}"


def _read_record(path: Path) -> dict[str, bool]:
    """The recorded choices; an unreadable or malformed record counts as empty (it is only a cache)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {k: v for k, v in record.items() if isinstance(k, str) and isinstance(v, bool)}


def time_split(out_features: int, in_features: int, dtype: torch.dtype, blocks: int) -> bool:
    """Whether the split clearly beats F.linear for one row times an (out, in) weight, timed here.

    The paths take turns, each call on the next of many equal weights in one large buffer, so
    every weight comes from memory as in decoding (a weight hot in cache hid a 2.7x win) and
    neither path reads what the other just read.
    """
    count = max(1, STREAM_BYTES // (out_features * in_features * dtype.itemsize))  # one: larger than the buffer
    buffer = torch.ones(count, out_features, in_features, dtype=dtype)  # written: no shared zero page
    x = torch.ones(1, in_features, dtype=dtype)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        took_split, took_plain = _fastest([lambda w: split(x, w, blocks), lambda w: F.linear(x, w)],
                                          (buffer[i] for i in itertools.cycle(range(count))))
    return took_split * SPLIT_MARGIN < took_plain


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
