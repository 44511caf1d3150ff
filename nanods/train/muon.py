"""Muon: momentum SGD whose update for each weight matrix is orthogonalised by Newton-Schulz.

Stacked expert weights (E, out, in) are orthogonalised slice by slice in one batched call,
which torch.optim.Muon (2-D only) cannot do.
"""

from __future__ import annotations

import torch

# quintic iteration coefficients tuned for fast convergence of singular values towards ~1 (Keller Jordan)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise each matrix in g (..., m, n): U S V^T -> U S' V^T with S' ~ 1."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide side: X X^T is then the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for >= 2-D hidden weights (the last two dims are the matrix; leading dims are a batch).

    The update is scaled by 0.2 * sqrt(max(m, n)) so its RMS matches AdamW's and the two can share
    learning-rate ranges (Moonshot's "Muon is scalable" convention).
    """

    def __init__(self, params, lr: float = 2e-3, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                update = newton_schulz(g, group["ns_steps"])
                scale = 0.2 * max(p.size(-2), p.size(-1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)
