"""nanods.layers.cross_entropy: the sliced head loss equals F.cross_entropy on full logits, gradients included."""

import pytest
import torch
import torch.nn.functional as F

from nanods.layers import cross_entropy
from nanods.layers.cross_entropy import linear_cross_entropy


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(cross_entropy, "SLICE_ELEMENTS", 200)  # 4 rows of 50 logits per slice: 10 slices, the last short


def _case():
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = (0.5 * torch.randn(50, 16)).requires_grad_()
    targets = torch.randint(0, 50, (37,))
    targets[[3, 10, 36]] = -1  # ignored rows
    return h, w, targets


def _loss_and_grads(fn, h, w, targets):
    loss = fn(h, w, targets)
    return (loss, *torch.autograd.grad(3 * loss, (h, w)))


def reference(h, w, targets):
    logits = h @ w.T
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, ignore_index=-1)


def test_equals_full_logits(float64, small_slices):
    h, w, targets = _case()
    for got, want in zip(_loss_and_grads(linear_cross_entropy, h, w, targets), _loss_and_grads(reference, h, w, targets)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_bf16_autocast_close_to_full_logits(small_slices):
    h, w, targets = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(linear_cross_entropy, h, w, targets)
        want = _loss_and_grads(reference, h, w, targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == h.dtype and got[2].dtype == w.dtype
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=3e-3, rtol=1e-2)


def test_no_grad_gives_the_loss_only(small_slices):
    h, w, targets = _case()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(h, w, targets).detach())
