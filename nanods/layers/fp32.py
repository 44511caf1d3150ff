"""A mixin for modules whose own tensors must stay float32 whatever the model is cast to."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn


class KeepsFloat32(nn.Module):
    """`model.to(torch.bfloat16)` and friends leave this module's own parameters and buffers float32.

    Routers need this: a 1e-3 bias step vanishes in bfloat16, and a near-tie in top-k flips.
    """

    def _apply(self, fn: Any, recurse: bool = True) -> KeepsFloat32:
        super()._apply(fn, recurse)
        for t in itertools.chain(self.parameters(recurse=False), self.buffers(recurse=False)):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return self
