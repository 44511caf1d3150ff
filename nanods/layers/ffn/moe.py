"""DeepSeekMoE: always-on shared experts plus top-k routed experts chosen by a pluggable router."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nanods import registry
from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.layers.ffn.dense import MLP
from nanods.layers.ffn.experts import KERNELS, RoutedExperts
from nanods.layers.fp32 import KeepsFloat32
from nanods.layers.routers.common import router_dtype


class MoE(KeepsFloat32):
    """y = shared(x) + sum_k w_k * expert_{i_k}(x), with (w, i) from the router.

    `tokens_per_expert` counts routed tokens of training forwards only; the trainer reads it
    through `update_expert_bias` before each optimizer step.
    """

    @dataclass
    class Config:
        kernel: str = "auto"  # routed-expert matmuls: "auto", "grouped_mm" (F.grouped_mm) or "loop"

    def __init__(self, config: NanoDeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        opts = registry.options(type(self), config.ffn_options, "[model.ffn_options]")
        if opts.kernel not in KERNELS:
            raise NanodsError(f"ffn_options.kernel must be one of {', '.join(KERNELS)}, got '{opts.kernel}'")
        self.config = config
        self.router = registry.build("router", config.router, config, layer_idx)
        self.experts = RoutedExperts(config.num_experts, config.n_embd, config.moe_hidden, config.activation, opts.kernel)
        hidden = config.n_shared_experts * config.moe_hidden  # n shared experts == one MLP n times as wide
        self.shared = MLP(config.n_embd, hidden, config.activation) if config.n_shared_experts else None
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        weights, indices, aux = self._route(x)
        counts = self._count(indices)
        # count only real training forwards: not eval, not no-grad generation, not a checkpoint recompute
        if self.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            self.tokens_per_expert += counts
        y = self.experts(x.reshape(-1, C), weights.reshape(B * T, -1), indices.reshape(B * T, -1), counts).view(B, T, C)
        if self.shared is not None:
            y = y + self.shared(x)
        return y if aux is None else (y, aux)

    def _count(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows routed to each expert (E,), checking the router's ids in eager runs."""
        E, flat = self.config.num_experts, indices.flatten()
        if torch.compiler.is_compiling():  # bincount's output size depends on the values: a graph cannot have it
            return torch.zeros(E, dtype=flat.dtype, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
        counts = torch.bincount(flat, minlength=E)
        if counts.numel() != E:  # an index >= num_experts (negative ones raise in bincount)
            self._broken(f"indices must be in [0, {E}), got up to {counts.numel() - 1}")
        return counts

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Call the router and check its output against the contract (shape and dtype checks are free)."""
        out = self.router(x)
        expected = (*x.shape[:2], self.config.top_k)
        dtype = router_dtype(x)
        problem = None
        if not isinstance(out, tuple) or len(out) not in (2, 3):
            problem = "must return (weights, indices) or (weights, indices, aux_loss)"
        elif out[0].shape != expected or out[0].dtype != dtype:
            problem = f"weights must be {dtype} {tuple(expected)}, got {out[0].dtype} {tuple(out[0].shape)}"
        elif out[1].shape != expected or out[1].dtype != torch.int64:
            problem = f"indices must be int64 {tuple(expected)}, got {out[1].dtype} {tuple(out[1].shape)}"
        if problem:
            self._broken(problem)
        return out[0], out[1], out[2] if len(out) == 3 else None

    def _broken(self, problem: str) -> None:
        c = registry.find("router", self.config.router)
        raise NanodsError(f"router '{c.name}' from package '{c.dist}' broke the contract: {problem}")


def update_expert_bias(model: nn.Module, all_reduce: Callable[[torch.Tensor], object] | None = None) -> torch.Tensor | None:
    """Auxiliary-loss-free balancing step: call before each optimizer step.

    Stacks every MoE layer's counts (L, E), lets `all_reduce` sum them in place across
    data-parallel ranks, hands each router its layer's counts, zeroes the counts, and returns
    them (for logging expert load). None when the model has no MoE layer.
    """
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        return None
    counts = torch.stack([m.tokens_per_expert for m in layers])
    if all_reduce is not None:
        all_reduce(counts)
    for layer, layer_counts in zip(layers, counts):
        if hasattr(layer.router, "update_bias"):
            layer.router.update_bias(layer_counts)
        layer.tokens_per_expert.zero_()
    return counts
