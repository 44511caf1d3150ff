"""Rotary embedding against the rotate-half definition, and its relative-position property."""

import warnings

import pytest
import torch

from nanods.layers.rope import Rope, apply_rope


def rotate_half_reference(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Pairs (i, i + D/2) rotated by pos * theta^(-2i/D), written out element by element."""
    D = x.size(-1)
    out = torch.empty_like(x)
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            for i in range(D // 2):
                a = float(pos[b, t]) * theta ** (-2 * i / D)
                c, s = torch.cos(torch.tensor(a, dtype=torch.float64)), torch.sin(torch.tensor(a, dtype=torch.float64))
                x1, x2 = x[b, t, :, i], x[b, t, :, i + D // 2]
                out[b, t, :, i], out[b, t, :, i + D // 2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


def test_matches_rotate_half_reference():
    x = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 7], [100, 501, 1023]])
    expected = rotate_half_reference(x, pos, 10000.0)
    torch.testing.assert_close(apply_rope(x, pos, 10000.0), expected, atol=2e-5, rtol=0)  # float32 inside


def test_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        rq = apply_rope(q, torch.tensor([[m]]), 10000.0)
        rk = apply_rope(k, torch.tensor([[n]]), 10000.0)
        return float((rq * rk).sum())

    assert abs(score(5, 2) - score(1005, 1002)) < 1e-4
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and it does depend on the offset


@pytest.mark.slow
@pytest.mark.parametrize("rope", [10000.0, Rope(500.0, factor=4.0, original_len=64, mscale=2.0)], ids=["plain", "yarn"])
def test_compiles_without_warnings_and_equals_eager(rope):
    """One graph, no Dynamo warning, equal to eager."""
    x, pos = torch.randn(2, 5, 3, 8), torch.arange(5).expand(2, 5)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(apply_rope, fullgraph=True)(x, pos, rope)
    assert not [w for w in caught if "dynamo" in str(w.message).lower() or "graph" in str(w.message).lower()]
    torch.testing.assert_close(compiled, apply_rope(x, pos, rope))
