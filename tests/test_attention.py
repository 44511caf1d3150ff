"""causal_attention against a plain softmax(QK^T)V reference, on each of its paths."""

import pytest
import torch

from nanods.layers.attention.sdpa import causal_attention


def reference(q, k, v, scale, past):
    """Every query head against its KV head, with an explicit causal mask."""
    H, Hk = q.size(1), k.size(1)
    k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    t, s = q.size(2), k.size(2)
    scores = (q @ k.transpose(-1, -2)) * scale
    visible = torch.ones(t, s, dtype=torch.bool).tril(diagonal=past)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v


# (query heads, KV heads, key width, value width): MHA, GQA, MLA's latent MQA (values narrower than keys)
SHAPES = [(4, 4, 16, 16), (4, 2, 16, 16), (4, 1, 24, 16), (4, 4, 24, 16)]


@pytest.mark.parametrize("heads,kv_heads,dk,dv", SHAPES)
@pytest.mark.parametrize("past,t", [(0, 7), (5, 1), (5, 3)])  # prefill, one decode step, a chunk after a prefix
def test_matches_reference(float64, heads, kv_heads, dk, dv, past, t):
    q = torch.randn(2, heads, t, dk, requires_grad=True)
    k = torch.randn(2, kv_heads, past + t, dk, requires_grad=True)
    v = torch.randn(2, kv_heads, past + t, dv, requires_grad=True)
    out = causal_attention(q, k, v, 0.3, past)
    assert out.shape == (2, heads, t, dv)
    expected = reference(q, k, v, 0.3, past)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_decode_step_softmax_runs_in_float32_for_bfloat16():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 1, 9, 16)
    v = torch.randn(1, 1, 9, 8)
    out = causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.25, 8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q, k, v, 0.25, 8), atol=2e-2, rtol=2e-2)
