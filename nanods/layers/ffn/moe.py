"""DeepSeekMoE: always-on shared experts plus top-k routed experts chosen by a pluggable router."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import nn

from nanods import registry
from nanods.config import NanoDeepSeekConfig
from nanods.errors import NanodsError
from nanods.layers.ffn.dense import MLP
from nanods.layers.ffn.experts import KERNELS, RoutedExperts
from nanods.layers.fp32 import KeepsFloat32


class MoE(KeepsFloat32):
    """y = shared(x) + sum_k w_k * expert_{i_k}(x), with (w, i) from the router.

    Any router, a plugin's too, keeps its parameters and buffers float32 under
    `model.to(torch.bfloat16)` and is called by `route` in float32 with autocast off.
    `tokens_per_expert` counts routed tokens of training forwards only (a forward recomputed by
    activation checkpointing would count twice; nanods does not recompute); the trainer reads it
    through `update_expert_bias` before each optimizer step.
    """

    @dataclass
    class Config:
        kernel: str = "auto"  # routed experts: "auto", "reference" (the definition), "loop" or "grouped_mm"

    float32_children = ("router",)

    def __init__(self, config: NanoDeepSeekConfig, layer_idx: int) -> None:
        super().__init__()
        opts = self.Config(**config.ffn_options)  # keys and types checked by the registry before building
        if opts.kernel not in KERNELS:
            raise NanodsError(f"ffn_options.kernel must be one of {', '.join(KERNELS)}, got '{opts.kernel}'")
        self.config = config
        self.router = registry.build("router", config.router, config, layer_idx)
        self.experts = RoutedExperts(config.num_experts, config.n_embd, config.moe_hidden, config.activation, opts.kernel)
        hidden = config.n_shared_experts * config.moe_hidden  # n shared experts == one MLP n times as wide
        self.shared = MLP(config.n_embd, hidden, config.activation) if config.n_shared_experts else None
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts), persistent=False)
        self.values_checked = False  # index range and distinctness cost a host sync: checked on the first call

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        weights, indices, aux = self.route(x)
        counts = self._count(indices)
        if self.training and torch.is_grad_enabled():  # training forwards only: not eval, not generation
            self.tokens_per_expert += counts
        y = self.experts(x.reshape(-1, C), weights.reshape(B * T, -1), indices.reshape(B * T, -1), counts).view(B, T, C)
        if self.shared is not None:
            y = y + self.shared(x)
        return y if aux is None else (y, aux)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(weights, indices, aux_loss or None) from the router, called as the host promises and checked.

        Every router runs with autocast off on float32 input, whatever the training dtype, so a
        plugin need not arrange it (bf16 autocast would round its gate matmul and flip near-ties).
        A float64 model routes in float64: its tests compare to ~1e-10.
        """
        routed = x.to(torch.promote_types(x.dtype, torch.float32))
        with torch.autocast(x.device.type, enabled=False):
            out = self.router(routed)
        self._check(out, (*x.shape[:2], self.config.top_k), routed.dtype)
        return out[0], out[1], out[2] if len(out) == 3 else None  # a third element of None: no aux loss

    def _check(self, out: object, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """The router's output against the contract: shapes and dtypes (free, every call), then index range
        and distinctness (one host sync, on the first eager call; later out-of-range ids show in _count)."""
        if not isinstance(out, tuple) or len(out) not in (2, 3) or not all(isinstance(t, torch.Tensor) for t in out[:2]) \
                or not (len(out) == 2 or out[2] is None or isinstance(out[2], torch.Tensor)):
            self._broken("it must return tensors (weights, indices) or (weights, indices, aux_loss)")
        weights, indices = out[0], out[1]
        if weights.shape != shape or weights.dtype != dtype:
            self._broken(f"weights must be {dtype} {shape}, got {weights.dtype} {tuple(weights.shape)}")
        if indices.shape != shape or indices.dtype != torch.int64:
            self._broken(f"indices must be torch.int64 {shape}, got {indices.dtype} {tuple(indices.shape)}")
        if len(out) == 3 and out[2] is not None and out[2].dim() != 0:
            self._broken(f"aux_loss must be a scalar, got shape {tuple(out[2].shape)}")
        if self.values_checked or torch.compiler.is_compiling():  # a graph cannot branch on values
            return
        self.values_checked = True
        E = self.config.num_experts
        repeated = (indices.sort(-1).values.diff(dim=-1) == 0).any()
        low, high, twice = torch.stack([indices.min(), indices.max(), repeated.long()]).tolist()
        if low < 0 or high >= E:
            self._broken(f"indices must be in [0, {E}), got {low}..{high}")
        if twice:
            self._broken("a token chose the same expert twice; its top_k indices must be distinct")

    def _count(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows routed to each expert (E,)."""
        E, flat = self.config.num_experts, indices.flatten()
        if torch.compiler.is_compiling():  # bincount's size depends on the values: a graph takes a fixed-size sum
            return flat.new_zeros(E).index_add_(0, flat, torch.ones_like(flat))
        counts = torch.bincount(flat, minlength=E)  # an id < 0 raises here, on every device
        if counts.numel() != E:  # an id past the last expert (the first call checked the router more closely)
            self._broken(f"indices must be in [0, {E}), got up to {counts.numel() - 1}")
        return counts

    def _broken(self, problem: str) -> NoReturn:
        c = registry.find("router", self.config.router)
        raise NanodsError(f"router '{c.name}' from package '{c.dist}' broke the contract: {problem}; "
                          f"fix the router (nanods.testing.check_component checks it) or pick another one")


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
