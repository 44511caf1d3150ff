"""Conformance kit for component authors: call it from your own pytest.

    from nanods.testing import check_component

    def test_my_router_conforms():
        check_component("router", "my-router")

It builds tiny models around the installed component and checks the plugin contract
(docs/plugins.md): construction (also on the meta device), shapes and dtypes, gradients,
determinism under a seed, causality (decoding with the cache equals the full forward), that
training, sampling and inspecting work, all in float32 and again under CPU bf16 autocast (the
trainer's mode where bf16 is native). A failure is an AssertionError that says which promise
broke, or the NanodsError the MoE raises for a router output that breaks the contract; both
name the component and its package.
"""

from __future__ import annotations

import itertools
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
    if group == "router":  # its outputs first: a broken router is named before training trips over it
        _check_router(a, config, who)
    _check_training(a, idx, group, who)
    torch.manual_seed(1)
    first = a.loss_terms(idx[:, :-1], idx[:, 1:]).total
    torch.manual_seed(1)
    again = a.loss_terms(idx[:, :-1], idx[:, 1:]).total
    assert torch.equal(first, again), f"{who}: the training forward is not deterministic under a seed"
    _check_decode(a.eval(), idx, who)
    # an attention meets a dense FFN here: a bf16 near-tie that flips a router's choice is not its fault
    isolated = {"ffn": "dense"} if group == "attention" else {}
    _check_bf16(_build(tiny_config(group, name, **{**isolated, **overrides})), idx, group, who)
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
    """The router as the MoE calls it, in float32 and under bf16 autocast; `MoE.route` raises a
    NanodsError for wrong shapes or dtypes (weights float32 even under autocast), indices out of
    range or chosen twice, and an aux_loss that is not a scalar."""
    moe = model.blocks[0].ffn
    x = torch.randn(2, 10, config.n_embd)
    for training, autocast in itertools.product((True, False), (False, True)):
        moe.train(training)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            aux = moe.route(x)[2]
        if aux is not None:
            assert training, f"{who}: aux_loss is returned only in training mode"
            assert aux.requires_grad, f"{who}: aux_loss must be differentiable"
    prefix = moe.route(x[:, :4])[1]
    assert torch.equal(moe.route(x)[1][:, :4], prefix), f"{who}: a token's choice depends on other tokens"


def _check_bf16(model: NanoDeepSeek, idx: torch.Tensor, group: str, who: str) -> None:
    """Forward and backward under CPU bf16 autocast: finite outputs in the dtypes the contract allows,
    finite float32 gradients; for an attention, cached decoding equals the full forward."""
    allowed = (torch.float32,) if group == "router" else (torch.float32, torch.bfloat16)
    outputs = []
    modules = _component_modules(model, group)
    hooks = [m.register_forward_hook(lambda _m, _args, out: outputs.append(out)) for m in modules]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.train()(idx[:, :-1], idx[:, 1:])
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(loss), f"{who}: the training loss under bf16 autocast is {loss.item()}"
    for out in outputs:
        y = out[0] if isinstance(out, tuple) else out  # an attention's or FFN's y, a router's weights
        assert y.dtype in allowed, f"{who}: under bf16 autocast the output must be one of {allowed}, got {y.dtype}"
        assert torch.isfinite(y).all(), f"{who}: the output under bf16 autocast is not finite"
    loss.backward()
    for module in modules:
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), \
                f"{who}: parameter '{pname}' gets no finite {p.dtype} gradient under bf16 autocast"
    if group == "attention":
        _check_decode(model.eval(), idx, who, autocast=True)


def _check_decode(model: NanoDeepSeek, idx: torch.Tensor, who: str, autocast: bool = False) -> None:
    """Decoding with the cache equals the full forward: to 1e-4 in float32, to 2e-2 under bf16 autocast
    (bf16 keeps 8 significant bits; a causality bug moves logits by far more)."""
    tol = 2e-2 if autocast else 1e-4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        full = model(idx)
        cache = model.init_cache(idx.size(0), idx.size(1))
        steps = [model(idx[:, :5], cache=cache)]
        steps += [model(idx[:, t:t + 1], cache=cache, start_pos=t) for t in range(5, idx.size(1))]
    mode = " under bf16 autocast" if autocast else ""
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=tol, atol=tol,
                               msg=lambda m: f"{who}: decoding with the cache differs from the full forward{mode}: {m}")


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
