"""Parameters, active parameters and FLOPs per token: the one definition every report uses."""

from __future__ import annotations

import torch
from torch import nn

from nanods.layers.attention.mha import MultiHeadAttention
from nanods.layers.ffn.experts import RoutedExperts
from nanods.model import NanoDeepSeek

# parameter name fragment -> reporting group (first match wins)
_GROUPS = [("embed.", "embedding"), ("lm_head.", "head"), (".mtp.", "mtp"), (".ffn.router.", "routers"),
           (".ffn.experts.", "routed experts"), (".ffn.shared.", "shared experts"), (".attn.", "attention"),
           (".ffn.", "dense ffn"), ("norm", "norms")]


def _group(name: str) -> str:
    return next((g for fragment, g in _GROUPS if fragment in f".{name}"), "other")


def _inactive(model: nn.Module, mtp: bool = False) -> dict[str, float]:
    """Per parameter name: the share of it a token does not use (unchosen routed experts, and the
    MTP modules unless mtp=True: they train, but inference runs without them)."""
    cfg = model.config
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            for name, _ in module.named_parameters(prefix=prefix):
                out[name] = (cfg.num_experts - cfg.top_k) / cfg.num_experts
    for name, _ in model.named_parameters():
        if _group(name) == "mtp" and not mtp:
            out[name] = 1.0
    return out


def count_parameters(model: NanoDeepSeek) -> dict:
    """{'total', 'active', 'groups': {group: {'total', 'active'}}}; works on the meta device."""
    inactive = _inactive(model)
    groups: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():  # tied weights are listed once
        g = groups.setdefault(_group(name), {"total": 0, "active": 0})
        g["total"] += p.numel()
        g["active"] += round(p.numel() * (1 - inactive.get(name, 0.0)))
    return {"total": sum(g["total"] for g in groups.values()),
            "active": sum(g["active"] for g in groups.values()), "groups": groups}


def matmul_params_active(model: NanoDeepSeek, mtp: bool = False) -> int:
    """Active parameters that multiply activations: >= 2-D weights, lm_head in, input embedding out
    (with mtp=True, the MTP modules' too, and the head once more per MTP depth)."""
    inactive = _inactive(model, mtp)
    tied = model.config.tie_embeddings
    params = sum(round(p.numel() * (1 - inactive.get(n, 0.0))) for n, p in model.named_parameters()
                 if p.dim() >= 2 and (tied or _group(n) != "embedding"))
    return params + (len(model.mtp) * model.lm_head.weight.numel() if mtp else 0)


def flops_per_token(model: NanoDeepSeek, seq_len: int, decode: bool = False, mtp: bool = False) -> int:
    """Forward FLOPs per token at context seq_len: 2 x active matmul params + attention scores/values.

    decode=False is the training/prefill path (naive MLA), decode=True the cached path (absorbed
    MLA). Training costs 3x this, with mtp=True: the MTP modules run in training only. The
    attention term counts the full context per query (the PaLM/nanochat convention, not halved
    for causality).
    """
    blocks = list(model.blocks) + ([m.block for m in model.mtp] if mtp else [])
    attention = 0
    for block in blocks:
        term = getattr(type(block.attn), "attention_flops_per_token", MultiHeadAttention.attention_flops_per_token)
        attention += term(model.config, seq_len, decode)
    return 2 * matmul_params_active(model, mtp) + attention


def build_on_meta(config) -> NanoDeepSeek:  # noqa: ANN001 - NanoDeepSeekConfig
    """Build a model without allocating memory (for counting and inspecting)."""
    with torch.device("meta"):
        return NanoDeepSeek(config)
