"""The output head's cross-entropy, computed a slice of rows at a time: the full logits never exist.

For `small` the logits of one 8x256 batch are 2048 x 8192 floats (64 MiB), the largest tensor of
a step, then cast, soft-maxed, and matched by a gradient of the same size that autograd allocates
and fills. Here the forward computes, slice by slice, the loss and both gradients
(softmax - one-hot, times W for h, transposed times h for W) and keeps only those; the backward
scales them. Matmuls run in the compute dtype (autocast's, else the input's), softmax in float32
(or float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from nanods.device import compute_dtype

SLICE_ELEMENTS = 1 << 22  # logits per slice: 16 MiB in float32


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight^T against targets, rows with ignore_index left out.

    h (N, C), weight (V, C), targets (N,): equal to
    `F.cross_entropy((h @ weight.T).float(), targets, ignore_index=ignore_index)`, gradients included
    (float64 inputs: without the `.float()`).
    """
    dtype = compute_dtype(h)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, dtype)
    with torch.autocast(h.device.type, enabled=False):
        return _slices(h, weight, targets, ignore_index, dtype, grads=False)[0]


def _slices(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, dtype: torch.dtype,
            grads: bool, weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean loss, d loss / d h, d loss / d weight): gradients only with grads, the weight's also with weight_grad."""
    hc, w = h.to(dtype), weight.to(dtype)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).unsqueeze(1)
    count = valid.sum()
    softmax_dtype = torch.promote_types(dtype, torch.float32)
    total = torch.zeros((), dtype=softmax_dtype, device=h.device)
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=softmax_dtype, device=weight.device) if grads and weight_grad else None
    rows = max(1, SLICE_ELEMENTS // weight.size(0))
    for i in range(0, h.size(0), rows):
        s = slice(i, i + rows)
        logp = (hc[s] @ w.t()).log_softmax(-1, dtype=softmax_dtype)
        total -= (logp.gather(1, safe[s]).squeeze(1) * valid[s]).sum()
        if grads:
            g = logp.exp_()  # softmax, in place
            g.scatter_(1, safe[s], g.gather(1, safe[s]) - 1)  # minus the one-hot target
            g = g.mul_(valid[s].unsqueeze(1)).to(dtype)  # ignored rows: no gradient
            grad_h[s] = g @ w
            if grad_w is not None:
                grad_w += g.t() @ hc[s]
    loss = total / count  # nan without a target, as F.cross_entropy
    if not grads:
        return loss, None, None
    count = count.clamp(min=1)  # ... but zero gradients then, also as F.cross_entropy
    return loss, grad_h / count, None if grad_w is None else (grad_w / count).to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, dtype):  # noqa: ANN001, ANN205
        with torch.autocast(h.device.type, enabled=False):
            loss, grad_h, grad_w = _slices(h, weight, targets, ignore_index, dtype, grads=True,
                                           weight_grad=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, None if grad_w is None else grad_w * grad_loss, None, None, None
