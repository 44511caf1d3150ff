"""A mixin for modules whose tensors must stay float32 whatever the model is cast to."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn


class KeepsFloat32(nn.Module):
    """`model.to(torch.bfloat16)` and friends leave the float32 parameters and buffers of this module,
    and of the children named in `float32_children` (whole subtrees), float32 with their values unchanged.

    Devices still move. Routers need this: a 1e-3 bias step vanishes in bfloat16, and a near-tie
    in top-k flips.
    """

    float32_children: tuple[str, ...] = ()

    def _float32_tensors(self) -> dict[str, torch.Tensor]:
        own = itertools.chain(self.named_parameters(recurse=False), self.named_buffers(recurse=False))
        subtrees = (itertools.chain(self.get_submodule(c).named_parameters(c), self.get_submodule(c).named_buffers(c))
                    for c in self.float32_children)
        return {name: t for name, t in itertools.chain(own, *subtrees) if t.dtype == torch.float32}

    def _apply(self, fn: Any, recurse: bool = True) -> KeepsFloat32:
        kept = {name: t.detach() for name, t in self._float32_tensors().items()}
        super()._apply(fn, recurse)
        for name, t in itertools.chain(self.named_parameters(), self.named_buffers()):
            # the saved values, not a round trip through the new dtype
            if name in kept and t.dtype != torch.float32:
                t.data = kept[name].to(t.device)
        return self
