"""Decode step per attention layer, mla vs dsa, at contexts longer than `nanods bench --long-context` goes.

    python benchmarks/dsa_decode.py [--scale large] [--contexts 16384,32768,65536] [--compile] [--json]

The same layers and method as `nanods bench --long-context` (nanods.bench.bench_long_context: shared
MLA weights, a cache of random rows, alternating runs, index_topk 512), without the prefills, whose
O(L^2) cost makes the longest contexts take minutes there.
"""

from __future__ import annotations

import argparse
import json

import torch
from rich.console import Console
from rich.table import Table

from nanods.bench import bench_long_context, long_context_cells
from nanods.config import NanoDeepSeekConfig, preset
from nanods.device import resolve_dtype


def contexts(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated context lengths >= 2."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 2:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers >= 2, got {text!r}")
    return values


def positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="small", choices=["tiny", "small", "base", "large"])
    parser.add_argument("--contexts", default="16384,32768,65536", type=contexts, help="comma-separated lengths")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 where the CPU has native bf16 matmuls (as nanods bench)")
    parser.add_argument("--repeats", default=2, type=positive, help="timed rounds of 10 decode steps")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()
    device = torch.device("cpu")
    rows = bench_long_context(NanoDeepSeekConfig(**preset(args.scale)), device, resolve_dtype(args.dtype, device),
                              args.repeats, contexts=args.contexts, compile=args.compile, prefill=False)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"decode step per attention layer, {args.scale}, one sequence")
    for column in ("measure", "value", "note"):
        table.add_column(column)
    for cells in long_context_cells(rows):
        table.add_row(*cells)
    Console().print(table)


if __name__ == "__main__":
    main()
