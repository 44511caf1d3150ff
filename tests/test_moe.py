"""DeepSeekMoE and its routers: dispatch equals a per-token loop, balancing works, float32 routing."""

import pytest
import torch
from conftest import build, tiny_config

from nanods.errors import NanodsError
from nanods.layers.ffn.dense import activate
from nanods.layers.ffn.moe import MoE, update_expert_bias


def make_moe(seed=0, **overrides) -> MoE:
    torch.manual_seed(seed)
    return MoE(tiny_config(**overrides), 0)


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """A plain loop over tokens and their chosen experts: the definition the fast path must match."""
    weights, indices = moe.router(x)[:2]
    w_in, w_out, act = moe.experts.w_in, moe.experts.w_out, moe.config.activation
    rows = []
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            y = moe.shared(x[b, t]) if moe.shared is not None else torch.zeros_like(x[b, t])
            for k in range(indices.size(-1)):
                e = int(indices[b, t, k])
                y = y + weights[b, t, k].to(x.dtype) * (activate(x[b, t] @ w_in[e].T, act) @ w_out[e].T)
            rows.append(y)
    return torch.stack(rows).view_as(x)


def kernel_of(moe: MoE, kernel: str):
    """moe's forward with its routed experts computed by `kernel`."""
    def forward(x):
        old, moe.experts.kernel = moe.experts.kernel, kernel
        try:
            return moe(x)
        finally:
            moe.experts.kernel = old
    return forward


def _grads(module, x, fn):
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
@pytest.mark.parametrize("kernel,definition", [("reference", "token loop"), ("loop", "reference")])
def test_kernel_matches_its_definition_float64(float64, activation, router, kernel, definition):
    """The reference kernel equals a loop over tokens; the sorted loop equals the reference kernel."""
    moe = make_moe(activation=activation, router=router, ffn_options={"kernel": kernel}).eval()
    x = torch.randn(2, 7, 64)
    out, gx, gp = _grads(moe, x, moe)
    expected = (lambda x: reference_moe(moe, x)) if definition == "token loop" else kernel_of(moe, "reference")
    ref, rgx, rgp = _grads(moe, x, expected)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(gx, rgx, atol=1e-10, rtol=0)
    assert gp.keys() == rgp.keys()
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], atol=1e-10, rtol=0)


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_one_token_decode_path_matches_reference(float64, activation, monkeypatch):
    moe = make_moe(activation=activation, ffn_options={"kernel": "loop"}).eval()
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        expected = kernel_of(moe, "reference")(x)

    def no_sorting(*args, **kwargs):
        raise AssertionError("one token must not take the sorted dispatch")

    monkeypatch.setattr(torch.Tensor, "argsort", no_sorting)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), expected, atol=1e-10, rtol=0)


