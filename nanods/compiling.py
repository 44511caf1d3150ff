"""torch.compile for decoding: one graph, dynamic sizes, and a failure as one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nanods.errors import NanodsError


def compiled(fn: Callable[..., Any], what: str) -> Callable[..., Any]:
    """fn compiled by torch.compile into one graph on its first call, with dynamic sizes (one
    compilation serves every cache length), tensor values read on the host captured as values in
    the graph (the routed expert ids), and a failed compilation as one NanodsError line."""
    graph = torch.compile(fn, dynamic=True, fullgraph=True)

    def call(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            try:
                return graph(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as e:  # many lines of compiler output otherwise
                first = next((line for line in str(e).splitlines() if line.strip()), "")
                raise NanodsError(f"torch.compile failed on {what} ({type(e).__name__}: {first[:200]}); "
                                  "run without --compile / compile=False") from e

    return call
