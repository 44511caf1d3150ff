"""Conformance kit for component authors: call it from your own pytest.

    from nanods.testing import check_component

    def test_my_router_conforms():
        check_component("router", "my-router")

It builds tiny models around the installed component and checks DESIGN's contract: construction
(also on the meta device), shapes and dtypes, gradients, determinism under a seed, causality
(decoding with the cache equals the full forward), and that training, sampling and inspecting
work. A failure is an AssertionError that says which promise broke.
"""

from __future__ import annotations

from typing import Any

import torch

from nanods import registry
from nanods.config import NanoDeepSeekConfig
from nanods.inspect import report
from nanods.model import NanoDeepSeek

TINY = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=128, sequence_len=64, num_experts=4, top_k=2)


def tiny_config(group: str, name: str, **overrides: Any) -> NanoDeepSeekConfig:
    """A tiny config that selects `name` for `group` (routers get an MoE to live in)."""
    values = {**TINY, group: name, **({"ffn": "moe"} if group == "router" else {}), **overrides}
    return NanoDeepSeekConfig(**values)


def _build(config: NanoDeepSeekConfig, seed: int = 0) -> NanoDeepSeek:
    torch.manual_seed(seed)
    return NanoDeepSeek(config)


def _component_modules(model: NanoDeepSeek, group: str) -> list[torch.nn.Module]:
    if group == "attention":
        return [b.attn for b in model.blocks]
    if group == "ffn":
        return [b.ffn for b in model.blocks]
    return [b.ffn.router for b in model.blocks]


def check_component(group: str, name: str, **overrides: Any) -> None:
    """Run every check on the component `name` of `group` ("attention", "ffn" or "router")."""
    component = registry.find(group, name)
    who = f"{group} '{name}' from package '{component.dist}'"
    config = tiny_config(group, name, **overrides)
    with torch.device("meta"):
        NanoDeepSeek(config)  # inspect builds there

    a, b = _build(config), _build(config)
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), f"{who}: initialisation is not deterministic under torch.manual_seed ({key})"

    idx = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    _check_training(a, idx, group, who)
    torch.manual_seed(1)
    first = a.loss_terms(idx[:, :-1], idx[:, 1:]).total
    torch.manual_seed(1)
    again = a.loss_terms(idx[:, :-1], idx[:, 1:]).total
    assert torch.equal(first, again), f"{who}: the training forward is not deterministic under a seed"
    if group == "router":
        _check_router(a, config, who)
    _check_decode(a.eval(), idx, who)
    out = a.generate(idx[:, :4], 8, temperature=1.0, seed=0)
    assert out.shape == (2, 12), f"{who}: generate returned {tuple(out.shape)}"
    info = report(config)
    assert info["params_total"] == sum(p.numel() for p in a.parameters()), f"{who}: inspect miscounts parameters"
    if group == "attention":
        _check_cache_bytes(a, config, who)


def _check_training(model: NanoDeepSeek, idx: torch.Tensor, group: str, who: str) -> None:
    model.train()
    logits = model(idx)
    assert logits.shape == (*idx.shape, model.config.vocab_size), f"{who}: logits have shape {tuple(logits.shape)}"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        torch.manual_seed(step)
        loss = model(idx[:, :-1], idx[:, 1:])
        assert torch.isfinite(loss), f"{who}: the training loss is {loss.item()}"
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            for module in _component_modules(model, group):
                for pname, p in module.named_parameters():
                    assert p.grad is not None, f"{who}: parameter '{pname}' gets no gradient"
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{who}: 12 steps on one batch did not lower the loss ({losses[0]:.3f} -> {losses[-1]:.3f})"


def _check_router(model: NanoDeepSeek, config: NanoDeepSeekConfig, who: str) -> None:
    router = model.blocks[0].ffn.router
    x = torch.randn(2, 10, config.n_embd)
    for training in (True, False):
        router.train(training)
        torch.manual_seed(0)
        out = router(x)
        assert isinstance(out, tuple) and len(out) in (2, 3), f"{who}: must return (weights, indices[, aux_loss])"
        weights, indices = out[0], out[1]
        shape = (2, 10, config.top_k)
        assert weights.shape == shape and weights.dtype == torch.float32, \
            f"{who}: weights must be float32 {shape}, got {weights.dtype} {tuple(weights.shape)}"
        assert indices.shape == shape and indices.dtype == torch.int64, \
            f"{who}: indices must be int64 {shape}, got {indices.dtype} {tuple(indices.shape)}"
        assert 0 <= int(indices.min()) and int(indices.max()) < config.num_experts, f"{who}: an index is out of range"
        assert (indices.sort(-1).values.diff(dim=-1) != 0).all(), f"{who}: a token chose the same expert twice"
        if len(out) == 3:
            assert training, f"{who}: aux_loss is returned only in training mode"
            assert out[2].dim() == 0 and out[2].requires_grad, f"{who}: aux_loss must be a differentiable scalar"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router(x)[0].dtype == torch.float32, f"{who}: weights must stay float32 under bf16 autocast"
    prefix = router(x[:, :4])[1]
    assert torch.equal(router(x)[1][:, :4], prefix), f"{who}: a token's choice depends on other tokens"


def _check_decode(model: NanoDeepSeek, idx: torch.Tensor, who: str) -> None:
    with torch.no_grad():
        full = model(idx)
        cache = model.init_cache(idx.size(0), idx.size(1))
        steps = [model(idx[:, :5], cache=cache)]
        steps += [model(idx[:, t:t + 1], cache=cache, start_pos=t) for t in range(5, idx.size(1))]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4,
                               msg=lambda m: f"{who}: decoding with the cache differs from the full forward: {m}")


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor a cache object holds (attributes, and inside dicts, lists and tuples)."""
    found = []
    for value in vars(cache).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        found += [t for t in items if isinstance(t, torch.Tensor)]
    return found


def _check_cache_bytes(model: NanoDeepSeek, config: NanoDeepSeekConfig, who: str) -> None:
    cache = model.blocks[0].attn.init_cache(3, 20, torch.device("cpu"), torch.float32)
    held = sum(t.numel() * t.element_size() for t in cache_tensors(cache))
    claimed = type(model.blocks[0].attn).kv_cache_bytes_per_token(config, torch.float32) * 3 * 20
    assert held == claimed, f"{who}: kv_cache_bytes_per_token claims {claimed} bytes for 3 x 20, the cache holds {held}"
    assert hasattr(cache, "truncate"), f"{who}: the cache needs truncate(length)"