@pytest.mark.slow
def test_compiled_expert_counts_equal_bincount():
    moe = make_moe()
    indices = torch.tensor([[[0, 3], [3, 1], [3, 0]]])
    compiled = torch.compile(moe._count, fullgraph=True)
    torch.testing.assert_close(compiled(indices), torch.bincount(indices.flatten(), minlength=4))


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
def test_kernels_match_reference_float32(kernel):
    moe = make_moe(ffn_options={"kernel": kernel}).eval()
    x = torch.randn(3, 5, 64)
    out, gx, gp = _grads(moe, x, moe)
    ref, rgx, rgp = _grads(moe, x, kernel_of(moe, "reference"))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-4, atol=1e-5)
    for name in rgp:
        torch.testing.assert_close(gp[name], rgp[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
@pytest.mark.parametrize("cast", ["autocast", "model"])
def test_kernels_match_reference_in_bfloat16(kernel, cast):
    """Same dtype out, and the same values up to bf16 rounding, under autocast and for a bf16 model."""
    moe = make_moe(ffn_options={"kernel": kernel}).eval()
    x = torch.randn(3, 5, 64)
    if cast == "model":
        moe, x = moe.to(torch.bfloat16), x.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast == "autocast"):
        out, ref = moe(x), kernel_of(moe, "reference")(x)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_a_compiled_graph_as_the_first_call_of_a_fresh_moe():
    """The router's first-call value checks stay out of a graph (fullgraph, as the compiled decode step)."""
    moe = make_moe().eval()
    x = torch.randn(1, 1, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(moe, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(compiled, moe(x))


@pytest.mark.parametrize("kernel", ["reference", "loop", "grouped_mm"])
def test_experts_without_tokens_still_get_zero_gradients(kernel):
    moe = make_moe(ffn_options={"kernel": kernel}).train()
    moe.router.expert_bias.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))  # nobody picks experts 2 and 3
    x = torch.randn(2, 6, 64)
    moe(x).square().sum().backward()
    assert moe.tokens_per_expert[2:].sum() == 0 and moe.tokens_per_expert[:2].sum() == 2 * 6 * 2
    assert moe.experts.w_in.grad is not None
    assert moe.experts.w_in.grad[2:].abs().sum() == 0 and moe.experts.w_in.grad[:2].abs().sum() > 0


def test_update_bias_shrinks_a_skewed_load():
    moe = make_moe(bias_update_speed=0.01).train()
    with torch.no_grad():
        moe.router.weight[0] += 0.5  # expert 0 scores high for most tokens
    torch.manual_seed(1)
    x = torch.randn(8, 32, 64) + 0.5

    def imbalance() -> float:
        moe(x)
        counts = update_expert_bias(moe)[0]
        return float(counts.max() / counts.mean())

    first = imbalance()
    for _ in range(60):
        last = imbalance()
    assert first > 1.5, f"the input was meant to be skewed (max/mean {first:.2f})"
    assert last < 1.3 and last < 0.7 * first, (first, last)  # sign steps leave a small oscillation
    assert moe.router.expert_bias[0] < 0  # the overloaded expert was pushed down


def test_counts_only_training_forwards_with_grad():
    moe = make_moe()
    x = torch.randn(2, 5, 64)
    moe.eval()
    moe(x)
    moe.train()
    with torch.no_grad():
        moe(x)
    assert moe.tokens_per_expert.sum() == 0
    moe(x)
    assert moe.tokens_per_expert.sum() == 2 * 5 * moe.config.top_k
    update_expert_bias(moe)
    assert moe.tokens_per_expert.sum() == 0


def test_router_runs_in_float32_under_bf16_autocast():
    model = build(ffn="moe")
    router = model.blocks[0].ffn.router
    seen = {}
    router.register_forward_hook(lambda m, i, o: seen.update(w=o[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 128, (2, 8)))
    assert seen["w"] == torch.float32
    model.to(torch.bfloat16)
    assert router.weight.dtype == torch.float32 and router.expert_bias.dtype == torch.float32
    assert model.blocks[0].ffn.tokens_per_expert.dtype == torch.float32
    assert model.blocks[0].ffn.experts.w_in.dtype == torch.bfloat16


def test_route_norm_and_scale():
    moe = make_moe(route_scale=2.5).eval()
    weights, indices = moe.router(torch.randn(2, 5, 64))
    torch.testing.assert_close(weights.sum(-1), torch.full((2, 5), 2.5))
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts per token
    with pytest.raises(NanodsError, match="route_norm"):
        tiny_config(top_k=1, route_norm=True)


def test_group_limited_routing_stays_in_one_group():
    moe = make_moe(num_experts=8, top_k=2, n_group=4, topk_group=1).eval()
    _, indices = moe.router(torch.randn(4, 10, 64))
    assert (indices[..., 0] // 2 == indices[..., 1] // 2).all()


@pytest.mark.parametrize("router,alpha,expect", [("sigmoid", 0.0, False), ("sigmoid", 0.01, True), ("softmax", None, True)])
def test_aux_loss_returned_in_training_only(router, alpha, expect):
    moe = make_moe(router=router, aux_loss_alpha=alpha)
    x = torch.randn(2, 6, 64)
    out = moe.train()(x)
    assert isinstance(out, tuple) == expect
    if expect:
        assert out[1].requires_grad and out[1] > 0
    assert not isinstance(moe.eval()(x), tuple)


def test_model_adds_aux_loss():
    model = build(router="softmax").train()
    idx = torch.randint(0, 128, (2, 9))
    terms = model.loss_terms(idx[:, :-1], idx[:, 1:])
    assert terms.aux > 0 and torch.isclose(terms.total, terms.ce + terms.aux)


def test_broken_router_output_is_named():
    moe = make_moe()
    moe.router.forward = lambda x: (torch.ones(x.shape[0], x.shape[1], 3), torch.zeros(x.shape[0], x.shape[1], 3))
    with pytest.raises(NanodsError, match="router 'sigmoid' from package 'nanods' broke the contract"):
        moe(torch.randn(1, 2, 64))


def test_out_of_range_router_indices_are_named():
    moe = make_moe()
    moe.router.forward = lambda x: (torch.ones(*x.shape[:2], 2), torch.full((*x.shape[:2], 2), 7).long())
    with pytest.raises(NanodsError, match="router 'sigmoid' from package 'nanods' broke the contract: indices"):
        moe(torch.randn(1, 2, 64))


def test_padded_expert_blocks_match_reference(float64, monkeypatch):
    """Blocks padded past each expert's rows (as bf16 on CPU gets them) change nothing, gradients included."""
    from nanods.layers.ffn import dispatch

    monkeypatch.setattr(dispatch, "padded_rows", lambda n, x, dtype: n + 3 if n else 0)
    moe = make_moe(ffn_options={"kernel": "loop"}).eval()
    moe.router.expert_bias.copy_(torch.tensor([10.0, 0.0, -10.0, 0.0]))  # expert 2 gets no rows between padded blocks
    x = torch.randn(2, 7, 64)
    out, gx, gp = _grads(moe, x, moe)
    ref, rgx, rgp = _grads(moe, x, kernel_of(moe, "reference"))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(gx, rgx, atol=1e-10, rtol=0)
    for name in gp:
        torch.testing.assert_close(gp[name], rgp[name], atol=1e-10, rtol=0)


def test_padded_rows_only_for_half_precision_on_cpu():
    from nanods.layers.ffn.dispatch import ROW_MULTIPLE, padded_rows

    x = torch.zeros(1)
    assert padded_rows(ROW_MULTIPLE + 1, x, torch.bfloat16) == 2 * ROW_MULTIPLE
    assert padded_rows(2 * ROW_MULTIPLE, x, torch.bfloat16) == 2 * ROW_MULTIPLE
    assert padded_rows(5, x, torch.bfloat16) == 5  # few rows: few shapes, no padding
    assert padded_rows(ROW_MULTIPLE + 1, x, torch.float32) == ROW_MULTIPLE + 1
